"""``.npz`` archives read member by member, header first, without ``numpy.load``.

An ``.npz`` is a zip archive of ``.npy`` files. :class:`NpzReader` opens the archive,
reads each member's ``.npy`` header (shape, dtype, order — a few hundred bytes) and checks
it against the zip directory before any payload is decompressed:

* the member's declared uncompressed size must equal the header's size plus the array's
  bytes;
* a deflated member cannot claim more than :data:`~trojanscan.io.limits.DEFLATE_MAX_RATIO`
  times its compressed size; a stored one must be as large as it says;
* object arrays are refused (they would need unpickling), as are dtypes of size 0.

The payload is then streamed with :func:`~trojanscan.io.stream.read_rows`, keeping only
the selected rows. Every problem is a :class:`~trojanscan.exceptions.DataError` naming the
file and the array.
"""

from __future__ import annotations

import lzma
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..exceptions import DataError
from .limits import DEFLATE_MAX_RATIO
from .stream import ShortRead, read_rows

__all__ = ["NpyMember", "NpzReader"]

_NPY_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 10000  # numpy's own limit on .npy header size
#: errors the zip, zlib, bz2 and lzma layers raise on damaged data
_ZIP_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError,
               NotImplementedError, RuntimeError, ValueError, OverflowError)


@dataclass(frozen=True)
class NpyMember:
    """The header of one ``.npy`` member: name in the archive, shape, dtype, order."""

    key: str
    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_bytes: int

    @property
    def payload_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


class _Counting:
    """A reader that counts the bytes it hands out (to learn the header's length)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


class NpzReader:
    """An open ``.npz`` archive; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            raise DataError(f"{path}: not a readable .npz archive ({_one_line(exc)}); expected "
                            "a file written by numpy.savez with arrays x (and y)") from exc
        self._members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key in self._members:
                # tools disagree on which copy counts (numpy.load takes the last one):
                # the archive would mean different data to different readers
                self._zip.close()
                raise DataError(f"{path}: the archive holds array {key[:100]!r} twice; "
                                "expected one member per array (rewrite it with numpy.savez)")
            self._members[key] = info

    def __enter__(self) -> NpzReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._zip.close()

    @property
    def keys(self) -> list[str]:
        return sorted(self._members)

    @contextmanager
    def _open(self, key: str) -> Iterator[IO[bytes]]:
        info = self._members[key]
        try:
            with self._zip.open(info) as f:
                yield f
        except DataError:
            raise
        except ShortRead:
            raise
        except _ZIP_ERRORS as exc:
            raise DataError(f"{self.path}: corrupt .npz archive, cannot read {key!r} "
                            f"({_one_line(exc)})") from exc

    def header(self, key: str) -> NpyMember:
        """Read and check the ``.npy`` header of member ``key`` (payload untouched)."""
        info = self._members[key]
        where = f"{self.path}: array {key!r}"
        with self._open(key) as f:
            counting = _Counting(f)
            try:
                major, minor = np.lib.format.read_magic(counting)
                if (major, minor) == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                        counting, max_header_size=_MAX_HEADER)
                elif (major, minor) == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                        counting, max_header_size=_MAX_HEADER)
                else:
                    raise DataError(f"{where}: unsupported .npy format version "
                                    f"{major}.{minor}; expected 1.0 or 2.0 (numpy.savez)")
            except DataError:
                raise
            except (ValueError, SyntaxError, TypeError, KeyError, OverflowError,
                    tokenize.TokenError, RecursionError) as exc:
                raise DataError(f"{where}: cannot read array {key!r} ({_one_line(exc)})"
                                ) from exc
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise DataError(f"{self.path}: array {key!r} holds Python objects (dtype=object), "
                            "which would need unpickling; expected a numeric array")
        if dtype.itemsize == 0:
            raise DataError(f"{where}: unsupported dtype {dtype} of size 0")
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise DataError(f"{where}: negative dimension in shape {shape}")
        m = NpyMember(key, info.filename, shape, dtype, bool(fortran), counting.count)
        declared = info.file_size
        if declared != m.header_bytes + m.payload_bytes:
            raise DataError(
                f"{where}: the archive declares {declared} bytes for {info.filename!r} but its "
                f"header describes {m.header_bytes + m.payload_bytes} (shape {shape} of "
                f"{dtype}); the archive is corrupt or forged"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != declared:
            raise DataError(f"{where}: stored member {info.filename!r} declares {declared} bytes "
                            f"but holds {info.compress_size}; the archive is corrupt")
        if info.compress_type == zipfile.ZIP_DEFLATED \
                and declared > DEFLATE_MAX_RATIO * info.compress_size + 1024:
            raise DataError(
                f"{where}: {info.compress_size} compressed bytes cannot expand to the "
                f"{declared} bytes declared (deflate expands at most {DEFLATE_MAX_RATIO}:1); "
                "the archive is corrupt or forged"
            )
        return m

    def read(self, m: NpyMember, keep: np.ndarray | None) -> np.ndarray:
        """The member's array, only rows ``keep`` (all when ``None`` or Fortran order)."""
        with self._open(m.key) as f:
            try:
                _skip_exact(f, m.header_bytes)
                if m.fortran_order:
                    flat = read_rows(f, (m.payload_bytes // m.dtype.itemsize,), m.dtype, None)
                    arr = flat.reshape(m.shape[::-1]).transpose()
                    if keep is not None:
                        arr = arr[keep]
                    return np.ascontiguousarray(arr)
                arr = read_rows(f, m.shape, m.dtype, keep)
                if f.read(1):  # pragma: no cover - zipfile stops at the declared size
                    raise DataError(f"{self.path}: array {m.key!r} has trailing bytes")
                return arr
            except ShortRead as exc:
                raise DataError(f"{self.path}: corrupt .npz archive, array {m.key!r} is "
                                f"truncated ({exc})") from exc


def _skip_exact(f: IO[bytes], n: int) -> None:
    left = n
    while left:
        piece = f.read(left)
        if not piece:
            raise ShortRead(n - left, n)
        left -= len(piece)


def _one_line(exc: BaseException) -> str:
    """A foreign exception's text on one printable line (zip member names are untrusted)."""
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
