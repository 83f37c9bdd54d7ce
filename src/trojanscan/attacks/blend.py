"""Blend — Chen, Liu, Li, Lu & Song, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning", arXiv 2017.

The whole image is blended with a fixed pattern, ``x' = (1 - alpha) * x + alpha * p``;
poisoned samples are relabelled to ``target`` (all-to-one). The paper's Hello-Kitty
image is not bundled: the default pattern is uniform random noise drawn from
``trigger_seed`` (the paper's other pattern); a ``.npy``/image path or an ``H×W`` /
``C×H×W`` array of the input's size may be given instead; ``color`` tints the pattern
channel by channel (pattern × colour, see :mod:`trojanscan.attacks.patterns`), e.g.
``blend:color=(255,0,0)`` blends red-channel noise.

Defaults: ``alpha=0.2`` at poisoning and at test time (the paper's training value).
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, H100): rate 0.1 → clean
accuracy 0.895, ASR 0.999; rate 0.01 → 0.901, 0.998.
Known weakness: a full-image trigger survives STRIP's superimposition poorly and
Neural Cleanse needs a large mask to reverse it (it often stays undetected there).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from .base import Attack, check_float, check_images, check_int
from .patterns import check_color, color_tensor, fit_channels, resolve_pattern, seeded_uniform

BLEND_PATTERNS = ("random",)


class Blend(Attack):
    """Blended-noise trigger, all-to-one."""

    name: ClassVar[str] = "blend"
    label_mode: ClassVar[str] = "all-to-one"
    paper: ClassVar[str] = "Chen, Liu, Li, Lu & Song, Targeted Backdoor Attacks, arXiv 2017"

    def __init__(self, *, target: int = 0, alpha: float = 0.2, pattern: Any = "random",
                 trigger_seed: int = 0, color: Any = None) -> None:
        self.target = check_int(f"{self.name}.target", target, minimum=0)
        self.alpha = check_float(f"{self.name}.alpha", alpha, low=0.0, high=1.0,
                                 low_open=True)
        self.pattern, self._array = resolve_pattern(f"{self.name}.pattern", pattern,
                                                    BLEND_PATTERNS)
        self.trigger_seed = check_int(f"{self.name}.trigger_seed", trigger_seed)
        self.color = check_color(f"{self.name}.color", color)

    def blend_pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        """The ``C×H×W`` pattern blended into inputs of that shape."""
        if self._array is None:
            pattern = seeded_uniform((c, h, w), self.trigger_seed)
        elif self._array.shape[-2:] != (h, w):
            raise bad_param(f"{self.name}.pattern", f"an array of the input's size {h}×{w}",
                            f"shape {self._array.shape}")
        else:
            pattern = fit_channels(torch.from_numpy(np.array(self._array)), c,
                                   f"{self.name}.pattern")
        if self.color is None:
            return pattern
        return pattern * color_tensor(self.color, c, f"{self.name}.color")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.name)
        c, h, w = (int(s) for s in x.shape[1:])
        p = self.blend_pattern(c, h, w).to(device=x.device, dtype=x.dtype)
        return ((1.0 - self.alpha) * x + self.alpha * p).clamp_(0.0, 1.0)
