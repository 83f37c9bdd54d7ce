"""Self-references: re-initialised copies of the suspect's architecture, trained briefly on
the defender's clean data, as Neural Cleanse's references (``scan --references auto``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import _digits, stamp_patch
from tests._cli import run_cli
from trojanscan import archs
from trojanscan.dataset import ImageDataset
from trojanscan.io.models import load_model
from trojanscan.scan import scan_model
from trojanscan.self_reference import (
    architecture_signature,
    build_self_references,
    prepare_self_references,
    reinitialise,
    train_self_references,
)
from trojanscan.training import TrainConfig, train_model

SHAPE = (1, 8, 8)
#: a short Neural Cleanse: enough on 8×8 digits, fast on CPU
NC = {"n_samples": 150, "max_steps": 60}


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 64, 10))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _forms(tmp_path: Path) -> dict[str, nn.Module]:
    net = _bn_net().eval()
    with torch.no_grad():  # non-default statistics, so that a reset shows
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].weight.uniform_(0.5, 2.0)
    x = torch.rand(2, *SHAPE)
    torch.jit.save(torch.jit.trace(net, x), str(tmp_path / "traced.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(tmp_path / "net.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return {"eager": net, "torchscript": load_model(tmp_path / "traced.pt", device="cpu").module,
            "onnx": load_model(tmp_path / "net.onnx", device="cpu").module}


@pytest.mark.parametrize("form", ["eager", "torchscript", "onnx"])
def test_reinitialise_leaves_the_suspect_untouched_and_redraws_every_weight(
        tmp_path: Path, form: str) -> None:
    suspect = _forms(tmp_path)[form]
    before = _state(suspect)
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_before = suspect(x)
    twin = reinitialise(suspect, seed=3)
    after = _state(suspect)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    with torch.no_grad():
        assert torch.equal(suspect(x), y_before)
        out = twin(x)
    assert out.shape == y_before.shape and not torch.allclose(out, y_before)
    new = dict(twin.named_parameters())
    for name, p in suspect.named_parameters():
        assert p.data_ptr() != new[name].data_ptr()
        if p.dim() >= 2:  # conv/linear: uniform within ±1/sqrt(fan_in), not the old values
            fan_in = int(np.prod(p.shape[1:]))
            assert not torch.equal(p, new[name])
            assert float(new[name].detach().abs().max()) <= 1 / fan_in ** 0.5 + 1e-6
    assert all(p.requires_grad and p.is_leaf for p in twin.parameters())  # trainable
    if form == "eager":  # norm layer back to torch's defaults, running statistics reset
        assert torch.equal(twin[1].weight, torch.ones(4))
        assert torch.equal(twin[1].bias, torch.zeros(4))
        assert torch.equal(twin[1].running_mean, torch.zeros(4))
    same = reinitialise(suspect, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(),
                                                 same.state_dict().values()))
    other = reinitialise(suspect, seed=4)
    assert not torch.equal(next(other.parameters()), next(twin.parameters()))


def test_architecture_signature_ignores_weights_but_not_shapes() -> None:
    a, b = archs.build("mlp", SHAPE, 10), archs.build("mlp", SHAPE, 10)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert architecture_signature(a) == architecture_signature(b)
    assert architecture_signature(a) != architecture_signature(archs.build("lenet", (1, 28, 28),
                                                                           10))


def _digits_sets() -> tuple[ImageDataset, ImageDataset]:
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400].sort().values, perm[1400:].sort().values
    return (ImageDataset(x[tr], y[tr], source="digits[train]", format="builtin"),
            ImageDataset(x[te], y[te], source="digits[test]", format="builtin"))


@pytest.fixture(scope="module")
def digits_mlps() -> dict[str, object]:
    """A clean and a BadNets-backdoored MLP (an architecture the fixtures' CNNs are not),
    trained on the digits training split; the test split is the defender's clean data."""
    train, test = _digits_sets()
    xp, yp = train.x.clone(), train.labels().clone()
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:140]
    xp[idx] = stamp_patch(xp[idx])
    yp[idx] = 0
    cfg = TrainConfig(epochs=20, batch_size=64, lr=2e-3)
    clean = train_model("mlp", train, config=cfg, seed=3, device="cpu")
    clean2 = train_model("mlp", train, config=cfg, seed=4, device="cpu")
    bad = train_model("mlp", train.with_data(xp, yp), config=cfg, seed=3, device="cpu")
    return {"clean": clean, "clean2": clean2, "backdoored": bad, "test": test}


