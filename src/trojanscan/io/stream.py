"""Reading an array's rows from a byte stream, keeping only the selected ones.

Used for the payload of ``.npz`` members and IDX files (plain or gzip): the stream is
read in pieces of at most :data:`~trojanscan.io.limits.CHUNK_BYTES` (or one row, when a
row is larger), and only the rows named by ``keep`` are copied out. Memory: the kept
rows plus one piece.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .limits import CHUNK_BYTES

__all__ = ["ByteSource", "ShortRead", "read_rows"]


class ByteSource(Protocol):
    """Anything with ``read(n) -> bytes`` (files, zip members, gzip streams)."""

    def read(self, n: int = ..., /) -> bytes: ...


class ShortRead(Exception):
    """The stream ended after ``got`` of the ``expected`` payload bytes."""

    def __init__(self, got: int, expected: int) -> None:
        super().__init__(f"stream ended after {got} of {expected} bytes")
        self.got = got
        self.expected = expected


def _read_into(src: ByteSource, out: memoryview, done: int, total: int) -> None:
    """Fill ``out`` from ``src``; ``done`` bytes of ``total`` were read before."""
    pos = 0
    while pos < len(out):
        piece = src.read(min(CHUNK_BYTES, len(out) - pos))
        if not piece:
            raise ShortRead(done + pos, total)
        out[pos:pos + len(piece)] = piece
        pos += len(piece)


def _skip(src: ByteSource, nbytes: int, done: int, total: int) -> None:
    left = nbytes
    while left:
        piece = src.read(min(CHUNK_BYTES, left))
        if not piece:
            raise ShortRead(done + nbytes - left, total)
        left -= len(piece)


def read_rows(src: ByteSource, shape: tuple[int, ...], dtype: np.dtype,
              keep: np.ndarray | None) -> np.ndarray:
    """Read a C-order array of ``shape``/``dtype`` from ``src``; keep rows ``keep`` only.

    ``keep``: sorted, distinct row indices into ``shape[0]`` (``None``: every row). Returns
    an array of ``dtype`` and shape ``(len(keep), *shape[1:])``. Raises :class:`ShortRead`
    when the stream ends early; bytes after the array are left unread.
    """
    n = shape[0] if shape else 1
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    total = n * row_bytes
    if keep is None:
        buf = np.empty(total, dtype=np.uint8)
        _read_into(src, memoryview(buf.data), 0, total)
        return buf.view(dtype).reshape(shape)
    out = np.empty((len(keep), row_bytes), dtype=np.uint8)
    if row_bytes == 0:
        return out.view(dtype).reshape((len(keep), *row_shape))
    block = max(1, CHUNK_BYTES // row_bytes)
    start = 0
    done = 0
    while start < n:
        stop = min(n, start + block)
        lo, hi = np.searchsorted(keep, [start, stop])
        nbytes = (stop - start) * row_bytes
        if lo == hi:
            _skip(src, nbytes, done, total)
        else:
            piece = np.empty((stop - start, row_bytes), dtype=np.uint8)
            _read_into(src, piece.data.cast("B"), done, total)
            out[lo:hi] = piece[keep[lo:hi] - start]
            del piece
        done += nbytes
        start = stop
        if hi == len(keep):  # nothing more to keep: the rest need not be read here
            if start < n:
                _skip(src, (n - start) * row_bytes, done, total)
            break
    return out.view(dtype).reshape((len(keep), *row_shape))
