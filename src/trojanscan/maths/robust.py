"""Robust statistics for poisoned-data detection (pure functions, arrays in and out).

* SPECTRE — Hayase, Kong, Somani & Oh, "SPECTRE: Defending Against Backdoor Attacks
  Using Robust Statistics", ICML 2021: per class, project the representations on their
  top-``k`` principal directions, estimate mean and covariance *robustly* (so that the
  poison does not enter them), whiten every sample with that estimate and score it with
  the QUantum Entropy (QUE) score of Dong, Hopkins & Li (NeurIPS 2019)::

      Σ' = cov(whitened samples),   M = exp(α (Σ' - I) / (‖Σ'‖₂ - 1)) / tr(...),
      τ_i = z_iᵀ M z_i

  ``α = 0`` is the Mahalanobis distance, ``α → ∞`` the squared projection on the top
  direction of excess variance (a whitened spectral signature); the paper uses ``α = 4``.

  The robust covariance here is a *deterministic* Minimum Covariance Determinant
  (MCD; Rousseeuw 1984) fit by concentration steps (Rousseeuw & Van Driessen 1999) from
  a few deterministic starts (Hubert, Rousseeuw & Verdonck 2012): the classical
  estimate, the samples nearest the coordinate-wise median, and each group of a 2-means
  split. The reference code uses an iterative 4th-moment filter (Diakonikolas et al.
  2017) instead; both estimate the covariance of the clean majority.

* Activation Clustering — Chen et al., "Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering", SafeAI@AAAI 2019 (arXiv 2018): the relative-size
  and silhouette rules on a per-class 2-means clustering.

Memory: every function takes one class's reduced representation (``n×k`` with
``k ≤ 64``); silhouettes are computed on a bounded random sample, never on an ``n×n``
distance matrix of the whole class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: robust support rows needed per dimension of the whitened space (caps ``k``)
SAMPLES_PER_DIM = 15

# ----------------------------------------------------------------------------- covariance


def _mean_cov(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = y.mean(axis=0)
    c = y - mu
    return mu, (c.T @ c) / max(len(y), 1)


def _regularise(cov: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    scale = float(np.trace(cov)) / max(cov.shape[0], 1)
    return cov + np.eye(cov.shape[0]) * ridge * max(scale, 1e-12)


def mahalanobis_sq(y: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances of the rows of ``y`` (float64)."""
    from scipy.linalg import solve_triangular

    chol = np.linalg.cholesky(_regularise(cov))
    sol = solve_triangular(chol, (y - mean).T, lower=True, check_finite=False)
    return np.einsum("ij,ij->j", sol, sol)


@dataclass(frozen=True)
class RobustFit:
    """A robust location/scatter estimate and the samples it was computed from."""

    mean: np.ndarray
    cov: np.ndarray
    support: np.ndarray  # bool mask over the rows used for the estimate
    log_det: float
    start: str


def _log_det(cov: np.ndarray) -> float:
    sign, logdet = np.linalg.slogdet(_regularise(cov))
    return float(logdet) if sign > 0 else float("inf")


def _smallest(d: np.ndarray, h: int) -> np.ndarray:
    """Mask of the ``h`` smallest values (linear-time selection)."""
    out = np.zeros(len(d), dtype=bool)
    out[np.argpartition(d, h - 1)[:h] if h < len(d) else slice(None)] = True
    return out


def _c_steps(y: np.ndarray, subset: np.ndarray, h: int, max_steps: int) -> np.ndarray:
    """Concentration steps: refit on the ``h`` rows closest to the current fit."""
    current = subset
    for _ in range(max_steps):
        mu, cov = _mean_cov(y[current])
        nxt = _smallest(mahalanobis_sq(y, mu, cov), h)
        if np.array_equal(nxt, current):
            break
        current = nxt
    return current


def _two_means(y: np.ndarray, iters: int = 20) -> np.ndarray:
    """Deterministic 2-means (start: the extremes along the first principal axis)."""
    mu, cov = _mean_cov(y)
    _, vecs = np.linalg.eigh(cov)
    p = (y - mu) @ vecs[:, -1]
    centres = np.stack([y[int(np.argmin(p))], y[int(np.argmax(p))]])
    assign = np.zeros(len(y), dtype=np.int64)
    for _ in range(iters):
        d0 = ((y - centres[0]) ** 2).sum(1)
        d1 = ((y - centres[1]) ** 2).sum(1)
        new = (d1 < d0).astype(np.int64)
        if np.array_equal(new, assign) and _ > 0:
            break
        assign = new
        for j in (0, 1):
            if (assign == j).any():
                centres[j] = y[assign == j].mean(0)
    return assign


