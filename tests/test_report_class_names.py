"""scan-data and filter reports carry the data's class names, as scan's do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._cli import run_cli
from trojanscan import archs

Cap = pytest.CaptureFixture[str]
NAMES = [f"class-{chr(97 + k)}" for k in range(10)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cn")
    torch.manual_seed(0)
    model = d / "m.pt"
    torch.jit.save(torch.jit.script(archs.build("mlp", (1, 8, 8), 10).eval()), str(model))
    rng = np.random.default_rng(0)
    data = d / "named.npz"
    np.savez(data, x=rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8),
             y=np.arange(300) % 10, class_names=np.array(NAMES))
    return model, data


def test_scan_data_report_has_the_class_names(capsys: Cap, tmp_path: Path,
                                              files: tuple[Path, Path]) -> None:
    model, data = files
    r = run_cli(capsys, "scan-data", str(data), "--model", str(model), "--detectors",
                "spectral_signatures", "--out", str(tmp_path / "sd"), "-q")
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "sd" / "report.json").read_text())
    assert doc["class_names"] == NAMES


def test_filter_report_has_the_class_names(capsys: Cap, tmp_path: Path,
                                           files: tuple[Path, Path]) -> None:
    model, data = files
    r = run_cli(capsys, "filter", str(model), str(data), "--calibrate", str(data),
                "--param", "n_overlays=4", "--param", "sequential=false", "--out",
                str(tmp_path / "f"), "-q")
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "f" / "report.json").read_text())
    assert doc["class_names"] == NAMES
