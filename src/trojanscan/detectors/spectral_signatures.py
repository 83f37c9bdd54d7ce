"""Spectral Signatures — Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks",
NeurIPS 2018.

Needs: the training set (with labels) and a model trained on it. Per class, the
penultimate representations are centred and projected on their top right singular
vector; poisoned samples, which share a feature the clean ones lack, sit at one end
of that direction. Score = squared projection (divided by the variance along the
direction, so scores are comparable across classes).

Two modes:

* ``mode="paper"`` — the paper: remove the ``1.5·ε·n`` highest-scored samples of *every*
  class (``ε`` = ``poison_rate_bound``, required). With poison concentrated in one class
  this throws away ``1.5·ε`` of every clean class and misses most of a heavily poisoned
  one (F1 ≤ 0.28 measured on a peer's port).
* ``mode="adaptive"`` (default) — decide per class whether the projections hold a
  separate population: exact 1-D 2-means, then a density valley between the two groups
  at most ``max_valley`` (0.25) of the smaller peak and a separation ``d' ≥
  min_separation`` (3; a unimodal Gaussian gives 2.65). On the Fashion-MNIST benchmark
  clean classes had valleys of 0.32–0.85 and poisoned ones 0.02–0.16. The group
  boundary is refined by a 1-D Gaussian mixture; the suspect group is the minority, or
  for balanced splits (≥ 40/60) the group whose runner-up classes (second-highest logit)
  are the more varied — the more spread-out group when those are not known (see
  :func:`trojanscan.maths.spectral.suspect_side`). Only those classes are flagged, at
  most ``⌊1.5·ε·N⌋`` samples in total when ``ε`` is given; without ``ε`` nothing caps
  the count but the per-class decision. Scores in a detected class are the squared
  distance to the clean group's mean in its standard deviations.

The paper centres the representations; its reference code (MadryLab/
backdoor_data_poisoning) does not — ``centre=False`` reproduces the code.
Known failures: the poison must dominate the top singular direction of its class —
small poison counts or a class whose own variance is larger hide it (SPECTRE whitens
first to fix this); when the poison is half of its class, centring puts both halves
equally far from the mean, so the paper's scores cannot tell them apart (the adaptive
mode's runner-up rule does); clean-label poison (SIG) that the network maps into its
class is not a separate population; tiny networks on tiny inputs (the 8×8 digits test
fixture) do not separate the poison into its own mode.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dataset import ImageDataset
from ..exceptions import ParameterError, bad_param
from ..maths.spectral import (
    check_rate,
    class_groups,
    class_signature,
    decide_population,
    paper_removal_count,
    suspect_side,
    top_k_mask,
)
from .data_base import FeatureDataDetector, annotate_classes, apply_budget, budget

MODES = ("adaptive", "paper")


def check_mode(mode: str, poison_rate_bound: float | None) -> None:
    """The checks Spectral Signatures and SPECTRE share: ε, and a mode that can use it."""
    check_rate("poison_rate_bound", poison_rate_bound)
    if mode not in MODES:
        raise bad_param("mode", MODES, mode)
    if mode == "paper" and poison_rate_bound is None:
        raise ParameterError("invalid poison_rate_bound: mode='paper' removes 1.5·ε·n "
                             "samples per class and needs ε (a float in (0, 0.5]), got None")


def min_population(n: int) -> int:
    """Smallest group called a population in a class of ``n`` (0.2%, at least 2)."""
    return max(2, int(np.ceil(0.002 * n)))


class SpectralSignatures(FeatureDataDetector):
    """Per-class top-singular-vector outlier scores (see the module docstring)."""

    name: ClassVar[str] = "spectral_signatures"

    def __init__(self, *, poison_rate_bound: float | None = None, mode: str = "adaptive",
                 centre: bool = True, max_valley: float = 0.25,
                 min_separation: float = 3.0, removal_factor: float = 1.5,
                 layer: str = "penultimate",
                 batch_size: int = 256, seed: int = 0, device: str | None = None) -> None:
        self.poison_rate_bound = poison_rate_bound
        self.mode = mode
        self.centre = centre
        self.max_valley = max_valley
        self.min_separation = min_separation
        self.removal_factor = removal_factor
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_mode(self.mode, self.poison_rate_bound)
        if not isinstance(self.min_separation, (int, float)) or self.min_separation <= 0:
            raise bad_param("min_separation", "a number > 0", self.min_separation)
        if not isinstance(self.max_valley, (int, float)) or not 0 < self.max_valley <= 1:
            raise bad_param("max_valley", "a float in (0, 1]", self.max_valley)
        if not isinstance(self.removal_factor, (int, float)) or self.removal_factor <= 0:
            raise bad_param("removal_factor", "a number > 0", self.removal_factor)

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None, runner_up: np.ndarray | None = None
               ) -> dict[str, Any]:
        eps = self.poison_rate_bound
        n = len(y)
        scores = np.zeros(n, dtype=np.float64)
        paper_scores = np.zeros(n, dtype=np.float64)
        adaptive = np.zeros(n, dtype=bool)
        paper = np.zeros(n, dtype=bool)
        per_class: dict[str, Any] = {}
        for label, index in class_groups(y).items():
            sig = class_signature(f, index, label, centre=self.centre)
            dec = decide_population(sig.projection, max_valley=float(self.max_valley),
                                    min_separation=float(self.min_separation),
                                    min_count=min_population(len(index)))
            paper_scores[index] = sig.scores
            entry: dict[str, Any] = {"num_samples": len(index),
                                     "top_eigenvalue": round(sig.variance, 6), **dec.to_dict()}
            if dec.detected:
                suspect, rule = suspect_side(f, index, dec.upper, runner_up=runner_up)
                major = sig.projection[~suspect]
                sd = max(float(major.std()), 1e-12)
                scores[index] = ((sig.projection - major.mean()) / sd) ** 2
                adaptive[index[suspect]] = True
                entry.update(orientation=rule, suspect_fraction=round(float(suspect.mean()), 4))
            else:
                scores[index] = sig.scores
            if eps is not None:
                k = paper_removal_count(len(index), eps, self.removal_factor)
                paper[index[top_k_mask(sig.scores, k)]] = True
                entry["paper_num_flagged"] = k
            per_class[str(label)] = entry
        annotate_classes(per_class, "separation", (
            f"within the class: the density valley between the two groups of its top "
            f"singular direction with {self.max_valley:g} of the smaller peak, and their "
            f"separation d' with {self.min_separation:g}" if self.mode == "adaptive" else
            "none: the paper removes the 1.5·ε·n highest scores of every class"))
        limit = budget(eps, n, self.removal_factor)
        adaptive = apply_budget(adaptive, scores, limit)
        for label, index in class_groups(y).items():
            per_class[str(label)]["num_flagged"] = int(
                (paper if self.mode == "paper" else adaptive)[index].sum())
        evidence: dict[str, Any] = {
            "mode": self.mode,
            "centred": bool(self.centre),
            "budget": limit,
            "classes_with_outliers": [int(c) for c, e in per_class.items() if e["detected"]],
            "adaptive_num_flagged": int(adaptive.sum()),
        }
        if eps is not None:
            evidence["paper_num_flagged"] = int(paper.sum())
        if self.mode == "paper":
            return {"scores": paper_scores, "flagged": paper, "per_class": per_class,
                    "evidence": evidence}
        return {"scores": scores, "flagged": adaptive, "per_class": per_class,
                "evidence": evidence}
