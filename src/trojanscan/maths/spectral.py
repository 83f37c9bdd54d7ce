"""Spectral Signatures maths — Tran, Li & Madry, "Spectral Signatures in Backdoor
Attacks", NeurIPS 2018 — plus the per-class outlier decision shared by the
data-level detectors.

Pure functions on arrays (no models). Features are an ``N×D`` array (``numpy`` array or
``np.memmap``); everything here reads them class by class in chunks of rows, so the
memory held besides the features is ``O(D²)`` per class plus one float per sample of
that class — never an ``N×N`` matrix.

Spectral signature score (the paper): for the representations ``R_c`` of class ``c``,
centre them (``R̂ = R_c - mean``), take the top right singular vector ``v`` of ``R̂``
(the top eigenvector of the class covariance) and score each sample by ``(r̂_i · v)²``.
The paper centres; the authors' reference code (MadryLab/backdoor_data_poisoning)
scores *uncentred* representations — ``centre=False`` reproduces that. Scores are
reported divided by the variance along ``v`` (the top eigenvalue), a per-class
constant that makes classes comparable without changing any ranking within a class.

Per-class decision (:func:`two_split`, :func:`decide_population`): removing a fixed
fraction of *every* class caps precision (most classes are clean), so we first ask
whether a class holds a separate sub-population along a 1-D score: the optimal 1-D
2-means split (exact, by sorting) and its separation ``d'`` — the distance between the
two means in units of the pooled within-group standard deviation. A unimodal Gaussian
gives ``d' ≈ 2.65``; two well separated groups give a large ``d'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..exceptions import DataError, bad_param

#: rows read at once from the feature matrix (bounds temporary memory)
CHUNK = 8192


# ----------------------------------------------------------------------------- input checks


def check_features(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate an ``N×D`` float feature array and ``N`` integer labels.

    Returns them as numpy arrays (the features are not copied when they already are
    a floating numpy array or memmap). Raises :class:`DataError` on bad shapes.
    """
    if hasattr(features, "detach"):  # torch tensor
        features = features.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    if labels is None:
        raise DataError("labels are needed: data-level detectors work class by class")
    f = features if isinstance(features, np.ndarray) else np.asarray(features)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
        raise DataError(f"features must be a non-empty N×D array, got shape {f.shape}")
    if not np.issubdtype(f.dtype, np.floating):
        raise DataError(f"features must be floating point, got {f.dtype}")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise DataError(f"labels must be a vector of integers, got {y.dtype} {y.shape}")
    if y.shape[0] != f.shape[0]:
        raise DataError(f"features have {f.shape[0]} rows but labels have {y.shape[0]} entries")
    if y.size and int(y.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(y.min())}")
    if np.unique(y).size < 2:
        raise DataError(f"needs samples of at least 2 classes, found {np.unique(y).size}")
    return f, y.astype(np.int64, copy=False)


def check_rate(name: str, value: float | None) -> float | None:
    """``None`` or a float in (0, 0.5]: an upper bound on the share of poisoned samples."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
            0.0 < float(value) <= 0.5):
        raise bad_param(name, "a float in (0, 0.5] (an upper bound on the poison rate) or None",
                        value)
    return float(value)


def class_groups(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Indices of each class (ascending), keyed by class index."""
    order = np.argsort(labels, kind="stable")
    sorted_y = labels[order]
    classes, starts = np.unique(sorted_y, return_index=True)
    bounds = [*starts.tolist(), len(labels)]
    return {int(c): np.sort(order[bounds[i]:bounds[i + 1]]) for i, c in enumerate(classes)}


def _chunks(index: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, len(index), chunk):
        yield index[start:start + chunk]


# ----------------------------------------------------------------------------- moments


@dataclass(frozen=True)
class Moments:
    """Count, mean and (biased) covariance of a set of rows, in float64."""

    n: int
    mean: np.ndarray
    cov: np.ndarray


def moments(features: np.ndarray, index: np.ndarray, *, chunk: int = CHUNK) -> Moments:
    """Mean and covariance of ``features[index]``, streamed in chunks (Chan et al. merge).

    Each chunk's centred scatter is merged into the running one, which keeps the result
    accurate in float64 and (up to rounding) independent of the chunk size and order.
    """
    d = features.shape[1]
    n = 0
    mean = np.zeros(d)
    scatter = np.zeros((d, d))
    for part in _chunks(index, chunk):
        block = np.asarray(features[part], dtype=np.float64)
        m = block.shape[0]
        bm = block.mean(axis=0)
        centred = block - bm
        bs = centred.T @ centred
        delta = bm - mean
        total = n + m
        scatter += bs + np.outer(delta, delta) * (n * m / total)
        mean = mean + delta * (m / total)
        n = total
    if n == 0:
        raise DataError("cannot compute moments of an empty class")
    return Moments(n, mean, scatter / n)


