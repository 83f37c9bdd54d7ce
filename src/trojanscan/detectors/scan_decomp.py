"""SCAn — Tang, Wang, Tang & Zhang, "Demon in the Variant: Statistical Analysis of DNNs
for Robust Backdoor Contamination Detection", USENIX Security 2021.

Needs: the training set (with labels) and a model trained on it (its penultimate
features). Each class's representations are *untangled* into two sub-groups (see
:mod:`trojanscan.maths.decomposition`); a class into which samples of other classes were
relabelled holds a second identity, so its two sub-groups separate more than those of
the other classes. Every decision compares a class with the **other classes of the same
data set** (median and MAD of the class statistics): nothing is a constant fitted to
some other model.

Two modes:

* ``mode="paper"`` — the authors' reference code: a global model (identity covariance
  ``S_μ`` and a variation covariance ``S_ε`` shared by all classes, by EM, here fitted on
  the training set itself), untangling in the ``S_ε⁻¹`` metric from a random split, the
  log-likelihood-ratio statistic ``J`` per class, and a class flagged when its two-sided
  anomaly index ``|J − median| / MAD`` exceeds ``e²``. On Fashion-MNIST models trained
  elsewhere the shared ``S_ε`` did not hold: each class has its own covariance, shoe
  classes got the largest ``J`` on clean sets and poisoned classes did not stand out.
* ``mode="adaptive"`` (default, ours) — untangling in each class's *own* covariance
  metric, started from the class's top direction (deterministic); the class statistic is
  the log separation ``d'`` of the two sub-groups along their discriminant direction;
  a class is flagged when its one-sided across-class index exceeds the family-wise
  threshold at ``alpha`` (the index of the largest of ``K`` i.i.d. normal statistics
  exceeds it with probability ``alpha``: :func:`trojanscan.maths.outliers.index_threshold`),
  so ``alpha`` is the stated false-alarm rate per clean set under that null.

``alpha`` defaults to 0.01 (5.87 for K = 10). On the development training sets of
models trained elsewhere 0.05 (3.87) would find the poisoned class in 17 of 36 sets
instead of 10, with the same false alarms on 12 clean sets (1: a clean class with a
natural sub-population, index 6.7), but it flags a class of a small clean digits model
(index 3.99).

In a flagged class the suspect sub-group is the minority, unless the split is closer to
even than 40/60 and each sample's runner-up class (second-highest logit, recorded when
the features are extracted) is known: then the sub-group whose runner-up classes are the
more varied (:func:`trojanscan.maths.spectral.suspect_side`) — relabelled poison keeps a
trace of its many source classes, a class's own samples are confused with few
neighbours; when the poison is half of its class, size is a coin flip (recall 0 on a
development set with the minority rule, 1.0 with this one). ``balance`` overrides the
40/60 bound (0.5: always the minority); without runner-up classes the minority is used,
and ``mode="paper"`` always uses the minority. At
most ``⌊1.5·ε·N⌋`` samples in total when ``ε`` is given. Scores: the squared
standardised distance along the discriminant direction from the class's main sub-group.

Known failures: the across-class null needs at least 3 classes and assumes most classes
are clean — poison spread over every class (all-to-all) raises the median with it; a
class with a strong natural sub-population (shirts of two styles) has a large statistic
too; clean-label poison that the network maps into its class is no second identity.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dataset import ImageDataset
from ..exceptions import DetectorNotApplicable, bad_param
from ..maths import decomposition as dc
from ..maths.outliers import index_threshold
from ..maths.spectral import check_rate, class_groups, suspect_side
from .data_base import FeatureDataDetector, apply_budget, budget
from .spectral_signatures import MODES, min_population


class Scan(FeatureDataDetector):
    """Two-component decomposition per class, judged against the other classes."""

    name: ClassVar[str] = "scan"

    def __init__(self, *, poison_rate_bound: float | None = None, mode: str = "adaptive",
                 alpha: float = 0.01, ridge: float = 0.01, max_iter: int = 100,
                 balance: float | None = None, removal_factor: float = 1.5,
                 layer: str = "penultimate", batch_size: int = 256, seed: int = 0,
                 device: str | None = None) -> None:
        self.poison_rate_bound = poison_rate_bound
        self.balance = balance
        self.mode = mode
        self.alpha = alpha
        self.ridge = ridge
        self.max_iter = max_iter
        self.removal_factor = removal_factor
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_rate("poison_rate_bound", self.poison_rate_bound)
        if self.mode not in MODES:
            raise bad_param("mode", MODES, self.mode)
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not (
                0 < self.alpha < 1):
            raise bad_param("alpha", "a float in (0, 1)", self.alpha)
        if not isinstance(self.ridge, (int, float)) or isinstance(self.ridge, bool) or not (
                0 <= self.ridge <= 10):
            raise bad_param("ridge", "a float in [0, 10]", self.ridge)
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or (
                self.max_iter < 1):
            raise bad_param("max_iter", "an integer >= 1", self.max_iter)
        if self.balance is not None and (
                not isinstance(self.balance, (int, float)) or isinstance(self.balance, bool)
                or not 0 < self.balance <= 0.5):
            raise bad_param("balance", "None or a float in (0, 0.5]", self.balance)
        if not isinstance(self.removal_factor, (int, float)) or self.removal_factor <= 0:
            raise bad_param("removal_factor", "a number > 0", self.removal_factor)

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None, runner_up: np.ndarray | None = None
               ) -> dict[str, Any]:
        groups = class_groups(y)
        k = len(groups)
        if k < 3:
            raise DetectorNotApplicable(
                f"the across-class comparison needs at least 3 classes, found {k}")
        n = len(y)
        paper = self.mode == "paper"
        # near-even splits are oriented by the runner-up classes when they are known;
        # without them the minority is the suspect (the spread rule was a coin flip)
        balance = float(self.balance if self.balance is not None
                        else 0.4 if runner_up is not None and not paper else 0.5)
        gm = dc.global_model(dc.class_stats(f, y), max_iter=self.max_iter) if paper else None
        stats: dict[int, float] = {}
        parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        sizes: dict[int, float] = {}
        for label, index in groups.items():
            x = np.asarray(f[index], dtype=np.float64)
            if gm is not None:
                x = x - gm.mean
                metric = gm.metric
                split = dc.untangle(x, metric, faithful=True, seed=self.seed + label,
                                    max_iter=self.max_iter)
                mu = dc.one_identity_mean(x, gm, faithful=True)
                stats[label] = dc.split_statistic(x, split, mu, metric)
            else:
                x = x - x.mean(axis=0)
                metric = dc.own_metric(x, float(self.ridge))
                split = dc.untangle(x, metric, faithful=False, max_iter=self.max_iter)
                proj = dc.discriminant_projection(x, split, metric)
                stats[label] = float(np.log(max(dc.split_separation(proj, split.first),
                                                1e-12)))
            proj = dc.discriminant_projection(x, split, metric)
            parts[label] = (index, split.first, proj)
            sizes[label] = float(split.first.mean())
        labels = list(groups)
        values = np.array([stats[c] for c in labels])
        if paper:
            index_values = dc.two_sided_index(values)
            cut = dc.PAPER_THRESHOLD
            rule = "two-sided |J - median| / MAD over the classes > e^2"
        else:
            index_values = dc.one_sided_index(values)
            cut = index_threshold(k, float(self.alpha), seed=self.seed)
            rule = (f"one-sided (statistic - median) / MAD over the {k} classes > "
                    f"{cut:.2f}, the family-wise threshold at alpha={self.alpha:g}")
        med = float(np.median(values))
        scale = 1.4826 * float(np.median(np.abs(values - med)))
        scores = np.zeros(n, dtype=np.float64)
        flagged = np.zeros(n, dtype=bool)
        per_class: dict[str, Any] = {}
        for pos, label in enumerate(labels):
            index, first, proj = parts[label]
            detected = bool(index_values[pos] > cut)
            suspect, orientation = suspect_side(f, index, first, balance=balance,
                                                runner_up=runner_up)
            main = proj[~suspect] if (~suspect).any() else proj
            sd = max(float(main.std()), 1e-12)
            scores[index] = ((proj - main.mean()) / sd) ** 2
            entry: dict[str, Any] = {
                "num_samples": len(index), "statistic": round(stats[label], 4),
                "across_class_index": round(float(index_values[pos]), 4),
                "threshold": round(float(cut), 4),
                "compared_with": f"the other {k - 1} classes of this set (median "
                                 f"{med:.4f}, MAD {scale:.4f})",
                "sub_group_fraction": round(sizes[label], 4),
                "detected": detected,
            }
            if detected and int(suspect.sum()) >= min_population(len(index)):
                flagged[index[suspect]] = True
                entry.update(orientation=orientation,
                             suspect_fraction=round(float(suspect.mean()), 4),
                             reason=f"index {index_values[pos]:.2f} > {cut:.2f}")
            else:
                entry["detected"] = False
                entry["reason"] = (f"index {index_values[pos]:.2f} <= {cut:.2f}"
                                   if not detected else "suspect sub-group too small")
            per_class[str(label)] = entry
        limit = budget(self.poison_rate_bound, n, self.removal_factor)
        flagged = apply_budget(flagged, scores, limit)
        for label, index in groups.items():
            per_class[str(label)]["num_flagged"] = int(flagged[index].sum())
        evidence: dict[str, Any] = {
            "mode": self.mode,
            "rule": rule,
            "threshold": float(cut),
            "false_alarm_rate": float(self.alpha) if not paper else None,
            "budget": limit,
            "classes_with_outliers": [int(c) for c, e in per_class.items() if e["detected"]],
        }
        if gm is not None:
            evidence["global_model_iterations"] = gm.iterations
        return {"scores": scores, "flagged": flagged, "per_class": per_class,
                "evidence": evidence}
