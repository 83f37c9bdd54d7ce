"""SIG — Barni, Kallas & Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption
Without Label Poisoning", ICIP 2019.

Clean-label: a horizontal sinusoid ``v(i, j) = delta * sin(2π j f / W)`` (``j`` the
column, ``W`` the width, same in every row and channel) is added to samples *of the
target class only* and their labels are kept; at test time the signal on an input of
another class pulls it to the target. ``x' = clip(x + v, 0, 1)``.

Poisoning: ``rate`` is the fraction of the *whole* training set, all taken from the
target class and capped by how many target samples exist (with a warning); e.g. 0.05
of Fashion-MNIST's 60 000 samples is 3 000, half of the target class. Poisoning the
whole target class (rate 0.1 there) leaves no clean sample of it and costs ~7 points of
clean accuracy: keep the rate at or below half the target class's share.

Defaults: ``delta=0.1`` (≈ 25/255, of the order of the paper's training Δ) while
poisoning, ``test_delta=0.3`` at test time (the paper too uses a stronger signal at test
time; ``test_delta=none`` uses ``delta``), ``frequency=6`` as in the paper.
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, rate 0.05, target 0, H100):
clean accuracy 0.892, ASR 0.96 (0.40 when testing at ``delta``); targets 8 / 2 / 4 / 7
gave 0.96 / 0.89 / 0.80 / 0.27 — how well SIG works depends on the target class.
Known weakness: clean-label attacks need a large share of the target class poisoned.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..exceptions import bad_param
from .base import Attack, check_float, check_images, check_int


def sinusoid(width: int, delta: float, frequency: float) -> torch.Tensor:
    """The SIG signal along one row: ``delta * sin(2π j f / W)`` for ``j < W``."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()


class SIG(Attack):
    """Sinusoidal-signal clean-label attack."""

    name: ClassVar[str] = "sig"
    label_mode: ClassVar[str] = "clean-label"
    paper: ClassVar[str] = "Barni, Kallas & Tondi, SIG, ICIP 2019"

    def __init__(self, *, target: int = 0, delta: float = 0.1, test_delta: float | None = 0.3,
                 frequency: float = 6.0) -> None:
        self.target = check_int(f"{self.name}.target", target, minimum=0)
        self.delta = check_float(f"{self.name}.delta", delta, low=0.0, high=1.0, low_open=True)
        self.test_delta = None if test_delta is None else check_float(
            f"{self.name}.test_delta", test_delta, low=0.0, high=1.0, low_open=True)
        self.frequency = check_float(f"{self.name}.frequency", frequency, low=0.0,
                                     high=1e6, low_open=True)

    def stamp(self, x: torch.Tensor, delta: float) -> torch.Tensor:
        """``clip(x + delta * sin(2π j f / W))``."""
        check_images(x, self.name)
        width = int(x.shape[3])
        v = sinusoid(width, delta, self.frequency)
        if float(v.abs().max()) < 1e-3 * delta:
            raise bad_param(f"{self.name}.frequency", f"a frequency whose signal is not zero on "
                            f"every column of a width-{width} image (2·f/W must not be an "
                            "integer)", self.frequency)
        v = v.to(device=x.device, dtype=x.dtype)
        return (x + v.view(1, 1, 1, -1)).clamp_(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time trigger (``test_delta``, or ``delta`` when it is None)."""
        return self.stamp(x, self.delta if self.test_delta is None else self.test_delta)

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Clean-label: only samples already of the target class are poisoned."""
        assert self.target is not None
        return torch.eq(y, self.target)

    def _stamp_poison(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.stamp(x, self.delta)
