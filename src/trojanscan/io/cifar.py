"""CIFAR-10 and CIFAR-100 as distributed (Krizhevsky, "Learning Multiple Layers of Features
from Tiny Images", 2009): the binary and the Python-pickle layouts, read without running code.

Layouts (the folders the archives unpack to; the folder's own name does not matter)::

    cifar-10-batches-bin/   data_batch_1.bin … data_batch_5.bin, test_batch.bin,
                            batches.meta.txt (class names, one a line)
    cifar-10-batches-py/    data_batch_1 … data_batch_5, test_batch, batches.meta
    cifar-100-binary/       train.bin, test.bin, fine_label_names.txt
    cifar-100-python/       train, test, meta

* Binary rows: CIFAR-10 ``<label byte><3,072 pixel bytes>``; CIFAR-100 ``<coarse label>
  <fine label><3,072 pixel bytes>``. Pixels are 1,024 red, 1,024 green, 1,024 blue bytes,
  row-major: one row is one ``3×32×32`` image.
* Pickles: a dict with ``data`` (``N×3072`` uint8 array) and ``labels`` (CIFAR-10) or
  ``fine_labels``/``coarse_labels`` (CIFAR-100); the meta pickle holds ``label_names``
  (CIFAR-10) or ``fine_label_names`` (CIFAR-100).
* CIFAR-100 is read with its **fine** labels (100 classes) and fine class names; the coarse
  (20 super-class) labels are ignored.

The pickles were written by Python 2's cPickle. They are read by :func:`load_cifar_pickle`,
an unpickler that resolves only the three globals a pickled NumPy array needs
(``numpy.core.multiarray._reconstruct`` — also under its NumPy 2 name
``numpy._core.multiarray`` —, ``numpy.ndarray`` and ``numpy.dtype``) and maps them to
inert stand-ins that build the array from its bytes after checking shape, dtype and size;
NumPy's own functions are never called with the file's arguments. Any other global (a
function, a class, ``os.system``…) stops the read with a :class:`DataError` naming it: it is
never imported or called. Strings are decoded as bytes (``encoding="bytes"``), as
Python 2 pickles need.

Memory: a file's size bounds what it decodes to (the arrays' bytes are inside it), so the
budget (:mod:`trojanscan.io.limits`) is checked from the file sizes before anything is read.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..exceptions import DataError
from .limits import check_budget, select_rows

__all__ = [
    "PIXELS",
    "CifarSplit",
    "describe_file",
    "find_cifar_splits",
    "load_cifar_pickle",
    "read_cifar",
    "select_split",
]

#: Bytes of one image (3×32×32).
PIXELS = 3 * 32 * 32
_PICKLE_PROTOCOL_2_PLUS = b"\x80"
_BATCH_BIN = re.compile(r"^data_batch_(\d+)\.bin$")
_BATCH_PY = re.compile(r"^data_batch_(\d+)$")


@dataclass(frozen=True)
class CifarSplit:
    """One split of a CIFAR data set: its files in order and where its class names are."""

    family: str            # "cifar-10" or "cifar-100"
    encoding: str          # "binary" or "python"
    split: str             # "train", "test" or a single file's name
    files: tuple[Path, ...]
    meta: Path | None

    @property
    def format(self) -> str:
        return f"{self.family}-{self.encoding}"

    @property
    def classes(self) -> int:
        return 10 if self.family == "cifar-10" else 100


def _is_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == _PICKLE_PROTOCOL_2_PLUS
    except OSError:
        return False


def describe_file(path: Path) -> CifarSplit | None:
    """The one-file split ``path`` is, judged by its name (and, for the pickles, by its
    first byte), or ``None`` when it is not a CIFAR batch file."""
    name, folder = path.name, path.parent
    if _BATCH_BIN.match(name) or name == "test_batch.bin":
        return CifarSplit("cifar-10", "binary", name, (path,), _existing(folder,
                                                                            "batches.meta.txt"))
    if name in ("train.bin", "test.bin"):
        return CifarSplit("cifar-100", "binary", name, (path,),
                          _existing(folder, "fine_label_names.txt"))
    if (_BATCH_PY.match(name) or name == "test_batch") and _is_pickle(path):
        return CifarSplit("cifar-10", "python", name, (path,), _existing(folder, "batches.meta"))
    if name in ("train", "test") and _is_pickle(path):
        return CifarSplit("cifar-100", "python", name, (path,), _existing(folder, "meta"))
    return None


def _existing(folder: Path, name: str) -> Path | None:
    p = folder / name
    return p if p.is_file() else None


def find_cifar_splits(folder: Path) -> dict[str, CifarSplit]:
    """The ``train`` and ``test`` splits of a folder in one of the CIFAR layouts (empty when
    the folder is in none of them). Training batches are ordered by their number."""
    try:
        names = {p.name: p for p in folder.iterdir() if p.is_file()}
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    found: dict[str, CifarSplit] = {}
    for encoding, pattern, test_name, meta in (
            ("binary", _BATCH_BIN, "test_batch.bin", "batches.meta.txt"),
            ("python", _BATCH_PY, "test_batch", "batches.meta")):
        batches = sorted(((int(m.group(1)), p) for n, p in names.items()
                          if (m := pattern.match(n))), key=lambda t: t[0])
        if encoding == "python":
            batches = [(k, p) for k, p in batches if _is_pickle(p)]
        test = names.get(test_name)
        if encoding == "python" and test is not None and not _is_pickle(test):
            test = None
        if batches or test is not None:
            meta_path = names.get(meta)
            if batches:
                found["train"] = CifarSplit("cifar-10", encoding, "train",
                                            tuple(p for _, p in batches), meta_path)
            if test is not None:
                found["test"] = CifarSplit("cifar-10", encoding, "test", (test,), meta_path)
            return found
    for encoding, suffix, meta in (("binary", ".bin", "fine_label_names.txt"),
                                   ("python", "", "meta")):
        for split in ("train", "test"):
            p = names.get(split + suffix)
            if p is not None and (encoding == "binary" or _is_pickle(p)):
                found[split] = CifarSplit("cifar-100", encoding, split, (p,), names.get(meta))
        if found:
            return found
    return {}


def select_split(splits: dict[str, CifarSplit], selector: str | None, *,
                 folder: str) -> CifarSplit:
    """``train`` or ``test`` of a CIFAR folder; without a selector, the only split there is.
    A folder holding both needs one named (``folder:train`` / ``folder:test``)."""
    kind = next(iter(splits.values()))
    what = f"a {kind.family} folder ({kind.encoding} layout)"
    if selector is None:
        if len(splits) == 1:
            return next(iter(splits.values()))
        raise DataError(f"{folder}: {what} holding the splits train and test; choose one: "
                        f"{folder}:train or {folder}:test")
    key = selector.strip().lower()
    if key in splits:
        return splits[key]
    raise DataError(f"{folder}: {what} has no split {selector!r}; found "
                    + ", ".join(f"{folder}:{s}" for s in splits))


# --------------------------------------------------------------------------- unpickling

class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` in a pickle; never instantiated."""