def top_eigen(cov: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending) and eigenvectors (columns) of ``cov``.

    Signs are fixed (largest-magnitude component positive) so results do not depend on
    the LAPACK call.
    """
    vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
    vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    pivots = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[pivots, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return np.maximum(vals, 0.0), vecs * signs


def project(features: np.ndarray, index: np.ndarray, centre: np.ndarray, basis: np.ndarray,
            *, chunk: int = CHUNK) -> np.ndarray:
    """``(features[index] - centre) @ basis`` in float64, streamed in chunks."""
    out = np.empty((len(index), basis.shape[1]))
    pos = 0
    for part in _chunks(index, chunk):
        block = np.asarray(features[part], dtype=np.float64) - centre
        out[pos:pos + len(part)] = block @ basis
        pos += len(part)
    return out


# ----------------------------------------------------------------------------- the paper's score


@dataclass(frozen=True)
class ClassSignature:
    """One class's spectral signature: projections on the top singular direction."""

    label: int
    index: np.ndarray        # sample indices of the class
    projection: np.ndarray   # signed projection on ``direction`` (float64)
    direction: np.ndarray    # top right singular vector (D,)
    centre: np.ndarray       # the mean (or zeros when uncentred)
    variance: float          # mean squared projection (top eigenvalue)

    @property
    def scores(self) -> np.ndarray:
        """The paper's score ``(r̂·v)²`` divided by the variance along ``v``."""
        return self.projection**2 / max(self.variance, 1e-12)


def class_signature(features: np.ndarray, index: np.ndarray, label: int, *,
                    centre: bool = True, chunk: int = CHUNK) -> ClassSignature:
    """Spectral signature of one class (``features[index]``)."""
    mom = moments(features, index, chunk=chunk)
    if centre:
        c, second = mom.mean, mom.cov
    else:  # uncentred second moment, as in the reference code
        c = np.zeros_like(mom.mean)
        second = mom.cov + np.outer(mom.mean, mom.mean)
    vals, vecs = top_eigen(second, 1)
    v = vecs[:, 0]
    p = project(features, index, c, vecs, chunk=chunk)[:, 0]
    return ClassSignature(label, index, p, v, c, float(max(vals[0], 1e-12)))


def spectral_signature_scores(features: Any, labels: Any, *, centre: bool = True,
                              chunk: int = CHUNK) -> np.ndarray:
    """Per-sample spectral-signature scores (float32, higher = more suspicious).

    ``(r̂_i · v_c)² / λ_c`` for sample ``i`` of class ``c`` (see the module docstring).
    """
    f, y = check_features(features, labels)
    scores = np.zeros(len(y), dtype=np.float32)
    for label, index in class_groups(y).items():
        sig = class_signature(f, index, label, centre=centre, chunk=chunk)
        scores[index] = sig.scores.astype(np.float32)
    return scores


# ----------------------------------------------------------------------------- 1-D decision


@dataclass(frozen=True)
class TwoSplit:
    """The optimal 1-D 2-means split of a set of values."""

    threshold: float     # values > threshold form the upper group
    n_low: int
    n_high: int
    mean_low: float
    mean_high: float
    sd_low: float
    sd_high: float
    separation: float    # |mean_high - mean_low| / pooled within-group sd

    @property
    def minority_high(self) -> bool:
        return self.n_high <= self.n_low

    @property
    def minority_fraction(self) -> float:
        return min(self.n_low, self.n_high) / max(self.n_low + self.n_high, 1)


