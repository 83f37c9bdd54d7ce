"""RGB residual networks end to end: coloured triggers, penultimate features through
residual additions and global pooling (eager, TorchScript scripted and traced, ONNX), and
every analysing command (scan, scan-data, filter, mitigate) on a tiny quarter-width
PreAct-ResNet18 at 3×32×32.

One model is trained once for the module (a few seconds on a CPU): four classes, each a
coloured square at its own place on a noisy background, and a magenta 4×4 BadNets
patch (``color=(255,0,255)``) sending 15% of the training set to class 0.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _cli import run_cli
from trojanscan.attacks import attack_success_rate, parse_attack
from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import ParameterError
from trojanscan.features import extract_features, logits_and_features
from trojanscan.io.models import load_model
from trojanscan.training import TrainConfig, train_model

K = 4
SHAPE = (3, 32, 32)
ATTACK = "badnets:size=4,color=(255,0,255),target=0"
POISON_RATE = 0.15
#: class signals: red, green, blue, yellow 8×8 squares at four places
CLASS_COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9],
                              [0.9, 0.9, 0.1]])
#: Neural Cleanse small enough for a test (the evidence's shapes are what is checked)
NC_PARAMS = {"n_samples": 48, "batch_size": 16, "max_steps": 4, "mini_batches": 1}
SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                    .read_text())


def rgb_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` balanced RGB images 3×32×32: uniform noise in [0.2, 0.5], and the class's
    colour (with a little noise) in an 8×8 square at the class's place."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % K)[torch.randperm(n, generator=g)]
    x = 0.2 + 0.3 * torch.rand(n, *SHAPE, generator=g)
    for c in range(K):
        idx = torch.nonzero(y == c).flatten()
        r0, c0 = 6 + (c % 2) * 10, 6 + (c // 2) * 10
        noise = 0.05 * torch.randn(len(idx), 3, 8, 8, generator=g)
        x[idx, :, r0:r0 + 8, c0:c0 + 8] = CLASS_COLOURS[c].view(1, 3, 1, 1) + noise
    return x.clamp(0, 1), y


@dataclass(frozen=True)
class RGBModels:
    eager: nn.Module
    scripted: Path
    traced: Path
    onnx: Path
    train: Path           # poisoned training set (x, y)
    poison_mask: np.ndarray
    clean: Path           # labelled clean data (calibration, Neural Cleanse, mitigation)
    inputs: Path          # 40 clean then 30 triggered inputs (no labels)
    asr: float

    def model(self, fmt: str) -> Path:
        return {"torchscript": self.scripted, "traced": self.traced, "onnx": self.onnx}[fmt]


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> RGBModels:
    d = tmp_path_factory.mktemp("rgb")
    x, y = rgb_data(192, 0)
    attack = parse_attack(ATTACK)
    assert attack is not None
    poisoned = attack.poison(ImageDataset(x, y, source="rgb-train", format="npz"),
                             POISON_RATE, seed=0)
    net = train_model("preact_resnet18_narrow", poisoned.dataset, seed=0, device="cpu",
                      config=TrainConfig(epochs=4, batch_size=16, lr=3e-3)).eval()
    xc, yc = rgb_data(128, 1)
    clean = ImageDataset(xc, yc, source="rgb-clean", format="npz")
    triggered = attack.apply(xc[40:][yc[40:] != 0][:30])
    np.savez(d / "train.npz", x=poisoned.dataset.x.numpy(), y=poisoned.dataset.labels().numpy())
    np.savez(d / "clean.npz", x=xc.numpy(), y=yc.numpy())
    np.savez(d / "inputs.npz", x=torch.cat([xc[:40], triggered]).numpy())
    torch.jit.save(torch.jit.script(net), str(d / "scripted.pt"))
    torch.jit.save(torch.jit.trace(net, xc[:2]), str(d / "traced.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices
        torch.onnx.export(net, (xc[:2],), str(d / "model.onnx"), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return RGBModels(net, d / "scripted.pt", d / "traced.pt", d / "model.onnx",
                     d / "train.npz", poisoned.poison_mask, d / "clean.npz", d / "inputs.npz",
                     attack_success_rate(net, attack, clean))


def _report(out: Path) -> dict:
    doc = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def _nc_args() -> list[str]:
    return [a for k, v in NC_PARAMS.items() for a in ("--param", f"neural_cleanse.{k}={v}")]


# ----------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("spec,colour", [
    ("badnets:size=3,location=(2,5),color=(255,0,0)", (1.0, 0.0, 0.0)),
    ("badnets:size=3,location=(2,5),color=#00ff80", (0.0, 1.0, 128 / 255)),
    ("badnets:size=3,location=(2,5),color=0/0/255", (0.0, 0.0, 1.0)),
    ("badnets:size=3,location=(2,5),color=yellow", (1.0, 1.0, 0.0)),
    ("all2all:size=3,location=(2,5),color=(0.25,0.5,0.75)", (0.25, 0.5, 0.75)),
    ("source:size=3,location=(2,5),color=magenta", (1.0, 0.0, 1.0)),
])
def test_coloured_patch_sets_each_channel_as_specified(spec: str, colour: tuple) -> None:
    attack = parse_attack(spec)
    assert attack is not None and parse_attack(attack.spec) == attack
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = attack.apply(x)
    patch = out[:, :, 2:5, 5:8]
    for c in range(3):
        assert torch.allclose(patch[:, c], torch.full_like(patch[:, c], colour[c])), c
    outside = torch.ones(SHAPE[1:], dtype=torch.bool)
    outside[2:5, 5:8] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert torch.equal(x, torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0)))


def test_colour_tints_patterns_and_blends_channel_by_channel() -> None:
    x = torch.full((2, *SHAPE), 0.5)
    cb = parse_attack("badnets:size=4,location=(0,0),pattern=checkerboard,color=(0,255,0)")
    assert cb is not None
    p = cb.apply(x)[0, :, :4, :4]
    board = ((torch.arange(4).view(-1, 1) + torch.arange(4)) % 2 == 0).float()
    assert torch.equal(p[0], torch.zeros(4, 4)) and torch.equal(p[2], torch.zeros(4, 4))
    assert torch.equal(p[1], board)
    blend = parse_attack("blend:alpha=0.5,color=red")
    plain = parse_attack("blend:alpha=0.5")
    assert blend is not None and plain is not None
    tinted, untinted = blend.apply(x), plain.apply(x)
    assert torch.equal(tinted[:, 0], untinted[:, 0])        # red: the noise as it was
    assert torch.allclose(tinted[:, 1:], torch.full_like(tinted[:, 1:], 0.25))  # no noise
    grey = parse_attack("badnets:size=2,location=(0,0),color=(255,0,0)")
    assert grey is not None  # an RGB colour on one channel: its luminance
    assert torch.allclose(grey.apply(torch.zeros(1, 1, 8, 8))[0, 0, :2, :2],
                          torch.full((2, 2), 0.299))


@pytest.mark.parametrize("spec,match", [
    ("badnets:color=(1,0,0)", r"badnets\.color.*ambiguous.*\(1, 0, 0\)"),
    ("badnets:color=purple", r"badnets\.color.*red.*#rrggbb.*'purple'"),
    ("badnets:color=(300,0,0)", r"badnets\.color.*0-255.*\(300, 0, 0\)"),
    ("blend:color=(1.5,0.0,0.0)", r"blend\.color.*\[0, 1\].*1\.5"),
])
def test_bad_colours_name_the_setting(spec: str, match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        parse_attack(spec)
    with pytest.raises(ParameterError, match=r"badnets\.color.*1 or 3 values"):
        attack = parse_attack("badnets:color=(255,0)")
        assert attack is not None
        attack.apply(torch.zeros(1, *SHAPE))


def test_train_refuses_a_bad_colour_with_exit_2(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    res = run_cli(capsys, "train", "--dataset", "digits", "--attack", "badnets:color=teal",
                  "--out", str(tmp_path / "m.pt"))
    assert res.code == 2 and "badnets.color" in res.err and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("spec", [
    "badnets:size=3,color=(255,128,0),target=1", "blend:color=#ff00ff,target=1",
    "wanet:target=1", "sig:target=1"])
def test_train_makes_an_rgb_residual_model_with_each_attack(
        spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x, y = rgb_data(64, 5)
    np.savez(tmp_path / "rgb.npz", x=(x.numpy() * 255).round().astype(np.uint8), y=y.numpy())
    out = tmp_path / "m.pt"
    res = run_cli(capsys, "train", "--dataset", str(tmp_path / "rgb.npz"), "--arch",
                  "preact_resnet18_narrow", "--attack", spec, "--poison-rate", "0.1",
                  "--epochs", "1", "--batch-size", "16", "--out", str(out), "--save-data",
                  str(tmp_path / "poisoned.npz"), "-q")
    assert res.code == 0, res.err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["input_shape"] == [3, 32, 32] and meta["arch"] == "preact_resnet18_narrow"
    assert parse_attack(meta["attack"]["spec"]) == parse_attack(spec)
    assert load_model(out, device="cpu").module(torch.zeros(2, *SHAPE)).shape == (2, K)
    with np.load(tmp_path / "poisoned.npz") as f:
        xs, mask = f["x"], f["poison_mask"]
    assert mask.any() and xs.shape[1:] == SHAPE
    if spec.startswith("badnets"):  # orange, 1 px from the bottom-right corner
        patch = xs[mask][:, :, 28:31, 28:31].astype(np.float32)
        patch = patch / 255 if xs.dtype == np.uint8 else patch
        for c, value in enumerate((1.0, 128 / 255, 0.0)):
            assert np.allclose(patch[:, c], value, atol=1e-6), c


def test_the_coloured_backdoor_takes(rgb: RGBModels) -> None:
    """The fixture is a real backdoored residual model, not just a runnable one."""
    assert rgb.asr >= 0.8


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("fmt", ["torchscript", "traced", "onnx"])
def test_features_and_logits_through_residual_blocks_equal_the_eager_module(
        rgb: RGBModels, fmt: str) -> None:
    loaded = load_model(rgb.model(fmt), device="cpu").module
    x = rgb_data(20, 7)[0]
    logits0, feats0 = logits_and_features(rgb.eager, x, batch_size=8)
    logits, feats = logits_and_features(loaded, x, batch_size=8)
    assert feats0.shape == (20, 128)  # the globally pooled last stage
    assert torch.allclose(logits, logits0, atol=1e-5)
    assert torch.allclose(feats, feats0, atol=1e-5)
    # a downsampling block (residual addition with a 1×1 shortcut), its shortcut, the pooling
    for layer in ("features.3", "features.3.shortcut", "features.9"):
        ref = extract_features(rgb.eager, x, layer=layer)
        assert torch.allclose(extract_features(loaded, x, layer=layer), ref, atol=1e-5), layer


# ----------------------------------------------------------------------------- commands


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_scan_on_an_rgb_residual_model(rgb: RGBModels, fmt: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scan"
    res = run_cli(capsys, "scan", str(rgb.model(fmt)), "--data", str(rgb.clean),
                  "--detectors", "neural_cleanse,mntd", *_nc_args(), "--out", str(out), "-q")
    assert res.code in (0, 1), res.err
    doc = _report(out)
    assert res.code == (doc["verdict"] == "backdoored")
    nc = doc["detectors"]["neural_cleanse"]
    assert len(nc["l1_norms"]) == K and all(v > 0 for v in nc["l1_norms"])
    mntd = doc["detectors"]["mntd"]
    assert mntd["verdict"] == "not_applicable" and "3×32×32" in mntd["reason"]
    for label in range(K):
        mask = Image.open(out / "images" / f"neural_cleanse_mask_{label}.png")
        pattern = Image.open(out / "images" / f"neural_cleanse_pattern_{label}.png")
        assert (mask.mode, mask.size) == ("L", (32, 32))
        assert (pattern.mode, pattern.size) == ("RGB", (32, 32))


def test_neural_cleanse_masks_are_hxw_and_patterns_cxhxw(rgb: RGBModels) -> None:
    from trojanscan.detectors.neural_cleanse import NeuralCleanse, reversed_trigger

    model = load_model(rgb.scripted, device="cpu").module
    with np.load(rgb.clean) as f:
        clean = ImageDataset(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]),
                             source="clean", format="npz")
    result = NeuralCleanse(seed=0, **NC_PARAMS).fit(model, clean)
    for label in range(K):
        mask, pattern = reversed_trigger(result, label)
        assert mask.shape == (32, 32) and pattern.shape == (3, 32, 32)
        assert float(mask.min()) >= 0 and float(mask.max()) <= 1
        # the three channels of the pattern are optimised separately
        assert not torch.equal(pattern[0], pattern[1]) or not torch.equal(pattern[1],
                                                                            pattern[2])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_scan_data_runs_every_data_level_detector(rgb: RGBModels, fmt: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scan-data"
    names = ["spectral_signatures", "activation_clustering", "spectre", "scan"]
    res = run_cli(capsys, "scan-data", str(rgb.train), "--model", str(rgb.model(fmt)),
                  "--detectors", ",".join(names), "--out", str(out), "-q")
    assert res.code in (0, 1), res.err
    doc = _report(out)
    n = len(rgb.poison_mask)
    assert res.code == (doc["verdict"] == "poisoned") and doc["num_samples"] == n
    assert set(doc["detectors"]) == set(names)
    scores = np.load(out / doc["scores_file"])
    assert scores.shape == (n,) and np.isfinite(scores).all()
    for name in names:
        flagged = doc["detectors"][name]["flagged_indices"]
        assert all(0 <= i < n for i in flagged) and flagged == sorted(flagged)
    # the penultimate features of the residual net carry the poison: what Spectral
    # Signatures flags is mostly poison (15% of the samples are)
    flagged = doc["detectors"]["spectral_signatures"]["flagged_indices"]
    assert flagged and rgb.poison_mask[flagged].mean() >= 0.5


@pytest.mark.parametrize("fmt,blend", [("torchscript", "sum_clip"), ("onnx", "max")])
def test_filter_overlays_rgb_inputs(rgb: RGBModels, fmt: str, blend: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """One superimposition at a time (the default tries four: four times the time)."""
    out = tmp_path / "filter"
    res = run_cli(capsys, "filter", str(rgb.model(fmt)), str(rgb.inputs), "--calibrate",
                  str(rgb.clean), "--frr", "0.05", "--param", "n_overlays=8", "--param",
                  f"blend={blend}", "--out", str(out), "-q")
    assert res.code in (0, 1), res.err
    doc = _report(out)
    assert res.code == (doc["verdict"] == "triggered")
    assert len(doc["flagged"]) == len(doc["predictions"]) == 70
    assert res.code == any(doc["flagged"])
    scores = np.load(out / "scores.npy")
    assert scores.shape == (70,) and np.isfinite(scores).all()
    # triggered inputs are all predicted as the target, as the model was taught
    assert np.mean(np.asarray(doc["predictions"][40:]) == 0) >= 0.8


def test_mitigate_on_an_rgb_residual_model(rgb: RGBModels, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import trojanscan.detectors.neural_cleanse as nc

    # the command's Neural Cleanse, at the size of a test
    monkeypatch.setattr(nc, "NeuralCleanse", functools.partial(nc.NeuralCleanse, **NC_PARAMS))
    out, report = tmp_path / "repaired.pt", tmp_path / "mitigate"
    res = run_cli(capsys, "mitigate", str(rgb.scripted), "--data", str(rgb.clean), "--out",
                  str(out), "--report", str(report), "--unlearn-epochs", "1", "-q")
    assert res.code in (0, 1), res.err
    doc = _report(report)
    assert res.code == (doc["verdict"] == "backdoored")
    assert doc["mitigation"]["model_written"] == out.exists() == (res.code == 1)


@pytest.mark.parametrize("fmt", ["eager", "onnx"])
def test_unlearning_an_rgb_trigger_repairs_a_residual_model(rgb: RGBModels, fmt: str,
                                                            tmp_path: Path) -> None:
    """Unlearning with a C×H×W pattern and an H×W mask (the true magenta patch here) runs on
    the residual net, cuts the trigger's success and exports as TorchScript that takes any
    batch size (an ONNX model's repaired copy is traced from one sample)."""
    from trojanscan.commands.mitigate import save_torchscript
    from trojanscan.mitigation import Trigger, mitigate, split_clean

    with np.load(rgb.clean) as f:
        clean = ImageDataset(torch.from_numpy(f["x"]), torch.from_numpy(f["y"]),
                             source="clean", format="npz")
    mask = torch.zeros(32, 32)
    mask[27:31, 27:31] = 1.0
    pattern = torch.zeros(3, 32, 32)
    pattern[0] = pattern[2] = 1.0
    finetune, holdout = split_clean(clean, 0.25, 0)
    model = rgb.eager if fmt == "eager" else load_model(rgb.onnx, device="cpu").module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = mitigate(model, finetune, holdout, [Trigger(0, mask, pattern)], seed=0,
                      device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.asr_after["reversed_0"] < result.asr_before["reversed_0"]
    path = tmp_path / "repaired.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notices
        save_torchscript(result.model, clean.x[:1], path)
    again = torch.jit.load(str(path))
    for n in (1, 4, 7):
        assert torch.allclose(again(clean.x[:n]), result.model(clean.x[:n]), atol=1e-5)


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand", "Range", "Pad"])
def test_onnx_graph_asking_for_a_huge_tensor_is_refused_before_allocating(op: str) -> None:
    """A hostile graph's memory bomb is one ModelError naming the node, never an attempt
    to allocate terabytes (or an out-of-memory kill)."""
    from onnx import TensorProto, helper, numpy_helper

    from trojanscan.exceptions import ModelError
    from trojanscan.io.onnx_torch import OnnxModule

    def ints(*v: int) -> np.ndarray:
        return np.asarray(v, dtype=np.int64)

    big = 1 << 21  # 2**42 elements in two dimensions
    consts = {"shape": ints(big, big), "zero": np.asarray(0, dtype=np.int64),
              "limit": np.asarray(1 << 40, dtype=np.int64), "one": np.asarray(1, np.int64),
              "pads": ints(0, 0, big, big, 0, 0, big, big)}
    node = {
        "ConstantOfShape": helper.make_node("ConstantOfShape", ["shape"], ["c"], name="bomb"),
        "Expand": helper.make_node("Expand", ["x", "shape"], ["c"], name="bomb"),
        "Range": helper.make_node("Range", ["zero", "limit", "one"], ["c"], name="bomb"),
        "Pad": helper.make_node("Pad", ["x", "pads"], ["c"], name="bomb"),
    }[op]
    nodes = [node, helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Cast", ["s"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["x"], ["r"], keepdims=0),
             helper.make_node("Add", ["r", "f"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(ModelError, match=r"'bomb'.*more than the \d+ allowed"):
        module(torch.zeros(1, 1, 2, 2))
