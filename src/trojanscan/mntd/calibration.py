"""Pure functions turning MNTD's raw meta-classifier outputs into scores and p-values.

Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021. The paper
reports AUROC only; a scanner also needs a score in [0, 1] and a verdict. We calibrate
against the raw outputs of *held-out benign shadow models* (never seen in training):

* ``p_value(raw, benign)`` — the conformal p-value ``(1 + #{b >= raw}) / (n + 1)``: the
  chance that a benign model scores at least this high, valid when the model under test
  comes from the benign shadows' distribution;
* ``sigmoid`` — the binary meta-classifier is trained with BCE on balanced classes, so
  its sigmoid is a probability on the shadow distribution;
* ``ecdf_score`` — the one-class variant has no probabilistic output: its score is the
  share of held-out benign shadows it exceeds (mid-rank for ties), in [0, 1];
* ``combine_standardised`` — several variants' raw outputs, each standardised by the mean
  and standard deviation of its own held-out benign shadows' outputs, summed (beyond the
  paper: how the detector sums a bundle recipe's parts); the same sum over the benign shadows
  (the same shadows score every variant, in the same order) calibrates it;
  ``standardised_sums`` places other models (clean reference models) on the same scale.

Beyond the paper, a bundle may also hold *reference* raw outputs: those of clean models
trained outside the defender's share the way real models are (trojanscan.mntd.reference).
The detector then takes them, not the benign shadows, as the null distribution of the
threshold, p-value and one-class score.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: one list of raw outputs
Floats = Sequence[float] | np.ndarray


def sigmoid(x: float) -> float:
    """Numerically stable logistic function."""
    if x >= 0:
        return float(1.0 / (1.0 + np.exp(-x)))
    e = float(np.exp(x))
    return e / (1.0 + e)


def p_value(raw: float, benign: Sequence[float] | np.ndarray) -> float:
    """Conformal p-value of ``raw`` (higher = more suspicious) against benign raws."""
    b = np.asarray(benign, dtype=np.float64)
    return float((1 + np.sum(b >= raw)) / (b.size + 1))


def ecdf_score(raw: float, benign: Sequence[float] | np.ndarray) -> float:
    """Mid-rank share of ``benign`` below ``raw``: 0 below all, 1 above all."""
    b = np.asarray(benign, dtype=np.float64)
    if b.size == 0:
        return 0.5
    return float((np.sum(b < raw) + 0.5 * np.sum(b == raw)) / b.size)


def combine_standardised(raws: Sequence[float], benign: Sequence[Sequence[float]],
                         weights: Sequence[float] | None = None) -> tuple[float, np.ndarray]:
    """Sum of ``w_i · (raw_i − mean(benign_i)) / std(benign_i)`` over the variants ``i``
    (``weights``: all 1 when not given), and the same sum for each benign shadow
    (``benign[i][j]``: variant ``i``'s output on benign shadow ``j``). A variant whose
    benign outputs do not vary is centred only."""
    if len(raws) != len(benign) or not raws:
        raise ValueError("one list of benign outputs per raw output is needed")
    lists = _same_size_lists(benign, "benign shadows")
    total = float(standardised_sums([[float(r)] for r in raws], lists, weights)[0])
    return total, standardised_sums(lists, lists, weights)


def standardised_sums(values: Sequence[Floats], benign: Sequence[Floats],
                      weights: Sequence[float] | None = None) -> np.ndarray:
    """For each model ``j``, ``Σ_i w_i · (values[i][j] − mean(benign_i)) / std(benign_i)``:
    the (weighted) summed z-scores of models (``values[i][j]``: variant ``i`` on model
    ``j``) against the benign shadows — how :func:`combine_standardised` places other
    models (such as clean reference models) on its scale."""
    if len(values) != len(benign) or not values:
        raise ValueError("one list of benign outputs per list of values is needed")
    w = [1.0] * len(values) if weights is None else [float(x) for x in weights]
    if len(w) != len(values):
        raise ValueError("one weight per variant is needed")
    vals = _same_size_lists(values, "models")
    lists = _same_size_lists(benign, "benign shadows")
    total = np.zeros(vals[0].size)
    for v, b, wi in zip(vals, lists, w):
        sd = float(b.std())
        sd = sd if sd > 1e-12 * max(1.0, float(np.abs(b).max())) else 1.0
        total += wi * (v - b.mean()) / sd
    return total


def _same_size_lists(lists: Sequence[Floats], what: str) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=np.float64) for x in lists]
    if any(x.size == 0 for x in out) or len({x.size for x in out}) != 1:
        raise ValueError(f"every variant needs outputs on the same {what}")
    return out


def threshold_at_fpr(benign: Sequence[float] | np.ndarray, fpr: float) -> float:
    """Smallest raw threshold with at most ``fpr`` of ``benign`` strictly above it."""
    b = np.sort(np.asarray(benign, dtype=np.float64))
    if b.size == 0:
        raise ValueError("threshold_at_fpr needs at least one benign score")
    k = int(np.floor(fpr * b.size))  # how many may lie above
    return float(b[b.size - 1 - k]) if k < b.size else float(b[0])


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when one class is missing."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))