def robust_covariance(y: np.ndarray, *, support_fraction: float = 0.5,
                      max_steps: int = 15) -> RobustFit:
    """Deterministic MCD: the ``h = ⌈support_fraction·n⌉`` rows with the smallest
    covariance determinant found by C-steps from deterministic starts (see module doc).

    ``support_fraction`` in [0.5, 1]: 0.5 gives the highest breakdown point (up to half
    the rows may be outliers), 1 the classical estimate.
    """
    y = np.asarray(y, dtype=np.float64)
    n, k = y.shape
    h = int(np.ceil(np.clip(support_fraction, 0.5, 1.0) * n))
    h = max(h, min(n, (n + k + 1) // 2))
    if h >= n or n <= k + 1:
        mu, cov = _mean_cov(y)
        return RobustFit(mu, cov, np.ones(n, dtype=bool), _log_det(cov), "classical")
    starts: dict[str, np.ndarray] = {"classical": np.ones(n, dtype=bool)}
    med = np.median(y, axis=0)
    mad = np.median(np.abs(y - med), axis=0) * 1.4826
    mad[mad <= 0] = 1.0
    dist = (((y - med) / mad) ** 2).sum(1)
    starts["median"] = _smallest(dist, h)
    groups = _two_means(y)
    for j in (0, 1):
        members = groups == j
        if members.sum() > k + 1:
            mu, cov = _mean_cov(y[members])
            starts[f"cluster{j}"] = _smallest(mahalanobis_sq(y, mu, cov), h)
    best: RobustFit | None = None
    for name, start in starts.items():
        support = _c_steps(y, start, h, max_steps)
        mu, cov = _mean_cov(y[support])
        ld = _log_det(cov)
        if best is None or ld < best.log_det - 1e-9:
            best = RobustFit(mu, cov, support, ld, name)
    assert best is not None
    return best


# ----------------------------------------------------------------------------- whitening, QUE


def whiten(y: np.ndarray, mean: np.ndarray, cov: np.ndarray, *,
           rcond: float = 1e-6) -> np.ndarray:
    """``(y - mean) Σ^{-1/2}`` (PCA whitening; directions with eigenvalue below
    ``rcond·λ_max`` are dropped)."""
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    keep = vals > rcond * max(float(vals.max()), 1e-300)
    return ((y - mean) @ vecs[:, keep]) / np.sqrt(vals[keep])


@dataclass(frozen=True)
class QueResult:
    """QUE scores of whitened samples and the spectrum they came from."""

    scores: np.ndarray      # τ_i (float64), about 1 for an inlier when Σ' ≈ I
    top_eigenvalue: float   # ‖Σ'‖₂
    top_direction: np.ndarray  # its eigenvector (the direction of most excess variance)
    excess: float           # tr(Σ' M) / tr(M): the QUE-weighted variance


def que_scores(z: np.ndarray, alpha: float = 4.0) -> QueResult:
    """QUantum Entropy scores (Dong, Hopkins & Li 2019) of whitened rows ``z``."""
    z = np.asarray(z, dtype=np.float64)
    n, k = z.shape
    if k == 0:
        return QueResult(np.zeros(n), 0.0, np.zeros(0), 0.0)
    zc = z - z.mean(axis=0)
    sigma = (zc.T @ zc) / max(n, 1)
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    top = float(vals.max())
    if alpha <= 0 or top <= 1.0 + 1e-9:
        weights = np.ones(k)
    else:
        expo = alpha * (vals - 1.0) / (top - 1.0)
        weights = np.exp(expo - expo.max())  # scaled; normalised by the trace below
    weights = weights / weights.sum()
    proj = z @ vecs
    scores = (proj**2) @ weights
    excess = float((vals * weights).sum())
    v = vecs[:, -1]
    if v[int(np.argmax(np.abs(v)))] < 0:
        v = -v
    return QueResult(scores, top, v, excess)


def consistency_factor(k: int, support_fraction: float) -> float:
    """Factor making the covariance of the central ``support_fraction`` of Gaussian
    data consistent for the full covariance (Croux & Haesbroeck 1999): ``q/F`` with
    ``q = support_fraction`` and ``F = P(χ²_{k+2} ≤ χ²_k⁻¹(q))``."""
    from scipy.stats import chi2

    q = float(np.clip(support_fraction, 1e-6, 1.0))
    if q >= 1.0:
        return 1.0
    return q / float(chi2.cdf(chi2.ppf(q, k), k + 2))


@dataclass(frozen=True)
class SpectreClassResult:
    """SPECTRE scores of one class for the chosen number of dimensions ``k``."""

    scores: np.ndarray        # QUE scores τ_i
    projection: np.ndarray    # whitened projection on the top excess direction
    k: int
    excess: float
    top_eigenvalue: float
    support_fraction: float
    start: str
    candidates: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "que_excess": round(self.excess, 4),
                "top_whitened_eigenvalue": round(self.top_eigenvalue, 4),
                "support_fraction": round(self.support_fraction, 4), "mcd_start": self.start,
                "excess_by_k": {str(k): round(v, 4) for k, v in self.candidates.items()}}


def spectre_class_scores(y: np.ndarray, *, ks: tuple[int, ...] = (2, 4, 8, 16, 32),
                         alpha: float = 4.0, support_fraction: float = 0.5,
                         fit_rows: np.ndarray | None = None, shrinkage: float = 0.05,
                         reference: np.ndarray | None = None) -> SpectreClassResult:
    """SPECTRE for one class: ``y`` holds the class's representations projected on
    its top principal directions (``n×K``, columns in decreasing variance).

    The clean mean and covariance come from ``reference`` (a bool mask of rows known to
    be clean, e.g. the other side of a detected split) or else from one deterministic
    MCD fit in ``max(ks)`` dimensions on ``fit_rows`` (a bounded subsample), refined by
    C-steps in each ``k`` and made consistent. ``shrinkage`` adds that share of the
    classical covariance, so sparse (ReLU) directions whose central half has almost no
    variance are not blown up by whitening. For each ``k`` in ``ks`` the first ``k``
    columns of every row are whitened and given QUE scores; the ``k`` with the largest
    QUE-weighted excess variance ``tr(Σ'M)/tr(M)`` is kept (the reference code's
    automatic choice of ``k``).
    """
    y = np.asarray(y, dtype=np.float64)
    rows = np.arange(len(y)) if fit_rows is None else np.asarray(fit_rows)
    if reference is not None:
        rows = rows[np.asarray(reference, dtype=bool)[rows]]
    # a covariance needs many more samples than dimensions: k ≤ (support) / 15
    frac = 1.0 if reference is not None else float(np.clip(support_fraction, 0.5, 1.0))
    cap = max(1, int(np.ceil(frac * len(rows))) // SAMPLES_PER_DIM)
    ks = tuple(k for k in ks if k <= cap) or (min(min(ks), cap),)
    big_k = max(1, min(y.shape[1], max(int(k) for k in ks)))
    fit = y[rows, :big_k]
    _, classical = _mean_cov(y[:, :big_k] if reference is None else fit)
    if reference is None:
        rf = robust_covariance(fit, support_fraction=support_fraction)
        start = rf.start
    else:
        mu, cov = _mean_cov(fit)
        rf = RobustFit(mu, cov, np.ones(len(fit), dtype=bool), _log_det(cov), "reference")
        start = "reference"
    h = int(rf.support.sum())
    best: SpectreClassResult | None = None
    cands: dict[int, float] = {}
    for k in sorted({min(int(k), big_k) for k in ks if k >= 1}):
        if reference is None:
            # refit in k dimensions from the big fit's support: C-steps, consistency
            support = _c_steps(fit[:, :k], rf.support, h, 3)
            mu, cov = _mean_cov(fit[support, :k])
            cov = cov * consistency_factor(k, h / len(fit))
        else:
            mu, cov = rf.mean[:k], rf.cov[:k, :k]
        if shrinkage > 0:  # keep sparse (ReLU) directions from exploding when whitened
            cov = cov + shrinkage * classical[:k, :k]
        z = whiten(y[:, :k], mu, cov)
        q = que_scores(z, alpha)
        cands[k] = q.excess
        if best is None or q.excess > best.excess:
            best = SpectreClassResult(q.scores, z @ q.top_direction, k, q.excess,
                                      q.top_eigenvalue, h / max(len(fit), 1), start, {})
    assert best is not None
    return SpectreClassResult(best.scores, best.projection, best.k, best.excess,
                              best.top_eigenvalue, best.support_fraction, best.start, cands)


# ----------------------------------------------------------------------------- clustering rules


def silhouette_sampled(x: np.ndarray, assign: np.ndarray, *, max_samples: int = 2000,
                       seed: int = 0) -> float:
    """Mean silhouette of a 2-group assignment on at most ``max_samples`` rows (seeded,
    stratified by group so small groups are represented)."""
    from sklearn.metrics import silhouette_score

    x = np.asarray(x, dtype=np.float64)
    assign = np.asarray(assign)
    if np.unique(assign).size < 2:
        return 0.0
    n = len(assign)
    if n > max_samples:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(n, max_samples, replace=False))
        if np.unique(assign[keep]).size < 2:
            return 0.0
        x, assign = x[keep], assign[keep]
    return float(silhouette_score(x, assign))


@dataclass(frozen=True)
class ClusterDecision:
    """Activation Clustering's decision for one class."""

    suspect: np.ndarray          # bool mask over the class (the smaller cluster, if poisoned)
    detected: bool
    relative_size: float         # size of the smaller cluster / class size
    silhouette: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"detected": self.detected, "relative_size": round(self.relative_size, 4),
                "silhouette": round(self.silhouette, 4),
                "num_suspect": int(self.suspect.sum()), "reason": self.reason}