def two_split(values: np.ndarray, *, min_size: int = 1) -> TwoSplit:
    """Exact 1-D 2-means: the cut of the sorted values minimising the within-group
    sum of squares (each group holds at least ``min_size`` values)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = v.size
    if n < 2 * max(min_size, 1):
        return TwoSplit(float("inf"), n, 0, float(v.mean()) if n else 0.0, 0.0, 0.0, 0.0, 0.0)
    shift = v.mean()
    w = v - shift
    c1 = np.cumsum(w)
    c2 = np.cumsum(w * w)
    k = np.arange(1, n)  # size of the lower group
    s1_lo, s2_lo = c1[:-1], c2[:-1]
    s1_hi, s2_hi = c1[-1] - s1_lo, c2[-1] - s2_lo
    within = (s2_lo - s1_lo**2 / k) + (s2_hi - s1_hi**2 / (n - k))
    ok = (k >= min_size) & (n - k >= min_size)
    within = np.where(ok, within, np.inf)
    best = int(np.argmin(within))
    n_lo = best + 1
    lo, hi = v[:n_lo], v[n_lo:]
    pooled = np.sqrt(max(within[best], 0.0) / n)
    gap = hi.mean() - lo.mean()
    sep = float(gap / pooled) if pooled > 0 else (float("inf") if gap > 0 else 0.0)
    return TwoSplit(float((v[n_lo - 1] + v[n_lo]) / 2), n_lo, n - n_lo, float(lo.mean()),
                    float(hi.mean()), float(lo.std()), float(hi.std()), sep)


def valley_ratio(values: np.ndarray, split: TwoSplit | None = None) -> float:
    """Depth of the density valley between the two groups of a 1-D split.

    Histogram of the values (``√n`` bins, 20–100, over the 0.1–99.9% quantiles,
    smoothed over 3 bins): the lowest density between the two group means divided by
    the lower of the two groups' peak densities. About 1 (no dip) for a unimodal
    distribution, near 0 when the groups are separated by an empty gap. Unlike the
    separation ``d'`` it does not shrink when the groups are wide, and it ignores how
    heavy the tails are. (Measured on Fashion-MNIST penultimate features: clean classes
    0.32–0.84, classes holding BadNets/Blend poison at 1–10% of the data 0.02–0.16.)
    """
    v = np.asarray(values, dtype=np.float64)
    split = split or two_split(v)
    if split.n_high == 0 or split.n_low == 0:
        return 1.0
    bins = int(np.clip(np.sqrt(v.size), 20, 100))
    lo, hi = np.quantile(v, [0.001, 0.999])
    if not hi > lo:
        return 1.0
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    dens = np.convolve(counts.astype(np.float64), np.ones(3) / 3, mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    between = (centres >= split.mean_low) & (centres <= split.mean_high)
    low_side, high_side = centres <= split.threshold, centres > split.threshold
    if between.sum() < 3 or not low_side.any() or not high_side.any():
        return 1.0
    peak = min(dens[low_side].max(), dens[high_side].max())
    return float(dens[between].min() / peak) if peak > 0 else 1.0


def gaussian_mixture_split(values: np.ndarray, upper: np.ndarray, *,
                           iters: int = 50) -> np.ndarray:
    """Refine a 1-D split with a two-component Gaussian mixture (EM, initialised from
    ``upper``): returns the samples whose posterior favours the upper component. With
    groups of different widths the boundary moves towards the tighter one, where
    2-means would cut through the wider group."""
    v = np.asarray(values, dtype=np.float64)
    upper = np.asarray(upper, dtype=bool)
    if upper.all() or not upper.any():
        return upper
    w = upper.mean()
    m1, m0 = v[upper].mean(), v[~upper].mean()
    floor = max(float(v.std()) * 1e-3, 1e-12)
    s1, s0 = max(v[upper].std(), floor), max(v[~upper].std(), floor)
    post = upper.astype(np.float64)
    for _ in range(iters):
        l1 = np.log(max(w, 1e-12)) - np.log(s1) - 0.5 * ((v - m1) / s1) ** 2
        l0 = np.log(max(1 - w, 1e-12)) - np.log(s0) - 0.5 * ((v - m0) / s0) ** 2
        new = 1.0 / (1.0 + np.exp(np.clip(l0 - l1, -700, 700)))
        r1, r0 = new.sum(), (1 - new).sum()
        if r1 < 1 or r0 < 1:
            break
        w = r1 / v.size
        m1, m0 = (new * v).sum() / r1, ((1 - new) * v).sum() / r0
        s1 = max(np.sqrt((new * (v - m1) ** 2).sum() / r1), floor)
        s0 = max(np.sqrt(((1 - new) * (v - m0) ** 2).sum() / r0), floor)
        converged = np.abs(new - post).max() < 1e-6
        post = new
        if converged:
            break
    out = post > 0.5
    # keep the orientation: the upper component must stay the one with the larger mean
    return out if m1 >= m0 else ~out


@dataclass(frozen=True)
class PopulationDecision:
    """Whether one class holds a separate sub-population along a 1-D score, and its
    two groups (``upper`` = the group of larger values)."""

    upper: np.ndarray        # bool mask over the class's samples
    detected: bool
    separation: float
    valley: float
    upper_fraction: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"detected": self.detected, "separation": round(self.separation, 4),
                "valley": round(self.valley, 4),
                "upper_fraction": round(self.upper_fraction, 4), "reason": self.reason}


def decide_population(values: np.ndarray, *, max_valley: float = 0.25,
                      min_separation: float = 3.0, min_count: int = 2) -> PopulationDecision:
    """Decide whether ``values`` (one class, 1-D) hold two separated groups.

    Exact 1-D 2-means (:func:`two_split`), then a population is detected when the
    density valley between the groups is at most ``max_valley`` of the smaller peak
    (:func:`valley_ratio`), the separation ``d'`` is at least ``min_separation`` (a
    unimodal Gaussian gives 2.65) and each group holds at least ``min_count`` samples.
    The groups' boundary is then refined by a 1-D Gaussian mixture. Which group is the
    suspect one is the caller's choice (see :func:`suspect_side`).
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    none = np.zeros(n, dtype=bool)
    if n < 2 * max(min_count, 2):
        return PopulationDecision(none, False, 0.0, 1.0, 0.0, "too few samples")
    split = two_split(v, min_size=max(min_count, 1))
    valley = valley_ratio(v, split)
    upper = v > split.threshold
    if split.separation < min_separation:
        return PopulationDecision(upper, False, split.separation, valley, float(upper.mean()),
                                  f"separation {split.separation:.2f} < {min_separation:g}")
    if valley > max_valley:
        return PopulationDecision(upper, False, split.separation, valley, float(upper.mean()),
                                  f"no density valley ({valley:.2f} > {max_valley:g})")
    refined = gaussian_mixture_split(v, upper)
    if min(int(refined.sum()), int((~refined).sum())) < min_count:
        return PopulationDecision(upper, False, split.separation, valley, float(upper.mean()),
                                  f"fewer than {min_count} samples apart")
    return PopulationDecision(refined, True, split.separation, valley, float(refined.mean()),
                              f"valley {valley:.2f} <= {max_valley:g}, separation "
                              f"{split.separation:.2f}")


