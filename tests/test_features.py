"""Feature extraction: the same features whatever format the network was saved in."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _archs import Explodes, NoLinear, TinyNet
from trojanscan.detectors.base import count_hooks
from trojanscan.exceptions import ModelError, ParameterError
from trojanscan.features import (
    PENULTIMATE,
    FeatureModel,
    _hierarchy_path,
    extract_features,
    forward_with_features,
    layer_names,
    logits_and_features,
)
from trojanscan.io.models import load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
SHAPE = (1, 8, 8)


def make_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet(SHAPE, 4).eval()
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-0.5, 0.5)
        net.features[1].running_var.uniform_(0.5, 2.0)
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nn.Module]:
    """One network as a plain module, traced, scripted, ONNX and safetensors + --arch."""
    d: Path = tmp_path_factory.mktemp("feat")
    net = make_net()
    x = torch.rand(2, *SHAPE)
    torch.jit.save(torch.jit.trace(net, x), str(d / "traced.pt"))
    torch.jit.save(torch.jit.script(net), str(d / "scripted.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(d / "net.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    save_file(net.state_dict(), str(d / "net.safetensors"))
    return {
        "module": net,
        "traced": load_model(d / "traced.pt", device="cpu").module,
        "scripted": load_model(d / "scripted.pt", device="cpu").module,
        "onnx": load_model(d / "net.onnx", device="cpu").module,
        "safetensors": load_model(d / "net.safetensors", arch="_archs:tiny_net",
                                  device="cpu").module,
    }


FORMATS = ["traced", "scripted", "onnx", "safetensors"]


def _inputs(n: int = 10) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(3))


def _reference_penultimate(net: TinyNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.relu(net.fc1(net.features(x).flatten(1)))


def test_penultimate_of_plain_module_is_the_input_of_the_last_linear(
        models: dict[str, nn.Module]) -> None:
    x = _inputs()
    feats = extract_features(models["module"], x)
    assert feats.shape == (10, 16) and feats.dtype == torch.float32
    assert feats.device == torch.device("cpu")
    assert torch.equal(feats, _reference_penultimate(models["module"], x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_penultimate_features_identical_across_formats(models: dict[str, nn.Module],
                                                       fmt: str) -> None:
    x = _inputs()
    ref_logits, ref = logits_and_features(models["module"], x)
    logits, feats = logits_and_features(models[fmt], x, batch_size=3)
    assert feats.shape == ref.shape == (10, 16)
    assert (feats - ref).abs().max() < 1e-5
    assert (logits - ref_logits).abs().max() < 1e-5
    assert torch.equal(extract_features(models[fmt], x, batch_size=3), feats)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("layer", "dim"), [("features.2", 4 * 8 * 8), ("features", 4 * 4 * 4),
                                            ("fc1", 16)])
def test_named_layer_features_equal_across_formats(models: dict[str, nn.Module], fmt: str,
                                                   layer: str, dim: int) -> None:
    x = _inputs(6)
    ref = extract_features(models["module"], x, layer=layer)
    got = extract_features(models[fmt], x, layer=layer)
    assert ref.shape == got.shape == (6, dim)
    assert (got - ref).abs().max() < 1e-5


@pytest.mark.parametrize("fmt", ["module", *FORMATS])
def test_feature_model_gives_gradients(models: dict[str, nn.Module], fmt: str) -> None:
    x = _inputs(4).requires_grad_(True)
    logits, feats = FeatureModel(models[fmt])(x)
    assert feats.requires_grad and feats.shape == (4, 16)
    (feats.pow(2).sum() + logits[:, 0].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    ref = _inputs(4).requires_grad_(True)
    lr, fr = forward_with_features(models["module"], ref)
    (fr.pow(2).sum() + lr[:, 0].sum()).backward()
    assert (x.grad - ref.grad).abs().max() < 1e-4


def test_batch_size_does_not_change_features(models: dict[str, nn.Module]) -> None:
    x = _inputs(11)
    for fmt in ("module", "scripted", "onnx"):
        a = extract_features(models[fmt], x, batch_size=1)
        b = extract_features(models[fmt], x, batch_size=256)
        assert (a - b).abs().max() < 1e-6


def test_no_hooks_remain_and_training_flags_are_restored() -> None:
    net = make_net().train()
    flags = [m.training for m in net.modules()]
    x = _inputs(5)
    feats = extract_features(net, x)
    eval_feats = _reference_penultimate(make_net(), x)
    assert torch.equal(feats, eval_feats)  # features come from eval mode
    assert count_hooks(net) == 0
    extract_features(net, x, layer="features.1")
    assert count_hooks(net) == 0
    assert [m.training for m in net.modules()] == flags


def test_no_hooks_remain_after_an_error() -> None:
    net = Explodes().train()
    x = torch.rand(3, *SHAPE) * 3  # values > 2 make the forward raise
    for layer in (PENULTIMATE, "fc"):
        with pytest.raises(RuntimeError, match="bad input"):
            extract_features(net, x, layer=layer)
        assert count_hooks(net) == 0
    assert net.training and net.fc.training
    assert extract_features(net, x / 3).shape == (3, 4)


def test_scripted_training_flags_restored(models: dict[str, nn.Module]) -> None:
    scripted = models["scripted"]
    scripted.train()
    try:
        extract_features(scripted, _inputs(3))
        assert all(m.training for m in scripted.modules())
    finally:
        scripted.eval()


@pytest.mark.parametrize("fmt", ["module", "traced", "onnx"])
def test_unknown_layer_lists_available_names(models: dict[str, nn.Module], fmt: str) -> None:
    with pytest.raises(ParameterError) as info:
        extract_features(models[fmt], _inputs(2), layer="no.such.layer")
    msg = str(info.value)
    assert "no.such.layer" in msg and "fc1" in msg and "penultimate" in msg


def test_layer_names() -> None:
    names = layer_names(make_net())
    assert names[:3] == ["features", "features.0", "features.1"] and "head" in names


def test_model_without_linear_needs_a_layer_name() -> None:
    net = NoLinear().eval()
    with pytest.raises(ModelError, match=r"no nn\.Linear"):
        extract_features(net, _inputs(2))
    assert count_hooks(net) == 0
    assert extract_features(net, _inputs(2), layer="body").shape == (2, 4 * 8 * 8)
    scripted = torch.jit.script(net)
    with pytest.raises(ModelError, match="penultimate"):
        extract_features(scripted, _inputs(2))
    assert torch.equal(extract_features(scripted, _inputs(2), layer="body"),
                       extract_features(net, _inputs(2), layer="body"))


def test_loaded_model_is_accepted_and_bad_arguments_rejected(tmp_path: Path) -> None:
    net = make_net()
    path = tmp_path / "w.safetensors"
    save_file(net.state_dict(), str(path))
    loaded = load_model(path, arch="_archs:tiny_net", device="cpu")
    assert torch.equal(extract_features(loaded, _inputs(3)), extract_features(net, _inputs(3)))
    with pytest.raises(ParameterError, match="batch_size"):
        extract_features(net, _inputs(3), batch_size=0)
    with pytest.raises(ParameterError, match="x"):
        extract_features(net, torch.zeros(0, *SHAPE))
    with pytest.raises(ParameterError, match="model"):
        extract_features("not a model", _inputs(3))


def test_hierarchy_path_parsing() -> None:
    assert _hierarchy_path("features(Sequential).3(Conv2d)") == "features.3"
    assert _hierarchy_path("features(Sequential).3(Conv2d).SELF(Conv2d)") == "features.3"
    assert _hierarchy_path("a(__torch__.pkg.Block).b(Linear)") == "a.b"
    assert _hierarchy_path(
        "features(Sequential).2(ReLU).UNKNOWN_INSTANCE(UNKNOWN_TYPE)") == "features.2"
    assert _hierarchy_path("") == ""


def test_onnx_module_scopes_from_dynamo_metadata() -> None:
    """Graphs from the dynamo exporter carry module paths in node metadata."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from trojanscan.io.onnx_torch import OnnxModule

    def node(op: str, ins: list[str], outs: list[str], scopes: list[str]) -> onnx.NodeProto:
        n = helper.make_node(op, ins, outs, name=f"node_{outs[0]}")
        prop = n.metadata_props.add()
        prop.key, prop.value = "pkg.torch.onnx.name_scopes", repr(scopes)
        return n

    g = torch.Generator().manual_seed(0)
    w, fc = torch.randn(2, 1, 3, 3, generator=g), torch.randn(3, 2 * 6 * 6, generator=g)
    nodes = [node("Conv", ["x", "w"], ["c"], ["", "block", "block.conv", "conv2d"]),
             node("Relu", ["c"], ["r"], ["", "block", "block.act", "relu"]),
             node("Shape", ["r"], ["s"], ["", "block", "sym_size"]),  # a side value
             node("Flatten", ["r"], ["f"], ["", "flatten"]),
             node("Gemm", ["f", "fc"], ["y"], ["", "head", "linear"])]
    nodes[-1].attribute.append(helper.make_attribute("transB", 1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w.numpy(), "w"), numpy_helper.from_array(fc.numpy(), "fc")])
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layer_names(module)[:4] == ["block", "block.conv", "block.act", "head"]
    x = _inputs(3)
    conv = torch.nn.functional.conv2d(x, w)
    assert torch.allclose(extract_features(module, x, layer="block"),
                          torch.relu(conv).flatten(1), atol=1e-6)
    assert torch.allclose(extract_features(module, x, layer="block.conv"), conv.flatten(1),
                          atol=1e-6)
    assert torch.allclose(extract_features(module, x), torch.relu(conv).flatten(1), atol=1e-6)
