"""Multiple triggers, multiple targets — the "multiple infected labels with separate
triggers" setting of Wang et al., "Neural Cleanse", IEEE S&P 2019 (section VII): several
independent backdoors in one model, e.g. two patches in different corners sending
inputs to different classes.

Poisoning: the ``round(rate * N)`` poisoned samples are split evenly between the
triggers (the first ones get the remainder), each trigger drawing from its own
candidates among the samples not yet taken, so the sets are disjoint; the poison and
cover masks are the unions. ``apply(x)`` stamps trigger ``i % m`` on the ``i``-th input
of the batch (round robin; ``target_labels`` and ``eligible`` follow the same rule);
:func:`~trojanscan.attacks.attack_success_rates` reports one ASR per trigger and their
mean.
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, H100), patches top-left → 1
and bottom-right → 5: rate 0.1 → clean accuracy 0.898, ASR 0.999 / 0.990; rate 0.01 →
0.902, 0.993 / 0.923. Spec: ``multi:badnets(size=3,location=top-left,target=1)+badnets(target=5)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..exceptions import bad_param
from .base import Attack, check_images


class Multi(Attack):
    """Several attacks at once (each with its own trigger and target)."""

    name: ClassVar[str] = "multi"
    label_mode: ClassVar[str] = "multi"
    paper: ClassVar[str] = "Wang et al., Neural Cleanse, IEEE S&P 2019 (multiple infected labels)"

    def __init__(self, *, attacks: Sequence[Attack] = ()) -> None:
        if isinstance(attacks, Attack) or not isinstance(attacks, (list, tuple)) or not attacks:
            raise bad_param("multi.attacks", "a non-empty sequence of attacks", attacks)
        for a in attacks:
            if not isinstance(a, Attack) or isinstance(a, Multi):
                raise bad_param("multi.attacks", "attacks other than multi", a)
        self.attacks: tuple[Attack, ...] = tuple(attacks)
        self.target = None

    @property
    def spec(self) -> str:
        return "multi:" + "+".join(a.call_spec for a in self.attacks)

    @property
    def call_spec(self) -> str:
        raise bad_param("multi.attacks", "attacks other than multi", self.spec)

    @property
    def targets(self) -> tuple[int, ...]:
        out: list[int] = []
        for a in self.attacks:
            out.extend(t for t in a.targets if t not in out)
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["triggers"] = [a.to_dict() for a in self.attacks]
        d["params"] = {"attacks": [a.spec for a in self.attacks]}
        return d

    def check_classes(self, num_classes: int) -> None:
        for a in self.attacks:
            a.check_classes(num_classes)

    def _rows(self, n: int, i: int) -> torch.Tensor:
        return torch.arange(i, n, len(self.attacks))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.name)
        out = x.clone()
        for i, a in enumerate(self.attacks):
            rows = self._rows(int(x.shape[0]), i).to(x.device)
            if rows.numel():
                out[rows] = a.apply(x[rows])
        return out

    def target_labels(self, y: torch.Tensor, *, num_classes: int | None = None) -> torch.Tensor:
        out = y.clone()
        for i, a in enumerate(self.attacks):
            rows = self._rows(int(y.shape[0]), i).to(y.device)
            out[rows] = a.target_labels(y[rows], num_classes=num_classes)
        return out

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(y, dtype=torch.bool)
        for i, a in enumerate(self.attacks):
            rows = self._rows(int(y.shape[0]), i).to(y.device)
            out[rows] = a.eligible(y[rows])
        return out

    def _poison_into(self, x_out: torch.Tensor, y_out: torch.Tensor, y: torch.Tensor, n: int,
                     gen: torch.Generator, num_classes: int, poison_mask: torch.Tensor,
                     cover_mask: torch.Tensor) -> None:
        m = len(self.attacks)
        for i, a in enumerate(self.attacks):
            share = n // m + (1 if i < n % m else 0)
            a._poison_into(x_out, y_out, y, share, gen, num_classes, poison_mask, cover_mask)
