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

All functions are pure (arrays in, arrays out).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

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


__all__ = [
    "CONSISTENCY",
    "anomaly_index",
    "anomaly_p_values",
    "flag_outliers",
    "index_threshold",
    "mad",
    "null_max_index",
]