class _DtypeStub:
    """Stands for ``numpy.dtype(spec, align, copy)`` + ``__setstate__``; checked later."""

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        if isinstance(spec, bytes):
            spec = spec.decode("ascii", "replace")
        if not isinstance(spec, str) or not re.fullmatch(r"[biuf]\d{1,2}", spec):
            raise DataError(f"a pickled numpy dtype {spec!r} is not a plain number type")
        self.spec = spec
        self.order = "|"

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) < 5 or any(
                s is not None for s in state[2:5]):
            raise DataError("a pickled numpy dtype has sub-arrays or fields")
        order = state[1].decode("ascii", "replace") if isinstance(state[1], bytes) else state[1]
        if order not in ("<", ">", "|", "="):
            raise DataError(f"a pickled numpy dtype has byte order {order!r}")
        self.order = order

    def to_numpy(self) -> np.dtype:
        dt = np.dtype(self.spec)
        return dt.newbyteorder(">") if self.order == ">" else dt.newbyteorder("<") \
            if self.order == "<" else dt


class _ArrayStub:
    """Stands for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)``; its
    ``__setstate__`` receives ``(version, shape, dtype, fortran, raw bytes)``."""

    def __init__(self, cls: object, shape: object = (0,), typecode: object = b"b") -> None:
        if cls is not _NdarrayMarker:
            raise DataError("a pickled array is reconstructed from something other than "
                            "numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise DataError("a pickled numpy array has an unexpected state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeStub):
            raise DataError("a pickled numpy array has no plain dtype")
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and 0 <= s < 2**40
                                                 for s in shape)):
            raise DataError(f"a pickled numpy array has an invalid shape {shape!r}")
        if isinstance(raw, str):  # pickled by Python 2 and read as latin-1 text
            raw = raw.encode("latin-1")
        dt = dtype.to_numpy()
        count = int(np.prod(shape, dtype=object))
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dt.itemsize:
            raise DataError(f"a pickled numpy array of shape {shape} ({dt}) does not hold "
                            "the matching number of bytes")
        arr = np.frombuffer(bytes(raw), dtype=dt, count=count)
        self.array = arr.reshape(shape, order="F" if fortran else "C")


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy._core.multiarray", "_reconstruct"): _ArrayStub,
    ("numpy", "ndarray"): _NdarrayMarker,
    ("numpy", "dtype"): _DtypeStub,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise _Refused(f"{module}.{name}")
        return target

    def persistent_load(self, pid: object) -> Any:
        raise _Refused("a persistent id")


class _Refused(Exception):
    """A global the restricted unpickler does not accept."""


def _plain(value: object, *, name: str) -> object:
    """The unpickled value with stand-ins replaced by arrays, keys and bytes decoded;
    anything that is not a dict/list/tuple/array/bytes/str/int/float/bool/None refused."""
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise DataError(f"{name}: a pickled numpy array has no data")
        return value.array
    if isinstance(value, dict):
        return {_key(k, name=name): _plain(v, name=name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, name=name) for v in value]
    if isinstance(value, (bytes, str, int, float)) or value is None:
        return value
    raise DataError(f"{name}: the pickle holds a {type(value).__name__}, which a CIFAR file "
                    "never does")


