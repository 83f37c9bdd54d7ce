"""Pure maths of the runtime (input-level) detector STRIP.

Everything here works on arrays or tensors only — no model — so it is tested on
hand-made numbers.

STRIP (Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan
Attacks on Deep Neural Networks", ACSAC 2019)
    An input is superimposed with ``N`` clean images; for each of the ``N`` perturbed
    inputs the model's prediction (softmax of the logits) has a Shannon entropy *over
    the classes*, ``H_j = -Σ_k p_jk log2 p_jk``; the input's score is the average
    ``H = (1/N) Σ_j H_j`` (the reference code sums ``-p log2 p`` over both axes and
    divides by ``N``, the same thing). A trigger dominates every superimposition, so
    triggered inputs keep confident predictions: *low* entropy = suspicious.
    :func:`strip_scores` returns the negative entropy so that higher = more suspicious.

Thresholds at a chosen false-rejection rate (FRR)
    :func:`normal_threshold` is the paper's rule — fit a normal distribution to the
    clean inputs' values and take its FRR quantile (in entropy terms
    ``norm.ppf(frr, μ, σ)``; here in score terms ``μ + σ · z_{1-frr}``, σ the maximum-
    likelihood estimate as in ``scipy.stats.norm.fit``). :func:`empirical_threshold`
    is the distribution-free alternative: the smallest value that leaves at most
    ``floor(frr · n)`` clean scores strictly above it. An input is flagged when its
    score is *strictly greater* than the threshold. :func:`conservative_threshold`
    (beyond the paper) picks the order statistic whose true FRR is at most ``frr`` with
    90% confidence. All three are non-increasing in ``frr``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..exceptions import DataError, bad_param

LN2 = math.log(2.0)

THRESHOLD_METHODS = ("normal", "empirical", "conservative")
#: ``threshold_method="conservative"``: the probability that the true FRR is at most the
#: requested one
CONSERVATIVE_CONFIDENCE = 0.9


# ---------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------

def entropy(probs: torch.Tensor | np.ndarray, *, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits of probability vectors along ``dim`` (``0 log 0 = 0``).

    >>> float(entropy(torch.tensor([0.5, 0.5])))
    1.0
    """
    p = torch.as_tensor(probs, dtype=torch.float64 if isinstance(probs, np.ndarray)
                        else None)
    if not p.is_floating_point():
        p = p.double()
    return -torch.special.xlogy(p, p).sum(dim=dim) / LN2


