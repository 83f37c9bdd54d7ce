"""Model loading (every format, refusals, errors), compatibility checks and the ONNX converter."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _archs import Flat3D, NaNNet, TinyNet
from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import (
    IncompatibleError,
    ModelError,
    ParameterError,
    TrojanscanWarning,
    UnknownFormatError,
    UnsafeModelError,
)
from trojanscan.io.models import (
    LoadedModel,
    build_arch,
    check_compatible,
    detect_format,
    load_model,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from trojanscan.io.onnx_torch import OnnxModule  # noqa: E402

SHAPE = (1, 8, 8)
# torch >= 2.10 deprecates TorchScript and the legacy ONNX exporter; we still read both
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")


def make_net(seed: int = 0, num_classes: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    net = TinyNet(SHAPE, num_classes).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.features[1].running_mean.uniform_(-0.5, 0.5)
        net.features[1].running_var.uniform_(0.5, 2.0)
    return net


def export_onnx(net: nn.Module, path: Path, *, opset: int = 17, dynamic: bool = True,
                sample: torch.Tensor | None = None) -> None:
    sample = torch.rand(2, *SHAPE) if sample is None else sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (sample,), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], opset_version=opset,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}} if dynamic else None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same network saved in every supported format."""
    d = tmp_path_factory.mktemp("models")
    net = make_net()
    x = torch.rand(2, *SHAPE)
    out = {
        "traced": d / "traced.pt", "scripted": d / "scripted.pt", "onnx": d / "net.onnx",
        "safetensors": d / "net.safetensors", "state_dict": d / "sd.pt",
        "whole": d / "whole.pt", "plain_pickle": d / "plain.pkl",
    }
    torch.jit.save(torch.jit.trace(net, x), str(out["traced"]))
    torch.jit.save(torch.jit.script(net), str(out["scripted"]))
    export_onnx(net, out["onnx"])
    save_file(net.state_dict(), str(out["safetensors"]))
    torch.save(net.state_dict(), out["state_dict"])
    torch.save(net, out["whole"])
    with open(out["plain_pickle"], "wb") as f:
        pickle.dump(net, f)
    return out


KW = {
    "traced": {}, "scripted": {}, "onnx": {},
    "safetensors": {"arch": "_archs:tiny_net"}, "state_dict": {"arch": "_archs:tiny_net"},
}
FORMAT = {"traced": "torchscript", "scripted": "torchscript", "onnx": "onnx",
          "safetensors": "safetensors", "state_dict": "state_dict"}


def _fingerprint(path: Path) -> tuple[str, int, int, list[str]]:
    st = path.stat()
    return (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns,
            sorted(p.name for p in path.parent.iterdir()))


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", list(KW))
def test_load_each_format_matches_the_network(files: dict[str, Path], name: str) -> None:
    before = _fingerprint(files[name])
    loaded = load_model(files[name], device="cpu", **KW[name])
    assert isinstance(loaded, LoadedModel)
    assert loaded.format == FORMAT[name]
    assert loaded.input_shape == SHAPE and loaded.num_classes == 4
    assert loaded.sha256 == before[0] and loaded.path == str(files[name])
    assert loaded.device == torch.device("cpu")
    assert not any(m.training for m in loaded.module.modules())
    assert loaded.converter == ("builtin" if name == "onnx" else None)
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        diff = (loaded.module(x) - make_net()(x)).abs().max().item()
    assert diff < 1e-5
    assert _fingerprint(files[name]) == before, "the user's file or folder changed"


