"""Property tests of the model loaders on damaged files (hypothesis, deterministic).

Whatever the bytes, loading gives a model or one of our errors with a one-line message,
never another exception; a damaged ZIP member is named; the file is only read. The
last tests replay what coverage-guided fuzzing (benchmarks/fuzz/fuzz_model_loaders.py)
found.
"""

from __future__ import annotations

import io
import json
import re
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import ModelError, TrojanscanError
from trojanscan.io.models import LoadedModel, check_compatible, load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
SHAPE = (1, 4, 4)
ARCH_SOURCE = "from torch import nn\n\n\ndef tiny():\n    return nn.Sequential(nn.Flatten(), " \
              "nn.Linear(16, 3))\n"
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes | str]:
    """The tiny network in each format (bytes), and an ``--arch`` for the weights."""
    d = tmp_path_factory.mktemp("fuzz")
    (d / "tiny_arch.py").write_text(ARCH_SOURCE)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    out: dict[str, bytes | str] = {"arch": f"{d / 'tiny_arch.py'}:tiny", "dir": str(d)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buf)
        out["torchscript"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        out["state_dict"] = buf.getvalue()
        out["safetensors"] = save(net.state_dict())
        onnx_path = d / "seed.onnx"
        torch.onnx.export(net, (torch.rand(2, *SHAPE),), str(onnx_path), dynamo=False,
                          input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
        out["onnx"] = onnx_path.read_bytes()
    return out


SUFFIX = {"torchscript": ".pt", "state_dict": ".pt", "safetensors": ".safetensors",
          "onnx": ".onnx"}


def load_bytes(seeds: dict[str, bytes | str], kind: str, data: bytes) -> LoadedModel | None:
    """Load ``data`` as a file of ``kind``; None for our error (checked to be one line)."""
    path = Path(str(seeds["dir"])) / f"case{SUFFIX[kind]}"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = check_compatible(load_model(path, arch=str(seeds["arch"]), device="cpu"),
                                      ImageDataset(torch.rand(3, *SHAPE), None, source="t"))
    except TrojanscanError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        return None
    finally:
        assert path.read_bytes() == data  # only read
    return loaded


def test_seeds_load(seeds: dict[str, bytes | str]) -> None:
    for kind in SUFFIX:
        loaded = load_bytes(seeds, kind, bytes(seeds[kind]))  # type: ignore[arg-type]
        assert loaded is not None and loaded.num_classes == 3, kind


@FAST
@given(kind=st.sampled_from(sorted(SUFFIX)),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                      min_size=1, max_size=4))
def test_byte_flips_give_a_model_or_our_error(seeds: dict[str, bytes | str], kind: str,
                                              flips: list[tuple[float, int]]) -> None:
    data = bytearray(bytes(seeds[kind]))  # type: ignore[arg-type]
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    load_bytes(seeds, kind, bytes(data))


@FAST
@given(kind=st.sampled_from(sorted(SUFFIX)), keep=st.floats(0, 1, exclude_max=True))
def test_truncated_files_give_a_model_or_our_error(seeds: dict[str, bytes | str], kind: str,
                                                   keep: float) -> None:
    data = bytes(seeds[kind])  # type: ignore[arg-type]
    loaded = load_bytes(seeds, kind, data[:int(keep * len(data))])
    assert loaded is None or kind == "onnx"  # a protobuf cut at a field can still parse


def _data_start(blob: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:
                                                    info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


@FAST
@given(kind=st.sampled_from(["torchscript", "state_dict"]), pick=st.integers(0, 10**6),
       at=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flip_inside_a_member_is_a_named_crc_mismatch(
        seeds: dict[str, bytes | str], kind: str, pick: int, at: float, xor: int) -> None:
    blob = bytes(seeds[kind])  # type: ignore[arg-type]
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        members = [i for i in z.infolist() if i.compress_size > 0]
    info = members[pick % len(members)]
    data = bytearray(blob)
    data[_data_start(blob, info) + int(at * info.compress_size)] ^= xor
    path = Path(str(seeds["dir"])) / "crc.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=f"model file is corrupt: .*member {info.filename}"):
        load_model(path, arch=str(seeds["arch"]), device="cpu")


@FAST
@given(header=st.dictionaries(
    st.sampled_from(["1.weight", "1.bias", "__metadata__", "x"]),
    st.one_of(st.fixed_dictionaries({
        "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "XX"]),
        "shape": st.lists(st.integers(-2, 1 << 40), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 1 << 40), min_size=0, max_size=3)}),
        st.integers(), st.text(max_size=5)), max_size=4),
    pad=st.integers(0, 256))
def test_forged_safetensors_headers_give_a_model_or_our_error(
        seeds: dict[str, bytes | str], header: dict[str, object], pad: int) -> None:
    raw = json.dumps(header).encode()
    load_bytes(seeds, "safetensors", struct.pack("<Q", len(raw)) + raw + b"\0" * pad)


# ----------------------------------------------------------------------------- fuzz findings


def _repack(blob: bytes, member_suffix: str, edit: object) -> bytes:
    """``blob`` with one member's content edited and the ZIP re-packed (CRCs correct)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = src.read(info)
            if info.filename.endswith(member_suffix):
                content = edit(content)  # type: ignore[operator]
            dst.writestr(info, content)
    return out.getvalue()


@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl", ".debug_pkl"])
def test_fuzz_finding_pickle_string_claiming_4_gib_is_refused(
        seeds: dict[str, bytes | str], member: str) -> None:
    """A pickle string whose length field claims ~4 GiB made TorchScript's C++ unpickler
    allocate it (4.3 GB resident, killed by the fuzzer's memory limit); the pickles of a
    model ZIP are now read opcode by opcode first."""
    def claim_4_gib(content: bytes) -> bytes:
        # the first BINUNICODE (or a whole new one for the tiny constants.pkl)
        i = content.find(b"X")
        if i < 0 or member == "constants.pkl":
            return content[:2] + b"X\xff\xff\xff\xffabc" + content[2:]
        return content[:i + 1] + b"\xff\xff\xff\xff" + content[i + 5:]

    blob = _repack(bytes(seeds["torchscript"]), member, claim_4_gib)  # type: ignore[arg-type]
    path = Path(str(seeds["dir"])) / "pkl4g.pt"
    path.write_bytes(blob)
    with pytest.raises(ModelError, match=r"malformed pickle in member .*" + re.escape(member)):
        load_model(path, device="cpu")


def test_fuzz_finding_onnx_name_not_utf8_is_refused(seeds: dict[str, bytes | str]) -> None:
    """An operator name that is not UTF-8 reached the converter as ``bytes`` and raised a
    TypeError (an 'internal error' on the command line)."""
    blob = bytes(seeds["onnx"])  # type: ignore[arg-type]
    op_type = b"\x22\x07Flatten"  # NodeProto field 4 (op_type), 7 bytes
    assert blob.count(op_type) == 1
    bad = blob.replace(op_type, b"\x22\x07Fla\xff\xff\xff\xff")
    path = Path(str(seeds["dir"])) / "bad_utf8.onnx"
    path.write_bytes(bad)
    with pytest.raises(ModelError, match=r"op_type is not valid UTF-8"):
        load_model(path, device="cpu")


def _onnx_file(seeds: dict[str, bytes | str], name: str, *, nodes: list[object],
               inits: list[object]) -> Path:
    """A small ONNX model 1×4×4 → 3 written to ``name`` (the checker is not run: these
    graphs are malformed on purpose)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = Path(str(seeds["dir"])) / name
    path.write_bytes(model.SerializeToString())
    assert onnx.load(str(path)).graph.node
    return path


def _gemm_nodes(flat_out: str = "f") -> list[object]:
    from onnx import helper

    return [helper.make_node("Flatten", ["x"], [flat_out]),
            helper.make_node("Gemm", [flat_out, "W", "b"], ["y"], transB=1)]


def _init(name: str, dims: list[int], data_type: int, raw: bytes) -> object:
    from onnx import TensorProto

    t = TensorProto(name=name, dims=dims, data_type=data_type)
    t.raw_data = raw
    return t


@pytest.mark.parametrize(("data_type", "dims", "raw", "why"), [
    (1, [3, 16], b"\0" * 12, "cannot reshape"),      # data that does not fill its dims
    (0, [3, 16], b"\0" * 192, "UNDEFINED"),          # undefined element type
    (65, [3, 16], b"\0" * 192, "KeyError"),          # no such element type
])
def test_fuzz_finding_onnx_malformed_initializer_is_refused(
        seeds: dict[str, bytes | str], data_type: int, dims: list[int], raw: bytes,
        why: str) -> None:
    """numpy/onnx raised ValueError, TypeError or KeyError on these initializers (an
    'internal error' on the command line)."""
    path = _onnx_file(seeds, "bad_init.onnx", nodes=_gemm_nodes(), inits=[
        _init("W", dims, data_type, raw), _init("b", [3], 1, b"\0" * 12)])
    with pytest.raises(ModelError, match=rf"ONNX initializer 'W' is malformed .*{why}"):
        load_model(path, device="cpu")


def test_fuzz_finding_names_with_newlines_stay_on_one_line(seeds: dict[str, bytes | str]
                                                           ) -> None:
    """Value and operator names, and ZIP member names, come from the file; a newline in
    them split the one-line error message."""
    from onnx import helper

    ok_inits = [_init("W", [3, 16], 1, b"\0" * 192), _init("b", [3], 1, b"\0" * 12)]
    undefined = _onnx_file(seeds, "undef.onnx", inits=ok_inits, nodes=[
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f\nforged: line", "W", "b"], ["y"], transB=1)])
    unsupported = _onnx_file(seeds, "unsup.onnx", inits=ok_inits, nodes=[
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm\nforged: line", ["f", "W", "b"], ["y"])])
    blob = bytearray(bytes(seeds["torchscript"]))  # type: ignore[arg-type]
    central = blob.rfind(b"code/__torch__/")  # the central directory comes last
    blob[central + 5] = ord("\n")  # the central directory's copy of a member name only
    zipped = Path(str(seeds["dir"])) / "newline.pt"
    zipped.write_bytes(bytes(blob))
    for path, needle in ((undefined, "f\\nforged: line"), (unsupported, "Gemm\\nforged"),
                         (zipped, "code/\\n_torch")):
        with pytest.raises(ModelError) as info:
            load_model(path, device="cpu")
        assert "\n" not in str(info.value) and needle in str(info.value), str(info.value)
