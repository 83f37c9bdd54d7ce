"""SPECTRE — Hayase, Kong, Somani & Oh, "SPECTRE: Defending Against Backdoor Attacks
Using Robust Statistics", ICML 2021.

Needs: the training set (with labels) and a model trained on it. The robust upgrade
of Spectral Signatures: per class, project the penultimate representations on their
top principal directions, estimate the clean mean and covariance *robustly*
(deterministic MCD, see :mod:`trojanscan.maths.robust`, with 5% shrinkage towards the
classical covariance), whiten every sample with them
and score it with the QUantum Entropy score (``α = 4``). Whitening by the clean
covariance turns a poison direction that is small next to the class's own variance
into the direction of largest excess variance, so SPECTRE finds poison counts where
Spectral Signatures fails. The number of dimensions ``k`` is chosen per class among
``dims`` by the largest QUE-weighted excess variance, as in the reference code.

Modes: ``"paper"`` removes the ``1.5·ε·n`` highest QUE scores of every class
(``ε`` = ``poison_rate_bound``, required). ``"adaptive"`` (default) decides per class
whether it holds a separate population, in two views: the spectral one (density valley
on the top principal direction, exactly as Spectral Signatures' adaptive mode) and,
when that finds nothing, the whitened one (valley on the direction of largest excess
variance after robust whitening, with a 5× stricter bar because whitening amplifies the
heavy tails of ReLU features). In a detected class the clean side of the split is the
reference: mean and covariance are estimated from it, every sample is whitened and
QUE-scored, and the suspect side's samples scoring above the reference's 99th
percentile are flagged — at most ``⌊1.5·ε·N⌋`` in total when ``ε`` is given.

Known failures: robust estimation assumes the clean samples are the majority of their
class; a tight poison cluster can attract the MCD fit (the minimum determinant then
favours it). Clean-label attacks whose poison looks like the class in feature space
(SIG here) are not separable at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dataset import ImageDataset
from ..exceptions import bad_param
from ..maths.robust import spectre_class_scores
from ..maths.spectral import (
    class_groups,
    decide_population,
    moments,
    paper_removal_count,
    project,
    suspect_side,
    top_eigen,
    top_k_mask,
)
from .data_base import (
    FeatureDataDetector,
    annotate_classes,
    apply_budget,
    budget,
    seeded_subset,
)
from .spectral_signatures import check_mode, min_population


class Spectre(FeatureDataDetector):
    """Robust-covariance whitening + QUE scores, per class (see the module docstring)."""

    name: ClassVar[str] = "spectre"

    def __init__(self, *, poison_rate_bound: float | None = None, mode: str = "adaptive",
                 alpha: float = 4.0, dims: tuple[int, ...] = (2, 4, 8, 16, 32),
                 max_valley: float = 0.25, min_separation: float = 3.0,
                 reference_quantile: float = 0.99, shrinkage: float = 0.05,
                 max_fit_samples: int = 4000,
                 removal_factor: float = 1.5, layer: str = "penultimate",
                 batch_size: int = 256, seed: int = 0, device: str | None = None) -> None:
        self.poison_rate_bound = poison_rate_bound
        self.mode = mode
        self.alpha = alpha
        self.dims = dims
        self.max_valley = max_valley
        self.min_separation = min_separation
        self.reference_quantile = reference_quantile
        self.max_fit_samples = max_fit_samples
        self.shrinkage = shrinkage
        self.removal_factor = removal_factor
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_mode(self.mode, self.poison_rate_bound)
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise bad_param("alpha", "a number >= 0", self.alpha)
        dims = self.dims if isinstance(self.dims, (tuple, list)) else (self.dims,)
        if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                               and d >= 1 for d in dims):
            raise bad_param("dims", "a tuple of integers >= 1", self.dims)
        if not isinstance(self.min_separation, (int, float)) or self.min_separation <= 0:
            raise bad_param("min_separation", "a number > 0", self.min_separation)
        if not isinstance(self.max_valley, (int, float)) or not 0 < self.max_valley <= 1:
            raise bad_param("max_valley", "a float in (0, 1]", self.max_valley)
        if not isinstance(self.reference_quantile, (int, float)) or not (
                0.5 <= self.reference_quantile < 1):
            raise bad_param("reference_quantile", "a float in [0.5, 1)",
                            self.reference_quantile)
        if not isinstance(self.shrinkage, (int, float)) or not 0 <= self.shrinkage <= 1:
            raise bad_param("shrinkage", "a float in [0, 1]", self.shrinkage)
        if (isinstance(self.max_fit_samples, bool) or not isinstance(self.max_fit_samples, int)
                or self.max_fit_samples < 100):
            raise bad_param("max_fit_samples", "an integer >= 100", self.max_fit_samples)

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None, runner_up: np.ndarray | None = None
               ) -> dict[str, Any]:
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
            entry, suspect, que = self._class(f, index, label, dims, runner_up)
            scores[index] = que
            if suspect is not None:
                adaptive[index[suspect]] = True
            if eps is not None:
                k = paper_removal_count(nc, eps, self.removal_factor)
                paper[index[top_k_mask(que, k)]] = True
                entry["paper_num_flagged"] = k
            per_class[str(label)] = entry
        annotate_classes(per_class, "separation", (
            f"within the class: the density valley on its top principal direction (else on "
            f"the robustly whitened one, bar /5) with {self.max_valley:g} of the smaller "
            f"peak and the separation d' with {self.min_separation:g}; then QUE scores with "
            f"the clean group's {self.reference_quantile:g} quantile"
            if self.mode == "adaptive" else
            "none: the paper removes the 1.5·ε·n highest QUE scores of every class"))
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

    def _class(self, f: np.ndarray, index: np.ndarray, label: int, dims: tuple[int, ...],
               runner_up: np.ndarray | None = None
               ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray]:
        """One class: ``(per-class entry, suspect mask or None, QUE scores)``."""
        nc = len(index)
        min_count = min_population(nc)
        mom = moments(f, index)
        big_k = max(1, min(max(dims), f.shape[1], nc - 2))
        _, basis = top_eigen(mom.cov, big_k)
        reps = project(f, index, mom.mean, basis)
        rows = seeded_subset(nc, self.max_fit_samples, self.seed + label)
        common: dict[str, Any] = {"ks": dims, "alpha": float(self.alpha), "fit_rows": rows,
                  "shrinkage": float(self.shrinkage)}
        # the spectral view (top principal direction, as Spectral Signatures) ...
        spectral = decide_population(reps[:, 0], max_valley=float(self.max_valley),
                                     min_separation=float(self.min_separation),
                                     min_count=min_count)
        view = "spectral"
        suspect: np.ndarray | None = None
        rule = ""
        if spectral.detected and self.mode == "paper":
            # the paper's scores: robust (MCD) whitening, whatever the split says
            suspect, rule = suspect_side(f, index, spectral.upper, runner_up=runner_up)
            res = spectre_class_scores(reps, **common)
            dec = spectral
        elif spectral.detected:
            suspect, rule = suspect_side(f, index, spectral.upper, runner_up=runner_up)
            res = spectre_class_scores(reps, reference=~suspect, **common)
            dec = spectral
        else:
            # ... else the whitened view: robust (MCD) whitening, top excess direction;
            # whitening amplifies heavy tails, hence the stricter valley
            res = spectre_class_scores(reps, **common)
            view = "whitened"
            dec = decide_population(res.projection, max_valley=float(self.max_valley) / 5,
                                    min_separation=float(self.min_separation),
                                    min_count=min_count)
            if dec.detected:
                far_upper = abs(res.projection[dec.upper].mean()) >= abs(
                    res.projection[~dec.upper].mean())
                suspect = dec.upper if far_upper else ~dec.upper
                rule = "far from the robust centre"
                if suspect.mean() > 0.5:
                    suspect, rule = None, ""
        entry: dict[str, Any] = {"num_samples": nc, **res.to_dict(), "view": view,
                                 **dec.to_dict()}
        entry["detected"] = suspect is not None
        if suspect is not None:
            # flag the suspect group's samples the clean group's QUE scores do not explain
            cut = float(np.quantile(res.scores[~suspect], self.reference_quantile))
            suspect = suspect & (res.scores > cut)
            entry.update(orientation=rule, que_cut=round(cut, 4),
                         suspect_fraction=round(float(suspect.mean()), 4))
            if int(suspect.sum()) < min_count:
                suspect = None
                entry["detected"] = False
        return entry, suspect, res.scores
