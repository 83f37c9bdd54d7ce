"""How much memory a data loader may use, and which rows it keeps.

The loaders read a file's header first (shape and dtype of the ``.npz`` member, the IDX
dimensions, the image count and the first image's size) and refuse, before allocating
anything large, a data set whose decoded arrays would exceed the *data budget*:

* default :data:`DEFAULT_MAX_DATA_BYTES` (4 GiB);
* overridden by the environment variable :data:`MAX_DATA_ENV` (``TROJANSCAN_MAX_DATA_BYTES``;
  bytes, or with a suffix ``K``/``M``/``G``/``T``, binary: ``8G`` = 8 GiB);
* overridden by the ``max_bytes`` argument of :func:`trojanscan.io.data.load_dataset`.

What is counted (:func:`array_bytes`): the kept rows as stored in the file plus their
float32 (images) or int64 (labels) copy — the two arrays that coexist while converting —
plus the 8 bytes per sample of the seeded permutation when subsampling. That is the
loader's peak, give or take one read buffer (:data:`CHUNK_BYTES`).

:func:`select_rows` is the one seeded selection every command uses for ``--max-samples``;
the loaders apply it while streaming, so only the selected rows are ever decoded.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..dataset import MAX_CLASS_INDEX
from ..exceptions import DataError, ParameterError, bad_param

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_DATA_BYTES",
    "DEFLATE_MAX_RATIO",
    "MAX_CLASS_INDEX",
    "MAX_DATA_ENV",
    "array_bytes",
    "check_budget",
    "check_max_samples",
    "format_bytes",
    "resolve_budget",
    "select_rows",
]

#: Default data budget: decoded arrays of at most 4 GiB.
DEFAULT_MAX_DATA_BYTES = 4 << 30
#: Environment variable overriding the default budget.
MAX_DATA_ENV = "TROJANSCAN_MAX_DATA_BYTES"
#: Bytes read from a compressed stream at a time.
CHUNK_BYTES = 1 << 20
#: Deflate's largest expansion (zlib technical details: 1032:1); a header declaring more
#: data than its compressed stream can hold is refused before anything is read.
DEFLATE_MAX_RATIO = 1032

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
          "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def format_bytes(n: int) -> str:
    """``n`` bytes for people: ``'196.0 MiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _parse_size(text: str) -> int | None:
    m = _SIZE_RE.match(text)
    if m is None or m.group(2).upper() not in _UNITS:
        return None
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    return int(value) if value >= 1 else None


def resolve_budget(max_bytes: int | None = None) -> int:
    """The data budget in bytes: ``max_bytes``, else :data:`MAX_DATA_ENV`, else the default."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise bad_param("max_bytes", "an integer number of bytes >= 1", max_bytes)
        return max_bytes
    env = os.environ.get(MAX_DATA_ENV, "").strip()
    if not env:
        return DEFAULT_MAX_DATA_BYTES
    parsed = _parse_size(env)
    if parsed is None:
        raise ParameterError(f"invalid {MAX_DATA_ENV}: expected a number of bytes >= 1, "
                             f"optionally with K, M, G or T (e.g. 8G), got {env!r}")
    return parsed


def array_bytes(rows: int, row_items: int, itemsize: int, out_itemsize: int) -> int:
    """Bytes of ``rows`` rows held as stored (``itemsize``) and converted (``out_itemsize``)."""
    return rows * row_items * (itemsize + out_itemsize)


def check_budget(need: int, budget: int, *, name: str, what: str) -> None:
    """Refuse (``DataError``) when ``need`` bytes exceed ``budget``; ``what`` describes them."""
    if need > budget:
        raise DataError(
            f"{name}: {what} would take {format_bytes(need)} of memory, over the data budget "
            f"of {format_bytes(budget)}; use fewer samples (--max-samples, where the command "
            f"has it) or raise the budget with {MAX_DATA_ENV} (bytes, e.g. 8G)"
        )


def check_max_samples(max_samples: int | None) -> None:
    """``max_samples`` is ``None`` (all samples) or an integer >= 1."""
    if max_samples is None:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) \
            or max_samples < 1:
        raise bad_param("max_samples", "an integer >= 1 (or none for all samples)",
                        max_samples)


def select_rows(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of at most ``max_samples`` of ``n`` rows, or ``None`` for all of them.

    The rows are the first ``max_samples`` of ``torch.randperm(n)`` under
    ``torch.Generator().manual_seed(seed)``, in ascending order — the selection
    ``--max-samples`` has always made, so loading with ``max_samples`` and subsampling
    afterwards give the same samples.
    """
    import torch

    check_max_samples(max_samples)
    if max_samples is None or n <= max_samples:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:int(max_samples)].sort().values.numpy()
