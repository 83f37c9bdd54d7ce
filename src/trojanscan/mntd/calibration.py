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

Beyond the paper, :func:`tail_p_value` lets the p-value go below the conformal floor
``1/(n + 1)`` for a raw output beyond every null value, so that p-values (and the scan's
fused score) still order models the null cannot separate. Inside the null's range it *is*
the conformal p-value; beyond the largest null value ``x_max`` it is
``S(raw) / S(x_max) / (n + 1)``, where ``S`` is a survival function fitted to the null's
upper tail — continuous at ``x_max`` and decreasing. Candidates (:func:`fit_tail`): a normal
and a logistic fitted to every null value, and a generalized Pareto fitted to the
exceedances over the ``m``-th largest (``m = max(8, ⌈n/4⌉)``; probability-weighted
moments, its shape then raised by one standard error, since a dozen exceedances estimate it
loosely). Each is checked by a
Kolmogorov–Smirnov test of the ``m`` top null values against its distribution conditional
on exceeding that threshold; of the candidates that pass (KS p ≥ 0.05; all of them when none
passes) the p-value takes the *largest* (the heaviest tail: conservative). Because the
p-value equals the conformal one wherever that is above ``1/(n + 1)``, the false-alarm rate
at any level ``α ≥ 1/(n + 1)`` is exactly the conformal guarantee; below it the guarantee is
the fitted tail's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

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


#: a tail candidate passes the goodness-of-fit check when its KS p-value is at least this
TAIL_FIT_LEVEL = 0.05
#: smallest null for which a tail is fitted (fewer values: the conformal p-value only)
MIN_TAIL_NULL = 16


@dataclass(frozen=True)
class TailCandidate:
    """One fitted upper-tail model: its name, parameters and KS check on the top values."""

    name: str
    params: tuple[float, ...]
    ks_p: float

    def log_sf(self, x: float | np.ndarray, threshold: float) -> np.ndarray:
        """Log survival function (for ``gpd``: of the excess over ``threshold``)."""
        xs = np.asarray(x, dtype=np.float64)
        if self.name == "normal":
            return np.asarray(stats.norm.logsf(xs, *self.params))
        if self.name == "logistic":
            return np.asarray(stats.logistic.logsf(xs, *self.params))
        c, scale = self.params[:2]
        return np.asarray(stats.genpareto.logsf(np.maximum(xs - threshold, 0.0), c, 0.0,
                                                scale))


@dataclass(frozen=True)
class TailModel:
    """The fitted candidates of a null's upper tail (see the module docstring)."""

    n: int
    x_max: float
    threshold: float  # the GPD's threshold: the m-th largest null value
    top: int  # m
    candidates: tuple[TailCandidate, ...]

    @property
    def passing(self) -> tuple[TailCandidate, ...]:
        ok = tuple(c for c in self.candidates if c.ks_p >= TAIL_FIT_LEVEL)
        return ok or self.candidates

    def p_beyond(self, raw: float) -> tuple[float, str]:
        """``S(raw) / S(x_max) / (n + 1)`` for ``raw > x_max`` and the candidate used."""
        best, name = -np.inf, ""
        for c in self.passing:
            with np.errstate(invalid="ignore"):
                lr = float(c.log_sf(raw, self.threshold)
                           - c.log_sf(self.x_max, self.threshold))
            if lr == lr and lr > best:  # NaN: x_max beyond the candidate's support
                best, name = min(0.0, lr), c.name
        if best == -np.inf:
            return 1.0 / (self.n + 1.0), "empirical"
        return float(np.exp(best - np.log(self.n + 1.0))), name

    def to_dict(self) -> dict[str, object]:
        return {"null_size": self.n, "x_max": self.x_max, "threshold": self.threshold,
                "top": self.top, "fit_level": TAIL_FIT_LEVEL,
                "candidates": {c.name: {"params": list(c.params), "ks_p": c.ks_p,
                                        "passed": c.ks_p >= TAIL_FIT_LEVEL}
                               for c in self.candidates}}


