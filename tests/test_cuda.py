"""The CUDA path (skipped where no GPU is present; CI has none).

Every registered detector fitted with ``device="cuda"`` on the CPU fixture model reaches
the CPU run's verdict and evidence, leaves the user's model where and as it was, and is
reproducible under one seed; training, the MNTD trigger search and the CLI run on the
GPU too. Run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._cli import run_cli
from tests.test_detector_contract import (
    NAMES,
    _assert_unchanged,
    _data_for,
    _fit,
    _get,
    _snapshot,
)
from trojanscan.detectors.base import DataScanResult, InputDetector, ModelScanResult

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _targets(result: ModelScanResult) -> Any:
    return result.to_dict().get("suspected_targets")


@pytest.mark.parametrize("name", NAMES)
def test_detector_on_cuda_agrees_with_cpu(name: str, tiny: Any) -> None:
    cls = _get(name)
    model, data = copy.deepcopy(tiny.backdoored), _data_for(cls, tiny)
    snap = _snapshot(model)
    gpu = _fit(cls(seed=0, device="cuda"), model, data)
    _assert_unchanged(model, snap)
    assert all(p.device.type == "cpu" for p in model.parameters()), "model moved"
    cpu = _fit(cls(seed=0, device="cpu"), model, data)
    if isinstance(gpu, ModelScanResult):
        assert gpu.verdict == cpu.verdict
        assert _targets(gpu) == _targets(cpu)
        assert gpu.score == pytest.approx(cpu.score, abs=0.05)
    elif isinstance(gpu, DataScanResult):
        assert float(np.mean(gpu.flagged == cpu.flagged)) >= 0.98
        assert np.corrcoef(gpu.scores, cpu.scores)[0, 1] > 0.99
    else:
        assert isinstance(gpu, InputDetector)
        x = tiny.test.x[:40]
        np.testing.assert_allclose(gpu.score(x), cpu.score(x), rtol=1e-3, atol=1e-3)
        trig = tiny.triggered_test()[:40]
        agree = gpu.filter(trig).flagged == cpu.filter(trig).flagged
        assert float(np.mean(agree)) >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_detector_on_cuda_same_seed_same_verdict(name: str, tiny: Any) -> None:
    cls = _get(name)
    model, data = copy.deepcopy(tiny.backdoored), _data_for(cls, tiny)
    a = _fit(cls(seed=3, device="cuda"), model, data)
    b = _fit(cls(seed=3, device="cuda"), model, data)
    if isinstance(a, ModelScanResult):
        assert (a.verdict, _targets(a)) == (b.verdict, _targets(b))
        assert a.score == pytest.approx(b.score, abs=1e-6)
    elif isinstance(a, DataScanResult):
        assert np.array_equal(a.flagged, b.flagged)
    else:
        x = tiny.test.x[:40]
        np.testing.assert_allclose(a.score(x), b.score(x), rtol=1e-5, atol=1e-5)


def test_model_already_on_the_gpu_stays_there(tiny: Any) -> None:
    cls = _get("neural_cleanse")
    model = copy.deepcopy(tiny.backdoored).cuda()
    snap = _snapshot(model)
    result = cls(seed=0).fit(model, tiny.test)  # device follows the model
    _assert_unchanged(model, snap)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert result.verdict == "backdoored" and tiny.target in _targets(result)


def test_training_on_cuda_learns_the_backdoor(tiny: Any) -> None:
    from trojanscan.training import TrainConfig, evaluate, train_model

    cfg = TrainConfig(epochs=20, batch_size=64, lr=2e-3)
    model = train_model("small_cnn", tiny.train_poisoned, config=cfg, seed=0, device="cuda")
    model = model.cpu().eval()
    assert evaluate(model, tiny.test) > 0.9
    with torch.no_grad():
        asr = float((model(tiny.triggered_test()).argmax(1) == tiny.target).float().mean())
    assert asr > 0.9


def test_mntd_search_costs_on_cuda_match_cpu(tiny: Any) -> None:
    from trojanscan.mntd.search import SearchConfig, search_outcome

    cfg = SearchConfig(steps=20)
    x, y = tiny.test.x[:100], tiny.test.labels()[:100]
    cpu, cpu_flows = search_outcome(tiny.backdoored, x, y, 10, cfg)
    model = copy.deepcopy(tiny.backdoored).cuda()
    gpu1, flows1 = search_outcome(model, x.cuda(), y.cuda(), 10, cfg)
    gpu2, flows2 = search_outcome(model, x.cuda(), y.cuda(), 10, cfg)
    # seeded and deterministic on the GPU too
    assert torch.equal(gpu1, gpu2) and torch.equal(flows1, flows2)
    torch.testing.assert_close(gpu1.cpu(), cpu, rtol=0.05, atol=0.05)
    torch.testing.assert_close(flows1.cpu(), cpu_flows, rtol=0.05, atol=0.05)


def test_mntd_flow_mix_on_cuda_shares_its_search_and_matches_cpu(tmp_path: Path) -> None:
    """The shipped bundle's two search readouts on a model on the GPU: one search (the
    probes' keys do not depend on the device), the same parts as on the CPU."""
    from dataclasses import replace

    from tests.test_mntd_search import _Counting as Counting
    from trojanscan.archs import build
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.mntd.pretrained import builtin_path, load_bundle, save_bundle
    from trojanscan.mntd.recipe import Recipe

    torch.manual_seed(0)
    model = build("mlp", (1, 28, 28), 10).eval()
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    cpu = MNTD().fit(copy.deepcopy(model), shape_only).evidence["component_raw_scores"]
    shipped = load_bundle(builtin_path("fashion-mnist"))
    cost_only = str(save_bundle(tmp_path / "cost_only", replace(shipped, recipe=Recipe(
        (("stamp", 1.0), ("one_class", 1.0), ("search", 2.0)), "reference")))[1])
    calls = {}
    for name, meta in (("cost_only", cost_only), ("default", None)):
        on_gpu = Counting(copy.deepcopy(model).cuda())
        r = MNTD(meta_classifier=meta).fit(on_gpu, shape_only)
        calls[name] = on_gpu.calls
    gpu = r.evidence["component_raw_scores"]
    assert calls["default"] == calls["cost_only"]
    assert set(cpu) == set(gpu)
    # z-scores of probabilities over spreads down to 0.01: a 1e-3 difference in a flow
    # moves search_flow by 0.1, hence the wider absolute tolerance
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], rel=0.05, abs=0.25), k


def test_scan_cli_on_cuda(capsys: pytest.CaptureFixture[str], tiny: Any,
                          tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(copy.deepcopy(tiny.backdoored).eval()), str(model))
    x = np.round(tiny.test.x.numpy() * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=tiny.test.labels().numpy())
    r = run_cli(capsys, "scan", str(model), "--data", str(tmp_path / "d.npz"), "--out",
                str(tmp_path / "out"), "--detectors", "neural_cleanse", "--quiet",
                "--device", "cuda")
    assert r.code == 1, r.err
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["verdict"] == "backdoored" and tiny.target in doc["suspected_targets"]
