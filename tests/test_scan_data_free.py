"""``trojanscan scan MODEL`` without ``--data``: the data-free detectors on the input
shape alone (``--input-shape``, or the ONNX graph's), and one-line errors otherwise."""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch

from tests._cli import run_cli
from tests.test_mmbd import Planted

SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                    .read_text())
QUICK = ("--param", "mmbd.n_init=4", "--param", "mmbd.steps=20")


def _script(model: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def _onnx(shape: tuple[int, int, int], path: Path) -> Path:
    from trojanscan import archs

    torch.manual_seed(0)
    model = archs.build("small_cnn", shape, 10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, *shape), str(path), dynamo=False)
    return path


def test_scan_without_data_runs_the_data_free_detectors(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path) -> None:
    model = _script(Planted(backdoor=True), tmp_path / "planted.pt")
    r = run_cli(capsys, "scan", str(model), "--input-shape", "1,8,8", "--out",
                str(tmp_path / "r"), "--quiet", "--param", "mmbd.n_init=8",
                "--param", "mmbd.steps=100")
    assert r.code == 1, r.err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert [i["role"] for i in doc["inputs"]] == ["model"]  # no clean data input
    free = doc["data_free"]
    assert free["clean_data_used"] is False and free["input_shape"] == [1, 8, 8]
    assert free["detectors_run"] == ["mmbd", "mntd"]  # the digits bundle fits 1×8×8 → 10
    assert "No clean data" in free["note"]
    assert doc["detectors"]["mmbd"]["verdict"] == "backdoored"
    assert doc["detectors"]["mmbd"]["suspected_targets"] == [3]
    assert len(doc["detectors"]["mmbd"]["label_p_values"]) == 10
    assert doc["detectors"]["mmbd"]["data_used"] is False
    assert "No clean data" in (tmp_path / "r" / "report.html").read_text()


def test_clean_twin_exits_0_and_the_summary_says_data_free(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _script(Planted(backdoor=False), tmp_path / "clean.pt")
    r = run_cli(capsys, "scan", str(model), "--input-shape", "1,8,8", "--detectors", "mmbd",
                "--out", str(tmp_path / "r"), "--param", "mmbd.n_init=8",
                "--param", "mmbd.steps=100")
    assert r.code == 0, r.err
    assert "no clean data" in r.out.lower()


def test_unknown_or_wrong_shape_and_data_detectors_exit_2_in_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _script(Planted(backdoor=False), tmp_path / "m.pt")
    cases = [((), "--input-shape"),                                  # TorchScript: unknown
             (("--input-shape", "3,8,8"), "3×8×8"),                  # the model refuses it
             (("--input-shape", "1,8"), "C,H,W"),                    # malformed
             (("--input-shape", "1,8,8", "--detectors", "neural_cleanse"), "--data")]
    for extra, needle in cases:
        r = run_cli(capsys, "scan", str(model), "--out", str(tmp_path / "r"), "--quiet",
                    *extra)
        assert r.code == 2, (extra, r.err)
        assert needle in r.err and r.err.strip().count("\n") == 0, r.err
        assert "Traceback" not in r.err
    assert not (tmp_path / "r").exists()


def test_onnx_shape_is_read_from_the_graph_and_missing_mntd_is_said(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _onnx((3, 8, 8), tmp_path / "rgb.onnx")
    r = run_cli(capsys, "scan", str(model), "--out", str(tmp_path / "r"), "--quiet", *QUICK)
    assert r.code in (0, 1), r.err
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert doc["model"]["input_shape"] == [3, 8, 8]
    assert doc["data_free"]["detectors_run"] == ["mmbd"]
    assert "mntd" in doc["data_free"]["not_applicable"]
    assert "MNTD did not run" in doc["data_free"]["note"]
    # a shape that disagrees with the graph is refused
    r = run_cli(capsys, "scan", str(model), "--input-shape", "1,8,8", "--out",
                str(tmp_path / "r2"), "--quiet", *QUICK)
    assert r.code == 2 and "3×8×8" in r.err


def test_public_api_scans_without_data(tmp_path: Path) -> None:
    import trojanscan

    planted = Planted(backdoor=True)
    params = {"mmbd": {"n_init": 8, "steps": 100}}
    by_module = trojanscan.scan_model(planted, None, input_shape=(1, 8, 8),
                                      detectors="mmbd", detector_params=params)
    by_path = trojanscan.scan_model(_script(planted, tmp_path / "p.pt"),
                                    input_shape=(1, 8, 8), detectors="mmbd",
                                    detector_params=params)
    assert by_module.verdict == by_path.verdict == "backdoored"
    assert by_module.suspected_targets == by_path.suspected_targets == (3,)
    assert trojanscan.MMBD.name == "mmbd"
    with pytest.raises(trojanscan.ParameterError, match="input shape"):
        trojanscan.scan_model(planted, None, detectors="mmbd")
