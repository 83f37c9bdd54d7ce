"""The command line: exit codes, one-line errors, and ``train`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests._cli import run_cli
from trojanscan import archs
from trojanscan.utils import sha256_file


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "--version")
    assert r.code == 0 and r.out.strip().startswith("trojanscan ")
    r = run_cli(capsys, "--help")
    assert r.code == 0
    for command in ("demo", "scan", "scan-data", "filter", "guard", "train", "mitigate"):
        assert command in r.out


def test_detectors_lists_names_levels_and_parameters(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    r = run_cli(capsys, "detectors")
    assert r.code == 0 and "neural_cleanse\tmodel" in r.out and "strip\tinput" in r.out
    assert "statistic=" not in r.out
    r = run_cli(capsys, "detectors", "--params")
    strip = r.out.split("strip\tinput", 1)[1].split("\n", 1)[1]
    assert "    statistic='confidence'" in strip and "    n_overlays=32" in strip


def test_usage_error_exits_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "scan")
    assert r.code == 2
    assert "Traceback" not in r.err and "Missing argument" in r.err
    r = run_cli(capsys, "train", "--dataset", "digits", "--out", "x.pt", "--bogus")
    assert r.code == 2 and "No such option" in r.err


def test_domain_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    r = run_cli(capsys, "scan", str(tmp_path / "missing.pt"), "--data", "digits")
    assert r.code == 2
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.pt" in lines[0]
    r = run_cli(capsys, "train", "--dataset", "digits:train", "--attack", "badnets:size=-1",
                "--out", str(tmp_path / "m.pt"))
    assert r.code == 2 and r.err.startswith("error: ") and "size" in r.err
    assert not (tmp_path / "m.pt").exists()


def test_unknown_detector_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
    model = archs.build("mlp", (1, 8, 8), 10).eval()
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    r = run_cli(capsys, "scan", str(path), "--data", "digits", "--detectors", "nope",
                "--out", str(tmp_path / "rep"))
    assert r.code == 2 and "unknown detector 'nope'" in r.err


def _train(capsys: pytest.CaptureFixture[str], out: Path, seed: int, *extra: str):
    return run_cli(capsys, "train", "--dataset", "digits:train", "--test-data", "digits:test",
                   "--attack", "badnets:size=2,target=0", "--arch", "mlp", "--epochs", "8",
                   "--seed", str(seed), "--out", str(out), *extra)


def test_train_writes_model_sidecar_and_data(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    out = tmp_path / "bd.pt"
    r = _train(capsys, out, 0, "--save-data", str(tmp_path / "poisoned.npz"))
    assert r.code == 0, r.err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["backdoored"] and meta["attack"]["target"] == 0
    assert meta["num_poisoned"] == len(meta["poison_indices"]) > 0
    assert 0.8 < meta["clean_accuracy"] <= 1.0 and meta["asr"] > 0.5
    assert meta["files"]["torchscript"]["sha256"] == sha256_file(out)
    # TorchScript and safetensors+arch are the same network
    ts = torch.jit.load(str(out))
    net = archs.build("mlp", (1, 8, 8), 10)
    net.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(ts(x), net.eval()(x), atol=1e-6)
    # the poisoned training set carries the ground truth
    z = np.load(tmp_path / "poisoned.npz")
    mask = z["poison_mask"]
    assert mask.sum() == meta["num_poisoned"]
    assert (z["y"][mask] == 0).all()
    assert np.array_equal(np.flatnonzero(mask), meta["poison_indices"])


def test_train_same_seed_bit_identical(capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    assert _train(capsys, a, 3).code == 0
    assert _train(capsys, b, 3).code == 0
    assert _train(capsys, c, 4).code == 0
    wa = load_file(str(a.with_suffix(".safetensors")))
    wb = load_file(str(b.with_suffix(".safetensors")))
    wc = load_file(str(c.with_suffix(".safetensors")))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_train_json_output_parses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = _train(capsys, tmp_path / "m.pt", 1, "--json", "--epochs", "2")
    assert r.code == 0
    doc = json.loads(r.out)
    assert doc["arch"] == "mlp" and doc["seed"] == 1
