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

Naming targets (:func:`name_targets`): a detector may give one p-value per label for
"this label is a backdoor target" (``Evidence.label_p_values``). Per label, the detectors
that have them are combined by the same Bonferroni min-p rule,
``q_k = min(1, m_L · min_i p_ik)`` over the ``m_L`` such detectors (valid whatever their
dependence); a Holm step-down across the K labels at ``alpha`` then names every label it
rejects (family-wise error ≤ ``alpha`` over the labels), so all-to-all and multi-target
backdoors name several. The fused verdict already says some label is a target, so when the
Holm step names none the single label with the smallest ``q_k`` is named (the best-supported
one). When no detector has per-label evidence the targets are, as before, those named by
every individually significant detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Evidence:
    """One detector's contribution: its verdict and (optional) calibrated p-value."""

    name: str
    backdoored: bool
    p_value: float | None
    suspected_targets: tuple[int, ...] = ()
    label_p_values: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Fused:
    backdoored: bool
    p_value: float
    score: float
    suspected_targets: tuple[int, ...]
    decisive: str | None  # detector with the smallest p-value, if any
    #: per-label fused p-values for "this label is a target" (None: no per-label evidence)
    target_p_values: tuple[float, ...] | None = None


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
    label_q = fuse_label_p_values([e.label_p_values for e in evidence])
    targets: list[int] = []
    if backdoored and label_q is not None:
        targets = name_targets(label_q, alpha=alpha)
    elif backdoored:
        # targets named by every detector that is individually significant, best first
        for i in sorted(range(len(ps)), key=lambda i: ps[i]):
            if len(ps) * ps[i] < alpha:
                targets += [t for t in evidence[i].suspected_targets if t not in targets]
    return Fused(backdoored, p_fused, 1.0 - p_fused, tuple(targets), evidence[i_min].name,
                 None if label_q is None else tuple(float(q) for q in label_q))


def _label_array(p: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"label p-values must be a non-empty 1-D sequence, got shape "
                         f"{arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=1.0), 0.0, 1.0)


def fuse_label_p_values(per_detector: Sequence[Sequence[float] | None]) -> np.ndarray | None:
    """Per-label Bonferroni min-p over the detectors that give label p-values
    (``None`` entries are skipped; ``None`` when none gives any). All must have as many
    labels; NaN counts as no evidence (1)."""
    rows = [_label_array(p) for p in per_detector if p is not None]
    if not rows:
        return None
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"detectors disagree on the number of labels: "
                         f"{sorted({r.size for r in rows})}")
    return np.minimum(1.0, len(rows) * np.min(np.vstack(rows), axis=0))


def holm(p: Sequence[float] | np.ndarray, *, alpha: float) -> list[int]:
    """Indices rejected by Holm's step-down procedure at family-wise level ``alpha``,
    smallest p first."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    arr = _label_array(p)
    order = np.argsort(arr, kind="stable")
    out: list[int] = []
    for rank, i in enumerate(order):
        if arr[i] * (arr.size - rank) >= alpha:
            break
        out.append(int(i))
    return out


def name_targets(label_q: Sequence[float] | np.ndarray, *, alpha: float) -> list[int]:
    """Labels named as targets of a model already judged backdoored (module docstring):
    Holm's rejections at ``alpha``, else the label with the smallest fused p-value."""
    named = holm(label_q, alpha=alpha)
    if named:
        return named
    arr = _label_array(label_q)
    return [int(np.argmin(arr))] if float(arr.min()) < 1.0 else []
