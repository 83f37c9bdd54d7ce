"""The public API: ``trojanscan.__all__`` resolves, ``import trojanscan`` stays light,
and each function answers as its command does (same defaults, same seed) on the tiny
models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import trojanscan
from _data_poisoning_fixtures import PassThrough, planted_images
from tests._cli import run_cli
from trojanscan.classifier import known_classifier
from trojanscan.exceptions import NotFittedError, ParameterError


@pytest.fixture(scope="module")
def files(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("api")
    p = d / "backdoored.pt"
    torch.jit.save(torch.jit.script(tiny.backdoored.eval()), str(p))
    x = np.round(tiny.test.x.numpy() * 255).astype(np.uint8)
    np.savez(d / "clean.npz", x=x, y=tiny.test.labels().numpy())
    return {"model": p, "data": d / "clean.npz"}


def test_every_public_name_resolves() -> None:
    for name in trojanscan.__all__:
        assert getattr(trojanscan, name) is not None, name
    for name in ("scan_model", "scan_data", "filter_inputs", "load_model", "load_dataset",
                 "NeuralCleanse", "MNTD", "Strip", "NotFittedError"):
        assert name in trojanscan.__all__
    from trojanscan import detectors as registry

    for name in registry.available():  # every registered detector is public
        cls = registry.get(name)
        assert getattr(trojanscan, cls.__name__) is cls, name
    assert issubclass(NotFittedError, ParameterError)
    assert issubclass(NotFittedError, AttributeError)
    with pytest.raises(AttributeError):
        _ = trojanscan.no_such_name  # type: ignore[attr-defined]


def test_import_is_light() -> None:
    code = ("import sys, trojanscan; heavy = [m for m in ('sklearn', 'scipy', 'trojanscan.api',"
            " 'trojanscan.detectors', 'trojanscan.mntd', 'onnx', 'ray', 'fastapi') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_load_model_and_dataset(files: dict[str, Path]) -> None:
    loaded = trojanscan.load_model(files["model"], device="cpu")
    ds = trojanscan.load_dataset(files["data"])
    assert isinstance(loaded.module, nn.Module) and ds.input_shape == (1, 8, 8)
    assert loaded.module(ds.x[:3]).shape == (3, 10)
    assert len(trojanscan.load_dataset(files["data"], max_samples=50, seed=1)) == 50


def test_scan_model_matches_the_command(files: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    res = trojanscan.scan_model(files["model"], files["data"], detectors="mntd", seed=3,
                                device="cpu")
    cli = run_cli(capsys, "scan", str(files["model"]), "--data", str(files["data"]),
                  "--out", str(tmp_path / "r"), "--detectors", "mntd", "--seed", "3",
                  "--device", "cpu", "--quiet")
    assert cli.code in (0, 1), cli.err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert res.verdict == doc["verdict"]
    assert res.score == pytest.approx(doc["score"], abs=0.0)
    assert res.results["mntd"].score == pytest.approx(doc["detectors"]["mntd"]["score"], abs=0.0)


def test_scan_model_takes_objects_and_checks_once(tiny: Any) -> None:
    """In-memory model and data; the detectors reuse the one classifier check."""
    model = tiny.backdoored
    probes: list[int] = []

    def count(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not torch.is_grad_enabled() and args[0].shape[0] <= 4:
            probes.append(int(args[0].shape[0]))

    handle = model.register_forward_pre_hook(count)
    try:
        res = trojanscan.scan_model(model, tiny.test, detectors="neural_cleanse",
                                    detector_params={"neural_cleanse": {"max_steps": 2}})
    finally:
        handle.remove()
    assert res.verdict in ("backdoored", "clean") and "neural_cleanse" in res.results
    # the API's own check; Neural Cleanse's input check and class count reuse it (before
    # one scan probed the model once per detector wrapper and once per detector)
    assert len(probes) == 1, probes


def test_a_known_classifier_is_not_probed_again(tiny: Any) -> None:
    from trojanscan.classifier import check_classifier

    calls: list[int] = []
    handle = tiny.clean.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert check_classifier(tiny.clean, tiny.test.x[:2]) == 10
        with known_classifier(tiny.clean, tiny.test.input_shape, 10):
            assert check_classifier(tiny.clean, tiny.test.x[:2]) == 10
            assert check_classifier(tiny.backdoored, tiny.test.x[:2]) == 10  # another model
    finally:
        handle.remove()
    assert len(calls) == 1


def test_scan_data_finds_the_poison() -> None:
    """On a planted poison cluster whose answer is known (the tiny digits model's
    features do not separate its poison per class, see test_scan_data.py)."""
    planted = planted_images(poison=30)
    res = trojanscan.scan_data(PassThrough(), planted.data, detectors="spectral_signatures",
                               seed=0)
    flagged = np.asarray(res.flagged, dtype=bool)
    assert flagged.shape == planted.mask.shape
    assert flagged[planted.mask].mean() > 0.5 > flagged[~planted.mask].mean()
    with pytest.raises(ParameterError, match="poison_rate_bound"):
        trojanscan.scan_data(PassThrough(), planted.data, poison_rate_bound=0.9)


def test_filter_inputs_flags_triggered_inputs(tiny: Any) -> None:
    triggered = tiny.triggered_test()[:60]
    res = trojanscan.filter_inputs(tiny.backdoored, triggered, tiny.test, frr=0.05, seed=0)
    assert res.flagged.shape == (60,) and res.verdict in ("triggered", "clean")
    clean = trojanscan.filter_inputs(tiny.backdoored, tiny.test.x[:60], tiny.test, frr=0.05,
                                     seed=0)
    assert res.flagged.mean() > clean.flagged.mean()
    with pytest.raises(ParameterError, match="detector"):
        trojanscan.filter_inputs(tiny.backdoored, triggered, tiny.test, detector="nope")
