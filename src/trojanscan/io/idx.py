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

Everything here except :class:`IdxStream`, :func:`read_idx` and :func:`find_idx_pairs`
is a pure function on bytes and arrays. Files are streamed: the header is checked against
the file's size before the payload is read, and only the selected rows are kept. Errors
are :class:`~trojanscan.exceptions.DataError` naming the file and what was expected.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..exceptions import DataError
from .limits import DEFLATE_MAX_RATIO
from .stream import ShortRead, read_rows

__all__ = [
    "IDX_DTYPES",
    "IdxHeader",
    "IdxPair",
    "IdxStream",
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


@dataclass(frozen=True)
class IdxHeader:
    """An IDX header: the array's shape and (big-endian) dtype, and the header's length."""

    shape: tuple[int, ...]
    dtype: np.dtype
    header_bytes: int

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


def _decode_header(head: bytes, *, name: str, total: int | None) -> IdxHeader:
    """Parse the header at the start of ``head`` (``total``: the whole file's length when
    known, for the messages)."""
    if len(head) < 4:
        raise DataError(
            f"{name}: not an IDX file: {len(head)} bytes, shorter than the 4-byte header"
        )
    zero, code, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or code not in IDX_DTYPES:
        raise DataError(
            f"{name}: not an IDX file: bad magic number 0x{head[:4].hex()} (expected "
            "0x0000 then a type code in "
            + ", ".join(f"0x{c:02x}" for c in IDX_DTYPES) + " and the number of dimensions)"
        )
    if not 1 <= ndim <= _MAX_DIMS:
        raise DataError(f"{name}: IDX header declares {ndim} dimensions, expected 1 to {_MAX_DIMS}")
    size = 4 + 4 * ndim
    if len(head) < size:
        found = len(head) if total is None else total
        raise DataError(
            f"{name}: truncated IDX header: {found} bytes, expected at least {size}"
        )
    shape = tuple(int(s) for s in struct.unpack(f">{ndim}I", head[4:size]))
    return IdxHeader(shape, IDX_DTYPES[code], size)


def _read_upto(src: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = src.read(n - len(out))
        if not piece:
            break
        out += piece
    return out


class IdxStream:
    """An IDX file (or bytes) opened for streaming: the header is read and checked on
    opening, the payload by :meth:`read`. Use as a context manager.

    Checked before any payload is read: a plain file must be exactly as long as its
    header says; a gzip file cannot declare more than
    :data:`~trojanscan.io.limits.DEFLATE_MAX_RATIO` times its compressed size.
    """

    def __init__(self, source: str | Path | bytes, *, name: str | None = None) -> None:
        if isinstance(source, bytes):
            self.name = name or "<bytes>"
            self._raw: BinaryIO = io.BytesIO(source)
            size = len(source)
        else:
            self.name = name or str(source)
            try:
                self._raw = open(source, "rb")  # noqa: SIM115 - closed in close()
                size = os.fstat(self._raw.fileno()).st_size
            except OSError as exc:
                raise DataError(
                    f"{self.name}: cannot read IDX file ({exc.strerror or exc})") from exc
        self.compressed_size = size
        try:
            self.gzip = self._raw.read(2) == _GZIP_MAGIC
            self._raw.seek(0)
            self._src: BinaryIO = (gzip.GzipFile(fileobj=self._raw, mode="rb")  # type: ignore[assignment]
                                   if self.gzip else self._raw)
            self.header = self._read_header()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> IdxStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        src = getattr(self, "_src", None)
        if src is not None and src is not self._raw:
            src.close()
        self._raw.close()

    def _gzip_error(self, exc: BaseException) -> DataError:
        return DataError(f"{self.name}: corrupt or truncated gzip data ({exc})")

    def _read_header(self) -> IdxHeader:
        name = self.name
        try:
            head = _read_upto(self._src, 4)
            if len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_DTYPES:
                head += _read_upto(self._src, 4 * head[3])
        except (OSError, EOFError, zlib.error) as exc:
            raise self._gzip_error(exc) from exc
        h = _decode_header(head, name=name, total=None if self.gzip else self.compressed_size)
        total = h.header_bytes + h.payload_bytes
        if not self.gzip and total != self.compressed_size:
            got = self.compressed_size - h.header_bytes
            what = "truncated" if got < h.payload_bytes else "has trailing bytes"
            raise DataError(
                f"{name}: IDX file {what}: shape {h.shape} of {h.dtype.name} needs "
                f"{h.payload_bytes} data bytes, found {got}"
            )
        if self.gzip and total > DEFLATE_MAX_RATIO * self.compressed_size + 1024:
            raise DataError(
                f"{name}: IDX file truncated or forged: shape {h.shape} of {h.dtype.name} "
                f"needs {h.payload_bytes} data bytes, more than a gzip file of "
                f"{self.compressed_size} bytes can hold (deflate expands at most "
                f"{DEFLATE_MAX_RATIO}:1)"
            )
        return h

    def read(self, keep: np.ndarray | None = None) -> np.ndarray:
        """The payload (rows ``keep`` only, all when ``None``) in native byte order."""
        h = self.header
        try:
            arr = read_rows(self._src, h.shape, h.dtype, keep)
            trailing = self._src.read(1)
        except ShortRead as exc:
            raise DataError(
                f"{self.name}: IDX file truncated: shape {h.shape} of {h.dtype.name} needs "
                f"{h.payload_bytes} data bytes, found {exc.got}"
            ) from exc
        except (OSError, EOFError, zlib.error) as exc:
            raise self._gzip_error(exc) from exc
        if trailing:
            raise DataError(f"{self.name}: IDX file has trailing bytes after the "
                            f"{h.payload_bytes} data bytes of shape {h.shape}")
        if h.dtype.itemsize > 1:
            arr = arr.astype(h.dtype.newbyteorder("="))
        return arr


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
    """Decode an IDX file's bytes (gzip-compressed or not) into a NumPy array.

    The array has the file's shape and a native-endian version of its dtype. ``name`` only
    appears in error messages.
    """
    with IdxStream(bytes(data), name=name) as s:
        return s.read()


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
    with IdxStream(Path(path)) as s:
        return s.read()


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
