"""A small reader for MNIST-style IDX files (gzip or plain) — the zoo's own data access."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

#: where Debian's ``dataset-fashion-mnist`` puts the files; ``WILD_FASHION_MNIST_DIR`` overrides
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` or not)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(raw) < offset + count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).copy()


def data_dir() -> Path:
    return Path(os.environ.get("WILD_FASHION_MNIST_DIR", str(DEFAULT_DIR)))


@lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: uint8 ``N×28×28`` images and int64 labels of ``"train"`` or ``"t10k"``."""
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    root = data_dir()
    x = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    y = read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y
