"""Early stopping of a fixed-N mean test: decide as soon as the answer is clear.

A per-input test averages ``n_total`` i.i.d. per-draw values (e.g. STRIP's overlays) and
flags the input when the mean exceeds a threshold ``τ``. Drawing the values one batch
at a time, after ``n`` of them (mean ``m``, standard deviation ``s``) the mean of all
``n_total`` differs from ``m`` by ``(n_total − n)/n_total · (m_rest − m)``, whose standard
deviation is ``σ·√((n_total − n)/(n·n_total))``. The rule (a *curtailed* test, Jennison &
Turnbull, "Group Sequential Methods", 2000, ch. 10) stops when ``|m − τ|`` exceeds
``q·max(s, s_floor)·√((n_total − n)/(n·n_total))`` and answers by the side of ``τ`` that
``m`` lies on, where ``q`` is the Student-t quantile at ``1 − δ/L`` with ``n − 1`` degrees
of freedom and ``L`` the number of early looks. At ``n = n_total`` it answers exactly as
the fixed-N test.

Stated bound: for every input, the probability that the early answer differs from the
fixed-N answer on the same draws is at most ``δ`` (Bonferroni over the looks; exact for
normal values, approximate for bounded ones — checked on synthetic streams in the
tests). Hence the false-rejection and false-acceptance rates are within ``δ`` of the
fixed-N test's, while inputs far from ``τ`` (most clean inputs and most triggered
ones) stop after the first look.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..exceptions import bad_param

#: outcome codes of :func:`curtailed_decisions`
FLAG, PASS, CONTINUE = 1, -1, 0


def look_schedule(n_first: int, n_total: int) -> tuple[int, ...]:
    """Numbers of draws at which the rule looks: ``n_first``, doubling, then ``n_total``."""
    if isinstance(n_first, bool) or not isinstance(n_first, int) or n_first < 2:
        raise bad_param("n_first", "an integer >= 2", n_first)
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 1:
        raise bad_param("n_total", "an integer >= 1", n_total)
    looks: list[int] = []
    n = n_first
    while n < n_total:
        looks.append(n)
        n *= 2
    looks.append(n_total)
    return tuple(looks)


def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 0.5), or a ParameterError naming it."""
    if (isinstance(delta, bool) or not isinstance(delta, (int, float))
            or not math.isfinite(delta) or not 0.0 < delta < 0.5):
        raise bad_param("delta", "a number in (0, 0.5)", delta)
    return float(delta)


def stop_quantile(n: int, delta: float, early_looks: int, prior_df: float = 0.0) -> float:
    """Student-t quantile (``n − 1 + prior_df`` degrees of freedom) at
    ``1 − δ/early_looks``."""
    check_delta(delta)
    return float(stats.t.ppf(1.0 - delta / max(1, early_looks),
                             df=max(1.0, n - 1 + prior_df)))


def moderated_sd(sample_var: np.ndarray, n: int, prior_var: float, prior_df: float
                 ) -> np.ndarray:
    """Standard deviation of an input's draws, its own ``n``-draw variance shrunk toward a
    prior variance worth ``prior_df`` draws (the moderated t of Smyth, "Linear models and
    empirical Bayes methods for assessing differential expression in microarray
    experiments", SAGMB 2004): few draws that happen to agree do not make the input look
    certain. Use with :func:`stop_quantile`'s ``prior_df``."""
    v = np.asarray(sample_var, dtype=np.float64)
    return np.sqrt((prior_df * prior_var + (n - 1) * v) / max(1e-12, prior_df + n - 1))


def curtailed_decisions(mean: np.ndarray, sd: np.ndarray, n: int, n_total: int,
                        threshold: float, quantile: float, sd_floor: float = 0.0
                        ) -> np.ndarray:
    """Per input: :data:`FLAG` (mean of all ``n_total`` draws will exceed ``threshold``),
    :data:`PASS`, or :data:`CONTINUE`, from the mean and standard deviation of its first
    ``n`` draws (see the module). At ``n >= n_total`` every input is decided."""
    m = np.asarray(mean, dtype=np.float64)
    above = (m > threshold) | np.isnan(m)
    decided_answer = np.where(above, FLAG, PASS).astype(np.int8)
    if n >= n_total:
        return decided_answer
    s = np.maximum(np.nan_to_num(np.asarray(sd, dtype=np.float64), nan=np.inf), sd_floor)
    half_width = quantile * s * math.sqrt((n_total - n) / (n * n_total))
    clear = (np.abs(m - threshold) > half_width) | np.isnan(m)
    return np.where(clear, decided_answer, CONTINUE).astype(np.int8)


def replay(values: np.ndarray, threshold: float, *, n_first: int, delta: float,
           sd_floor: float = 0.0, prior_var: float = 0.0, prior_df: float = 0.0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the rule on precomputed draws ``B×n_total`` (in draw order): returns the
    flags, the number of draws used per input, and the running mean at the stop (the
    score). The same decisions as drawing batch by batch."""
    v = np.asarray(values, dtype=np.float64)
    b, n_total = v.shape
    looks = look_schedule(n_first, n_total) if n_total > n_first else (n_total,)
    flags = np.zeros(b, dtype=bool)
    used = np.full(b, n_total, dtype=np.int64)
    score = np.empty(b, dtype=np.float64)
    open_ = np.ones(b, dtype=bool)
    for n in looks:
        idx = np.flatnonzero(open_)
        if not idx.size:
            break
        head = v[idx, :n]
        mean = head.mean(1)
        var = head.var(1, ddof=1) if n > 1 else np.full(len(idx), np.inf)
        sd = moderated_sd(var, n, prior_var, prior_df)
        q = stop_quantile(n, delta, len(looks) - 1, prior_df)
        dec = curtailed_decisions(mean, sd, n, n_total, threshold, q, sd_floor)
        done = dec != CONTINUE
        flags[idx[done]] = dec[done] == FLAG
        used[idx[done]] = n
        score[idx[done]] = mean[done]
        open_[idx[done]] = False
    return flags, used, score


__all__ = ["CONTINUE", "FLAG", "PASS", "check_delta", "curtailed_decisions", "look_schedule",
           "moderated_sd", "replay", "stop_quantile"]