def gpd_pwm(excess: np.ndarray) -> tuple[float, float]:
    """Generalized Pareto shape ``c`` (scipy's sign: ``c > 0`` heavy) and scale fitted to
    positive excesses by probability-weighted moments (Hosking & Wallis, Technometrics
    1987; closed form, steadier than maximum likelihood on a few values), the shape
    clipped to [-0.5, 1]."""
    x = np.sort(np.asarray(excess, dtype=np.float64))
    n = x.size
    a0 = float(x.mean())
    a1 = float(np.mean((1.0 - (np.arange(1, n + 1) - 0.35) / n) * x))
    den = a0 - 2.0 * a1
    if not den > 0:
        return float("nan"), 0.0
    k = a0 / den - 2.0
    return float(np.clip(-k, -0.5, 1.0)), float(2.0 * a0 * a1 / den)


def gpd_pwm_shape_se(c: float, n: int) -> float:
    """Asymptotic standard error of the probability-weighted-moment shape estimate
    (Hosking & Wallis 1987; infinite where it does not exist, ``c >= 0.5``)."""
    k = -float(c)
    if not 1.0 + 2.0 * k > 0 or n < 1:
        return float("inf")
    var = (1 + k) ** 2 * (2 + k) ** 2 * (1 + k + 2 * k * k) / ((1 + 2 * k) * (3 + 2 * k) * n)
    return float(np.sqrt(var))


def fit_tail(null: Floats) -> TailModel | None:
    """Fit the upper-tail candidates to ``null`` (``None`` when it has fewer than
    :data:`MIN_TAIL_NULL` values or no spread)."""
    b = np.sort(np.asarray(null, dtype=np.float64))
    b = b[np.isfinite(b)]
    n = int(b.size)
    if n < MIN_TAIL_NULL or not float(b[-1]) > float(b[0]):
        return None
    m = max(8, int(np.ceil(n / 4)))
    u = float(b[n - m - 1])
    top = b[n - m:]
    cands: list[TailCandidate] = []
    for name, dist in (("normal", stats.norm), ("logistic", stats.logistic)):
        loc, scale = dist.fit(b)
        if not scale > 0:
            continue
        cand = TailCandidate(name, (float(loc), float(scale)), 0.0)
        log_su = float(cand.log_sf(u, u))

        def cdf(x: np.ndarray, c: TailCandidate = cand, lsu: float = log_su) -> np.ndarray:
            return np.asarray(-np.expm1(c.log_sf(x, u) - lsu))

        cands.append(TailCandidate(name, cand.params, float(stats.kstest(top, cdf).pvalue)))
    excess = top - u
    if float(excess.max()) > 0:
        c, scale = gpd_pwm(excess)
        if scale > 0 and np.isfinite(c):
            ks = float(stats.kstest(excess, "genpareto", (c, 0.0, scale)).pvalue)
            # the tail used is one standard error heavier than the estimate: a dozen
            # exceedances estimate the shape loosely, and a too-light tail would make
            # p-values too small
            c_up = float(np.clip(c + gpd_pwm_shape_se(c, excess.size), -0.5, 1.0))
            cands.append(TailCandidate("gpd", (c_up, float(scale), float(c)), ks))
    if not cands:
        return None
    return TailModel(n, float(b[-1]), u, m, tuple(cands))


def tail_p_value(raw: float, null: Floats, tail: TailModel | None = None,
                 ) -> tuple[float, str]:
    """The p-value of ``raw`` (higher = more suspicious) against ``null``: the conformal
    p-value inside the null's range, the fitted tail beyond it (module docstring), and
    which of the two (``"empirical"`` or the tail candidate's name) gave it. ``tail``:
    ``fit_tail(null)`` when already computed."""
    b = np.asarray(null, dtype=np.float64)
    p = p_value(raw, b)
    if b.size == 0 or not raw > float(np.max(b)):
        return p, "empirical"
    model = tail if tail is not None else fit_tail(b)
    if model is None:
        return p, "empirical"
    q, name = model.p_beyond(float(raw))
    return min(p, q), name


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