def test_format_is_detected_from_content_not_extension(files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    cases = {"traced": "model.bin", "onnx": "model.weird", "safetensors": "weights.pt",
             "state_dict": "weights.safetensors"}
    expected = {"traced": "torchscript", "onnx": "onnx", "safetensors": "safetensors",
                "state_dict": "torch"}
    for name, new in cases.items():
        dst = tmp_path / new
        shutil.copy(files[name], dst)
        assert detect_format(dst) == expected[name], name
    loaded = load_model(tmp_path / "weights.pt", arch="_archs:tiny_net", device="cpu")
    assert loaded.format == "safetensors"
    assert load_model(tmp_path / "model.weird", device="cpu").format == "onnx"


def test_weights_with_shape_taking_factory_and_explicit_shapes(files: dict[str, Path]) -> None:
    loaded = load_model(files["safetensors"], arch="_archs:tiny_net_shaped",
                        input_shape=SHAPE, num_classes=4, device="cpu")
    assert loaded.arch == "_archs:tiny_net_shaped" and loaded.num_classes == 4
    with pytest.raises(IncompatibleError, match="7"):
        load_model(files["traced"], num_classes=7, device="cpu")


def test_builtin_arch_names_infer_the_input_shape(tmp_path: Path) -> None:
    archs = pytest.importorskip("trojanscan.archs")
    torch.manual_seed(1)
    net = archs.build("small_cnn", (1, 8, 8), 3).eval()
    path = tmp_path / "small.safetensors"
    save_file(net.state_dict(), str(path))
    x = torch.rand(4, 1, 8, 8)
    for arch in ("small_cnn", "trojanscan.archs:small_cnn"):
        loaded = load_model(path, arch=arch, device="cpu")
        assert loaded.input_shape == (1, 8, 8) and loaded.num_classes == 3
        with torch.no_grad():
            assert torch.allclose(loaded.module(x), net(x))
    given = load_model(path, arch="small_cnn", input_shape=(1, 8, 8), num_classes=3,
                       device="cpu")
    assert given.num_classes == 3
    with pytest.raises(ModelError, match="small_cnn"):
        load_model(path, arch="no_such_builtin", device="cpu")


def test_checkpoint_dicts_and_dataparallel_prefixes(tmp_path: Path) -> None:
    net = make_net()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v
                                           for k, v in net.state_dict().items()}}, path)
    loaded = load_model(path, arch="_archs:tiny_net", device="cpu")
    x = torch.rand(3, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), net(x))


# ----------------------------------------------------------------------------- pickles


@pytest.mark.parametrize("name", ["whole", "plain_pickle"])
def test_whole_pickled_module_is_refused_by_default(files: dict[str, Path], name: str) -> None:
    before = _fingerprint(files[name])
    with pytest.raises(UnsafeModelError) as info:
        load_model(files[name], device="cpu")
    msg = str(info.value)
    assert "arbitrary code" in msg and "--trust-pickle" in msg
    assert _fingerprint(files[name]) == before


@pytest.mark.parametrize("name", ["whole", "plain_pickle"])
def test_trust_pickle_loads_with_a_warning(files: dict[str, Path], name: str) -> None:
    with pytest.warns(TrojanscanWarning, match="trust-pickle"):
        loaded = load_model(files[name], trust_pickle=True, device="cpu")
    assert loaded.format == "pickle" and loaded.num_classes == 4
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), make_net()(x))


def test_trust_pickle_does_not_warn_for_plain_weights(files: dict[str, Path]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrojanscanWarning)
        loaded = load_model(files["state_dict"], arch="_archs:tiny_net", trust_pickle=True,
                            device="cpu")
    assert loaded.format == "state_dict"


# ----------------------------------------------------------------------------- bad files


def test_missing_empty_folder_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="not a file"):
        load_model(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(empty)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, I am not a model at all" * 10)
    with pytest.raises(UnknownFormatError, match="unknown model format"):
        load_model(junk)
    npz = tmp_path / "data.npz"
    np.savez(npz, x=np.zeros((2, 2)))
    with pytest.raises(UnknownFormatError, match="not a PyTorch model"):
        load_model(npz)


def test_corrupt_files_raise_model_errors(files: dict[str, Path], tmp_path: Path) -> None:
    for name, suffix in (("traced", ".pt"), ("state_dict", ".pt"), ("onnx", ".onnx"),
                         ("safetensors", ".safetensors")):
        data = files[name].read_bytes()
        bad = tmp_path / f"{name}{suffix}"
        bad.write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelError):
            load_model(bad, arch="_archs:tiny_net", device="cpu")
    garbage_onnx = tmp_path / "garbage.onnx"
    garbage_onnx.write_bytes(b"\x08\x07 definitely not protobuf \xff\xff")
    with pytest.raises(ModelError, match="ONNX"):
        load_model(garbage_onnx)
    garbage_pickle = tmp_path / "garbage.pt"
    garbage_pickle.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ModelError, match="corrupt") as info:
        load_model(garbage_pickle)
    assert not isinstance(info.value, UnsafeModelError)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(ModelError, match="not a state_dict"):
        load_model(tensor_file, arch="_archs:tiny_net")


# ----------------------------------------------------------------------------- --arch


