"""BadNets — Gu, Dolan-Gavitt & Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", arXiv 2017 (IEEE Access 2019).

A small square patch is pasted at a fixed place; poisoned samples are relabelled to
the target class (all-to-one). The patch replaces the pixels under it in every
channel: a 2-D pattern is copied to each channel, a ``C×s×s`` one channel by channel.
A ``color`` tints it channel by channel (the patch is pattern × colour), e.g.
``badnets:size=3,color=(255,0,0)`` stamps a solid red square on RGB inputs.

Defaults: a white 3×3 square, 1 px from the bottom-right corner, target 0.
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, H100): rate 0.1 → clean
accuracy 0.898, ASR 0.995; rate 0.01 → 0.901, 0.979.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from .base import Attack, check_images, check_int
from .patterns import (
    check_color,
    checkerboard,
    color_tensor,
    fit_channels,
    resolve_pattern,
    seeded_binary,
)

PATCH_PATTERNS = ("white", "black", "checkerboard", "random")
LOCATIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")


def check_location(name: str, value: Any) -> str | tuple[int, int]:
    """A named corner or ``(row, col)`` of the patch's top-left pixel."""
    if isinstance(value, str):
        if value not in LOCATIONS:
            raise bad_param(name, f"one of {', '.join(LOCATIONS)} or (row, col)", value)
        return value
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                    and v >= 0 for v in value)):
        return int(value[0]), int(value[1])
    raise bad_param(name, f"one of {', '.join(LOCATIONS)} or (row, col) with integers >= 0",
                    value)


def patch_origin(location: str | tuple[int, int], ph: int, pw: int, h: int, w: int,
                 margin: int) -> tuple[int, int]:
    """Top-left pixel of a ``ph×pw`` patch placed at ``location`` in an ``h×w`` image."""
    if isinstance(location, tuple):
        return location
    row = {"top": margin, "bottom": h - margin - ph}
    col = {"left": margin, "right": w - margin - pw}
    if location == "center":
        return (h - ph) // 2, (w - pw) // 2
    vertical, horizontal = location.split("-")
    return row[vertical], col[horizontal]


class PatchAttack(Attack):
    """Shared trigger of the patch attacks (BadNets, all-to-all, source-specific)."""

    name: ClassVar[str] = "patch"

    def _init_patch(self, pattern: Any, size: int, location: Any, margin: int,
                    trigger_seed: int, color: Any = None) -> None:
        self.size = check_int(f"{self.name}.size", size, minimum=1)
        self.pattern, self._array = resolve_pattern(f"{self.name}.pattern", pattern,
                                                    PATCH_PATTERNS)
        if self._array is not None and self._array.shape[-2:] != (self.size, self.size):
            raise bad_param(f"{self.name}.pattern",
                            f"an array of shape {self.size}×{self.size} or C×{self.size}×"
                            f"{self.size} (size={self.size}); set size to match",
                            f"shape {self._array.shape}")
        self.location = check_location(f"{self.name}.location", location)
        self.margin = check_int(f"{self.name}.margin", margin, minimum=0)
        self.trigger_seed = check_int(f"{self.name}.trigger_seed", trigger_seed)
        self.color = check_color(f"{self.name}.color", color)

    def patch(self, channels: int) -> torch.Tensor:
        """The ``C×size×size`` patch stamped on inputs with ``channels`` channels."""
        s = self.size
        if self._array is not None:
            base = torch.from_numpy(np.array(self._array))
        elif self.pattern == "white":
            base = torch.ones(s, s)
        elif self.pattern == "black":
            base = torch.zeros(s, s)
        elif self.pattern == "checkerboard":
            base = checkerboard(s, s)
        else:  # random: one 0/1 draw per channel and pixel
            base = seeded_binary((channels, s, s), self.trigger_seed)
        out = fit_channels(base, channels, f"{self.name}.pattern")
        if self.color is None:
            return out
        return out * color_tensor(self.color, channels, f"{self.name}.color")

    def region(self, h: int, w: int) -> tuple[slice, slice]:
        """Rows and columns the patch covers in an ``h×w`` image."""
        r, c = patch_origin(self.location, self.size, self.size, h, w, self.margin)
        if r < 0 or c < 0 or r + self.size > h or c + self.size > w:
            raise bad_param(f"{self.name}.location",
                            f"a place where a {self.size}×{self.size} patch (margin "
                            f"{self.margin}) fits a {h}×{w} image",
                            self.location if isinstance(self.location, str) else (r, c))
        return slice(r, r + self.size), slice(c, c + self.size)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.name)
        rows, cols = self.region(int(x.shape[2]), int(x.shape[3]))
        out = x.clone()
        out[:, :, rows, cols] = self.patch(int(x.shape[1])).to(device=x.device, dtype=x.dtype)
        return out.clamp_(0.0, 1.0)


class BadNets(PatchAttack):
    """BadNets patch trigger, all-to-one: every poisoned sample is relabelled ``target``.

    Needs nothing but the training set. Settings: ``target`` class; ``pattern`` —
    ``"white"``, ``"black"``, ``"checkerboard"``, ``"random"`` (0/1 per pixel and channel,
    drawn from ``trigger_seed``), a ``.npy``/image path or an array of shape
    ``size×size`` / ``C×size×size``; ``size`` in pixels; ``location`` — a corner name,
    ``"center"`` or ``(row, col)`` of the patch's top-left pixel; ``margin`` — distance in
    pixels from the image border for corner names; ``color`` — ``none`` (the pattern as
    it is) or a colour multiplying the pattern channel by channel (a name such as
    ``red``, ``#rrggbb``, ``R/G/B`` or a tuple: integers 0–255 or floats in [0, 1]; see
    :mod:`trojanscan.attacks.patterns`), e.g. ``color=(255,0,0)`` for a red patch.
    Known weakness: a large, constant patch is what Neural Cleanse and STRIP find best.
    """

    name: ClassVar[str] = "badnets"
    label_mode: ClassVar[str] = "all-to-one"
    paper: ClassVar[str] = "Gu, Dolan-Gavitt & Garg, BadNets, arXiv 2017 (IEEE Access 2019)"

    def __init__(self, *, target: int = 0, pattern: Any = "white", size: int = 3,
                 location: Any = "bottom-right", margin: int = 1,
                 trigger_seed: int = 0, color: Any = None) -> None:
        self.target = check_int(f"{self.name}.target", target, minimum=0)
        self._init_patch(pattern, size, location, margin, trigger_seed, color)
