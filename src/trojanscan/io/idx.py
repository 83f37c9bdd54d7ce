"""MNIST-style IDX files: parsing, encoding and finding image/label pairs in a folder.

The IDX format (LeCun et al., the MNIST database, 1998) is a big-endian header —
two zero bytes, a type code, the number of dimensions ``d`` — followed by ``d``
unsigned 32-bit sizes and the values in C order. Files may be gzip-compressed
(recognised by the gzip magic bytes, whatever the extension).

Type codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64.

File names follow the MNIST convention ``<split>-images-idx3-ubyte[.gz]`` and
``<split>-labels-idx1-ubyte[.gz]`` (a ``.`` instead of the ``-`` before ``idx`` is
accepted too, as some mirrors use it). The part before ``images``/``labels`` (without
its trailing ``-``, ``_`` or ``.``) is the *split name* — ``train`` and ``t10k`` for
MNIST and Fashion-MNIST — which pairs an images file with its labels file and
lets a folder that holds several splits be loaded one split at a time
(``folder:train``, ``folder:t10k``; ``test`` also selects ``t10k``), see
:func:`select_pair`.

Everything here except :func:`read_idx` and :func:`find_idx_pairs` is a pure
function on bytes and arrays. Errors are :class:`~trojanscan.exceptions.DataError`
naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..exceptions import DataError

__all__ = [
    "IDX_DTYPES",
    "IdxPair",
    "encode_idx",
    "find_idx_pairs",
    "is_idx_images_name",
    "is_idx_labels_name",
    "parse_idx",
    "read_idx",
    "select_pair",
    "split_name",
]

#: IDX type code -> big-endian NumPy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 8
_IMAGES_RE = re.compile(r"^(?P<split>.*?)[-_.]?images[-.]idx3[-.]ubyte(?P<gz>\.gz)?$", re.I)
_LABELS_RE = re.compile(r"^(?P<split>.*?)[-_.]?labels[-.]idx1[-.]ubyte(?P<gz>\.gz)?$", re.I)
#: selector aliases: what users type -> split name found in MNIST-style file names.
_ALIASES = {"test": "t10k", "t10k": "test"}


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file's bytes (gzip-compressed or not) into a NumPy array.

    The array has the file's shape and a native-endian version of its dtype; it may be
    a read-only view of ``data``. ``name`` only appears in error messages.
    """
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name}: corrupt or truncated gzip data ({exc})") from exc
    if len(data) < 4:
        raise DataError(
            f"{name}: not an IDX file: {len(data)} bytes, shorter than the 4-byte header"
        )
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise DataError(
            f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()} (expected "
            "0x0000 then a type code in "
            + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES) + " and the number of dimensions)"
        )
    if not 1 <= ndim <= _MAX_DIMS:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions, expected 1 to {_MAX_DIMS}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{name}: truncated IDX header: {len(data)} bytes, expected at least {header}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise DataError(
            f"{name}: IDX file {what}: shape {shape} of {dtype.name} needs {expected} data "
            f"bytes, found {got}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def encode_idx(array: np.ndarray, *, compress: bool = False) -> bytes:
    """Encode ``array`` as IDX bytes (gzipped when ``compress``); inverse of :func:`parse_idx`."""
    arr = np.asarray(array)
    code = next((c for c, d in IDX_DTYPES.items()
                 if arr.dtype.kind == d.kind and arr.dtype.itemsize == d.itemsize), None)
    if code is None:
        raise DataError(
            f"cannot encode {arr.dtype} as IDX: expected one of "
            + ", ".join(d.name for d in IDX_DTYPES.values())
        )
    if not 1 <= arr.ndim <= _MAX_DIMS:
        raise DataError(f"cannot encode a {arr.ndim}-d array as IDX: expected 1 to {_MAX_DIMS}")
    out = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    out += np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    return gzip.compress(out, compresslevel=6, mtime=0) if compress else out


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) from disk; see :func:`parse_idx`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot read IDX file ({exc.strerror or exc})") from exc
    return parse_idx(data, name=str(p))


def is_idx_images_name(name: str) -> bool:
    """Whether a file name looks like ``*images-idx3-ubyte[.gz]``."""
    return _IMAGES_RE.match(name) is not None


def is_idx_labels_name(name: str) -> bool:
    """Whether a file name looks like ``*labels-idx1-ubyte[.gz]``."""
    return _LABELS_RE.match(name) is not None


def split_name(file_name: str) -> str | None:
    """The split name of an IDX images/labels file name (``"train"``), or ``None``."""
    m = _IMAGES_RE.match(file_name) or _LABELS_RE.match(file_name)
    return None if m is None else m.group("split").lower()


@dataclass(frozen=True)
class IdxPair:
    """An IDX images file and, when present, its labels file (same split name)."""

    split: str
    images: Path
    labels: Path | None


def _prefer_raw(current: Path | None, new: Path) -> Path:
    """Of an uncompressed and a ``.gz`` copy of the same file, keep the uncompressed one."""
    if current is None:
        return new
    if current.suffix.lower() == ".gz" and new.suffix.lower() != ".gz":
        return new
    return current


def find_idx_pairs(folder: str | Path) -> dict[str, IdxPair]:
    """IDX images files in ``folder`` (not recursive) with their labels files, by split name.

    When both ``x`` and ``x.gz`` exist, the uncompressed file is used.
    """
    folder = Path(folder)
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        if (m := _IMAGES_RE.match(f.name)) is not None:
            split = m.group("split").lower()
            images[split] = _prefer_raw(images.get(split), f)
        elif (m := _LABELS_RE.match(f.name)) is not None:
            split = m.group("split").lower()
            labels[split] = _prefer_raw(labels.get(split), f)
    return {s: IdxPair(s, p, labels.get(s)) for s, p in sorted(images.items())}


def _describe(split: str) -> str:
    return repr(split) if split else "'' (files without a split prefix)"


def select_pair(pairs: dict[str, IdxPair], selector: str | None, *, folder: str) -> IdxPair:
    """Pick the split named by ``selector`` (``None``: the only one there is).

    ``test`` and ``t10k`` select each other when only one of them exists. A folder with
    several splits and no selector, or a selector naming no split, is a
    :class:`DataError` listing the ``folder:split`` specs that would work.
    """
    if not pairs:
        raise DataError(
            f"{folder}: no IDX images file (*images-idx3-ubyte or *images-idx3-ubyte.gz) found"
        )
    options = ", ".join(f"{folder}:{s}" for s in pairs if s)
    if selector is None:
        if len(pairs) == 1:
            return next(iter(pairs.values()))
        raise DataError(
            f"{folder}: holds IDX files of several splits ("
            + ", ".join(_describe(s) for s in pairs)
            + f"); choose one, e.g. {options}"
        )
    key = selector.lower()
    if key in pairs:
        return pairs[key]
    alias = _ALIASES.get(key)
    if alias is not None and alias in pairs:
        return pairs[alias]
    raise DataError(
        f"{folder}: no IDX split {selector!r}; found "
        + ", ".join(_describe(s) for s in pairs)
        + (f" (use {options})" if options else "")
    )