def group_spread(features: np.ndarray, index: np.ndarray, *, chunk: int = CHUNK) -> float:
    """Mean squared distance of ``features[index]`` to their mean (trace of their
    covariance), streamed."""
    if len(index) < 2:
        return 0.0
    return float(np.trace(moments(features, index, chunk=chunk).cov))


def source_variety(classes: np.ndarray) -> float:
    """Entropy (nats) of the distribution of class labels in ``classes``: how varied the
    classes a group's members resemble are (0 for a group that resembles one class)."""
    c = np.asarray(classes, dtype=np.int64).ravel()
    if c.size == 0:
        return 0.0
    counts = np.bincount(c).astype(np.float64)
    p = counts[counts > 0] / c.size
    return float(-(p * np.log(p)).sum())


def suspect_side(features: np.ndarray, index: np.ndarray, upper: np.ndarray, *,
                 balance: float = 0.4, runner_up: np.ndarray | None = None
                 ) -> tuple[np.ndarray, str]:
    """Which of a class's two groups is the suspect one: the minority, unless the
    split is balanced (minority share ≥ ``balance``) — then, when ``runner_up`` (each
    sample's class with the second-highest logit, over the whole set) is given, the
    group whose runner-up classes are the more varied, else the more spread-out group.

    Why runner-up variety: poison relabelled from other classes keeps a trace of its
    source classes in the model's runner-up class, spread over every source, while a
    class's own samples are confused only with their few natural neighbours. On the
    development models trained elsewhere the poison group had the more varied
    runner-up classes in every dirty-label all-to-one class split closer to even than
    40/60 (the spread rule, and size, are a coin flip there: poison was the tighter
    group as often as the wider one). Source-specific poison (one source) is a minority
    and never reaches this rule. Returns ``(suspect mask, rule)``.
    """
    share = float(upper.mean())
    if min(share, 1 - share) < balance:
        return (upper if share <= 0.5 else ~upper), "minority"
    if runner_up is not None:
        ru = np.asarray(runner_up)
        h_up = source_variety(ru[index[upper]])
        h_low = source_variety(ru[index[~upper]])
        if h_up != h_low:
            pick = upper if h_up > h_low else ~upper
            return pick, (f"runner-up variety {max(h_up, h_low):.2f} > "
                          f"{min(h_up, h_low):.2f} nats")
    wide_upper = group_spread(features, index[upper]) >= group_spread(features, index[~upper])
    return (upper if wide_upper else ~upper), "spread"


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the ``k`` highest scores (ties broken by position, deterministic)."""
    scores = np.asarray(scores)
    k = int(max(0, min(k, scores.size)))
    mask = np.zeros(scores.size, dtype=bool)
    if k:
        order = np.lexsort((np.arange(scores.size), -scores.astype(np.float64)))
        mask[order[:k]] = True
    return mask


def paper_removal_count(class_size: int, epsilon: float, factor: float = 1.5) -> int:
    """The paper's removal count for a class of ``class_size``: ``round(1.5·ε·n)``."""
    return int(min(class_size, np.floor(factor * epsilon * class_size + 0.5)))


def cap_to_budget(suspect: np.ndarray, scores: np.ndarray, budget: int | None) -> np.ndarray:
    """Keep at most ``budget`` of the ``suspect`` samples, the highest-scored ones."""
    if budget is None or int(suspect.sum()) <= budget:
        return suspect
    masked = np.where(suspect, scores.astype(np.float64), -np.inf)
    return top_k_mask(masked, budget) & suspect