@pytest.mark.parametrize("name", ["safetensors", "state_dict"])
def test_weights_without_arch_explain_arch(files: dict[str, Path], name: str) -> None:
    with pytest.raises(ModelError, match=r"--arch package\.module:factory"):
        load_model(files[name])


@pytest.mark.parametrize(("arch", "match"), [
    ("no_such_pkg.models:net", "cannot import module 'no_such_pkg.models'"),
    ("_archs:missing", "has no attribute 'missing'"),
    ("_archs:NOT_CALLABLE", "not callable"),
    ("_archs:returns_int", "not a torch.nn.Module"),
    ("_archs:raises", "factory exploded"),
    ("_archs:other_net", "missing keys: .*unexpected keys"),
    ("_archs:wide_head", r"shape mismatches: head.weight \(file 4×16, model 7×16\)"),
    (":tiny_net", "package.module:factory"),
])
def test_arch_errors(files: dict[str, Path], arch: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        load_model(files["safetensors"], arch=arch, device="cpu")


def test_arch_from_a_python_file(files: dict[str, Path], tmp_path: Path) -> None:
    src = Path(__file__).with_name("_archs.py")
    shutil.copy(src, tmp_path / "my_archs.py")
    loaded = load_model(files["state_dict"], arch=f"{tmp_path / 'my_archs.py'}:tiny_net",
                        device="cpu")
    assert loaded.num_classes == 4
    with pytest.raises(ModelError, match="not found"):
        build_arch(f"{tmp_path / 'absent.py'}:tiny_net")


def test_arch_is_ignored_with_a_warning_for_self_describing_formats(
        files: dict[str, Path]) -> None:
    with pytest.warns(TrojanscanWarning, match="ignored"):
        loaded = load_model(files["traced"], arch="_archs:tiny_net", device="cpu")
    assert loaded.arch is None


def test_bad_parameters(files: dict[str, Path]) -> None:
    with pytest.raises(ParameterError, match="input_shape"):
        load_model(files["traced"], input_shape=(8, 8))
    with pytest.raises(ParameterError, match="num_classes"):
        load_model(files["traced"], num_classes=0)


# ----------------------------------------------------------------------------- compatibility


def _data(shape: tuple[int, int, int] = SHAPE, classes: int = 4, n: int = 6) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return ImageDataset(torch.rand(n, *shape, generator=g), y, source="test-data")


def _loaded(module: nn.Module, shape: tuple[int, int, int] | None = None) -> LoadedModel:
    return LoadedModel(module=module, format="pickle", path="<memory>", sha256="0",
                       input_shape=shape, num_classes=None, device=torch.device("cpu"))


def test_check_compatible_fills_in_shapes(files: dict[str, Path]) -> None:
    loaded = _loaded(make_net())
    ok = check_compatible(loaded, _data())
    assert ok.input_shape == SHAPE and ok.num_classes == 4 and ok.module is loaded.module
    assert loaded.input_shape is None  # the original is left as it was
    for name in ("traced", "scripted", "onnx"):
        assert check_compatible(load_model(files[name], device="cpu"), _data()).num_classes == 4


def test_check_compatible_wrong_input_shape(files: dict[str, Path]) -> None:
    with pytest.raises(IncompatibleError, match=r"N×1×10×10"):
        check_compatible(_loaded(make_net()), _data(shape=(1, 10, 10)))
    with pytest.raises(IncompatibleError, match=r"1×8×8.*3×8×8|3×8×8.*1×8×8"):
        check_compatible(load_model(files["onnx"], device="cpu"), _data(shape=(3, 8, 8)))
    with pytest.raises(IncompatibleError, match="3×8×8"):
        check_compatible(load_model(files["traced"], device="cpu"), _data(shape=(3, 8, 8)))


def test_check_compatible_too_few_outputs() -> None:
    with pytest.raises(IncompatibleError, match=r"4 logits.*10 classes"):
        check_compatible(_loaded(make_net()), _data(classes=10, n=12))


def test_check_compatible_bad_outputs() -> None:
    with pytest.raises(IncompatibleError, match="NaN"):
        check_compatible(_loaded(NaNNet()), _data())
    with pytest.raises(IncompatibleError, match="N×K"):
        check_compatible(_loaded(Flat3D()), _data())


def test_check_compatible_restores_training_flags() -> None:
    net = make_net().train()
    before = net.features[1].running_mean.clone()
    check_compatible(_loaded(net), _data())
    assert all(m.training for m in net.modules())
    assert torch.equal(net.features[1].running_mean, before)  # ran in eval mode


# ----------------------------------------------------------------------------- ONNX converter


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _compare(model: onnx.ModelProto, shape: tuple[int, ...], *, batches: tuple[int, ...] = (3, 1)
             ) -> None:
    module = OnnxModule(model)
    rng = np.random.default_rng(0)
    for n in batches:
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        ref = _ort(model, x)
        got = module(torch.from_numpy(x)).detach().numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("opset", [11, 20])
def test_exported_network_matches_onnxruntime(tmp_path: Path, opset: int) -> None:
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.LeakyReLU(0.1),
                nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(6, 6, 3, stride=2, groups=3),
                nn.ELU(), nn.AvgPool2d(2, padding=1, count_include_pad=False))
            self.fc = nn.Linear(24, 10)
            self.out = nn.Linear(10, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x * 2 - 1)
            h = h.view(h.size(0), -1)
            return torch.softmax(self.out(nn.functional.gelu(self.fc(h))), dim=1)

    torch.manual_seed(0)
    net = Wide().eval()
    path = tmp_path / "wide.onnx"
    export_onnx(net, path, opset=opset, sample=torch.rand(2, 3, 9, 9))
    model = onnx.load(str(path))
    _compare(model, (3, 9, 9), batches=(4, 1, 7))
    x = torch.rand(3, 3, 9, 9)
    with torch.no_grad():
        assert (OnnxModule(model)(x) - net(x)).abs().max() < 1e-5