def cluster_decision(assign: np.ndarray, silhouette: float, *, size_threshold: float = 0.35,
                     silhouette_threshold: float = 0.15) -> ClusterDecision:
    """The paper's rules on a 2-means assignment of one class.

    Poisoned when the smaller cluster holds less than ``size_threshold`` of the class
    *and* the clustering is good (silhouette at least ``silhouette_threshold``); then
    the smaller cluster is the suspect. A clean class that 2-means splits into two
    loose halves fails both rules — the smaller cluster is never flagged by default.
    """
    assign = np.asarray(assign)
    n = assign.size
    counts = np.bincount(assign.astype(np.int64), minlength=2)
    small = int(np.argmin(counts))
    rel = float(counts[small] / max(n, 1))
    none = np.zeros(n, dtype=bool)
    if rel >= size_threshold:
        return ClusterDecision(none, False, rel, silhouette,
                               f"relative size {rel:.3f} >= {size_threshold:g}")
    if not silhouette >= silhouette_threshold:
        return ClusterDecision(none, False, rel, silhouette,
                               f"silhouette {silhouette:.3f} < {silhouette_threshold:g}")
    return ClusterDecision(assign == small, True, rel, silhouette,
                           f"relative size {rel:.3f} < {size_threshold:g} and silhouette "
                           f"{silhouette:.3f} >= {silhouette_threshold:g}")


def reclassification_verdict(predicted: np.ndarray, label: int, *,
                             min_own_share: float = 0.5) -> tuple[bool, dict[str, Any]]:
    """Exclusionary reclassification (Chen et al.): predictions of a model retrained
    *without* a suspect cluster, on that cluster. Legitimate when its own ``label`` is
    still predicted for at least ``min_own_share`` of it or more often than any other
    class (ordinary data of that class); poisonous otherwise, with the most frequent
    other prediction as the likely source class. Returns ``(poisonous, details)``."""
    predicted = np.asarray(predicted, dtype=np.int64)
    if predicted.size == 0:
        return False, {"own_share": None, "source_class": None}
    own = float((predicted == label).mean())
    other = predicted[predicted != label]
    source = int(np.bincount(other).argmax()) if other.size else None
    source_share = float((predicted == source).mean()) if source is not None else 0.0
    poisonous = own < min_own_share and source_share > own
    return poisonous, {"own_share": round(own, 4), "source_class": source,
                       "source_share": round(source_share, 4)}
