"""CIFAR-10/100 in their binary and Python-pickle layouts, on tiny generated files.

The pickles are written as Python 2's cPickle wrote the real ones (protocol 2, strings as
``BINSTRING``, arrays through ``numpy.core.multiarray._reconstruct``), so the restricted
unpickler is tested on the opcodes and globals it meets in the wild.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests._cli import run_cli
from trojanscan.exceptions import DataError
from trojanscan.io.cifar import load_cifar_pickle
from trojanscan.io.data import load_dataset

C10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]


class _Global:
    """A ``module.name`` reference written as a GLOBAL opcode, as Python 2 wrote them."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: object) -> None:  # pickle only checks callability
        raise AssertionError("never called")


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:  # Python 2 str: (SHORT_)BINSTRING
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[bytes] = save_bytes
    dispatch[_Global] = save_ref

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.dtype):
            return (_Global("numpy", "dtype"), (f"{obj.kind}{obj.itemsize}".encode(), 0, 1),
                    (3, b"|" if obj.itemsize == 1 else b"<", None, None, None, -1, -1, 0))
        if isinstance(obj, np.ndarray):
            return (_Global("numpy.core.multiarray", "_reconstruct"),
                    (_Global("numpy", "ndarray"), (0,), b"b"),
                    (1, obj.shape, obj.dtype, False, obj.tobytes()))
        return NotImplemented


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def _write_c10_binary(folder: Path, batches: list[tuple[np.ndarray, np.ndarray]],
                      test: tuple[np.ndarray, np.ndarray] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (x, y) in enumerate(batches, start=1):
        rows = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)
        (folder / f"data_batch_{k}.bin").write_bytes(rows.tobytes())
    if test is not None:
        x, y = test
        rows = np.concatenate([y.astype(np.uint8)[:, None], x.reshape(len(x), -1)], axis=1)
        (folder / "test_batch.bin").write_bytes(rows.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(C10_NAMES) + "\n\n")


def _c10_batch(x: np.ndarray, y: np.ndarray) -> dict[bytes, object]:
    return {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in y],
            b"data": x.reshape(len(x), -1), b"filenames": [b"img_%d.png" % i
                                                           for i in range(len(x))]}


@pytest.fixture
def c10(tmp_path: Path) -> dict[str, Any]:
    b1, b2, t = _images(7, 1), _images(5, 2), _images(4, 3)
    y1, y2, yt = np.arange(7) % 10, (np.arange(5) + 3) % 10, np.array([9, 0, 1, 2])
    return {"root": tmp_path, "x_train": np.concatenate([b1, b2]),
            "y_train": np.concatenate([y1, y2]), "x_test": t, "y_test": yt,
            "batches": [(b1, y1), (b2, y2)], "test": (t, yt)}


def _check(ds: Any, x: np.ndarray, y: np.ndarray) -> None:
    assert torch.equal(ds.x, torch.from_numpy(x.astype(np.float32) / 255))
    assert ds.labels().tolist() == y.tolist()


def test_cifar10_binary_folder_and_files(c10: dict[str, Any]) -> None:
    folder = c10["root"] / "cifar-10-batches-bin"
    _write_c10_binary(folder, c10["batches"], c10["test"])
    train = load_dataset(f"{folder}:train")
    _check(train, c10["x_train"], c10["y_train"])
    assert train.format == "cifar-10-binary" and train.class_names == tuple(C10_NAMES)
    test = load_dataset(f"{folder}:test")
    _check(test, c10["x_test"], c10["y_test"])
    one = load_dataset(folder / "data_batch_2.bin")
    _check(one, *c10["batches"][1])
    with pytest.raises(DataError, match=r":train or .*:test"):
        load_dataset(folder)
    with pytest.raises(DataError, match="no split 'valid'"):
        load_dataset(f"{folder}:valid")
    sub = load_dataset(f"{folder}:train", max_samples=5, seed=1)
    rows = torch.randperm(12, generator=torch.Generator().manual_seed(1))[:5].sort().values
    assert torch.equal(sub.x, train.x[rows])