def entropy_from_logits(logits: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """Entropy in bits of ``softmax(logits)`` along ``dim``, computed stably.

    Uses ``log_softmax`` so that very confident logits give 0, never NaN (the softmax is
    applied *first*: entropy of raw logits is meaningless).
    """
    logp = torch.log_softmax(logits, dim=dim)
    p = logp.exp()
    h = -(p * logp).sum(dim=dim) / LN2
    return h.clamp_min(0.0)


#: how the N overlays' predictions are summarised: the paper's mean entropy, the median
#: entropy, or (beyond the paper) the mean of the highest entropies ("tail") or their
#: consistency with the input's own prediction
STATISTICS = ("mean", "median", "tail", "consistency")
#: the statistics that summarise entropies (:func:`strip_entropy`)
ENTROPY_STATISTICS = ("mean", "median", "tail")
#: ``statistic="tail"``: the share of the N overlays (the highest entropies) averaged
TAIL_FRACTION = 0.1


def _check_overlay_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise bad_param("logits", "a tensor B×N×K (inputs × overlays × classes)",
                        tuple(logits.shape))


def strip_entropy(logits: torch.Tensor, statistic: str = "mean") -> torch.Tensor:
    """STRIP's normalised entropy per input from logits shaped ``B×N×K``.

    Entropy over the ``K`` classes of each of the ``N`` perturbed predictions, then the
    mean over the ``N`` overlays as in the paper (not an entropy *across* overlays), or
    their median (``statistic="median"``: a few overlays that cover and erase a trigger
    patch no longer pull a triggered input's score up), or the mean of the highest
    ``TAIL_FRACTION`` (10%, at least one) of them (``statistic="tail"``). Returns ``B``.

    Why the tail: a trigger keeps nearly *every* overlay's prediction confident, while a
    clean input is confident on most overlays too but not on all — what sets it apart is
    the few overlays that leave the model unsure. The mean dilutes those few among ~90
    confident ones; the tail mean reads them directly (beyond the paper; measured in
    benchmarks/notes/runtime_development.md).
    """
    _check_overlay_logits(logits)
    if statistic not in ENTROPY_STATISTICS:
        raise bad_param("statistic", ENTROPY_STATISTICS, statistic)
    h = entropy_from_logits(logits.float(), dim=-1)
    if statistic == "median":
        # the mean of the two middle values for even N (torch.median takes the lower one)
        return torch.quantile(h, 0.5, dim=1)
    if statistic == "tail":
        k = max(1, math.floor(TAIL_FRACTION * h.shape[1] + 0.5))  # half rounds up
        return h.topk(k, dim=1).values.mean(dim=1)
    return h.mean(dim=1)


def consistency(logits: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """Mean log-probability (nats, ≤ 0) the ``N`` perturbed predictions (logits ``B×N×K``)
    give to each input's own predicted class (``predicted``, ``B``). Returns ``B``.

    The log keeps confident inputs apart (mean probabilities pile up at 1.0, and a
    threshold inside a pile of ties cannot hit the requested FRR) and weighs the overlays
    that move the prediction away most.

    STRIP's premise is that a trigger keeps the prediction on its target whatever is
    superimposed. Entropy measures confidence, not *which* class: a clean input
    superimposed with a clean image often gets a confident prediction of the *overlay's*
    class (low entropy, so it looks triggered). Consistency asks whether the prediction
    stayed where it was (beyond the paper).
    """
    _check_overlay_logits(logits)
    if predicted.shape != logits.shape[:1]:
        raise bad_param("predicted", f"one class per input ({logits.shape[0]})",
                        tuple(predicted.shape))
    logp = torch.log_softmax(logits.float(), dim=-1)
    idx = predicted.long().view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    return logp.gather(-1, idx).squeeze(-1).mean(dim=1)


def strip_scores(logits: torch.Tensor, statistic: str = "mean",
                 predicted: torch.Tensor | None = None) -> torch.Tensor:
    """Suspicion scores (higher = more suspicious): the negative STRIP entropy, or the
    :func:`consistency` (``statistic="consistency"``, which needs ``predicted``)."""
    if statistic == "consistency":
        if predicted is None:
            raise bad_param("predicted", "the inputs' own predicted classes", None)
        return consistency(logits, predicted)
    return -strip_entropy(logits, statistic)


# ---------------------------------------------------------------------------
# superimposition
# ---------------------------------------------------------------------------

BLENDS = ("sum", "sum_clip", "max", "average")


def superimpose(x: torch.Tensor, overlays: torch.Tensor, blend: str = "sum") -> torch.Tensor:
    """Superimpose each input with its overlays: ``B×C×H×W`` and ``B×N×C×H×W`` → the latter.

    ``blend="sum"``: pixel sum ``x + o`` left unclipped, as the reference code
    (``cv2.addWeighted(background, 1, overlay, 1, 0)`` on float images); values reach 2.
    ``blend="sum_clip"``: the pixel sum clipped to [0, 1] (what ``cv2.addWeighted`` does
    on ``uint8`` images, which saturate at 255).
    ``blend="max"``: the pixel-wise maximum (an occlusion-like superimposition; our
    addition, not in the paper).
    ``blend="average"``: ``(x + o) / 2``, which stays in [0, 1].
    ``overlays`` may also be ``N×C×H×W`` (the same overlays for every input).
    """
    if blend not in BLENDS:
        raise bad_param("blend", BLENDS, blend)
    if overlays.dim() == 4:
        overlays = overlays.unsqueeze(0)
    out = x.unsqueeze(1) + overlays
    if blend == "average":
        return out.mul_(0.5)
    if blend == "sum_clip":
        return out.clamp_(0.0, 1.0)
    if blend == "max":
        return torch.maximum(x.unsqueeze(1), overlays)
    return out


# ---------------------------------------------------------------------------
# thresholds at a chosen false-rejection rate
# ---------------------------------------------------------------------------

def _clean_scores(scores: np.ndarray | Sequence[float] | torch.Tensor) -> np.ndarray:
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                   dtype=np.float64).ravel()
    if s.size == 0:
        raise DataError("cannot calibrate a threshold on zero clean scores")
    if not np.isfinite(s).all():
        raise DataError("clean scores contain NaN or infinite values; cannot calibrate")
    return s


def check_frr(frr: float) -> float:
    """``frr`` as a float in (0, 1), else a ParameterError naming it."""
    if isinstance(frr, bool) or not isinstance(frr, (int, float, np.floating)):
        raise bad_param("frr", "a float in (0, 1)", frr)
    f = float(frr)
    if not 0.0 < f < 1.0:
        raise bad_param("frr", "a float in (0, 1)", frr)
    return f


def normal_threshold(scores: np.ndarray | Sequence[float] | torch.Tensor,
                     frr: float) -> float:
    """The paper's threshold: normal fit to clean scores, upper ``frr`` quantile.

    Flag ``score > threshold``; under the fitted normal a share ``frr`` of clean
    inputs lies above it. ``σ`` is the maximum-likelihood (``ddof=0``) estimate.
    """
    from scipy.stats import norm

    f = check_frr(frr)
    s = _clean_scores(scores)
    mu, sigma = float(s.mean()), float(s.std())
    return mu + sigma * float(norm.isf(f))


def empirical_threshold(scores: np.ndarray | Sequence[float] | torch.Tensor,
                        frr: float) -> float:
    """Distribution-free threshold: at most ``floor(frr · n)`` clean scores lie above it.

    It is the ``k``-th largest clean score with ``k = floor(frr · n) + 1`` (so with fewer
    than ``1 / frr`` clean scores it is their maximum).
    """
    f = check_frr(frr)
    s = np.sort(_clean_scores(scores))
    k = math.floor(f * s.size + 1e-9) + 1
    return float(s[s.size - min(k, s.size)])


def conservative_rank(n: int, frr: float,
                      confidence: float = CONSERVATIVE_CONFIDENCE) -> int | None:
    """How many of ``n`` clean scores may lie above the threshold so that the true FRR is
    at most ``frr`` with probability ``confidence``: the largest ``j`` with
    ``BetaCDF(frr; j + 1, n − j) ≥ confidence`` — for exchangeable scores the FRR of the
    ``(n − j)``-th smallest score as threshold is ``Beta(j + 1, n − j)``-distributed.
    ``None`` when even the maximum (``j = 0``) cannot give that confidence (fewer than
    ``log(1 − confidence) / log(1 − frr)`` scores: 230 at 1%).
    """
    from scipy.stats import beta

    f = check_frr(frr)
    if n < 1 or beta.cdf(f, 1, n) < confidence:
        return None
    lo, hi = 0, n - 1  # beta.cdf(f, j + 1, n − j) falls as j grows: bisect the last ok
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if beta.cdf(f, mid + 1, n - mid) >= confidence:
            lo = mid
        else:
            hi = mid - 1
    return lo


def conservative_threshold(scores: np.ndarray | Sequence[float] | torch.Tensor,
                           frr: float, confidence: float = CONSERVATIVE_CONFIDENCE) -> float:
    """Distribution-free threshold whose true FRR is at most ``frr`` with probability
    ``confidence`` (90%): the ``(j + 1)``-th largest clean score, ``j`` from
    :func:`conservative_rank`. It asks less than ``frr`` of the calibration scores to lie
    above it (24 of 3,200, 0.75%, at 1%), which the empirical quantile does not: there
    the measured FRR exceeds the target about half of the time. With too few scores for
    the confidence it is their maximum (the calibration info says so)."""
    s = np.sort(_clean_scores(scores))
    j = conservative_rank(s.size, frr, confidence)
    return float(s[s.size - 1 - (j or 0)])


def fit_threshold(scores: np.ndarray | Sequence[float] | torch.Tensor, frr: float,
                  method: str = "normal") -> float:
    """Dispatch to :func:`normal_threshold`, :func:`empirical_threshold` or
    :func:`conservative_threshold`."""
    if method == "normal":
        return normal_threshold(scores, frr)
    if method == "empirical":
        return empirical_threshold(scores, frr)
    if method == "conservative":
        return conservative_threshold(scores, frr)
    raise bad_param("threshold_method", THRESHOLD_METHODS, method)


def flag(scores: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    """Boolean flags: ``score > threshold`` (NaN scores are flagged: never let one through)."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                   dtype=np.float64)
    return np.asarray((s > threshold) | np.isnan(s), dtype=bool)


def rejection_rate(scores: np.ndarray | torch.Tensor, threshold: float) -> float:
    """Share of ``scores`` flagged at ``threshold`` (the measured FRR on clean inputs)."""
    f = flag(scores, threshold)
    return float(f.mean()) if f.size else float("nan")


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a rate seen ``k`` times in ``n`` trials."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


# ---------------------------------------------------------------------------
# calibration split
# ---------------------------------------------------------------------------

def calibration_split(n: int, *, pool_fraction: float, holdout_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (overlay pool, fit, holdout) index arrays.

    ``pool_fraction`` of the samples (0 allowed: no pool) and ``holdout_fraction`` of
    them (0 allowed: no holdout) go to the pool and the holdout; the rest (at least 2)
    fits the threshold. Each part is sorted.
    """
    for name, v in (("pool_fraction", pool_fraction), ("holdout_fraction", holdout_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise bad_param(name, "a float in [0, 1)", v)
    if pool_fraction + holdout_fraction >= 1.0:
        raise bad_param("pool_fraction + holdout_fraction", "a sum below 1",
                        pool_fraction + holdout_fraction)
    perm = np.random.default_rng(seed).permutation(n)
    n_pool = round(pool_fraction * n)
    n_hold = round(holdout_fraction * n)
    if pool_fraction > 0:
        n_pool = max(n_pool, 1)
    if holdout_fraction > 0:
        n_hold = max(n_hold, 1)
    if n - n_pool - n_hold < 2:
        raise DataError(f"calibration needs more clean samples: {n} given, {n_pool} go to "
                        f"the overlay pool and {n_hold} to the holdout, leaving fewer than "
                        "2 to fit the threshold")
    pool = np.sort(perm[:n_pool])
    hold = np.sort(perm[n_pool:n_pool + n_hold])
    fit = np.sort(perm[n_pool + n_hold:])
    return pool, fit, hold
