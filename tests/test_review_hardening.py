"""Holes found by reviewing the hardening of the loaders, output checks and sidecars:
an IDX split (``FOLDER:split``) or an IDX images file left its files unprotected from
outputs; a data folder or a sidecar could make Pillow start an external program (an EPS
file is decoded by Ghostscript whatever its name); a named pipe given as data blocked
the command forever."""

from __future__ import annotations

import gzip
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from _cli import run_cli
from _hardening_files import (  # noqa: F401  (no_work is a fixture)
    assert_one_line_error,
    digest,
    no_work,
)
from trojanscan.commands.scan_data import sidecar_attack
from trojanscan.exceptions import DataError, ParameterError, TrojanscanWarning
from trojanscan.io.data import load_dataset
from trojanscan.io.outputs import Input, Output, check_outputs, report_folder

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n"
       b"0 0 moveto 4 4 lineto stroke\nshowpage\n%%EOF\n")


def idx_folder(root: Path) -> Path:
    """A folder of IDX files with a gzipped train split and a plain t10k split."""
    folder = root / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 4, 4), dtype=np.uint8)
    y = (np.arange(12) % 2).astype(np.uint8)
    for split, gz in (("train", True), ("t10k", False)):
        opener = gzip.open if gz else open
        sfx = ".gz" if gz else ""
        with opener(folder / f"{split}-images-idx3-ubyte{sfx}", "wb") as f:
            f.write(struct.pack(">iiii", 0x803, 12, 4, 4) + x.tobytes())
        with opener(folder / f"{split}-labels-idx1-ubyte{sfx}", "wb") as f:
            f.write(struct.pack(">ii", 0x801, 12) + y.tobytes())
    return folder


# ------------------------------------------------------------------ IDX inputs protected


@pytest.mark.parametrize("target", ["train-images-idx3-ubyte.gz", "report",
                                    "train-labels-idx1-ubyte.gz"])
def test_output_inside_an_idx_split_folder_is_refused(tmp_path: Path, target: str) -> None:
    folder = idx_folder(tmp_path)
    out = folder / target
    with pytest.raises(ParameterError, match=r"--out.*input folder"):
        check_outputs([Output("--out", out)], [Input("--dataset", f"{folder}:train")])
    with pytest.raises(ParameterError, match=r"--out.*input folder"):
        check_outputs([report_folder("--out", out)], [Input("--data", f"{folder}:t10k")])


def test_labels_file_of_an_idx_images_file_is_an_input(tmp_path: Path) -> None:
    folder = idx_folder(tmp_path)
    with pytest.raises(ParameterError, match=r"--out.*--data input"):
        check_outputs([Output("--out", folder / "t10k-labels-idx1-ubyte")],
                      [Input("--data", folder / "t10k-images-idx3-ubyte")])


def test_builtin_and_missing_inputs_still_skipped(tmp_path: Path) -> None:
    check_outputs([report_folder("--out", tmp_path / "r")],
                  [Input("--data", "digits:train"), Input("--data", tmp_path / "nope:x")])


def test_train_refuses_to_write_its_model_over_an_idx_split(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        no_work: list[str]) -> None:  # noqa: F811
    folder = idx_folder(tmp_path)
    before = digest(folder)
    r = run_cli(capsys, "train", "--dataset", f"{folder}:train", "--out",
                str(folder / "train-images-idx3-ubyte.gz"), "--epochs", "1")
    assert_one_line_error(r, "--out", "input folder")
    assert digest(folder) == before and no_work == []


# ------------------------------------------------------------------ Pillow decoders


def _no_eps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    opened: list[str] = []

    def refuse(self: object) -> None:
        opened.append("EPS")
        raise OSError("the EPS decoder must never be tried")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    return opened


def test_image_folder_never_tries_the_eps_decoder(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    opened = _no_eps(monkeypatch)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "0.png").write_bytes(EPS)
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset(tmp_path)
    assert opened == []


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".webp"])
def test_image_folder_still_reads_every_listed_format(tmp_path: Path, ext: str) -> None:
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(
                tmp_path / c / f"{i}{ext}")
    ds = load_dataset(tmp_path)
    assert ds.x.shape[0] == 4 and tuple(ds.x.shape[2:]) == (5, 6)  # GIF is palette: RGB
    assert ds.labels().tolist() == [0, 0, 1, 1]


