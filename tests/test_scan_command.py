"""``trojanscan scan`` end to end on the tiny models: report, schema, exit codes."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from tests._cli import run_cli

SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                    .read_text())


@pytest.fixture(scope="module")
def files(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scan")
    paths = {}
    for name, model in (("backdoored", tiny.backdoored), ("clean", tiny.clean)):
        p = d / f"{name}.pt"
        torch.jit.save(torch.jit.script(model.eval()), str(p))
        paths[name] = p
    x = np.round(tiny.test.x.numpy() * 255).astype(np.uint8)
    np.savez(d / "clean.npz", x=x, y=tiny.test.labels().numpy())
    paths["data"] = d / "clean.npz"
    return paths


def _scan(capsys: pytest.CaptureFixture[str], model: Path, data: Path, out: Path,
          *extra: str):
    return run_cli(capsys, "scan", str(model), "--data", str(data), "--out", str(out),
                   "--detectors", "neural_cleanse", "--quiet", *extra)


def test_backdoored_exit_1_with_target_and_evidence(capsys: pytest.CaptureFixture[str],
                                                    files: dict[str, Path], tmp_path: Path,
                                                    tiny: Any) -> None:
    inputs_before = {k: v.read_bytes() for k, v in files.items()}
    r = _scan(capsys, files["backdoored"], files["data"], tmp_path / "bd")
    assert r.code == 1, r.err
    doc = json.loads((tmp_path / "bd" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["command"] == "scan" and doc["verdict"] == "backdoored"
    assert tiny.target in doc["suspected_targets"]
    nc = doc["detectors"]["neural_cleanse"]
    assert nc["verdict"] == "backdoored" and "l1_norms" in nc and "anomaly_index" in nc
    assert {i["format"] for i in doc["inputs"]} >= {"torchscript", "npz"}
    html = (tmp_path / "bd" / "report.html").read_text()
    assert "Verdict: backdoored" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    # the user's files are untouched
    assert {k: v.read_bytes() for k, v in files.items()} == inputs_before


def test_clean_exit_0_and_json_output(capsys: pytest.CaptureFixture[str],
                                      files: dict[str, Path], tmp_path: Path) -> None:
    r = run_cli(capsys, "scan", str(files["clean"]), "--data", str(files["data"]),
                "--out", str(tmp_path / "cl"), "--detectors", "neural_cleanse", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["verdict"] == "clean" and doc["suspected_targets"] == []


def test_same_seed_same_report(capsys: pytest.CaptureFixture[str], files: dict[str, Path],
                               tmp_path: Path) -> None:
    docs = []
    for i in range(2):
        assert _scan(capsys, files["backdoored"], files["data"], tmp_path / f"r{i}",
                     "--seed", "7").code == 1
        docs.append(json.loads((tmp_path / f"r{i}" / "report.json").read_text()))
    a, b = (d["detectors"]["neural_cleanse"] for d in docs)
    assert a["l1_norms"] == b["l1_norms"] and docs[0]["score"] == docs[1]["score"]


def test_not_applicable_detector_is_reported(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    # a 3-class 1×12×12 model: no shipped MNTD meta-classifier matches that shape
    from trojanscan import archs

    model = archs.build("mlp", (1, 12, 12), 3).eval()
    p = tmp_path / "odd.pt"
    torch.jit.save(torch.jit.script(model), str(p))
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "d.npz", x=torch.rand(60, 1, 12, 12, generator=g).numpy(),
             y=(np.arange(60) % 3))
    r = run_cli(capsys, "scan", str(p), "--data", str(tmp_path / "d.npz"), "--out",
                str(tmp_path / "na"), "--detectors", "neural_cleanse,mntd", "--quiet")
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "na" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["detectors"]["mntd"]["verdict"] == "not_applicable"
    assert doc["detectors"]["mntd"]["reason"]
    assert doc["detectors"]["neural_cleanse"]["verdict"] in ("backdoored", "clean")
    assert doc["fusion"]["detectors_used"] == ["neural_cleanse"]
    # when no detector at all can run there is no verdict: a clear error, exit 2
    r = run_cli(capsys, "scan", str(p), "--data", str(tmp_path / "d.npz"), "--out",
                str(tmp_path / "na2"), "--detectors", "mntd", "--quiet")
    assert r.code == 2 and "no detector could run" in r.err and "mntd" in r.err


def test_bad_data_exit_2(capsys: pytest.CaptureFixture[str], files: dict[str, Path],
                         tmp_path: Path) -> None:
    bad = tmp_path / "nan.npz"
    x = np.full((10, 1, 8, 8), np.nan, dtype=np.float32)
    np.savez(bad, x=x, y=np.arange(10))
    r = run_cli(capsys, "scan", str(files["backdoored"]), "--data", str(bad), "--out",
                str(tmp_path / "x"))
    assert r.code == 2 and r.err.startswith("error: ") and "Traceback" not in r.err
    wrong = tmp_path / "rgb.npz"
    np.savez(wrong, x=np.zeros((10, 3, 8, 8), np.uint8), y=np.arange(10))
    r = run_cli(capsys, "scan", str(files["backdoored"]), "--data", str(wrong), "--out",
                str(tmp_path / "y"))
    assert r.code == 2 and "error: " in r.err
    assert not (tmp_path / "x" / "report.json").exists()


def test_clean_reference_reports_calibrate_neural_cleanse(
        capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path,
        tiny: Any) -> None:
    # three scans of the clean twin (different seeds) are the references
    refs = []
    for seed in (1, 2, 4):
        out = tmp_path / f"ref{seed}"
        assert _scan(capsys, files["clean"], files["data"], out, "--seed", str(seed)).code in (0, 1)
        refs += ["--nc-reference", str(out / "report.json")]
    r = _scan(capsys, files["backdoored"], files["data"], tmp_path / "bd", *refs)
    assert r.code == 1, r.err
    doc = json.loads((tmp_path / "bd" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    nc = doc["detectors"]["neural_cleanse"]
    assert nc["decision"] == "reference" and nc["num_reference_models"] == 3
    assert doc["suspected_targets"] == [tiny.target]
    r = _scan(capsys, files["clean"], files["data"], tmp_path / "cl", "--seed", "3", *refs)
    assert r.code == 0, r.err
    # a folder of references works too; a missing one is a clear error before any work
    assert _scan(capsys, files["clean"], files["data"], tmp_path / "cl2", "--seed", "3",
                 "--nc-reference", str(tmp_path / "ref1"), "--nc-reference",
                 str(tmp_path / "ref2")).code == 0
    r = _scan(capsys, files["clean"], files["data"], tmp_path / "x", "--nc-reference",
              str(tmp_path / "missing.json"))
    assert r.code == 2 and "reference" in r.err and "Traceback" not in r.err


def test_param_sets_a_detector_setting_and_bad_ones_exit_2(
        capsys: pytest.CaptureFixture[str], files: dict[str, Path], tmp_path: Path) -> None:
    r = run_cli(capsys, "scan", str(files["clean"]), "--data", str(files["data"]), "--out",
                str(tmp_path / "p"), "--detectors", "neural_cleanse", "--quiet",
                "--param", "neural_cleanse.max_steps=7", "--param", "neural_cleanse.images=false")
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "p" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["params"]["detector_params"] == {"neural_cleanse": {"max_steps": 7,
                                                                   "images": False}}
    nc = doc["detectors"]["neural_cleanse"]
    assert max(nc["steps"]) <= 7  # the setting reached the detector
    for bad, words in (("neural_cleanse.no_such=1", "no parameter 'no_such'"),
                       ("strip.n_overlays=5", "not a model-level detector"),
                       ("max_steps=5", "DETECTOR.KEY=VALUE"),
                       ("neural_cleanse.seed=3", "--seed"),
                       ("neural_cleanse.max_steps=-1", "max_steps")):
        r = run_cli(capsys, "scan", str(files["clean"]), "--data", str(files["data"]),
                    "--out", str(tmp_path / "bad"), "--detectors", "neural_cleanse",
                    "--param", bad)
        assert r.code == 2 and words in r.err and "Traceback" not in r.err, (bad, r.err)
    assert not (tmp_path / "bad" / "report.json").exists()
