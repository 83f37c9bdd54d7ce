"""The summary's maths: rank AUROC, ROC points and confusion counts (pure functions).

Labels are ``1`` (backdoored) / ``0`` (clean); scores are higher-is-more-suspicious.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve by the rank (Mann–Whitney) formula.

    The share of (backdoored, clean) pairs in which the backdoored model scores higher,
    a tie counting one half. ``None`` when either class is absent.
    """
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length: {len(labels)} != {len(scores)}")
    pos = [float(s) for y, s in zip(labels, scores) if int(y) == 1]
    neg = [float(s) for y, s in zip(labels, scores) if int(y) == 0]
    if not pos or not neg:
        return None
    # mid-ranks over the pooled scores: ties share the mean of their ranks
    pooled = sorted((s, i < len(pos)) for i, s in enumerate(pos + neg))
    rank_sum = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid = (i + j) / 2 + 1  # ranks are 1-based
        rank_sum += mid * sum(1 for k in range(i, j + 1) if pooled[k][1])
        i = j + 1
    n_pos, n_neg = len(pos), len(neg)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_points(labels: Sequence[int], scores: Sequence[float]) -> list[tuple[float, float]]:
    """``(FPR, TPR)`` at every distinct threshold, from ``(0, 0)`` to ``(1, 1)``; tied
    scores move both rates in one step (the trapezoid under these points is
    :func:`auroc`). Empty when either class is absent."""
    n_pos = sum(1 for y in labels if int(y) == 1)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return []
    order = sorted(zip(scores, labels), key=lambda t: -float(t[0]))
    points = [(0.0, 0.0)]
    tp = fp = 0
    i = 0
    while i < len(order):
        s = order[i][0]
        while i < len(order) and order[i][0] == s:
            if int(order[i][1]) == 1:
                tp += 1
            else:
                fp += 1
            i += 1
        points.append((fp / n_neg, tp / n_pos))
    return points


@dataclass(frozen=True)
class Confusion:
    """Counts of a yes/no verdict against ground truth (positive = backdoored)."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def tpr(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def fpr(self) -> float | None:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else None

    def to_dict(self) -> dict[str, int | float | None]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "tpr": self.tpr, "fpr": self.fpr}


def confusion(labels: Sequence[int], flagged: Sequence[bool]) -> Confusion:
    """Confusion counts of ``flagged`` (the shipped verdict) against ``labels``."""
    if len(labels) != len(flagged):
        raise ValueError(f"labels and verdicts differ in length: {len(labels)} != "
                         f"{len(flagged)}")
    pairs = [(int(y) == 1, bool(f)) for y, f in zip(labels, flagged)]
    return Confusion(tp=sum(y and f for y, f in pairs), fp=sum(f and not y for y, f in pairs),
                     tn=sum(not y and not f for y, f in pairs),
                     fn=sum(y and not f for y, f in pairs))