def test_same_seed_same_self_references_and_accuracy_reported(digits_mlps: dict) -> None:
    test = digits_mlps["test"]
    a = train_self_references(digits_mlps["clean"], test, n=2, seed=5, budget=8000)
    b = train_self_references(digits_mlps["clean"], test, n=2, seed=5, budget=8000)
    assert len(a.models) == 2 and not a.dropped
    for ma, mb in zip(a.models, b.models):
        assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(),
                                                     mb.state_dict().values()))
    assert a.accuracies == b.accuracies and min(a.accuracies) > 0.5
    assert not torch.equal(next(a.models[0].parameters()), next(a.models[1].parameters()))


def test_untrainable_copy_is_dropped_with_its_reason(digits_mlps: dict) -> None:
    frozen = torch.jit.freeze(torch.jit.script(digits_mlps["clean"].eval()))
    refs = train_self_references(frozen, digits_mlps["test"], n=2, seed=0, budget=500)
    assert refs.models == [] and not refs.usable
    assert "no parameters" in refs.dropped[0]
    # a scan then falls back and says so
    sr = prepare_self_references(frozen, digits_mlps["test"], ["neural_cleanse"], n=2,
                                 budget=500)
    assert sr.summary["active"] is False and "not used" in sr.summary["note"]
    assert "reference" not in sr.detector_params.get("neural_cleanse", {})
    # under-trained copies (one pass over the data) are no null: dropped by the floor
    weak = train_self_references(digits_mlps["clean"], digits_mlps["test"], n=2, seed=0,
                                 budget=1)
    assert weak.models == [] and all("below the floor" in r for r in weak.dropped.values())


def test_cache_hit_for_another_model_of_the_same_architecture(digits_mlps: dict,
                                                              tmp_path: Path) -> None:
    test = digits_mlps["test"]
    first = prepare_self_references(digits_mlps["clean"], test, ["neural_cleanse"], n=2,
                                    seed=0, budget=8000, cache_dir=tmp_path,
                                    detector_params={"neural_cleanse": NC})
    assert first.summary["from_cache"] is False
    files = sorted(p.name for p in (tmp_path / first.summary["cache_key"]).iterdir())
    assert files == ["meta.json", "ref0.safetensors", "ref1.safetensors"]
    json.loads((tmp_path / first.summary["cache_key"] / "meta.json").read_text())
    second = prepare_self_references(digits_mlps["clean2"], test, ["neural_cleanse"], n=2,
                                     seed=0, budget=8000, cache_dir=tmp_path,
                                     detector_params={"neural_cleanse": NC})
    assert second.summary["from_cache"] is True
    assert second.summary["cache_key"] == first.summary["cache_key"]
    assert second.summary["accuracies"] == first.summary["accuracies"]
    np.testing.assert_array_equal(second.detector_params["neural_cleanse"]["reference"],
                                  first.detector_params["neural_cleanse"]["reference"])
    # the cached copies are the trained ones: same outputs as freshly built
    refs, _ = build_self_references(digits_mlps["clean"], test, n=2, seed=0, budget=8000,
                                    cache_dir=tmp_path)
    fresh, _ = build_self_references(digits_mlps["clean"], test, n=2, seed=0, budget=8000)
    assert refs.cached and not fresh.cached
    with torch.no_grad():
        assert torch.equal(refs.models[0](test.x[:8]), fresh.models[0](test.x[:8]))