def test_sidecar_attack_never_opens_a_file(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    opened = _no_eps(monkeypatch)
    trig = tmp_path / "trigger.png"
    trig.write_bytes(EPS)
    read: list[str] = []
    import trojanscan.attacks.patterns as patterns

    real = patterns.load_pattern_file
    monkeypatch.setattr(patterns, "load_pattern_file",
                        lambda name, path: read.append(path) or real(name, path))
    for spec in (f"badnets:target=0,pattern={trig}",
                 f"multi:badnets(target=0,pattern={tmp_path / 'p.NPY'})+blend(target=1)"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert sidecar_attack({"attack": {"spec": spec}}) is None
        assert any(issubclass(w.category, TrojanscanWarning) and "names the file" in
                   str(w.message) for w in caught)
    assert read == [] and opened == []
    plain = sidecar_attack({"attack": {"spec": "badnets:target=1,size=2"}})
    assert plain is not None and plain.target == 1


# ------------------------------------------------------------------ pipes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_as_data_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def load() -> None:
        try:
            load_dataset(fifo)
        except BaseException as exc:  # handed to the test thread
            caught.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # unblock the reader so the thread ends
        with open(fifo, "wb"):
            pass
        pytest.fail("load_dataset blocked on a named pipe")
    assert len(caught) == 1 and isinstance(caught[0], DataError), caught
    assert "not a regular file" in str(caught[0])


# ------------------------------------------------------------------ npz ambiguity


def test_npz_with_an_array_twice_is_refused(tmp_path: Path) -> None:
    """numpy.load reads the last copy of a repeated member; a reader taking the first
    would see other data than every numpy-based tool: such an archive is refused."""
    import io
    import zipfile

    def npy(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    path = tmp_path / "dup.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", npy(np.zeros((6, 1, 4, 4), np.uint8)))
            z.writestr("y.npy", npy(np.arange(6) % 2))
            z.writestr("x.npy", npy(np.full((6, 1, 4, 4), 255, np.uint8)))
    with pytest.raises(DataError, match="'x' twice"):
        load_dataset(path)


# ------------------------------------------------------------------ guard token


def test_token_env_never_echoes_a_token_passed_by_mistake() -> None:
    from trojanscan.serve_options import token_from_env

    token = "deadbeef0123456789abcdef0123456789"  # hex: also a valid variable name
    with pytest.raises(ParameterError) as info:
        token_from_env(token, environ={})
    assert token not in str(info.value) and "NAME" in str(info.value)
    with pytest.raises(ParameterError, match="MY_GUARD_TOKEN: the environment variable is"):
        token_from_env("MY_GUARD_TOKEN", environ={})


def test_report_images_folder_linked_into_an_input_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    (data / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data / "a" / "0.png")
    out = tmp_path / "report"
    out.mkdir()
    (out / "images").symlink_to(data, target_is_directory=True)
    for given in (data, data / "a" / "0.png"):
        with pytest.raises(ParameterError, match=r"--out.*images/"):
            check_outputs([report_folder("--out", out)], [Input("--data", given)])
    other = tmp_path / "clean.npz"
    other.write_bytes(b"")
    check_outputs([report_folder("--out", out)], [Input("--data", other)])


def test_letter_case_of_what_a_report_writes_is_ignored(tmp_path: Path) -> None:
    """On a case-insensitive file system OUT/Images is OUT/images: an input there would
    receive the report's images."""
    data = tmp_path / "Images"
    (data / "a").mkdir(parents=True)
    with pytest.raises(ParameterError, match="--out"):
        check_outputs([report_folder("--out", tmp_path)], [Input("--data", data)])


def test_folder_identity_is_checked_when_paths_differ(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two spellings of one folder that path resolution cannot equate (letter case on a
    case-insensitive file system, a bind mount) are still one folder: simulated with a
    symbolic link and a path resolution that does not follow links."""
    import trojanscan.io.outputs as outputs

    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "alias").symlink_to(data, target_is_directory=True)
    monkeypatch.setattr(outputs, "canonical",
                        lambda p: Path(os.path.abspath(os.path.expanduser(os.fspath(p)))))
    with pytest.raises(ParameterError, match="input folder"):
        check_outputs([report_folder("--out", tmp_path / "alias" / "report")],
                      [Input("--data", data)])
