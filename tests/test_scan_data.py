"""``scan-data``: orchestration (features once), the tiny fixture, the CLI and its report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from _cli import run_cli
from _data_poisoning_fixtures import PassThrough, planted_images
from trojanscan.data_scan import (
    DEFAULT_DATA_DETECTORS,
    combine,
    export_clean,
    extract,
    parse_detectors,
    scan_data,
)
from trojanscan.detectors.base import count_hooks
from trojanscan.detectors.spectre import Spectre
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.io.data import load_dataset, save_npz


class Counting(PassThrough):
    """PassThrough that counts forward calls (features must be extracted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


# ----------------------------------------------------------------------------- library


def test_scan_finds_planted_poison_with_features_extracted_once() -> None:
    planted = planted_images(poison=30)
    model = Counting()
    scan = scan_data(model, planted.data, batch_size=128, poison_rate_bound=0.1)
    assert model.calls == int(np.ceil(len(planted.data) / 128)) + 0  # one pass, shared
    assert set(scan.results) == set(DEFAULT_DATA_DETECTORS)
    tp = (scan.flagged & planted.mask).sum()
    assert scan.verdict == "poisoned"
    assert tp / planted.mask.sum() >= 0.95 and tp / scan.flagged.sum() >= 0.9
    assert scan.scores.dtype == np.float32 and scan.scores.shape == (len(planted.data),)
    assert roc_auc_score(planted.mask, scan.scores) > 0.95
    assert count_hooks(model) == 0


def test_scan_clean_data_is_clean() -> None:
    planted = planted_images(poison=0)
    scan = scan_data(PassThrough(), planted.data, poison_rate_bound=0.05)
    assert scan.verdict == "clean" and not scan.flagged.any()


def test_extract_batch_size_does_not_change_features() -> None:
    planted = planted_images(poison=10)
    a = extract(PassThrough(), planted.data, batch_size=7)
    b = extract(PassThrough(), planted.data, batch_size=1000)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-6, atol=1e-6)
    out = np.lib.format.open_memmap  # a memory-mapped output works the same way
    del out
    buf = np.empty_like(a.features)
    c = extract(PassThrough(), planted.data, batch_size=64, out=buf)
    assert c.features is buf
    np.testing.assert_allclose(buf, a.features, rtol=1e-6, atol=1e-6)


def test_combine_rules() -> None:
    from trojanscan.data_scan import make_result

    def res(flags: list[int]) -> Any:
        f = np.zeros(6, dtype=bool)
        f[flags] = True
        return make_result("x", scores=f.astype(np.float32), flagged=f, seconds=0, seed=0,
                           params={}, per_class={})

    rs = {"a": res([0, 1]), "b": res([1, 2]), "c": res([1, 3])}
    assert np.flatnonzero(combine(rs, "majority")[1]).tolist() == [1]
    assert np.flatnonzero(combine(rs, "union")[1]).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(combine(rs, "intersection")[1]).tolist() == [1]
    with pytest.raises(ParameterError, match="combine"):
        combine(rs, "vote")


def test_parse_detectors() -> None:
    assert parse_detectors(None)[0] == "spectral_signatures"
    assert parse_detectors("spectre, spectre") == ["spectre"]
    with pytest.raises(ParameterError, match="detectors"):
        parse_detectors("neural_cleanse")
    with pytest.raises(ParameterError, match="unknown detector"):
        parse_detectors("magic")


def test_export_clean_refuses_to_overwrite_training_data(tmp_path: Path) -> None:
    planted = planted_images(poison=10)
    src = save_npz(tmp_path / "train.npz", planted.data)
    ds = load_dataset(str(src))
    before = src.read_bytes()
    with pytest.raises(ParameterError, match="export_clean"):
        export_clean(ds, planted.mask, src)
    with pytest.raises(ParameterError, match="export_clean"):
        export_clean(ds, planted.mask, tmp_path / "clean.csv")
    assert src.read_bytes() == before
    out = export_clean(ds, planted.mask, tmp_path / "clean.npz")
    back = load_dataset(str(out))
    assert len(back) == len(ds) - planted.mask.sum()
    assert torch.equal(back.x, ds.x[torch.from_numpy(~planted.mask)])


# ----------------------------------------------------------------------------- tiny fixture


def test_tiny_backdoored_poison_ranks_first(tiny: Any) -> None:
    """On the tiny digits model (poison = half of class 0, 8×8 inputs) the per-class
    decision does not separate the poison cleanly, but SPECTRE's scores rank it."""
    res = Spectre(poison_rate_bound=0.1).fit(tiny.backdoored, tiny.train_poisoned)
    mask = tiny.poison_mask
    assert roc_auc_score(mask, res.scores) >= 0.9
    top = np.argsort(-res.scores, kind="stable")[: int(mask.sum())]
    assert mask[top].mean() >= 0.6  # precision = recall at the true poison count
    assert res.flagged.sum() <= int(1.5 * 0.1 * len(mask))


def test_tiny_clean_twin_is_clean(tiny: Any) -> None:
    scan = scan_data(tiny.clean, tiny.train_clean, poison_rate_bound=0.1, seed=0)
    assert scan.verdict == "clean"
    for res in scan.results.values():
        assert res.flagged.sum() <= int(1.5 * 0.1 * len(tiny.train_clean))


