"""Mask-and-pattern triggers (Neural Cleanse's form): ``(1 − m)·x + m·p``."""

from __future__ import annotations

import torch

__all__ = ["stamp"]


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 − m)·x + m·p`` for x ``N×C×H×W``, mask ``H×W`` (or 1×H×W), pattern ``C×H×W``."""
    m = mask.reshape(1, 1, *mask.shape[-2:])
    return (1.0 - m) * x + m * pattern.unsqueeze(0)
