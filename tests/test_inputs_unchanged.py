"""Every command leaves every input byte-identical (sha256 of each file before and
after): on a real run, and when an output is aimed at an input — then the command
answers with one line and exit code 2 before any work, and writes nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from _cli import run_cli
from _hardening_files import (  # noqa: F401  (no_work is a fixture)
    assert_one_line_error,
    digests,
    files_fixture,
    no_work,
    tree,
)

f = files_fixture("inputs")


def _inputs(f: dict[str, Path]) -> list[Path]:
    return [f[k] for k in ("model", "sidecar", "train", "clean", "inputs", "imgs", "refs")]


# ----------------------------------------------------------------------------- real runs

RUNS: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "scan": lambda f, o: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--detectors", "neural_cleanse",
        "--param", "neural_cleanse.max_steps=3", "--param", "neural_cleanse.images=false",
        "--max-samples", "80", "--device", "cpu", "--out", str(o / "rep")],
    "scan-data --export-clean --verify": lambda f, o: [
        "scan-data", str(f["train"]), "--model", str(f["model"]), "--detectors", "spectre",
        "--verify", "--arch", "mlp", "--export-clean", str(o / "clean.npz"), "--device", "cpu",
        "--out", str(o / "rep")],
    "filter": lambda f, o: [
        "filter", str(f["model"]), str(f["inputs"]), "--calibrate", str(f["clean"]),
        "--param", "n_overlays=8", "--device", "cpu", "--out", str(o / "rep")],
    "mitigate": lambda f, o: [
        "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(o / "m.pt"),
        "--report", str(o / "rep"), "--unlearn-epochs", "1", "--device", "cpu"],
    "train --save-data": lambda f, o: [
        "train", "--dataset", str(f["train"]), "--test-data", str(f["clean"]), "--arch", "mlp",
        "--epochs", "1", "--attack", "badnets:size=2,target=0,margin=0", "--device", "cpu",
        "--out", str(o / "m.pt"), "--save-data", str(o / "poisoned.npz")],
}


@pytest.mark.parametrize("command", list(RUNS))
def test_command_leaves_every_input_byte_identical(command: str, f: dict[str, Path],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    before = digests(_inputs(f))
    files_before = tree(f["root"])
    r = run_cli(capsys, *RUNS[command](f, tmp_path), "--quiet")
    assert r.code in (0, 1), r.err
    assert digests(_inputs(f)) == before
    assert tree(f["root"]) == files_before  # nothing added beside the inputs either
    assert tree(tmp_path)  # it did write its outputs


# ----------------------------------------------------------- outputs aimed at inputs


def _refused(capsys: pytest.CaptureFixture[str], f: dict[str, Path], tmp_path: Path,
             argv: list[str], *needles: str) -> None:
    before = digests(_inputs(f))
    files_before = tree(f["root"])
    r = run_cli(capsys, *argv)
    assert_one_line_error(r, *needles)
    assert digests(_inputs(f)) == before
    assert tree(f["root"]) == files_before and tree(tmp_path) == set()


def test_train_out_equal_dataset_refused(f: dict[str, Path], tmp_path: Path,
                                         no_work: list[str],  # noqa: F811
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, f, tmp_path, [
        "train", "--dataset", str(f["train"]), "--arch", "mlp", "--epochs", "1",
        "--out", str(f["train"])], "--out", "--dataset")
    assert no_work == []


def test_train_save_data_equal_dataset_refused(f: dict[str, Path], tmp_path: Path,
                                               no_work: list[str],  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, f, tmp_path, [
        "train", "--dataset", str(f["train"]), "--arch", "mlp", "--epochs", "1",
        "--out", str(tmp_path / "m.pt"), "--save-data", str(f["train"])],
        "--save-data", "--dataset")
    assert no_work == []


def test_mitigate_out_equal_data_refused(f: dict[str, Path], tmp_path: Path,
                                         no_work: list[str],  # noqa: F811
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, f, tmp_path, [
        "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["clean"]),
        "--report", str(tmp_path / "rep")], "--out", "--data")
    assert no_work == []


#: (id, argv builder, words the one-line error must hold); ``t`` is an empty folder
AIMED: list[tuple[str, Callable[[dict[str, Path], Path], list[str]], tuple[str, ...]]] = [
    ("scan --out MODEL", lambda f, t: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["model"])],
     ("--out", "MODEL")),
    ("scan --out DATA", lambda f, t: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["clean"])],
     ("--out", "--data")),
    ("scan --out sidecar", lambda f, t: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["sidecar"])],
     ("--out", "sidecar")),
    ("scan --out a reference", lambda f, t: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--nc-reference", str(f["refs"]),
        "--out", str(f["refs"] / "clean-1")], ("--out", "--nc-reference")),
    ("scan --out holds a reference report", lambda f, t: [
        "scan", str(f["model"]), "--data", str(f["clean"]), "--nc-reference",
        str(f["ref_report"]), "--out", str(f["ref_report"].parent)],
     ("--out", "--nc-reference")),
    ("scan-data --out TRAIN", lambda f, t: [
        "scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(f["train"])],
     ("--out", "TRAIN")),
    ("scan-data --export-clean TRAIN", lambda f, t: [
        "scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(t / "rep"),
        "--export-clean", str(f["train"])], ("--export-clean", "TRAIN")),
    ("scan-data --export-clean TRAIN with dots", lambda f, t: [
        "scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(t / "rep"),
        "--export-clean", str(f["root"] / "imgs" / ".." / "." / "train.npz")],
     ("--export-clean", "TRAIN")),
    ("scan-data --verify --export-clean TRAIN", lambda f, t: [
        "scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(t / "rep"),
        "--verify", "--arch", "mlp", "--export-clean", str(f["train"])],
     ("--export-clean", "TRAIN")),
    ("filter --out INPUTS", lambda f, t: [
        "filter", str(f["model"]), str(f["inputs"]), "--calibrate", str(f["clean"]),
        "--out", str(f["inputs"])], ("--out", "INPUTS")),
    ("filter --out CALIBRATE", lambda f, t: [
        "filter", str(f["model"]), str(f["inputs"]), "--calibrate", str(f["clean"]),
        "--out", str(f["clean"])], ("--out", "--calibrate")),
    ("mitigate --out MODEL", lambda f, t: [
        "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["model"]),
        "--report", str(t / "rep")], ("--out", "MODEL")),
    ("mitigate --out sidecar", lambda f, t: [
        "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(f["sidecar"]),
        "--report", str(t / "rep")], ("--out", "sidecar")),
    ("mitigate --report DATA", lambda f, t: [
        "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(t / "m.pt"),
        "--report", str(f["clean"])], ("--report", "--data")),
    ("train --out TEST-DATA", lambda f, t: [
        "train", "--dataset", str(f["train"]), "--test-data", str(f["clean"]), "--arch", "mlp",
        "--out", str(f["clean"])], ("--out", "--test-data")),
    ("train --save-data TEST-DATA", lambda f, t: [
        "train", "--dataset", str(f["train"]), "--test-data", str(f["clean"]), "--arch", "mlp",
        "--out", str(t / "m.pt"), "--save-data", str(f["clean"])],
     ("--save-data", "--test-data")),
    ("train --out inside an image folder", lambda f, t: [
        "train", "--dataset", str(f["imgs"]), "--arch", "mlp", "--out",
        str(f["imgs"] / "a" / "m.pt")], ("--out", "--dataset")),
]


@pytest.mark.parametrize(("argv", "needles"), [(a, n) for _, a, n in AIMED],
                         ids=[i for i, _, _ in AIMED])
def test_output_aimed_at_an_input_refused_before_work(
        argv: Callable[[dict[str, Path], Path], list[str]], needles: tuple[str, ...],
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, f, tmp_path, argv(f, tmp_path), *needles)
    assert no_work == []


def test_links_to_an_input_refused_before_work(f: dict[str, Path], tmp_path: Path,
                                               no_work: list[str],  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A symbolic link, a hard link and a relative path to TRAIN are TRAIN."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "soft.npz").symlink_to(f["train"])
    os.link(f["train"], links / "hard.npz")
    monkeypatch.chdir(f["root"])
    for target in (links / "soft.npz", links / "hard.npz", Path("train.npz"),
                   Path("./train.npz")):
        before = digests(_inputs(f))
        r = run_cli(capsys, "scan-data", "train.npz", "--model", str(f["model"]), "--out",
                    str(links / "rep"), "--export-clean", str(target))
        assert_one_line_error(r, "--export-clean", "TRAIN")
        assert digests(_inputs(f)) == before
        r = run_cli(capsys, "train", "--dataset", "./train.npz", "--arch", "mlp", "--out",
                    str(links / "m.pt"), "--save-data", str(target))
        assert_one_line_error(r, "--save-data", "--dataset")
    assert tree(links) == {"soft.npz", "hard.npz"} and no_work == []