def test_scan_bad_inputs(tiny: Any) -> None:
    single = tiny.train_clean.subset(torch.nonzero(tiny.train_clean.labels() == 3).flatten())
    with pytest.raises(DataError, match="at least 2 classes"):
        scan_data(tiny.clean, single)
    unlabelled = tiny.train_clean.with_data(tiny.train_clean.x, None)
    with pytest.raises(DataError, match="labels"):
        scan_data(tiny.clean, unlabelled)
    for bad in (0.0, 0.51, -1.0):
        with pytest.raises(ParameterError, match="poison_rate_bound"):
            scan_data(tiny.clean, tiny.train_clean, poison_rate_bound=bad)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scan_data")
    poisoned = planted_images(poison=30)
    clean = planted_images(poison=0, seed=1)
    model = torch.jit.script(PassThrough())
    torch.jit.save(model, str(root / "model.pt"))
    np.save(root / "mask.npy", poisoned.mask)
    return {"root": root, "model": root / "model.pt",
            "poisoned": save_npz(root / "poisoned.npz", poisoned.data),
            "clean": save_npz(root / "clean.npz", clean.data), "mask": root / "mask.npy"}


def test_cli_poisoned_report_follows_contract(files: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    out = tmp_path / "rep"
    export = tmp_path / "cleaned.npz"
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(files["model"]),
                "--out", str(out), "--export-clean", str(export), "--poison-rate-bound",
                "0.1", "--quiet")
    assert r.code == 1, r.err
    doc = json.loads((out / "report.json").read_text())
    mask = np.load(files["mask"])
    n = len(mask)
    assert doc["command"] == "scan-data" and doc["verdict"] == "poisoned"
    assert doc["num_samples"] == n
    flagged = doc["flagged_indices"]
    assert flagged == sorted(flagged) and mask[flagged].mean() >= 0.9
    assert mask[flagged].sum() >= 0.95 * mask.sum()
    scores = np.load(out / doc["scores_file"])
    assert scores.dtype == np.float32 and scores.shape == (n,)
    for name in DEFAULT_DATA_DETECTORS:
        d = doc["detectors"][name]
        assert {"flagged_indices", "scores_file", "seconds", "per_class"} <= set(d)
        assert np.load(out / d["scores_file"]).shape == (n,)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "spectral_signatures" in html
    assert doc["carried_by"] and set(doc["carried_by"]) <= set(doc["detectors"])
    assert doc["combination"]["rule"] == "union"
    assert doc["combination"]["false_alarm_rate"] is not None
    assert doc["export"]["num_samples"] == n - len(flagged)
    assert len(load_dataset(str(export))) == n - len(flagged)


def test_cli_clean_data_exit_zero(files: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    r = run_cli(capsys, "scan-data", str(files["clean"]), "--model", str(files["model"]),
                "--out", str(tmp_path / "rep"), "--detectors", "spectral_signatures,spectre",
                "--quiet")
    assert r.code == 0, r.err
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["verdict"] == "clean" and doc["flagged_indices"] == []


def test_cli_refuses_to_overwrite_train_and_bad_eps(files: dict[str, Path],
                                                   capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    before = files["poisoned"].read_bytes()
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(files["model"]),
                "--out", str(tmp_path / "rep"), "--export-clean", str(files["poisoned"]))
    assert r.code == 2 and "--export-clean" in r.err and "TRAIN" in r.err
    assert files["poisoned"].read_bytes() == before
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(files["model"]),
                "--poison-rate-bound", "0.9", "--out", str(tmp_path / "rep"))
    assert r.code == 2 and ("poison-rate-bound" in r.err or "poison_rate_bound" in r.err)


def test_cli_verify_retrains_and_reports(files: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    # a model with a sidecar (as `trojanscan train` writes): training settings and the
    # attack (whose trigger gives ASR before/after); the architecture is --arch's — the
    # sidecar's is only quoted when --arch is missing
    model = tmp_path / "with_sidecar.pt"
    model.write_bytes(files["model"].read_bytes())
    sidecar = {"arch": "mlp", "attack": {"spec": "badnets:target=0,size=2,margin=0"},
               "train_config": {"epochs": 3, "batch_size": 64, "lr": 0.003,
                                "weight_decay": 0.0, "lr_decay": True}}
    model.with_suffix(".json").write_text(json.dumps(sidecar))
    out = tmp_path / "rep"
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(model),
                "--detectors", "spectre", "--verify", "--out", str(out), "--quiet")
    assert r.code == 2 and "pass --arch mlp if you trust it" in r.err
    assert not out.exists()
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(model),
                "--detectors", "spectre", "--verify", "--arch", "mlp", "--out", str(out),
                "--quiet")
    assert r.code == 1, r.err
    v = json.loads((out / "report.json").read_text())["verification"]
    assert v["arch"] == "mlp" and v["epochs"] == 3 and v["num_removed"] > 0
    assert 0.0 <= v["clean_accuracy_after"] <= 1.0
    assert v["asr_before"] is not None and v["asr_after"] is not None
    assert v["attack"].startswith("badnets")
    # TorchScript without a sidecar and without --arch: say what is missing
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(files["model"]),
                "--detectors", "spectre", "--verify", "--out", str(out))
    assert r.code == 2 and "--arch" in r.err


def test_cli_state_dict_model_takes_arch(files: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    """A torch.save state_dict (format "torch") is built with --arch, as safetensors are."""
    from trojanscan import archs

    weights = tmp_path / "weights.pt"
    torch.save(archs.build("mlp", (1, 4, 4), 4).state_dict(), weights)
    r = run_cli(capsys, "scan-data", str(files["poisoned"]), "--model", str(weights),
                "--arch", "mlp", "--detectors", "spectre", "--out", str(tmp_path / "rep"),
                "--quiet")
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert doc["params"]["arch"] == "mlp"
