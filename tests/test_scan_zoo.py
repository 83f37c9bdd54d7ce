"""``trojanscan scan-zoo``: per-model reports as ``scan`` writes them, resume, manifests,
failures, exit codes, the summary's AUROC and the HTML in a real browser.

The zoo is made of untrained digits CNNs (1×8×8 → 10, no training needed) scanned with
MNTD's shipped digits meta-classifier: about a second per model. A model whose last
bias favours class 0 by +20 is flagged by MNTD (p ≈ 0.03), a plain one is not, so exit
codes and ground truth are under the test's control. All runs but one use the
in-process backend (``--workers 0``); one runs on a local Ray with one worker.
"""

from __future__ import annotations

import itertools
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from tests._cli import run_cli
from trojanscan.archs import build
from trojanscan.fleet import auroc, confusion, roc_points
from trojanscan.fleet.summary import summarise

SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/zoo.schema.json")
                    .read_text())
REPORT_SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                           .read_text())
COMMON = ("--data", "digits", "--max-samples", "200", "--detectors", "mntd", "--quiet")


def save_model(path: Path, seed: int, *, biased: bool = False,
               shape: tuple[int, int, int] = (1, 8, 8)) -> Path:
    """An untrained small CNN (TorchScript); ``biased``: class 0's bias raised by 20."""
    torch.manual_seed(seed)
    m = build("small_cnn", shape, 10).eval()
    if biased:
        last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias[0] += 20.0
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(m), str(path))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.pt, sub/b.pt (clean-looking), c.pt (flagged), corrupt.pt, wrong_shape.pt."""
    d = tmp_path_factory.mktemp("zoo") / "models"
    save_model(d / "a.pt", 1)
    save_model(d / "sub" / "b.pt", 2)
    save_model(d / "c.pt", 3, biased=True)
    (d / "corrupt.pt").write_bytes(b"PK\x03\x04" + b"not a model" * 20)
    save_model(d / "wrong_shape.pt", 4, shape=(1, 28, 28))
    (d / "notes.txt").write_text("not a model, not scanned")
    return d


def _zoo_run(capsys: pytest.CaptureFixture[str], source: Path, out: Path, *extra: str,
             workers: str = "0") -> Any:
    return run_cli(capsys, "scan-zoo", str(source), "--out", str(out), "--workers", workers,
                   *COMMON, *extra)


def _load(out: Path) -> dict[str, Any]:
    doc = json.loads((out / "zoo.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    return doc


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in doc["models"]}


@pytest.fixture(scope="module")
def labelled_run(zoo: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, Any]:
    """One serial run of the whole zoo with ground truth (shared by several tests)."""
    base = tmp_path_factory.mktemp("labelled")
    labels = base / "labels.csv"
    labels.write_text("path,label\na.pt,clean\nsub/b.pt,1\nc.pt,backdoored\n"
                      "corrupt.pt,0\n")
    out = base / "out"
    from trojanscan.cli import main

    with pytest.raises(SystemExit) as info:
        main(["scan-zoo", str(zoo), "--out", str(out), "--workers", "0", *COMMON,
              "--labels", str(labels)])
    return out, info.value.code


def test_zoo_reports_match_scan_and_failures_are_rows(
        labelled_run: tuple[Path, Any], zoo: Path, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    out, code = labelled_run
    assert code == 1  # c.pt is flagged
    doc = _load(out)
    rows = _rows(doc)
    assert set(rows) == {"a.pt", "sub__b.pt", "c.pt", "corrupt.pt", "wrong_shape.pt"}
    assert rows["c.pt"]["verdict"] == "backdoored"
    assert rows["a.pt"]["verdict"] == "clean" and rows["sub__b.pt"]["verdict"] == "clean"
    assert rows["corrupt.pt"]["verdict"] == "error" and "corrupt" in rows["corrupt.pt"]["error"]
    assert rows["wrong_shape.pt"]["verdict"] == "error"
    assert "1×8×8" in rows["wrong_shape.pt"]["error"]
    s = doc["summary"]
    assert (s["models"], s["scanned"], s["failed"], s["flagged"]) == (5, 3, 2, 1)
    csv_lines = (out / "zoo.csv").read_text().splitlines()
    assert len(csv_lines) == 6 and "score_mntd" in csv_lines[0]
    # each model's report is the one `trojanscan scan` writes (timings aside)
    for name, rel in (("c.pt", "c.pt"), ("sub__b.pt", "sub/b.pt")):
        r = run_cli(capsys, "scan", str(zoo / rel), "--out", str(tmp_path / name),
                    "--data", "digits", "--max-samples", "200", "--detectors", "mntd",
                    "--quiet")
        assert r.code == (1 if name == "c.pt" else 0), r.err
        ref = json.loads((tmp_path / name / "report.json").read_text())
        got = json.loads((out / "models" / name / "report.json").read_text())
        jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(got)
        for d in (ref, got):
            d.pop("seconds"), d.pop("created")
            for det in d["detectors"].values():
                det.pop("seconds")
        assert got == ref
        assert rows[name]["score"] == ref["score"]
        assert rows[name]["sha256"] == ref["inputs"][0]["sha256"]
        assert (out / "models" / name / "report.html").is_file()


def test_summary_auroc_is_the_pairwise_count(labelled_run: tuple[Path, Any]) -> None:
    out, _ = labelled_run
    doc = _load(out)
    scanned = [r for r in doc["models"] if r["error"] is None and r["label"] is not None]
    pos = [r["score"] for r in scanned if r["label"] == 1]
    neg = [r["score"] for r in scanned if r["label"] == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    s = doc["summary"]
    assert s["labelled"] == 3 and len(pos) == 2 and len(neg) == 1  # corrupt.pt failed
    assert s["auroc"] == pytest.approx(sum(pairs) / len(pairs))
    assert s["confusion"] == {"tp": 1, "fp": 0, "tn": 1, "fn": 1, "tpr": 0.5, "fpr": 0.0}


def test_auroc_against_hand_computed_values() -> None:
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.4, 0.1, 0.8, 0.7]
    # backdoored 0.9 beats all 3 clean; 0.4 ties 0.4 (1/2) and beats 0.1; 0.8 beats all 3
    assert auroc(labels, scores) == pytest.approx(7.5 / 9)
    assert auroc([1, 0], [0.2, 0.2]) == 0.5
    assert auroc([1, 1], [0.2, 0.3]) is None
    pts = roc_points(labels, scores)
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(pts))
    assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0) and area == pytest.approx(7.5 / 9)
    c = confusion(labels, [s > 0.5 for s in scores])
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 2, 1)
    rows = [{"label": y, "score": s, "verdict": "backdoored" if s > 0.5 else "clean",
             "error": None} for y, s in zip(labels, scores)]
    rows.append({"label": 1, "score": None, "verdict": "error", "error": "corrupt"})
    summary = summarise(rows, extra={})
    assert summary["auroc"] == pytest.approx(7.5 / 9) and summary["failed"] == 1
    assert summary["confusion"]["tp"] == 2 and summary["tpr"] == pytest.approx(2 / 3)


def test_resume_skips_unchanged_models_and_rescans_changed_ones(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from trojanscan.fleet import runner

    calls: list[str] = []
    real = runner.scan_one

    def counting(job: Any, blob: bytes, shared: Any) -> Any:
        calls.append(job.name)
        return real(job, blob, shared)

    monkeypatch.setattr(runner, "scan_one", counting)
    src = tmp_path / "src"
    save_model(src / "x.pt", 11)
    save_model(src / "y.pt", 12)
    out = tmp_path / "out"
    assert _zoo_run(capsys, src, out).code == 0
    assert sorted(calls) == ["x.pt", "y.pt"]
    first = _rows(_load(out))
    calls.clear()
    assert _zoo_run(capsys, src, out).code == 0
    assert calls == []
    doc = _load(out)
    assert doc["summary"]["resumed"] == 2 and doc["summary"]["scanned"] == 0
    assert _rows(doc)["x.pt"]["score"] == first["x.pt"]["score"]
    # a changed model file is scanned again; the other is kept
    save_model(src / "y.pt", 13, biased=True)
    assert _zoo_run(capsys, src, out).code == 1
    assert calls == ["y.pt"]
    rows = _rows(_load(out))
    assert rows["y.pt"]["sha256"] != first["y.pt"]["sha256"] and not rows["y.pt"]["resumed"]
    assert rows["y.pt"]["verdict"] == "backdoored" and rows["x.pt"]["resumed"]
    # another setting (the seed) changes every key; --no-resume rescans everything
    calls.clear()
    assert _zoo_run(capsys, src, out, "--seed", "1").code == 1
    assert sorted(calls) == ["x.pt", "y.pt"]
    calls.clear()
    assert _zoo_run(capsys, src, out, "--seed", "1", "--no-resume").code == 1
    assert sorted(calls) == ["x.pt", "y.pt"]


def test_manifests_csv_and_jsonl_with_labels(zoo: Path, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    csv_m = tmp_path / "zoo.csv"
    csv_m.write_text(f"path,arch,label\n{zoo / 'c.pt'},,1\n{zoo / 'a.pt'},,clean\n")
    jsonl = zoo.parent / "zoo.jsonl"
    jsonl.write_text('{"path": "models/c.pt", "label": 1}\n\n'
                     '{"path": "models/a.pt", "label": "clean"}\n')
    for manifest, out, prefix in ((csv_m, tmp_path / "o1", ""),
                                  (jsonl, tmp_path / "o2", "models__")):
        assert _zoo_run(capsys, manifest, out).code == 1
        doc = _load(out)
        assert [(r["name"], r["label"], r["verdict"]) for r in doc["models"]] == [
            (f"{prefix}c.pt", 1, "backdoored"), (f"{prefix}a.pt", 0, "clean")]
        assert doc["summary"]["auroc"] == 1.0


@pytest.mark.parametrize("content,suffix,expected", [
    ("model,label\nc.pt,1\n", ".csv", "path"),
    ("path\nmissing.pt\n", ".csv", "existing model file"),
    ("path\nc.pt\nc.pt\n", ".csv", "each model once"),
    ("path,label\nc.pt,maybe\n", ".csv", "label 1/0"),
    ('{"path": "c.pt"}\n{oops\n', ".jsonl", "line 2"),
    ('{"path": "c.pt", "extra": 1}\n', ".jsonl", "only the keys"),
    ("", ".csv", "header"),
    ("path\nc.pt\n", ".txt", "manifest"),
    # a manifest travels with the models: it never chooses code (only --arch does)
    ("path,arch\nc.pt,os:abort\n", ".csv", "taken only from --arch"),
    ('{"path": "c.pt", "arch": "evil.py:f"}\n', ".jsonl", "taken only from --arch"),
])
def test_bad_manifest_exit_2_one_line(zoo: Path, capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path, content: str, suffix: str,
                                      expected: str) -> None:
    manifest = zoo / f"bad{suffix}"
    manifest.write_text(content)
    try:
        r = _zoo_run(capsys, manifest, tmp_path / "out")
    finally:
        manifest.unlink()
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("case,expected", [
    ("labels_unknown", "a path of a model in SOURCE"),
    ("labels_header", "--labels"),
    ("out_in_source", "--out"),
    ("no_models", "SOURCE"),
    ("workers", "--workers"),
    ("timeout", "--model-timeout"),
])
def test_bad_inputs_exit_2_before_work(zoo: Path, capsys: pytest.CaptureFixture[str],
                                       tmp_path: Path, case: str, expected: str) -> None:
    labels = tmp_path / "labels.csv"
    source, out, extra = zoo, tmp_path / "out", []
    if case == "labels_unknown":
        labels.write_text("path,label\nnope.pt,1\n")
        extra = ["--labels", str(labels)]
    elif case == "labels_header":
        labels.write_text("file,label\na.pt,1\n")
        extra = ["--labels", str(labels)]
    elif case == "out_in_source":
        out = zoo / "report"
    elif case == "no_models":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "workers":
        extra = ["--workers", "-1"]
    else:
        extra = ["--model-timeout", "0"]
    r = _zoo_run(capsys, source, out, *extra)
    lines = r.err.strip().splitlines()
    assert r.code == 2 and len(lines) == 1 and expected in lines[0], r.err
    assert not out.exists()


def test_every_model_failing_exits_2_and_timeouts_are_rows(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    save_model(src / "x.pt", 21)
    (src / "broken.onnx").write_bytes(b"\x08garbage")
    r = _zoo_run(capsys, src, tmp_path / "out", "--model-timeout", "0.001")
    assert r.code == 2 and "every model failed" in r.err
    rows = _rows(_load(tmp_path / "out"))
    assert "timed out" in rows["x.pt"]["error"] and rows["broken.onnx"]["error"]


def test_missing_ray_names_the_extra(zoo: Path, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    r = _zoo_run(capsys, zoo, tmp_path / "out", workers="1")
    assert r.code == 2 and "trojanscan[ray]" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "zoo.json").exists()


def test_ray_one_worker_gives_the_serial_rows(labelled_run: tuple[Path, Any], zoo: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    pytest.importorskip("ray")
    serial = _rows(_load(labelled_run[0]))
    r = _zoo_run(capsys, zoo, tmp_path / "ray", workers="1")
    assert r.code == 1, r.err
    doc = _load(tmp_path / "ray")
    assert doc["summary"]["backend"] == "ray" and doc["summary"]["workers"] == 1
    for name, row in _rows(doc).items():
        assert (row["verdict"], row["score"], row["suspected_targets"]) == (
            serial[name]["verdict"], serial[name]["score"], serial[name]["suspected_targets"])
    ref = json.loads((labelled_run[0] / "models" / "c.pt" / "report.json").read_text())
    got = json.loads((tmp_path / "ray" / "models" / "c.pt" / "report.json").read_text())
    assert got["detectors"]["mntd"]["raw_score"] == ref["detectors"]["mntd"]["raw_score"]


def test_zoo_html_in_headless_chromium(labelled_run: tuple[Path, Any]) -> None:
    pytest.importorskip("playwright.sync_api")
    from scripts.check_report_html import check_reports, find_chromium

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary installed")
    out = labelled_run[0]
    html = (out / "zoo.html").read_text()
    assert "AUROC" in html and "<polyline" in html and "models/c.pt/report.html" in html
    (res,) = check_reports([out / "zoo.html"], chromium=chromium)
    assert res.ok, res
    assert not res.console_errors and not res.blocked_requests
    assert res.verdict_text.startswith("Verdict: 1 of 5 models flagged")
    # the table sorts by score when its header is clicked (the inline script runs)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((out / "zoo.html").resolve().as_uri())
            page.click("#models th:nth-child(3)")
            page.click("#models th:nth-child(3)")  # descending
            first = page.locator("#models tbody tr").first.locator("td").first.inner_text()
        finally:
            browser.close()
    assert first == "c.pt" and not errors
