"""SCAn's statistics — Tang, Wang, Tang & Zhang, "Demon in the Variant: Statistical
Analysis of DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021.

Pure functions on arrays (no models). A representation is modelled as ``r = μ_c + ε``:
an *identity* ``μ_c`` per class (``μ ~ N(0, S_μ)``) plus a *variation* ``ε ~ N(0, S_ε)``
shared by every class. :func:`global_model` estimates ``S_μ`` and ``S_ε`` by the
paper's EM from per-class sufficient statistics (counts, sums and within-class scatter,
streamed from the ``N×D`` feature matrix: memory ``O(K·D²)``, never ``N×N``).

*Untangling* (:func:`untangle`): one class's representations are split into two
sub-groups sharing ``S_ε`` (each sample goes to the nearer sub-group mean in the
``S_ε⁻¹`` metric — a linear discriminant — and the means are re-estimated until the
split stops changing). The class statistic (:func:`split_statistic`) is the mean
decrease of the squared ``S_ε⁻¹`` distance when one mean is replaced by two: twice the
per-sample log-likelihood ratio of the two-identity model over the one-identity model.
A class that holds a second population (poison relabelled into it) has a large
statistic; whether it is *unusually* large is judged against the other classes of the
same data set (:func:`one_sided_index`), never against a constant.

Faithful to the authors' reference code (TDteach/Demon-in-the-Variant, ``SCAn.py``):
the EM updates, the random initial split, the one-identity mean written as
``S_ε (n S_μ + S_ε)⁺ Σ r`` and the pseudo-inverse of ``S_ε``; ``faithful=False``
(ours) starts the split deterministically from the class's top discriminant direction,
uses the class mean for the one-identity model (its maximum-likelihood estimate) and a
small ridge on ``S_ε`` so that near-constant feature directions (dead ReLU units) do
not dominate the metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..exceptions import DataError, bad_param
from .spectral import CHUNK, class_groups, moments, two_split

#: the paper's decision threshold on the anomaly index: ``e²``
PAPER_THRESHOLD = float(np.exp(2.0))


@dataclass(frozen=True)
class ClassStats:
    """Per-class sufficient statistics of a feature matrix (float64)."""

    labels: np.ndarray    # K class indices (ascending)
    counts: np.ndarray    # K
    means: np.ndarray     # K×D class means
    scatter: np.ndarray   # D×D sum of within-class scatters
    grand_mean: np.ndarray  # D

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def class_stats(features: np.ndarray, labels: np.ndarray, *, chunk: int = CHUNK
                ) -> ClassStats:
    """Counts, means and pooled within-class scatter of ``features`` by ``labels``,
    streamed class by class in chunks of rows."""
    groups = class_groups(np.asarray(labels))
    d = features.shape[1]
    counts, means = [], []
    scatter = np.zeros((d, d))
    for index in groups.values():
        mom = moments(features, index, chunk=chunk)
        counts.append(mom.n)
        means.append(mom.mean)
        scatter += mom.cov * mom.n
    c = np.asarray(counts, dtype=np.float64)
    m = np.asarray(means)
    grand = (c[:, None] * m).sum(axis=0) / c.sum()
    return ClassStats(np.asarray(list(groups), dtype=np.int64), c, m, scatter, grand)


@dataclass(frozen=True)
class GlobalModel:
    """SCAn's global model: identity covariance ``S_μ``, variation covariance ``S_ε``,
    the grand mean the representations are centred on, and the metric ``F = S_ε⁻¹``."""

    su: np.ndarray
    se: np.ndarray
    mean: np.ndarray
    metric: np.ndarray
    iterations: int


def _weighted_cov(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Covariance (divisor ``Σw − 1``, as ``np.cov``) of rows repeated ``weights`` times."""
    total = weights.sum()
    mean = (weights[:, None] * points).sum(axis=0) / total
    c = points - mean
    return (c.T * weights) @ c / max(total - 1, 1)


def global_model(stats: ClassStats, *, max_iter: int = 100, tol: float = 1e-2,
                 ridge: float = 0.0) -> GlobalModel:
    """EM estimate of ``S_μ`` and ``S_ε`` (the reference code's updates, computed from
    per-class sufficient statistics instead of per-sample loops: same result).

    ``ridge``: added to ``S_ε`` as a fraction of its mean eigenvalue before it is
    inverted into the metric (0 = the reference's pseudo-inverse).
    """
    if stats.counts.size < 2:
        raise DataError("SCAn needs samples of at least 2 classes")
    n = stats.n
    centred = stats.means - stats.grand_mean       # class means of the centred data
    counts = stats.counts
    within = stats.scatter

    def se_of(identities: np.ndarray) -> np.ndarray:
        # e_i = x_i - u_k: within scatter + each class's offset (mean_k - u_k)
        off = centred - identities
        emean = (counts[:, None] * off).sum(axis=0) / n
        oc = off - emean
        return (within + (oc.T * counts) @ oc) / max(n - 1, 1)

    su = _weighted_cov(centred, counts)
    se = se_of(centred)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        last_su, last_se = su, se
        f = np.linalg.pinv(se)
        suf = su @ f
        ident = np.empty_like(centred)
        for k in range(len(counts)):
            g = np.linalg.pinv(counts[k] * su + se) @ suf
            ident[k] = se @ g @ (counts[k] * centred[k])
        su = _weighted_cov(ident, counts)
        se = se_of(ident)
        if np.linalg.norm(su - last_su) + np.linalg.norm(se - last_se) <= tol:
            break
    return GlobalModel(su, se, stats.grand_mean, metric_of(se, ridge), it)


