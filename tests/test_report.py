"""Report writing: contract keys, JSON Schema, atomicity, self-contained HTML."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from trojanscan.report import Report, png_bytes

SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                    .read_text())


def validate(doc: dict) -> None:
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)


def _scan_report(tmp_path: Path) -> Report:
    rep = Report(command="scan", out_dir=tmp_path / "r", seed=3, params={"x": 1})
    rep.add_input(role="model", path="m.pt", sha256="a" * 64, format="torchscript")
    rep.set(verdict="backdoored", score=0.97, suspected_targets=[2])
    rep.add_detector("neural_cleanse", {"verdict": "backdoored", "score": 0.97,
                                        "suspected_targets": [2], "seconds": 1.5})
    rel = rep.add_image("mask_2", np.random.default_rng(0).random((8, 8)), scale=4)
    rep.add_section("Triggers <&>", f'<img alt="mask" src="{rep.image_uri(rel)}">')
    return rep


def test_scan_report_matches_contract_and_schema(tmp_path: Path) -> None:
    path = _scan_report(tmp_path).write(seconds=2.0)
    doc = json.loads(path.read_text())
    validate(doc)
    for key in ("schema_version", "tool", "command", "seed", "created", "inputs", "verdict",
                "seconds", "detectors"):
        assert key in doc
    assert doc["tool"]["name"] == "trojanscan" and doc["seed"] == 3
    assert (tmp_path / "r" / "images" / "mask_2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schema_rejects_broken_reports(tmp_path: Path) -> None:
    doc = json.loads(_scan_report(tmp_path).write(seconds=1.0).read_text())
    for broken in ({**doc, "score": 1.5}, {**doc, "verdict": "maybe"},
                   {k: v for k, v in doc.items() if k != "seed"},
                   {**doc, "inputs": [{"path": "x", "sha256": "nothex", "format": "npz"}]}):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    _scan_report(tmp_path).write(seconds=1.0)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Verdict: backdoored" in html
    assert "Triggers &lt;&amp;&gt;" in html
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in html and "https://" not in html


def test_failed_write_leaves_previous_report(tmp_path: Path, monkeypatch) -> None:
    _scan_report(tmp_path).write(seconds=1.0)
    before = (tmp_path / "r" / "report.json").read_text()
    rep = _scan_report(tmp_path)
    rep.set(verdict="clean", bad=float("nan"))
    monkeypatch.setattr("trojanscan.reports.report.to_json", lambda d: d)  # let NaN through
    with pytest.raises(ValueError):
        rep.write(seconds=1.0)
    assert (tmp_path / "r" / "report.json").read_text() == before
    assert not list((tmp_path / "r").glob(".report.json.*"))


def test_png_bytes_accepts_layouts() -> None:
    for arr in (np.zeros((5, 6)), np.zeros((5, 6, 3)), np.zeros((3, 5, 6)), np.ones((5, 6, 1))):
        assert png_bytes(arr)[:4] == b"\x89PNG"


def test_atomic_writes_get_the_usual_permissions(tmp_path: Path) -> None:
    """mkstemp's 0600 must not leak into outputs: they get 0666 minus the umask, like a
    plain open(); a failed write leaves neither a file nor a temporary behind."""
    import os
    import stat

    from trojanscan.utils import atomic_path, atomic_write_text

    out = tmp_path / "report.json"
    atomic_write_text(out, "{}")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "half.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_people_read_the_verdict_first_rounded_scores_and_class_names(tmp_path: Path) -> None:
    from trojanscan.io.data import FASHION_MNIST_CLASSES
    from trojanscan.reports import Report as ReportsReport

    rep = ReportsReport(command="scan", out_dir=tmp_path / "r", seed=0)
    rep.set_class_names(FASHION_MNIST_CLASSES)
    rep.set(verdict="backdoored", score=0.999956795745414, suspected_targets=[8])
    rep.add_detector("neural_cleanse", {"verdict": "backdoored", "score": 0.999956795745414,
                                        "suspected_targets": [8], "seconds": 1.23456})
    doc = json.loads(rep.write(seconds=1.0).read_text())
    html = (tmp_path / "r" / "report.html").read_text()
    assert doc["score"] == 0.999956795745414  # full precision stays in the JSON
    assert doc["class_names"][8] == "Bag"
    assert "0.999956795745414" not in html and "1.000" in html
    assert "8 (Bag)" in html
    sentence = html.index("This model looks backdoored")
    assert sentence < html.index("<h2>Detectors</h2>")
    validate(doc)


def test_digit_names_are_not_repeated() -> None:
    from trojanscan.reports.text import class_label, targets_text

    assert class_label(3, [str(i) for i in range(10)]) == "3"
    assert class_label(3, ["a", "b", "c", "Dress"]) == "3 (Dress)"
    assert class_label(12, ["a"]) == "12" and targets_text([], None) == "-"