def test_clean_unlike_architecture_stays_clean_and_backdoor_is_still_found(
        digits_mlps: dict) -> None:
    test = digits_mlps["test"]
    verdicts = {}
    for name in ("clean", "backdoored"):
        sr = prepare_self_references(digits_mlps[name], test, ["neural_cleanse"], n=3,
                                     seed=0, budget=8000,
                                     detector_params={"neural_cleanse": NC})
        assert sr.summary["active"] and sr.summary["used"] == 3
        assert sr.summary["applied_to"] == ["neural_cleanse"]
        assert len(sr.clean) < len(test)  # the detectors read the held-out half
        r = scan_model(digits_mlps[name], sr.clean, detectors=["neural_cleanse"],
                       detector_params=sr.detector_params)
        ev = r.results["neural_cleanse"].evidence
        assert ev["decision"] == "reference" and ev["num_reference_models"] == 3
        verdicts[name] = (r.verdict, r.suspected_targets)
    assert verdicts["clean"] == ("clean", ())
    assert verdicts["backdoored"] == ("backdoored", (0,))


def _saved(module: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.trace(module.eval(), torch.rand(2, *SHAPE)), str(path))
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_references_auto_reports_and_reuses_the_cache(digits_mlps: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """TorchScript files end to end: the copies train (their parameters are leaves), the
    report says what was used, and a second model of the same architecture trains none."""
    cache = tmp_path / "cache"
    docs = []
    for name in ("clean", "clean2"):
        model = _saved(digits_mlps[name], tmp_path / f"{name}.pt")
        r = run_cli(capsys, "scan", str(model), "--data", "digits:test", "--detectors",
                    "neural_cleanse", "--references", "auto", "--references-count", "2",
                    "--references-cache", str(cache), "--param",
                    "neural_cleanse.max_steps=60", "--out", str(tmp_path / name), "--json")
        assert r.code == 0, r.err
        docs.append(json.loads(r.out))
    first, second = (d["params"]["self_references"] for d in docs)
    assert first["active"] and first["used"] == 2 and first["from_cache"] is False
    assert second["from_cache"] is True and second["cache_key"] == first["cache_key"]
    assert second["training_seconds"] == first["training_seconds"]  # not retrained
    assert min(first["accuracies"]) > 0.5 and first["applied_to"] == ["neural_cleanse"]
    nc = docs[0]["detectors"]["neural_cleanse"]
    assert nc["num_reference_models"] == 2 and nc["decision"] == "reference"
    assert docs[0]["params"]["references"] == "auto"


@pytest.mark.parametrize("args, needle", [
    (["--references", "bogus"], "invalid --references"),
    (["--references-count", "3"], "--references-count"),
    (["--references", "auto", "--references-count", "1"], "--references-count"),
])
def test_cli_bad_references_options_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           args: list[str], needle: str) -> None:
    torch.manual_seed(0)
    model = _saved(archs.build("mlp", SHAPE, 10), tmp_path / "m.pt")
    r = run_cli(capsys, "scan", str(model), "--data", "digits", "--out", str(tmp_path / "o"),
                *args)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1 and needle in lines[0], r.err
    assert "Traceback" not in r.err and not (tmp_path / "o").exists()


def test_cli_references_auto_needs_data_and_excludes_nc_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = _saved(archs.build("mlp", SHAPE, 10), tmp_path / "m.pt")
    r = run_cli(capsys, "scan", str(model), "--references", "auto", "--input-shape", "1,8,8",
                "--out", str(tmp_path / "o"))
    assert r.code == 2 and "needs --data" in r.err
    r = run_cli(capsys, "scan", str(model), "--data", "digits", "--references", "auto",
                "--nc-reference", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.code == 2 and "not both" in r.err, r.err
