"""Pure scoring functions of the wild benchmark (no models, no files)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def auroc(scores_pos: Sequence[float], scores_neg: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count half); ``None`` without both classes."""
    pos, neg = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def recall_precision(flagged: Sequence[int], truth: Sequence[int]) -> tuple[float, float | None]:
    """Recall of ``truth`` among ``flagged`` indices and precision (``None`` if none flagged)."""
    f, t = set(int(i) for i in flagged), set(int(i) for i in truth)
    hit = len(f & t)
    recall = hit / len(t) if t else 0.0
    return recall, (hit / len(f) if f else None)


def filter_rates(flagged: Sequence[bool], triggered: Sequence[bool]) -> tuple[float, float]:
    """``(FAR, FRR)``: triggered inputs let through, clean inputs flagged."""
    fl, tr = np.asarray(flagged, bool), np.asarray(triggered, bool)
    far = float((~fl[tr]).mean()) if tr.any() else float("nan")
    frr = float(fl[~tr].mean()) if (~tr).any() else float("nan")
    return far, frr


def mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else None


def median(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and not np.isnan(x)]
    return float(np.median(v)) if v else None
