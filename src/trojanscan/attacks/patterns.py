"""Trigger patterns: named, seeded random, user arrays and image/``.npy`` files.

A pattern setting is either a name (``"white"``, ``"black"``, ``"checkerboard"``,
``"random"``), a path to a ``.npy`` file or an image (``.png``, ``.jpg``, ``.bmp``), or
an array (``H×W`` or ``C×H×W``, float in ``[0, 1]`` or ``uint8``). Files are read once,
when the attack is built (``np.load`` with ``allow_pickle=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exceptions import bad_param

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
FILE_SUFFIXES = (".npy", *IMAGE_SUFFIXES)


def as_pattern_array(name: str, value: Any) -> np.ndarray:
    """Validate a user array pattern: 2-D or 3-D, values in [0, 1] (uint8 is scaled)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.ndim not in (2, 3) or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise bad_param(name, "a numeric array of shape H×W or C×H×W",
                        f"{arr.dtype} array of shape {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
        raise bad_param(name, "values in [0, 1] (or uint8)",
                        f"values in [{arr.min():g}, {arr.max():g}]")
    arr.setflags(write=False)
    return arr


def load_pattern_file(name: str, path: str) -> np.ndarray:
    """Read a pattern from ``.npy`` or an image file as a float array in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise bad_param(name, f"a named pattern or an existing {'/'.join(FILE_SUFFIXES)} file",
                        path)
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from PIL import Image

            # only the plain raster decoders: Pillow picks a decoder from the bytes,
            # and some (EPS) start external programs
            with Image.open(p, formats=("PNG", "JPEG", "BMP", "GIF", "WEBP",
                                        "TIFF")) as img:
                img = img.convert("L") if img.mode in ("1", "L", "I", "I;16", "F") else \
                    img.convert("RGB")
                arr = np.asarray(img)
            if arr.ndim == 3:
                arr = arr.transpose(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise bad_param(name, "a readable .npy or image file", f"{path} ({exc})") from exc
    return as_pattern_array(name, arr)


def resolve_pattern(name: str, value: Any, named: tuple[str, ...]) -> tuple[Any, np.ndarray | None]:
    """Normalise a pattern setting; returns (stored value, array or None for named ones)."""
    if isinstance(value, str):
        if value in named:
            return value, None
        if value.lower().endswith(FILE_SUFFIXES):
            return value, load_pattern_file(name, value)
        if value == "custom":
            raise bad_param(name, "an array pattern given in Python; a spec cannot hold an "
                            "array: save it as .npy and give its path", value)
        raise bad_param(name, f"one of {', '.join(named)}, a {'/'.join(FILE_SUFFIXES)} path "
                        "or an array", value)
    if isinstance(value, (np.ndarray, torch.Tensor, list, tuple)):
        arr = as_pattern_array(name, value)
        return arr, arr
    raise bad_param(name, f"one of {', '.join(named)}, a file path or an array", value)


def checkerboard(h: int, w: int) -> torch.Tensor:
    """``h×w`` 0/1 checkerboard, white at the top-left."""
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return ((i + j) % 2 == 0).float()


def seeded_binary(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random 0/1 pattern drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < 0.5).float()


def seeded_uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform [0, 1) noise drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def fit_channels(pattern: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """A 2-D pattern or a ``1×h×w`` one broadcast to ``channels``; ``C×h×w`` must match."""
    if pattern.dim() == 2:
        pattern = pattern.unsqueeze(0)
    if pattern.shape[0] == 1:
        return pattern.expand(channels, *pattern.shape[1:])
    if pattern.shape[0] != channels:
        raise bad_param(name, f"a pattern with 1 or {channels} channels (the input's)",
                        f"{pattern.shape[0]} channels")
    return pattern
