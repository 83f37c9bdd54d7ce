"""Outlier statistics for Neural Cleanse's per-label trigger norms.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019: a label whose reversed trigger is much *smaller* than the
others' is a backdoor target. The paper's rule is the median absolute deviation (MAD)
with the normal consistency constant 1.4826; a label is flagged when its norm lies
**below** the median and its anomaly index exceeds 2 (one-sided: a label that needs a
big trigger is not suspicious).

Beyond the paper, :func:`anomaly_p_values` gives a family-wise p-value per label: the
probability, if the K labels' log-norms were independent draws of one normal
distribution (no backdoor), that *some* label's one-sided anomaly index on the
log-norms reaches the observed one. The statistic is pivotal under that null (location
and scale cancel), so its distribution depends only on K and is computed by a seeded
Monte Carlo simulation (deterministic). Taking the maximum over labels makes the
p-value account for having looked at all K labels.

With clean *reference* models of the same task (e.g. Fashion-MNIST, where the "Bag"
class needs a small trigger in every clean model), :func:`reference_p_values` compares each
label's norm with the same label's norm in the references instead of with the other
labels: it removes what is intrinsic to a class and keeps what the backdoor adds.

:func:`target_p_values` gives, per label, an *unadjusted* p-value for "this label is a
backdoor target" — the common currency in which a scan combines detectors to name targets
(the multiplicity over labels is handled there, by a Holm step across labels).

All functions are pure (arrays in, arrays out).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import stats

from ..exceptions import bad_param

#: consistency constant making the MAD a consistent estimator of a normal's sigma
CONSISTENCY = 1.4826


def _as_norms(norms: np.ndarray | list[float], name: str = "norms") -> np.ndarray:
    arr = np.asarray(norms, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 3:
        raise bad_param(name, "a 1-D array of at least 3 values", f"shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise bad_param(name, "finite values", arr.tolist())
    return arr


def mad(values: np.ndarray, consistency: float = CONSISTENCY) -> float:
    """``consistency × median(|values − median(values)|)``."""
    v = np.asarray(values, dtype=np.float64)
    return float(consistency * np.median(np.abs(v - np.median(v))))


def anomaly_index(norms: np.ndarray | list[float], *,
                  consistency: float = CONSISTENCY) -> np.ndarray:
    """One-sided anomaly index per label: ``(median − norm) / MAD``.

    Positive for labels below the median (smaller trigger than typical), negative above
    it; the paper's ``|norm − median| / MAD`` equals this value for the labels that can
    be flagged. When the MAD is 0 (more than half the norms equal), labels below the
    median get ``+inf``, the others ``0`` / ``-inf``.
    """
    arr = _as_norms(norms)
    med = float(np.median(arr))
    scale = mad(arr, consistency)
    diff = med - arr
    if scale > 0:
        return diff / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(diff == 0, 0.0, np.sign(diff) * np.inf)
    return out.astype(np.float64)


def flag_outliers(norms: np.ndarray | list[float], *, threshold: float = 2.0,
                  consistency: float = CONSISTENCY) -> np.ndarray:
    """Bool per label: below the median and anomaly index > ``threshold`` (the paper)."""
    if not threshold > 0:
        raise bad_param("threshold", "a number > 0", threshold)
    return anomaly_index(norms, consistency=consistency) > threshold


@lru_cache(maxsize=32)
def _null_max_index(k: int, draws: int, seed: int) -> np.ndarray:
    """Sorted simulated maxima of the one-sided index over ``k`` iid normal values."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws, dtype=np.float64)
    chunk = max(1, 200_000 // k)
    for start in range(0, draws, chunk):
        x = rng.standard_normal((min(chunk, draws - start), k))
        med = np.median(x, axis=1, keepdims=True)
        scale = CONSISTENCY * np.median(np.abs(x - med), axis=1, keepdims=True)
        out[start:start + len(x)] = ((med - x) / scale).max(axis=1)
    out.sort()
    out.setflags(write=False)
    return out


def null_max_index(k: int, *, draws: int = 100_000, seed: int = 0) -> np.ndarray:
    """Null distribution (sorted samples) of ``max_k`` one-sided anomaly index for K labels.

    Under the null the K values are iid normal; the statistic does not depend on the
    normal's mean or variance.
    """
    if k < 3:
        raise bad_param("k", "an integer >= 3", k)
    if draws < 100:
        raise bad_param("draws", "an integer >= 100", draws)
    return _null_max_index(int(k), int(draws), int(seed))


def index_threshold(k: int, alpha: float, *, draws: int = 100_000, seed: int = 0) -> float:
    """Index on log-norms above which a family-wise false-alarm rate ``alpha`` holds."""
    if not 0.0 < alpha < 1.0:
        raise bad_param("alpha", "a float in (0, 1)", alpha)
    return float(np.quantile(null_max_index(k, draws=draws, seed=seed), 1.0 - alpha))


def anomaly_p_values(norms: np.ndarray | list[float], *, draws: int = 100_000,
                     seed: int = 0) -> np.ndarray:
    """Family-wise p-value per label (see the module docstring).

    ``p_k = P_null(max_j A_j >= a_k)`` where ``a_k`` is label k's one-sided anomaly
    index computed on the log-norms, with the add-one Monte Carlo correction (never 0).
    Norms must be positive.
    """
    arr = _as_norms(norms)
    if np.any(arr <= 0):
        raise bad_param("norms", "positive values (L1 norms)", arr.tolist())
    idx = anomaly_index(np.log(arr))
    null = null_max_index(arr.size, draws=draws, seed=seed)
    exceed = null.size - np.searchsorted(null, idx, side="left")
    return (exceed + 1.0) / (null.size + 1.0)


def log_ratios(norms: np.ndarray) -> np.ndarray:
    """``log(norm) − median(log(norm))`` along the last axis (scale-free per model)."""
    logs = np.log(np.asarray(norms, dtype=np.float64))
    return logs - np.median(logs, axis=-1, keepdims=True)


#: asymptotic efficiency of the MAD relative to the standard deviation (normal data)
MAD_EFFICIENCY = 0.37


def reference_p_values(norms: np.ndarray | list[float], reference: np.ndarray | list[list[float]],
                       *, min_scale: float = 0.15) -> np.ndarray:
    """Per-label p-values against clean reference models (Bonferroni over the K labels).

    Statistic per label k: ``r_k = log n_k − median_j log n_j`` (the model's own scale
    removed). Over R reference models (rows of ``reference``, same labels, same mode),
    ``μ_k`` is the mean of the references' ``r_k`` and ``σ`` a pooled robust scale of
    their residuals (1.4826 × MAD, corrected by ``sqrt(R / (R − 1))`` for the fitted
    means, at least ``min_scale``). ``z_k = (r_k − μ_k) / (σ · sqrt(1 + 1/R))`` is
    referred to a Student t, one-sided (a *smaller* trigger than in the references), and
    multiplied by K (capped at 1). Degrees of freedom: the ``K(R − 1)`` residuals times the
    asymptotic efficiency of the MAD relative to the standard deviation (0.37 for normal
    data) — counting all ``K(R − 1)`` made two references of near-identical runs flag
    ordinary run-to-run variation.
    ``min_scale`` (0.15) floors σ: the spread of one label's log-norm across independently
    trained clean models (0.1–0.25 per label on five Fashion-MNIST ``small_cnn``) is larger
    than the pooled MAD of a few references suggests; with the earlier floor of 0.05 one of
    five clean models was flagged in fast mode (docs/benchmarks/neural_cleanse.md).
    """
    z, df = _reference_z(norms, reference, min_scale)
    return np.minimum(1.0, z.size * stats.t.cdf(z, df=df))


def _reference_z(norms: np.ndarray | list[float], reference: np.ndarray | list[list[float]],
                 min_scale: float) -> tuple[np.ndarray, float]:
    """The per-label ``z_k`` and degrees of freedom of :func:`reference_p_values`."""
    arr = _as_norms(norms)
    ref = np.asarray(reference, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[0] < 2 or ref.shape[1] != arr.size:
        raise bad_param("reference", f"at least 2 reference norm vectors of {arr.size} labels "
                        "(an R×K array)", f"shape {ref.shape}")
    if np.any(arr <= 0) or not np.all(np.isfinite(ref)) or np.any(ref <= 0):
        raise bad_param("reference", "positive, finite L1 norms", "zero, negative or non-finite "
                        "values")
    if not min_scale > 0:
        raise bad_param("min_scale", "a number > 0", min_scale)
    r = log_ratios(arr)
    refs = log_ratios(ref)
    n_ref, k = refs.shape
    mu = refs.mean(axis=0)
    resid = refs - mu
    scale = CONSISTENCY * float(np.median(np.abs(resid))) * np.sqrt(n_ref / (n_ref - 1))
    scale = max(scale, min_scale)
    z = (r - mu) / (scale * np.sqrt(1.0 + 1.0 / n_ref))
    return z, max(1.0, MAD_EFFICIENCY * k * (n_ref - 1))


def target_p_values(norms: np.ndarray | list[float],
                    reference: np.ndarray | list[list[float]] | None = None, *,
                    reached: np.ndarray | list[bool] | None = None,
                    min_scale: float = 0.15) -> np.ndarray:
    """Unadjusted one-sided p-value per label for "this label is a backdoor target".

    Without ``reference``: the normal upper tail of the label's robust z on the log-norms,
    ``p_k = 1 − Φ((median_j log n_j − log n_k) / (1.4826 · MAD))`` (the one-sided anomaly
    index of :func:`anomaly_index` on log-norms, read as a standard normal; a zero MAD gives
    0 below the median and 1 above). With ``reference`` (R×K clean models' norms): the
    Student-t lower tail of :func:`reference_p_values`'s ``z_k`` without its Bonferroni
    factor. Labels whose search never ``reached`` its attack success get 1. Norms must be
    positive.
    """
    arr = _as_norms(norms)
    if np.any(arr <= 0):
        raise bad_param("norms", "positive values (L1 norms)", arr.tolist())
    if reference is None:
        p = stats.norm.sf(anomaly_index(np.log(arr)))
    else:
        z, df = _reference_z(arr, reference, min_scale)
        p = stats.t.cdf(z, df=df)
    p = np.asarray(p, dtype=np.float64)
    if reached is not None:
        ok = np.asarray(reached, dtype=bool)
        if ok.shape != arr.shape:
            raise bad_param("reached", f"{arr.size} booleans", ok.shape)
        p = np.where(ok, p, 1.0)
    return np.clip(p, 0.0, 1.0)


__all__ = [
    "CONSISTENCY",
    "anomaly_index",
    "anomaly_p_values",
    "flag_outliers",
    "index_threshold",
    "log_ratios",
    "mad",
    "null_max_index",
    "reference_p_values",
    "target_p_values",
]
