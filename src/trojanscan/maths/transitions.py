"""Pure maths of TeCo (Liu, Li, Wang, Hu, Ye, Jin, Wu & Xiao, "Detecting Backdoors
During the Inference Stage Based on Corruption Robustness Consistency", CVPR 2023):
transition points and their deviation, and our two-sided statistics.

An input's prediction is compared, for each corruption, with its predictions under
that corruption at severities ``1..S``; the *transition point* is the first severity at
which the prediction differs, or ``S + 1`` when it never does (the reference code's
``args.max = 6`` for ImageNet-C's five severities). The input's score is the
population standard deviation (``np.std``, ``ddof=0``) of its transition points over
the corruptions: a clean input loses its class at similar severities under every
corruption, a triggered one keeps the target under some and loses it at once under
others, so *high* deviation is suspicious.
"""

from __future__ import annotations

import numpy as np
import torch


def transition_points(changed: np.ndarray | torch.Tensor) -> np.ndarray:
    """First severity (1-based) at which the prediction changed, per input and
    corruption, from ``changed`` (``B×K×S`` booleans: prediction at severity ``s + 1``
    differs from the uncorrupted one); ``S + 1`` where it never changed."""
    c = np.asarray(changed.detach().cpu() if isinstance(changed, torch.Tensor) else changed,
                   dtype=bool)
    if c.ndim != 3:
        raise ValueError(f"changed: expected B×K×S booleans, got shape {c.shape}")
    s = c.shape[2]
    first = np.where(c.any(axis=2), c.argmax(axis=2) + 1, s + 1)
    return np.asarray(first, dtype=np.int64)


def deviation_scores(points: np.ndarray) -> np.ndarray:
    """TeCo's score per input: the standard deviation (``ddof=0``) of its transition
    points over the corruptions (``B×K`` → ``B``)."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"points: expected B×K with K >= 2 corruptions, got shape {p.shape}")
    return np.asarray(p.std(axis=1), dtype=np.float64)


def robustness_scores(points: np.ndarray) -> np.ndarray:
    """Mean transition point per input (beyond the paper): how much corruption it takes,
    on average, to change the prediction. A trigger that dominates the prediction
    survives every corruption, so *high* robustness is suspicious too — the opposite
    of the inconsistency that :func:`deviation_scores` looks for."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"points: expected B×K, got shape {p.shape}")
    return np.asarray(p.mean(axis=1), dtype=np.float64)


def tail_fit(points: np.ndarray, max_severity: int) -> np.ndarray:
    """Per corruption, the share of clean inputs whose transition point is at least
    ``v`` for ``v = 1..max_severity + 1`` (``K×(S+1)``, add-one smoothed so that no share
    is 0), for :func:`tail_scores`."""
    p = np.asarray(points, dtype=np.int64)
    if p.ndim != 2 or len(p) < 1:
        raise ValueError(f"points: expected B×K with B >= 1, got shape {p.shape}")
    s = int(max_severity) + 1
    counts = np.stack([np.bincount(col - 1, minlength=s)[:s] for col in p.T])
    at_least = counts[:, ::-1].cumsum(axis=1)[:, ::-1]
    return np.asarray((at_least + 1.0) / (len(p) + 1.0), dtype=np.float64)


def tail_scores(points: np.ndarray, tails: np.ndarray) -> np.ndarray:
    """Robustness relative to clean inputs (beyond the paper): Fisher's combination
    ``Σ_k −log P_clean(transition_k ≥ p_k)`` of per-corruption one-sided tail shares
    (:func:`tail_fit`). Surviving a corruption that clean inputs rarely survive weighs
    more than surviving one that most survive; breaking early adds nothing."""
    p = np.asarray(points, dtype=np.int64)
    t = np.asarray(tails, dtype=np.float64)
    k = np.arange(p.shape[1])[None, :]
    return np.asarray(-np.log(t[k, np.clip(p, 1, t.shape[1]) - 1]).sum(axis=1),
                      dtype=np.float64)


def profile_scores(points: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """How far each input's transition points lie from the clean inputs' (beyond the
    paper): the mean over the corruptions of ``((p_k − mean_k) / scale_k)²``. It flags
    inputs that break unlike clean ones in either direction — inconsistent across
    corruptions as TeCo expects, or robust to all of them as a dominant trigger is."""
    p = np.asarray(points, dtype=np.float64)
    z = (p - np.asarray(mean, dtype=np.float64)) / np.asarray(scale, dtype=np.float64)
    return np.asarray((z * z).mean(axis=1), dtype=np.float64)


def profile_fit(points: np.ndarray, floor: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-corruption mean and standard deviation (at least ``floor`` severity steps) of
    clean inputs' transition points, for :func:`profile_scores`."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or len(p) < 2:
        raise ValueError(f"points: expected B×K with B >= 2, got shape {p.shape}")
    return p.mean(axis=0), np.maximum(p.std(axis=0), floor)


__all__ = ["deviation_scores", "profile_fit", "profile_scores", "robustness_scores",
           "tail_fit", "tail_scores", "transition_points"]
