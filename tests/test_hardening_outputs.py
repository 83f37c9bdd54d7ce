"""Outputs are checked before any work: an existing file where a folder goes, a folder
where a file goes, a place that cannot be written, an output that is an input or
another output — one line, exit code 2, nothing loaded, trained or written."""

from __future__ import annotations

import os
import sys
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
from trojanscan.exceptions import ParameterError
from trojanscan.io.outputs import Input, Output, check_outputs, report_folder

f = files_fixture("outputs")


def _scan(f: dict[str, Path], out: Path) -> list[str]:
    return ["scan", str(f["model"]), "--data", str(f["clean"]), "--out", str(out), "--quiet"]


def _scan_data(f: dict[str, Path], out: Path) -> list[str]:
    return ["scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(out),
            "--quiet"]


def _filter(f: dict[str, Path], out: Path) -> list[str]:
    return ["filter", str(f["model"]), str(f["inputs"]), "--calibrate", str(f["clean"]),
            "--out", str(out), "--quiet"]


def _mitigate_report(f: dict[str, Path], out: Path) -> list[str]:
    return ["mitigate", str(f["model"]), "--data", str(f["clean"]), "--out",
            str(out.parent / "repaired.pt"), "--report", str(out), "--quiet"]


def _demo(f: dict[str, Path], out: Path) -> list[str]:
    return ["demo", "--out", str(out), "--quick", "--jobs", "1", "--quiet"]


def _train(f: dict[str, Path], out: Path) -> list[str]:
    return ["train", "--dataset", str(f["train"]), "--test-data", str(f["clean"]), "--arch",
            "mlp", "--epochs", "1", "--out", str(out), "--quiet"]


def _mitigate_model(f: dict[str, Path], out: Path) -> list[str]:
    return ["mitigate", str(f["model"]), "--data", str(f["clean"]), "--out", str(out),
            "--report", str(out.parent / "mitigate-report"), "--quiet"]


#: commands whose --out (--report for mitigate) is a folder
FOLDER_OUT: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "scan": _scan, "scan-data": _scan_data, "filter": _filter, "mitigate": _mitigate_report,
    "demo": _demo}
#: commands whose --out is a file
FILE_OUT: dict[str, Callable[[dict[str, Path], Path], list[str]]] = {
    "train": _train, "mitigate": _mitigate_model}


