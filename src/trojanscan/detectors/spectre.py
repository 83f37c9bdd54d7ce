"""SPECTRE — Hayase, Kong, Somani & Oh, "SPECTRE: Defending Against Backdoor Attacks
Using Robust Statistics", ICML 2021.

Needs: the training set (with labels) and a model trained on it. The robust upgrade
of Spectral Signatures: per class, project the penultimate representations on their
top principal directions, estimate the clean mean and covariance *robustly*
(deterministic MCD, see :mod:`trojanscan.maths.robust`), whiten every sample with them
and score it with the QUantum Entropy score (``α = 4``). Whitening by the clean
covariance turns a poison direction that is small next to the class's own variance
into the direction of largest excess variance, so SPECTRE finds poison counts where
Spectral Signatures fails. The number of dimensions ``k`` is chosen per class among
``dims`` by the largest QUE-weighted excess variance, as in the reference code.

Modes: ``"paper"`` removes the ``1.5·ε·n`` highest QUE scores of every class
(``ε`` = ``poison_rate_bound``, required). ``"adaptive"`` (default) first decides per
class whether the whitened projection on the top excess direction holds a separate
group (1-D 2-means, separation ``≥ min_separation``) and flags the group farther from
the robust centre, at most ``⌊1.5·ε·N⌋`` samples in total when ``ε`` is given.

Known failures: robust estimation assumes the clean samples are the majority *and*
the tighter group of their class; a poison that is more than half of its class, or
tighter than the class's clean samples when it is half of it, is taken for the clean
part. Clean-label attacks whose poison looks like the class in feature space are not
separable at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..data_scan import FeatureDataDetector, apply_budget, budget, seeded_subset
from ..dataset import ImageDataset
from ..exceptions import ParameterError, bad_param
from ..maths.robust import spectre_class_scores
from ..maths.spectral import (
    check_rate,
    class_groups,
    decide_population,
    moments,
    paper_removal_count,
    project,
    top_eigen,
    top_k_mask,
)
from .spectral_signatures import MODES, min_population


class Spectre(FeatureDataDetector):
    """Robust-covariance whitening + QUE scores, per class (see the module docstring)."""

    name: ClassVar[str] = "spectre"

    def __init__(self, *, poison_rate_bound: float | None = None, mode: str = "adaptive",
                 alpha: float = 4.0, dims: tuple[int, ...] = (2, 4, 8, 16, 32),
                 min_separation: float = 4.0, max_fit_samples: int = 5000,
                 shrinkage: float = 0.05,
                 removal_factor: float = 1.5, layer: str = "penultimate",
                 batch_size: int = 256, seed: int = 0, device: str | None = None) -> None:
        self.poison_rate_bound = poison_rate_bound
        self.mode = mode
        self.alpha = alpha
        self.dims = dims
        self.min_separation = min_separation
        self.max_fit_samples = max_fit_samples
        self.shrinkage = shrinkage
        self.removal_factor = removal_factor
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_rate("poison_rate_bound", self.poison_rate_bound)
        if self.mode not in MODES:
            raise bad_param("mode", MODES, self.mode)
        if self.mode == "paper" and self.poison_rate_bound is None:
            raise ParameterError("invalid poison_rate_bound: mode='paper' removes 1.5·ε·n "
                                 "samples per class and needs ε (a float in (0, 0.5]), got "
                                 "None")
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise bad_param("alpha", "a number >= 0", self.alpha)
        dims = self.dims if isinstance(self.dims, (tuple, list)) else (self.dims,)
        if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                               and d >= 1 for d in dims):
            raise bad_param("dims", "a tuple of integers >= 1", self.dims)
        if not isinstance(self.min_separation, (int, float)) or self.min_separation <= 0:
            raise bad_param("min_separation", "a number > 0", self.min_separation)
        if (isinstance(self.max_fit_samples, bool) or not isinstance(self.max_fit_samples, int)
                or self.max_fit_samples < 100):
            raise bad_param("max_fit_samples", "an integer >= 100", self.max_fit_samples)

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None) -> dict[str, Any]:
        eps = self.poison_rate_bound
        dims = tuple(int(d) for d in (self.dims if isinstance(self.dims, (tuple, list))
                                      else (self.dims,)))
        n = len(y)
        scores = np.zeros(n, dtype=np.float64)
        adaptive = np.zeros(n, dtype=bool)
        paper = np.zeros(n, dtype=bool)
        per_class: dict[str, Any] = {}
        for label, index in class_groups(y).items():
            nc = len(index)
            mom = moments(f, index)
            big_k = max(1, min(max(dims), f.shape[1], nc - 2))
            _, basis = top_eigen(mom.cov, big_k)
            reps = project(f, index, mom.mean, basis)
            rows = seeded_subset(nc, self.max_fit_samples, self.seed + label)
            res = spectre_class_scores(reps, ks=dims, alpha=float(self.alpha),
                                       fit_rows=rows, shrinkage=float(self.shrinkage))
            dec = decide_population(res.projection, min_separation=float(self.min_separation),
                                    max_fraction=0.55, min_count=min_population(nc),
                                    reference=0.0)
            scores[index] = res.scores
            if dec.detected:
                adaptive[index[dec.suspect]] = True
            entry = {"num_samples": nc, **res.to_dict(), **dec.to_dict()}
            if eps is not None:
                k = paper_removal_count(nc, eps, self.removal_factor)
                paper[index[top_k_mask(res.scores, k)]] = True
                entry["paper_num_flagged"] = k
            per_class[str(label)] = entry
        limit = budget(eps, n, self.removal_factor)
        adaptive = apply_budget(adaptive, scores, limit)
        flagged = paper if self.mode == "paper" else adaptive
        for label, index in class_groups(y).items():
            per_class[str(label)]["num_flagged"] = int(flagged[index].sum())
        evidence: dict[str, Any] = {
            "mode": self.mode,
            "budget": limit,
            "classes_with_outliers": [int(c) for c, e in per_class.items() if e["detected"]],
            "adaptive_num_flagged": int(adaptive.sum()),
        }
        if eps is not None:
            evidence["paper_num_flagged"] = int(paper.sum())
        return {"scores": scores, "flagged": flagged, "per_class": per_class,
                "evidence": evidence}
