"""``trojanscan demo --quick`` end to end (on digits, so that it runs in seconds anywhere).

The demo is the README's first command: it must run offline, find the backdoor it
planted, not accuse the clean twin, and leave the four reports it announces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from tests.test_scan_command import SCHEMA


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("TROJANSCAN_FASHION_MNIST_DIR", str(out / "no-fashion-mnist-here"))
    try:
        from trojanscan.cli import main

        with pytest.raises(SystemExit) as info:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                main(["demo", "--quick", "--out", str(out / "run")])
        assert info.value.code in (0, None)
    finally:
        mp.undo()
    return out / "run", buf.getvalue()


def test_demo_tells_its_story_and_falls_back_to_digits(demo: tuple[Path, str]) -> None:
    _, story = demo
    assert "scikit-learn digits" in story and "Fashion-MNIST is not available" in story
    m = re.search(r"backdoored model → (\w+) .*suspected target\(s\) \[([\d, ]*)\]; true "
                  r"target (\d+)\); clean model → (\w+)", story)
    assert m, story
    assert m.group(1) == "BACKDOORED" and m.group(4) == "CLEAN"
    assert m.group(3) in m.group(2).split(", ")
    # the data scan's line agrees with its report (on the 8×8 digits Spectral Signatures
    # and SPECTRE do not find the 2×2 patch's poison; on Fashion-MNIST they do — see
    # benchmarks/notes/data_poisoning_development.md)
    m = re.search(r"3\. scan-data: (\w+) — flagged (\d+) of (\d+) training samples; (\d+) of "
                  r"the (\d+) poisoned", story)
    assert m, story
    out, _ = demo
    rep = json.loads((out / "scan-data" / "report.json").read_text())
    assert m.group(1) == rep["verdict"].upper() and int(m.group(2)) == rep["num_flagged"]
    assert int(m.group(3)) == rep["num_samples"] and int(m.group(5)) > 0
    assert "4. filter (STRIP" in story


def test_demo_reports_are_valid_and_agree_with_the_story(demo: tuple[Path, str]) -> None:
    out, _ = demo
    for name in ("scan-backdoored", "scan-clean", "scan-data", "filter"):
        doc = json.loads((out / name / "report.json").read_text())
        jsonschema.Draft202012Validator(SCHEMA).validate(doc)
        assert (out / name / "report.html").is_file()
    bd = json.loads((out / "scan-backdoored" / "report.json").read_text())
    assert bd["detectors"]["neural_cleanse"]["decision"] == "reference"
    assert bd["detectors"]["neural_cleanse"]["num_reference_models"] == 3
    flt = json.loads((out / "filter" / "report.json").read_text())
    flagged = flt["flagged"]
    half = len(flagged) // 2  # triggered inputs first, then as many clean ones
    assert sum(flagged[:half]) >= 0.8 * half and sum(flagged[half:]) <= 0.1 * half


def test_demo_reuses_its_models(demo: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
                                ) -> None:
    from trojanscan.commands import demo as demo_cmd

    out, _ = demo
    assert len(list((out / "models").glob("*.pt"))) == 5  # backdoored, twin, 3 references
    monkeypatch.setenv("TROJANSCAN_FASHION_MNIST_DIR", str(out / "none"))
    plan = demo_cmd._plan(True, 0)
    key = {"dataset": plan.dataset, "quick": True, "seed": 0, "attack":
           demo_cmd._attack_spec(plan.dataset), "n_train": len(plan.train),
           "epochs": plan.config.epochs, "poison_rate": demo_cmd.POISON_RATE, "kind": "clean"}

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached model should have been reused")

    monkeypatch.setattr("trojanscan.zoo.make_model", no_training)
    meta = demo_cmd._cached_or_train(out / "models" / "clean.pt", True, 0, None, 0, "cpu", key)
    assert meta["demo_key"] == key
    with pytest.raises(AssertionError, match="reused"):  # other settings: retrained
        demo_cmd._cached_or_train(out / "models" / "clean.pt", True, 0, None, 0, "cpu",
                                  {**key, "epochs": 99})


def test_demo_rejects_bad_jobs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from tests._cli import run_cli

    r = run_cli(capsys, "demo", "--quick", "--jobs", "0", "--out", str(tmp_path / "d"))
    assert r.code == 2 and "jobs" in r.err and "Traceback" not in r.err