def _key(key: object, *, name: str) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "replace")
    if isinstance(key, str):
        return key
    raise DataError(f"{name}: the pickled dict has a key of type {type(key).__name__}")


def load_cifar_pickle(path: Path) -> dict[str, object]:
    """Read a CIFAR pickle (a dict of arrays, lists, bytes, strings and numbers) without
    running anything it names; see the module docstring for what is accepted."""
    try:
        with open(path, "rb") as fh:
            value = _RestrictedUnpickler(fh, encoding="bytes").load()
    except _Refused as exc:
        raise DataError(f"{path}: refused to unpickle: it references {exc}, which a CIFAR "
                        "file never holds (only numpy arrays, lists, strings and numbers are "
                        "read; nothing in the file was run)") from None
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    except Exception as exc:
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: "
                        f"{exc})") from None
    plain = _plain(value, name=str(path))
    if not isinstance(plain, dict):
        raise DataError(f"{path}: the pickle holds a {type(value).__name__}; a CIFAR file "
                        "holds a dict")
    return plain


# --------------------------------------------------------------------------- reading

def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def _read_binary(path: Path, family: str) -> tuple[np.ndarray, np.ndarray]:
    head = 1 if family == "cifar-10" else 2
    row = head + PIXELS
    size = _file_size(path)
    if size == 0 or size % row:
        raise DataError(f"{path}: {size:,} bytes is not a whole number of {family} binary "
                        f"rows ({row:,} bytes: {head} label byte(s) + {PIXELS:,} pixels)")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    rows = raw.reshape(-1, row)
    return rows[:, head:].reshape(-1, 3, 32, 32), rows[:, head - 1].astype(np.int64)


def _read_pickle(path: Path, family: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_cifar_pickle(path)
    label_key = "labels" if family == "cifar-10" else "fine_labels"
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: a {family} pickle holds 'data' and '{label_key}'; found "
                        + ", ".join(repr(k) for k in sorted(d)))
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path}: 'data' must be an N×{PIXELS} uint8 array, got {shape}")
    labels = d[label_key]
    if not isinstance(labels, (list, np.ndarray)) or \
            not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                    for v in labels):
        raise DataError(f"{path}: '{label_key}' must be a list of class indices")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels")
    return data.reshape(-1, 3, 32, 32), y


def _class_names(split: CifarSplit) -> tuple[str, ...] | None:
    if split.meta is None:
        return None
    if split.encoding == "binary":
        size = _file_size(split.meta)
        if size > 1 << 20:
            raise DataError(f"{split.meta}: {size:,} bytes is too large for a class-name list")
        try:
            text = split.meta.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DataError(f"{split.meta}: cannot read file ({exc.strerror or exc})") from exc
        names: Sequence[object] = [t.strip() for t in text.splitlines() if t.strip()]
    else:
        if _file_size(split.meta) > 1 << 20:
            raise DataError(f"{split.meta}: too large for a CIFAR meta file")
        key = "label_names" if split.family == "cifar-10" else "fine_label_names"
        meta = load_cifar_pickle(split.meta)
        value = meta.get(key)
        if not isinstance(value, list):
            raise DataError(f"{split.meta}: has no list '{key}' of class names")
        names = value
    out = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                for n in names)
    if len(out) != split.classes:
        raise DataError(f"{split.meta}: holds {len(out)} class names; {split.family} has "
                        f"{split.classes}")
    return out


def read_cifar(split: CifarSplit, *, max_samples: int | None, seed: int, budget: int
               ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """Images (``N×3×32×32`` uint8), labels (int64) and class names (or ``None``) of
    ``split``; with ``max_samples``, the rows :func:`~trojanscan.io.limits.select_rows`
    picks over the split's concatenated batches. The budget is checked from the file sizes
    (which bound the images they hold) before anything is read."""
    sizes = [_file_size(p) for p in split.files]
    row = PIXELS + (1 if split.family == "cifar-10" else 2)
    est = sum(sizes) // row if split.encoding == "binary" else sum(sizes) // PIXELS
    rows = est if max_samples is None else min(est, max_samples)
    need = 2 * sum(sizes) + rows * PIXELS * 4
    check_budget(need, budget, name=str(split.files[0].parent),
                 what=f"{split.format} {split.split} ({rows:,} of about {est:,} images)")
    xs, ys = [], []
    for p in split.files:
        x, y = (_read_binary if split.encoding == "binary" else _read_pickle)(p, split.family)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= split.classes):
            bad = int(y.max()) if int(y.max()) >= split.classes else int(y.min())
            raise DataError(f"{p}: label {bad} is out of range for {split.family} "
                            f"(0–{split.classes - 1})")
        xs.append(x)
        ys.append(y)
    x_all = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y_all = ys[0] if len(ys) == 1 else np.concatenate(ys)
    keep = select_rows(len(y_all), max_samples, seed)
    if keep is not None:
        x_all, y_all = x_all[keep], y_all[keep]
    return np.ascontiguousarray(x_all), np.ascontiguousarray(y_all), _class_names(split)