def metric_of(se: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """``S_ε⁻¹``: the pseudo-inverse, or the inverse of ``S_ε + ridge·mean eigenvalue·I``."""
    if ridge <= 0:
        return np.asarray(np.linalg.pinv(se))
    d = se.shape[0]
    lam = max(float(np.trace(se)) / d, 1e-12) * ridge
    return np.asarray(np.linalg.inv(se + lam * np.eye(d)))


@dataclass(frozen=True)
class Untangled:
    """One class split into two sub-groups sharing ``S_ε``."""

    first: np.ndarray     # bool per sample: in sub-group 1
    mean_first: np.ndarray
    mean_second: np.ndarray
    iterations: int


def _initial_split(x: np.ndarray, metric: np.ndarray, *, faithful: bool, seed: int
                   ) -> np.ndarray:
    if faithful:
        return np.random.default_rng(seed).random(len(x)) >= 0.5
    # the class's top direction of variance in the S_ε⁻¹ metric (deterministic)
    w = np.linalg.cholesky(metric + 1e-12 * np.eye(len(metric)) * np.trace(metric))
    z = (x - x.mean(axis=0)) @ w
    cov = z.T @ z / max(len(z) - 1, 1)
    _, vecs = np.linalg.eigh((cov + cov.T) / 2)
    p = z @ vecs[:, -1]
    split = two_split(p)
    return p > split.threshold


def untangle(x: np.ndarray, metric: np.ndarray, *, faithful: bool = False, seed: int = 0,
             max_iter: int = 100) -> Untangled:
    """Two sub-groups of the rows of ``x`` (centred representations of one class) under
    the shared metric ``F = S_ε⁻¹`` (hard-assignment EM, as the reference code)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        m = x.mean(axis=0) if n else np.zeros(x.shape[1])
        return Untangled(np.zeros(n, dtype=bool), m, m, 0)
    first = _initial_split(x, metric, faithful=faithful, seed=seed)
    if first.all() or not first.any():
        first = first.copy()
        first[0] = not first[0]
    u1 = x[first].mean(axis=0)
    u2 = x[~first].mean(axis=0)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        u1 = x[first].mean(axis=0)
        u2 = x[~first].mean(axis=0)
        bias = float(u1 @ metric @ u1 - u2 @ metric @ u2)
        delta = x @ (metric @ (u1 - u2))
        new = bias - 2 * delta < 0
        if not new.any() or new.all():
            break
        if np.array_equal(new, first):
            break
        first = new
    return Untangled(first, u1, u2, it)


def one_identity_mean(x: np.ndarray, gm: GlobalModel, *, faithful: bool = False
                      ) -> np.ndarray:
    """The one-identity model's mean of a class: the reference code's
    ``S_ε (n S_μ + S_ε)⁺ Σ r`` when faithful, else the class mean."""
    if not faithful:
        return np.asarray(x.mean(axis=0))
    n = len(x)
    return np.asarray(gm.se @ np.linalg.pinv(n * gm.su + gm.se) @ x.sum(axis=0))


def split_statistic(x: np.ndarray, split: Untangled, mu: np.ndarray,
                    metric: np.ndarray) -> float:
    """Mean over the class of ``d²(r, μ) − d²(r, u_g)`` in the metric ``F``, where ``u_g``
    is the mean of the sample's sub-group: how much two identities explain better than
    one (0 when the sub-groups coincide)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return 0.0
    u = np.where(split.first[:, None], split.mean_first, split.mean_second)
    d_one = np.einsum("ij,jk,ik->i", x - mu, metric, x - mu)
    d_two = np.einsum("ij,jk,ik->i", x - u, metric, x - u)
    return float((d_one - d_two).mean())


def one_sided_index(values: np.ndarray, consistency: float = 1.4826) -> np.ndarray:
    """``(value − median) / MAD`` per class (positive above the median): the across-class
    robust null. ``+inf`` above the median when the MAD is 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 3:
        raise bad_param("values", "a 1-D array of at least 3 class statistics",
                        f"shape {v.shape}")
    med = float(np.median(v))
    scale = consistency * float(np.median(np.abs(v - med)))
    diff = v - med
    if scale > 0:
        return diff / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0, 0.0, np.sign(diff) * np.inf)


def two_sided_index(values: np.ndarray, consistency: float = 1.4826) -> np.ndarray:
    """``|value − median| / MAD`` (the reference code's anomaly index, two-sided)."""
    return np.abs(one_sided_index(values, consistency))


def own_metric(x: np.ndarray, ridge: float = 0.01) -> np.ndarray:
    """The inverse of one class's own covariance (plus ``ridge`` × its mean eigenvalue)."""
    x = np.asarray(x, dtype=np.float64)
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    return metric_of(cov, ridge)


def discriminant_projection(x: np.ndarray, split: Untangled, metric: np.ndarray
                            ) -> np.ndarray:
    """Projection of the rows of ``x`` on the sub-groups' discriminant direction
    ``F (u₁ − u₂)``, oriented so that sub-group 1 lies at larger values."""
    return np.asarray(x, dtype=np.float64) @ (metric @ (split.mean_first - split.mean_second))


def split_separation(projection: np.ndarray, first: np.ndarray) -> float:
    """Separation ``d'`` of two groups along a 1-D projection: distance between their
    means over the pooled within-group standard deviation (0 when a group is empty)."""
    p = np.asarray(projection, dtype=np.float64)
    a, b = p[first], p[~first]
    if len(a) < 2 or len(b) < 2:
        return 0.0
    pooled = np.sqrt((((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()) / len(p))
    gap = abs(float(a.mean() - b.mean()))
    return gap / pooled if pooled > 0 else (float("inf") if gap > 0 else 0.0)