@pytest.mark.parametrize("command", list(FOLDER_OUT))
def test_out_existing_file_refused_before_work(
        command: str, f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    occupied = tmp_path / "occupied.txt"
    occupied.write_text("mine")
    r = run_cli(capsys, *FOLDER_OUT[command](f, occupied))
    assert_one_line_error(r, "--", "existing file")
    assert no_work == [] and occupied.read_text() == "mine"
    assert tree(tmp_path) == {"occupied.txt"}


@pytest.mark.parametrize("command", list(FILE_OUT))
def test_file_out_existing_folder_refused_before_work(
        command: str, f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    r = run_cli(capsys, *FILE_OUT[command](f, folder))
    assert_one_line_error(r, "--out", "existing folder")
    assert no_work == [] and tree(tmp_path) == {"a-folder"}


def _all_commands() -> list[tuple[str, Callable[[dict[str, Path], Path], list[str]], bool]]:
    return ([(n, b, True) for n, b in FOLDER_OUT.items()]
            + [(f"{n}-file", b, False) for n, b in FILE_OUT.items()])


@pytest.mark.parametrize(("command", "build", "folder"), _all_commands(),
                         ids=[c[0] for c in _all_commands()])
def test_out_under_a_file_refused_before_work(
        command: str, build: Callable[[dict[str, Path], Path], list[str]], folder: bool,
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that cannot be created because a file is in its way (also as root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "sub" / ("rep" if folder else "m.pt")
    r = run_cli(capsys, *build(f, out))
    assert_one_line_error(r, "blocker")
    assert no_work == [] and tree(tmp_path) == {"blocker"}


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self").exists(),
                    reason="uses /proc, where nobody (root included) can create files")
@pytest.mark.parametrize(("command", "build", "folder"), _all_commands(),
                         ids=[c[0] for c in _all_commands()])
def test_out_readonly_refused_before_work(
        command: str, build: Callable[[dict[str, Path], Path], list[str]], folder: bool,
        f: dict[str, Path], no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """An unwritable place is refused before any work — also for the superuser, whom
    permission bits do not stop: /proc takes no new files from anyone."""
    out = Path("/proc/trojanscan-no-such-dir") / ("rep" if folder else "m.pt")
    r = run_cli(capsys, *build(f, out))
    assert_one_line_error(r, "cannot create files in '/proc'")
    assert no_work == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permission bits do not stop the superuser")
def test_out_readonly_folder_refused_for_a_normal_user(
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = run_cli(capsys, *_scan(f, ro / "rep"))
        assert_one_line_error(r, "--out", "cannot create files")
    finally:
        ro.chmod(0o700)
    assert no_work == []


@pytest.mark.parametrize(("option", "folder_name", "build"), [
    ("--save-data", "data-folder", lambda f, d: _train(f, d / "m.pt")),
    ("--export-clean", "clean.npz", lambda f, d: _scan_data(f, d / "rep")),
], ids=["save-data", "export-clean"])
def test_data_file_option_given_a_directory_refused(
        option: str, folder_name: str, build: Callable[[dict[str, Path], Path], list[str]],
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / folder_name
    folder.mkdir()
    r = run_cli(capsys, *build(f, tmp_path), option, str(folder))
    assert_one_line_error(r, option, "existing folder")
    assert no_work == [] and tree(tmp_path) == {folder_name}


def test_train_outputs_colliding_with_each_other_refused(
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    # --save-data would be replaced by the sidecar train writes beside --out
    r = run_cli(capsys, *_train(f, tmp_path / "m.pt"), "--save-data", str(tmp_path / "m.json"))
    assert_one_line_error(r, "--save-data")
    r = run_cli(capsys, *_train(f, tmp_path / "m.json"))
    assert_one_line_error(r, "out", ".json")
    assert no_work == [] and tree(tmp_path) == set()


def test_mitigate_model_inside_its_report_folder_refused(
        f: dict[str, Path], tmp_path: Path, no_work: list[str],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "mitigate", str(f["model"]), "--data", str(f["clean"]), "--out",
                str(tmp_path / "rep" / "report.json"), "--report", str(tmp_path / "rep"))
    assert_one_line_error(r, "--out")
    assert no_work == [] and tree(tmp_path) == set()


def test_test_data_shape_mismatch_refused(f: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--test-data of another shape than --dataset: one line before any training."""
    trained: list[int] = []

    def make_model(*args: object, **kwargs: object) -> None:
        trained.append(1)
        raise AssertionError("training started")

    monkeypatch.setattr("trojanscan.zoo.make_model", make_model)
    # the 1×4×4 training set against scikit-learn's 8×8 digits
    r = run_cli(capsys, "train", "--dataset", str(f["train"]), "--test-data", "digits:test",
                "--arch", "mlp", "--epochs", "1", "--out", str(tmp_path / "m.pt"))
    assert_one_line_error(r, "test_data", "1×4×4", "1×8×8")
    assert trained == [] and tree(tmp_path) == set()


def test_out_inside_an_input_folder_refused(f: dict[str, Path], no_work: list[str],  # noqa: F811
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A report folder inside an image-folder data set would add a class to it."""
    before = digests([f["imgs"]])
    r = run_cli(capsys, "scan-data", str(f["imgs"]), "--model", str(f["model"]), "--out",
                str(f["imgs"] / "report"))
    assert_one_line_error(r, "--out", "TRAIN")
    assert digests([f["imgs"]]) == before and no_work == []


# ----------------------------------------------------------------------------- the module


def test_check_outputs_sees_through_symlinks_dots_and_hard_links(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    data = tmp_path / "data.npz"
    data.write_bytes(b"data")
    monkeypatch.chdir(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    link = tmp_path / "link.npz"
    link.symlink_to(data)
    hard = tmp_path / "hard.npz"
    os.link(data, hard)
    for alias in ("data.npz", "./data.npz", "sub/../data.npz", str(link), str(hard),
                  str(data)):
        with pytest.raises(ParameterError, match=r"--x.*the --data input"):
            check_outputs([Output("--x", Path(alias))], [Input("--data", "data.npz")])
    # a report folder whose report.json is the input (or a hard link to it)
    os.link(data, sub / "report.json")
    with pytest.raises(ParameterError, match="report does not replace"):
        check_outputs([report_folder("--out", sub)], [Input("--data", data)])
    # an input beside the report files is fine; so are names that are not files
    # (built-in data sets) and unrelated paths
    check_outputs([report_folder("--out", tmp_path)], [Input("--data", data)])
    check_outputs([report_folder("--out", tmp_path / "rep"), Output("--y", tmp_path / "y.pt")],
                  [Input("--data", "digits:train"), Input("--model", data), Input("x", None)])
    assert data.read_bytes() == b"data"
