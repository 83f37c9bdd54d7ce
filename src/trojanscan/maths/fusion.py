"""Fusing model-level detectors into one verdict (pure functions).

Rule (Bonferroni min-p): each applicable detector ``i`` gives a p-value ``p_i`` — the
probability that a clean model produces evidence at least this strong. The fused
p-value is ``min(1, m · min_i p_i)`` over the ``m`` detectors that ran; the model is
called backdoored when it is below ``alpha``. If each ``p_i`` is calibrated on clean
models, the false-alarm rate of the fused verdict is at most ``alpha`` whatever the
dependence between detectors (union bound). The fused score is ``1 - p_fused``.

A detector that reports no p-value contributes through its own verdict: ``p = 0`` when
it says backdoored and ``p = 1`` when it says clean, so its verdict is carried over
unchanged (and its own false-alarm rate adds to the union bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Evidence:
    """One detector's contribution: its verdict and (optional) calibrated p-value."""

    name: str
    backdoored: bool
    p_value: float | None
    suspected_targets: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fused:
    backdoored: bool
    p_value: float
    score: float
    suspected_targets: tuple[int, ...]
    decisive: str | None  # detector with the smallest p-value, if any


def effective_p(e: Evidence) -> float:
    """The p-value used for fusion (verdict-derived when the detector has none)."""
    if e.p_value is None:
        return 0.0 if e.backdoored else 1.0
    p = float(e.p_value)
    if p != p:  # NaN: no evidence
        return 1.0
    return min(1.0, max(0.0, p))


def fuse(evidence: Sequence[Evidence], *, alpha: float = 0.05) -> Fused:
    """Combine detectors by the Bonferroni min-p rule (see module docstring)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not evidence:
        return Fused(False, 1.0, 0.0, (), None)
    ps = [effective_p(e) for e in evidence]
    i_min = min(range(len(ps)), key=lambda i: ps[i])
    p_fused = min(1.0, len(ps) * ps[i_min])
    backdoored = p_fused < alpha
    targets: list[int] = []
    if backdoored:
        # targets named by every detector that is individually significant, best first
        for i in sorted(range(len(ps)), key=lambda i: ps[i]):
            if len(ps) * ps[i] < alpha:
                targets += [t for t in evidence[i].suspected_targets if t not in targets]
    return Fused(backdoored, p_fused, 1.0 - p_fused, tuple(targets), evidence[i_min].name)