def test_static_batch_graph_runs_in_chunks(tmp_path: Path) -> None:
    net = make_net()

    class Viewed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.reshape(2, -1).reshape(2, *SHAPE))

    path = tmp_path / "static.onnx"
    export_onnx(Viewed().eval(), path, dynamic=False)
    loaded = load_model(path, device="cpu")
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        assert (loaded.module(x) - net(x)).abs().max() < 1e-5


def test_onnx_gradients_reach_the_input(files: dict[str, Path]) -> None:
    module = load_model(files["onnx"], device="cpu").module
    x = torch.rand(3, *SHAPE, requires_grad=True)
    module(x)[:, 1].sum().backward()
    ref = torch.rand(3, *SHAPE).copy_(x.detach()).requires_grad_(True)
    make_net()(ref)[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.allclose(x.grad, ref.grad, atol=1e-5)


def test_onnx_input_shape_from_graph_and_dynamic_spatial_dims() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert OnnxModule(m).input_shape is None


def test_unsupported_operators_are_listed(tmp_path: Path) -> None:
    nodes = [helper.make_node("Hardmax", ["x"], ["h"]),
             helper.make_node("LpNormalization", ["h"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "odd.onnx"
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="Hardmax, LpNormalization"):
        load_model(path)


N = helper.make_node
F32 = np.float32


def _model(opset: int, nodes: list[onnx.NodeProto], shape: tuple[int, ...],
           inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    tensors = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], tensors),
                          opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9 if opset >= 19 else 8
    return m


def _w(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def _i64(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


GRAPHS = {
    "conv_same_upper": lambda: _model(11, [N("Conv", ["x", "w", "b"], ["y"], strides=[2, 2],
                                             auto_pad="SAME_UPPER")], (2, 7, 7),
                                      {"w": _w(3, 2, 4, 4), "b": _w(3)}),
    "conv_same_lower": lambda: _model(13, [N("Conv", ["x", "w"], ["y"], strides=[2, 2],
                                             auto_pad="SAME_LOWER")], (2, 7, 7),
                                      {"w": _w(3, 2, 4, 4)}),
    "conv_asym_groups_dilation": lambda: _model(
        13, [N("Conv", ["x", "w"], ["y"], group=2, pads=[0, 1, 2, 1], dilations=[2, 1])],
        (2, 9, 9), {"w": _w(4, 1, 3, 3)}),
    "conv_transpose": lambda: _model(
        13, [N("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 0, 0],
               output_padding=[1, 1])], (2, 5, 5), {"w": _w(2, 3, 3, 3), "b": _w(3)}),
    "conv_transpose_same": lambda: _model(
        13, [N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
        (2, 5, 5), {"w": _w(2, 3, 3, 3)}),
    "gemm_alpha_beta": lambda: _model(
        13, [N("Flatten", ["x"], ["f"]),
             N("Gemm", ["f", "b", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)],
        (1, 4, 4), {"b": _w(5, 16), "c": _w(5)}),
    "gemm_trans_a": lambda: _model(
        11, [N("Flatten", ["x"], ["f"]), N("Transpose", ["f"], ["t"], perm=[1, 0]),
             N("Gemm", ["t", "b", "c"], ["y"], transA=1)], (1, 4, 4),
        {"b": _w(16, 5), "c": _w(1, 5)}),
    "matmul_add": lambda: _model(
        13, [N("GlobalAveragePool", ["x"], ["g"]), N("Flatten", ["g"], ["f"], axis=1),
             N("MatMul", ["f", "w"], ["m"]), N("Add", ["m", "b"], ["y"])], (3, 5, 5),
        {"w": _w(3, 4), "b": _w(4)}),
    "maxpool_asym_ceil": lambda: _model(
        13, [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
               pads=[0, 0, 1, 1], ceil_mode=1)], (2, 8, 8)),
    "maxpool_same": lambda: _model(
        11, [N("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
               auto_pad="SAME_UPPER")], (2, 7, 7)),
    "avgpool_exclude_pad": lambda: _model(
        13, [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])], (2, 8, 8)),
    "avgpool_asym_include_pad": lambda: _model(
        13, [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1],
               pads=[1, 0, 0, 1], count_include_pad=1)], (2, 6, 6)),
    "avgpool_asym_exclude_pad": lambda: _model(
        13, [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
               pads=[1, 0, 0, 1])], (2, 6, 6)),
    "softmax_opset11_coerced": lambda: _model(11, [N("Softmax", ["x"], ["y"], axis=1)],
                                              (2, 3, 3)),
    "softmax_opset13_axis": lambda: _model(13, [N("Softmax", ["x"], ["y"], axis=1)], (2, 3, 3)),
    "logsoftmax_opset11": lambda: _model(11, [N("LogSoftmax", ["x"], ["y"], axis=2)],
                                         (2, 3, 3)),
    "squeeze_unsqueeze_attrs": lambda: _model(
        11, [N("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
             N("Squeeze", ["m"], ["s"], axes=[2, -1]), N("Unsqueeze", ["s"], ["y"], axes=[1])],
        (2, 3, 3)),
    "squeeze_unsqueeze_inputs": lambda: _model(
        13, [N("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=1),
             N("Squeeze", ["m", "ax"], ["s"]), N("Unsqueeze", ["s", "ax1"], ["y"])],
        (2, 3, 3), {"ax": _i64(2, -1), "ax1": _i64(-1)}),
    "slice_attrs_opset9": lambda: _model(
        9, [N("Slice", ["x"], ["y"], starts=[1, -3], ends=[-1, 100], axes=[2, 3])], (2, 5, 5)),
    "slice_inputs_negative_steps": lambda: _model(
        13, [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], (2, 6, 6),
        {"st": _i64(-1, 4), "en": _i64(-1000, 0), "ax": _i64(3, 2), "sp": _i64(-2, -1)}),
    "clip_attrs_opset6": lambda: _model(6, [N("Clip", ["x"], ["y"], min=-0.2, max=0.7)],
                                        (2, 3, 3)),
    "clip_inputs_max_only": lambda: _model(12, [N("Clip", ["x", "", "hi"], ["y"])], (2, 3, 3),
                                           {"hi": np.asarray(0.3, dtype=F32)}),
    "reduce_inputs_opset18": lambda: _model(
        18, [N("ReduceMean", ["x", "a"], ["m"], keepdims=0), N("ReduceMax", ["x", "a2"], ["M"]),
             N("ReduceSum", ["M", "a"], ["s"], keepdims=0), N("Add", ["m", "s"], ["y"])],
        (2, 3, 4), {"a": _i64(1), "a2": _i64(-1)}),
    "pad_attrs_reflect_opset2": lambda: _model(
        2, [N("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect")], (2, 5, 5)),
    "pad_inputs_constant": lambda: _model(
        13, [N("Pad", ["x", "p", "v"], ["y"])], (2, 4, 4),
        {"p": _i64(0, 1, 1, 0, 0, 0, 2, 1), "v": np.asarray(0.5, dtype=F32)}),
    "pad_edge_axes_opset18": lambda: _model(
        18, [N("Pad", ["x", "p", "", "ax"], ["y"], mode="edge")], (2, 4, 4),
        {"p": _i64(1, 2, 2, 0), "ax": _i64(2, 3)}),
    "dynamic_reshape": lambda: _model(
        13, [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["n"], axis=0),
             N("Unsqueeze", ["n", "ax0"], ["n1"]), N("Concat", ["n1", "minus1"], ["shape"], axis=0),
             N("Reshape", ["x", "shape"], ["y"])], (2, 3, 3),
        {"zero": np.asarray(0, dtype=np.int64), "ax0": _i64(0), "minus1": _i64(-1)}),
    "shape_start_end_opset15": lambda: _model(
        15, [N("Shape", ["x"], ["s"], start=1, end=-1), N("Reshape", ["x", "r"], ["y"]),
             N("Identity", ["s"], ["unused"])], (2, 3, 3), {"r": _i64(0, 6, -1)}),
    "gather_negative_indices": lambda: _model(
        13, [N("Gather", ["x", "idx"], ["y"], axis=1)], (3, 2, 2), {"idx": _i64(-1, 0)}),
    "constant_of_shape": lambda: _model(
        13, [N("Shape", ["x"], ["s"]),
             N("ConstantOfShape", ["s"], ["c"],
               value=numpy_helper.from_array(np.asarray([2.0], dtype=F32))),
             N("Mul", ["x", "c"], ["y"])], (2, 3, 3)),
    "cast_and_constant": lambda: _model(
        13, [N("Constant", [], ["k"], value=numpy_helper.from_array(np.asarray(10.0, F32))),
             N("Mul", ["x", "k"], ["m"]), N("Cast", ["m"], ["i"], to=TensorProto.INT64),
             N("Cast", ["i"], ["f"], to=TensorProto.FLOAT),
             N("Constant", [], ["d"], value_float=4.0), N("Div", ["f", "d"], ["y"])], (2, 3, 3)),
    "transpose_concat_split": lambda: _model(
        13, [N("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
             N("Concat", ["x", "t"], ["c"], axis=1),
             N("Split", ["c", "sp"], ["a", "b"], axis=1), N("Sub", ["a", "b"], ["y"])],
        (2, 3, 3), {"sp": _i64(2, 2)}),
    "split_num_outputs_opset18": lambda: _model(
        18, [N("Split", ["x"], ["a", "b"], axis=2, num_outputs=2),
             N("ReduceSum", ["b", "ax"], ["s"]), N("Add", ["a", "s"], ["y"])], (2, 4, 3),
        {"ax": _i64(2)}),
    "activations": lambda: _model(
        13, [N("LeakyRelu", ["x"], ["a"], alpha=0.2), N("Elu", ["a"], ["b"], alpha=0.5),
             N("HardSigmoid", ["b"], ["c"]), N("Tanh", ["x"], ["d"]), N("Sigmoid", ["d"], ["e"]),
             N("Erf", ["e"], ["f"]), N("Abs", ["x"], ["g"]), N("Sqrt", ["g"], ["h"]),
             N("Pow", ["h", "two"], ["i"]), N("PRelu", ["x", "slope"], ["j"]),
             N("Softplus", ["j"], ["k"]), N("Sum", ["c", "f", "i", "k"], ["s"]),
             N("Max", ["s", "x"], ["m"]), N("Dropout", ["m"], ["y"])], (2, 3, 3),
        {"two": np.asarray(2.0, F32), "slope": _w(2, 1, 1)}),
    "gelu_tanh_opset20": lambda: _model(20, [N("Gelu", ["x"], ["y"], approximate="tanh")],
                                        (2, 3, 3)),
    "batchnorm_layernorm": lambda: _model(
        17, [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["n"], epsilon=1e-3),
             N("LayerNormalization", ["n", "ls", "lb"], ["y"], axis=-2)], (2, 3, 4),
        {"s": _w(2), "b": _w(2), "m": _w(2), "v": np.abs(_w(2)) + 0.5,
         "ls": _w(3, 4), "lb": _w(3, 4)}),
    "where_equal_expand": lambda: _model(
        13, [N("Greater", ["x", "zero"], ["g"]), N("Expand", ["x", "shape"], ["e"]),
             N("Where", ["g", "e", "zero"], ["y"])], (1, 3, 3),
        {"zero": np.asarray(0.0, F32), "shape": _i64(1, 2, 1, 1)}),
}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_operator_matches_onnxruntime(name: str) -> None:
    model = GRAPHS[name]()
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    _compare(model, shape)
