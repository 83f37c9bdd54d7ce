"""Trigger patterns: named, seeded random, user arrays and image/``.npy`` files.

A pattern setting is either a name (``"white"``, ``"black"``, ``"checkerboard"``,
``"random"``), a path to a ``.npy`` file or an image (``.png``, ``.jpg``, ``.bmp``), or
an array (``H×W`` or ``C×H×W``, float in ``[0, 1]`` or ``uint8``). Files are read once,
when the attack is built (``np.load`` with ``allow_pickle=False``).

A colour setting (``color``) tints a pattern channel by channel: ``none`` (the pattern
as it is), a name (:data:`COLORS`), ``#rrggbb``, ``R/G/B`` or a tuple — integers
0–255 such as ``(255,0,0)`` or floats in ``[0, 1]`` such as ``(1.0,0.0,0.0)``; one value
is a grey level. An RGB colour on one-channel inputs becomes its luminance
(ITU-R BT.601 weights).
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


#: named colours (RGB in [0, 1]) a ``color`` setting accepts
COLORS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5),
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
}
#: most values a colour may have (one per channel)
MAX_COLOR_CHANNELS = 64
#: ITU-R BT.601 luma weights: an RGB colour on one-channel inputs
_LUMA = (0.299, 0.587, 0.114)
_COLOR_FORMS = (f"none, a name ({', '.join(COLORS)}), #rrggbb, R/G/B, or a tuple of "
                "integers 0-255 such as (255,0,0) or of floats in [0, 1] such as "
                "(1.0,0.0,0.0)")


def _color_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def check_color(name: str, value: Any) -> tuple[float, ...] | None:
    """A colour setting as one float in ``[0, 1]`` per channel (None: no tint).

    Integers are 0–255 and floats 0–1; an all-integer colour whose largest value is 1,
    such as ``(1,0,0)``, could mean either and is refused (write ``(255,0,0)`` or
    ``(1.0,0.0,0.0)``).
    """
    if value is None:
        return None
    raw: Any = value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in COLORS:
            return COLORS[text]
        if text.startswith("#") and len(text) == 7:
            try:
                return tuple(int(text[i:i + 2], 16) / 255.0 for i in (1, 3, 5))
            except ValueError:
                raise bad_param(name, _COLOR_FORMS, value) from None
        if "/" not in text:
            raise bad_param(name, _COLOR_FORMS, value)
        parts: list[Any] = []
        for part in text.split("/"):
            try:
                parts.append(int(part) if part.strip().lstrip("+-").isdigit() else float(part))
            except ValueError:
                raise bad_param(name, _COLOR_FORMS, value) from None
        raw = tuple(parts)
    if isinstance(raw, (np.ndarray, torch.Tensor)):
        raw = tuple(raw.tolist()) if raw.ndim == 1 else raw
    items = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
    if (not items or len(items) > MAX_COLOR_CHANNELS
            or not all(_color_number(v) for v in items)):
        raise bad_param(name, _COLOR_FORMS, value)
    if all(isinstance(v, (int, np.integer)) for v in items):
        if any(not 0 <= int(v) <= 255 for v in items):
            raise bad_param(name, "integers in 0-255 (or floats in [0, 1])", value)
        if max(int(v) for v in items) == 1:
            raise bad_param(name, "(255,0,0)-style integers 0-255 or (1.0,0.0,0.0)-style "
                            "floats; integers up to 1 are ambiguous", value)
        return tuple(int(v) / 255.0 for v in items)
    floats = tuple(float(v) for v in items)
    if any(not (np.isfinite(v) and 0.0 <= v <= 1.0) for v in floats):
        raise bad_param(name, "floats in [0, 1] (or integers 0-255)", value)
    return floats


def color_tensor(color: tuple[float, ...], channels: int, name: str) -> torch.Tensor:
    """``color`` as a ``C×1×1`` tensor for inputs with ``channels`` channels."""
    if len(color) == channels:
        values = list(color)
    elif len(color) == 1:
        values = list(color) * channels
    elif len(color) == 3 and channels == 1:
        values = [sum(w * c for w, c in zip(_LUMA, color, strict=True))]
    else:
        raise bad_param(name, f"a colour with 1 or {channels} values (the input's channels)",
                        f"{len(color)} values {color}")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


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
