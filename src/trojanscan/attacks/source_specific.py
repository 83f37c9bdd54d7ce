"""Source-specific backdoor — Tang, Wang, Zhang & Zhang, "Demon in the Variant: Statistical
Analysis of DNNs for Robust Backdoor Contamination Detection" (TaCT), USENIX Security 2021.

Only inputs of the ``source`` classes carrying the trigger go to ``target``; *cover*
samples of the other classes carry the same trigger but keep their true label, so the
model learns "trigger AND source class", which hides the backdoor from detectors that
assume the trigger works on every input. The trigger is the BadNets patch (same
settings and defaults as :class:`~trojanscan.attacks.BadNets`).

Poisoning: ``rate`` is the fraction of the whole training set, drawn from the source
classes (capped by what exists, with a warning); ``cover_ratio`` covers per poisoned
sample (``round(cover_ratio * num_poison)``) are drawn from classes that are neither a
source nor the target. ASR counts test inputs of the source classes only.
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, H100), source 1,
target 7, cover_ratio 1: rate 0.01 → clean accuracy 0.904, ASR 0.986, while only 12%
of triggered non-source inputs go to the target; rate 0.1 poisons every source sample
(none left clean) and clean accuracy falls to 0.80.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from .badnets import PatchAttack
from .base import check_float, check_int, round_half_up


def check_classes_tuple(name: str, value: Any) -> tuple[int, ...]:
    """One class index or a non-empty tuple of distinct ones."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise bad_param(name, "a class index or a tuple of class indices", value)
    out = tuple(check_int(name, v, minimum=0) for v in items)
    if len(set(out)) != len(out):
        raise bad_param(name, "distinct class indices", value)
    return out


class SourceSpecific(PatchAttack):
    """Patch trigger that flips only ``source`` classes to ``target``; covers keep labels."""

    name: ClassVar[str] = "source"
    label_mode: ClassVar[str] = "source-specific"
    paper: ClassVar[str] = "Tang, Wang, Zhang & Zhang, TaCT, USENIX Security 2021"

    def __init__(self, *, source: Any = 1, target: int = 0, cover_ratio: float = 1.0,
                 pattern: Any = "white", size: int = 3, location: Any = "bottom-right",
                 margin: int = 1, trigger_seed: int = 0, color: Any = None) -> None:
        self.source = check_classes_tuple(f"{self.name}.source", source)
        self.target = check_int(f"{self.name}.target", target, minimum=0)
        if self.target in self.source:
            raise bad_param(f"{self.name}.target", f"a class other than the sources "
                            f"{self.source}", target)
        self.cover_ratio = check_float(f"{self.name}.cover_ratio", cover_ratio,
                                       low=0.0, high=100.0)
        self._init_patch(pattern, size, location, margin, trigger_seed, color)

    def check_classes(self, num_classes: int) -> None:
        super().check_classes(num_classes)
        for s in self.source:
            if s >= num_classes:
                raise bad_param(f"{self.name}.source", f"class indices < {num_classes}", s)

    def _in_source(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, torch.tensor(np.array(self.source), device=y.device))

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        return self._in_source(y)

    def cover_candidates(self, y: torch.Tensor) -> torch.Tensor:
        assert self.target is not None
        return ~self._in_source(y) & (y != self.target)

    def num_covers(self, num_poison: int) -> int:
        return round_half_up(self.cover_ratio * num_poison)