def test_cifar10_binary_bad_size(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(b"\0" * 3072)
    with pytest.raises(DataError, match="not a whole number of cifar-10 binary rows"):
        load_dataset(tmp_path / "data_batch_1.bin")


def test_cifar10_python_layout(c10: dict[str, Any]) -> None:
    folder = c10["root"] / "cifar-10-batches-py"
    folder.mkdir()
    for k, (x, y) in enumerate(c10["batches"], start=1):
        (folder / f"data_batch_{k}").write_bytes(py2_pickle(_c10_batch(x, y)))
    (folder / "test_batch").write_bytes(py2_pickle(_c10_batch(*c10["test"])))
    (folder / "batches.meta").write_bytes(py2_pickle(
        {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in C10_NAMES],
         b"num_vis": 3072}))
    train = load_dataset(f"{folder}:train")
    _check(train, c10["x_train"], c10["y_train"])
    assert train.format == "cifar-10-python" and train.class_names == tuple(C10_NAMES)
    _check(load_dataset(f"{folder}:TEST"), c10["x_test"], c10["y_test"])
    _check(load_dataset(folder / "test_batch"), c10["x_test"], c10["y_test"])
    # a folder holding only the test batch needs no selector
    only = c10["root"] / "only-test"
    only.mkdir()
    (only / "test_batch").write_bytes((folder / "test_batch").read_bytes())
    _check(load_dataset(only), c10["x_test"], c10["y_test"])


def _c100_parts() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = _images(6, 4)
    fine = np.array([0, 99, 42, 7, 55, 13])
    coarse = fine // 5
    return x, fine, coarse


def test_cifar100_binary_uses_fine_labels(tmp_path: Path) -> None:
    x, fine, coarse = _c100_parts()
    rows = np.concatenate([coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None],
                           x.reshape(len(x), -1)], axis=1)
    (tmp_path / "train.bin").write_bytes(rows.tobytes())
    (tmp_path / "test.bin").write_bytes(rows[:2].tobytes())
    names = [f"class_{i}" for i in range(100)]
    (tmp_path / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    ds = load_dataset(f"{tmp_path}:train")
    _check(ds, x, fine)
    assert ds.format == "cifar-100-binary" and ds.class_names == tuple(names)
    assert ds.num_classes == 100
    assert len(load_dataset(tmp_path / "test.bin")) == 2


def test_cifar100_python_uses_fine_labels(tmp_path: Path) -> None:
    x, fine, coarse = _c100_parts()
    batch = {b"filenames": [b"a.png"] * 6, b"batch_label": b"training batch 1 of 1",
             b"fine_labels": [int(v) for v in fine], b"coarse_labels": [int(v) for v in coarse],
             b"data": x.reshape(6, -1)}
    (tmp_path / "train").write_bytes(py2_pickle(batch))
    (tmp_path / "meta").write_bytes(py2_pickle(
        {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
         b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}))
    ds = load_dataset(tmp_path)  # only the train split is present
    _check(ds, x, fine)
    assert ds.format == "cifar-100-python" and ds.class_names == tuple(
        f"f{i}" for i in range(100))


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    return py2_pickle({b"data": Evil(), b"labels": [0]})


def test_restricted_unpickler_refuses_code(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(_evil_pickle(marker))
    with pytest.raises(DataError, match=r"refused to unpickle: it references posix\.system"):
        load_cifar_pickle(folder / "data_batch_1")
    assert not marker.exists()
    out = tmp_path / "m.pt"
    res = run_cli(capsys, "train", "--dataset", str(folder), "--out", str(out), "--quiet")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "refused to unpickle" in lines[0] and "posix.system" in lines[0]
    assert "Traceback" not in res.err
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=2),
    pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, protocol=5),
    b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.",
])
def test_restricted_unpickler_refuses_other_globals(tmp_path: Path, payload: bytes) -> None:
    """Modern pickles reach numpy through ``_codecs.encode`` or ``_frombuffer``: not what a
    CIFAR file needs, so refused with the global named (and nothing evaluated)."""
    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="refused to unpickle: it references") as info:
        load_dataset(tmp_path / "test_batch")
    assert "\n" not in str(info.value)


def test_corrupt_pickle_is_one_clear_error(tmp_path: Path) -> None:
    good = py2_pickle(_c10_batch(_images(2, 0), np.array([1, 2])))
    (tmp_path / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="not a readable CIFAR pickle"):
        load_dataset(tmp_path / "test_batch")
    (tmp_path / "test_batch").write_bytes(py2_pickle({b"data": [1, 2], b"labels": [0]}))
    with pytest.raises(DataError, match="'data' must be an N×3072 uint8 array"):
        load_dataset(tmp_path / "test_batch")
    (tmp_path / "test_batch").write_bytes(py2_pickle(_c10_batch(_images(2, 0),
                                                                np.array([1, 10]))))
    with pytest.raises(DataError, match="label 10 is out of range for cifar-10"):
        load_dataset(tmp_path / "test_batch")


def test_budget_checked_before_reading(c10: dict[str, Any]) -> None:
    folder = c10["root"] / "bin"
    _write_c10_binary(folder, c10["batches"], None)
    with pytest.raises(DataError, match="data budget"):
        load_dataset(folder, max_bytes=10_000)
