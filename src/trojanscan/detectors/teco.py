"""TeCo — Liu, Li, Wang, Hu, Ye, Jin, Wu & Xiao, "Detecting Backdoors During the Inference
Stage Based on Corruption Robustness Consistency", CVPR 2023 (reference code:
github.com/CGCL-codes/TeCo).

Needs: the model's hard-label predictions only (black box) and clean inputs for the
threshold (no labels, no training data).

Each input is corrupted by each of several common corruptions
(:mod:`trojanscan.maths.corruptions`, ImageNet-C's) at severities ``1..max_severity``;
per corruption, the *transition point* is the first severity at which the model's
prediction differs from its prediction on the plain input, or ``max_severity + 1`` when
it never does. The score is the standard deviation (``ddof=0``) of the transition
points across the corruptions (:mod:`trojanscan.maths.transitions`): a clean input's
prediction breaks at similar severities under every corruption, while a trigger is
robust to some corruptions and destroyed by others, so *high* deviation is suspicious.

Faithful to the paper: the statistic, severities 1–5, ``max + 1`` for no transition,
the corruptions' ImageNet-C parameters. Differences: 11 of the paper's 15 corruptions
(``frost``, ``glass_blur``, ``snow`` and ``fog`` are not implemented; see
:mod:`trojanscan.maths.corruptions`); each severity is applied to the plain input (the
reference script overwrites its image list in place, so that there each severity, and
each later corruption, is applied on top of all earlier ones — not what the paper
describes); the paper reports AUROC only, and the threshold here is set, as for
STRIP, at the false-rejection rate ``frr`` on the clean calibration inputs
(``threshold_method``, default ``"conservative"``) and measured on held-out clean ones.

``early_exit`` (default on) stops corrupting an input under a corruption once its
transition point is found: the score is the same, the model evaluations fewer.

Randomness (noises, elastic field, motion direction) is drawn per input from ``seed``
and a hash of the input's own pixels, so scores do not depend on batch size or order.

Known to fail: the scores take few values (a standard deviation of ``K`` integers), so
many clean inputs tie and the threshold is coarse; a trigger that is as fragile (or as
robust) under every corruption as the object itself — smooth whole-image blends and
warps — keeps a clean-like deviation; and the severities are ImageNet-C's absolute
ones, so on small images most corruptions break every prediction at severity 1 and
the transition points carry little information.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from ..maths import corruptions as cor
from ..maths import transitions as tr
from .input_base import CalibratedInputDetector, check_inputs, check_int, logits_of
from .strip import any_kind_thresholds, margins


def input_seeds(x: torch.Tensor, seed: int) -> np.ndarray:
    """One non-negative 63-bit seed per input, from ``seed`` and a hash of its pixels."""
    arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    out = np.empty(len(arr), dtype=np.int64)
    for i in range(len(arr)):
        h = hashlib.blake2b(arr[i].tobytes(), digest_size=8, key=int(seed).to_bytes(8, "little"))
        out[i] = int.from_bytes(h.digest(), "little") >> 1
    return out


#: per-input statistics of the transition points: the paper's and ours (see the module)
STATISTICS = ("any", "deviation", "tail", "robustness", "profile")
#: the one-sided statistics that ``"any"`` thresholds jointly
ANY_KINDS = ("deviation", "tail")


SCORE_TEXT = {
    "deviation": "standard deviation of the severities at which each corruption first "
                 "changes the prediction (max_severity + 1 where it never does)",
    "robustness": "mean severity at which each corruption first changes the prediction",
    "tail": "sum over the corruptions of -log(share of clean inputs whose prediction "
            "survives at least as long)",
    "profile": "mean squared standardised distance of the transition severities from the "
               "clean inputs' per-corruption means",
    "any": "largest margin, in clean standard deviations, of the deviation or the tail "
           "robustness above its threshold (flagged when positive)",
}


class TeCo(CalibratedInputDetector):
    """TeCo (Liu et al., CVPR 2023): deviation of corruption transition points; see the
    module."""

    name: ClassVar[str] = "teco"

    def __init__(self, *, corruptions: tuple[str, ...] = cor.IMPLEMENTED_PAPER,
                 max_severity: int = 5, statistic: str = "any",
                 pool_fraction: float = 0.2, early_exit: bool = True, frr: float = 0.01,
                 threshold_method: str = "conservative", holdout_fraction: float = 0.2,
                 max_samples: int | None = 2000, batch_size: int = 4096, seed: int = 0,
                 device: str | None = None) -> None:
        self.corruptions = corruptions
        self.max_severity = max_severity
        self.statistic = statistic
        self.pool_fraction = pool_fraction
        self.early_exit = early_exit
        self.frr = frr
        self.threshold_method = threshold_method
        self.holdout_fraction = holdout_fraction
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    @classmethod
    def paper(cls, **overrides: Any) -> TeCo:
        """The paper's statistic: the deviation of the transition points alone."""
        return cls(**({"statistic": "deviation"} | overrides))

    def _validate(self) -> None:
        self._validate_common()
        c = self.corruptions
        if (isinstance(c, str) or not isinstance(c, (tuple, list)) or len(set(c)) < 2
                or len(set(c)) != len(c) or any(n not in cor.CORRUPTIONS for n in c)):
            raise bad_param("corruptions", "a list of at least two distinct names among "
                            + ", ".join(cor.CORRUPTIONS), c)
        check_int("max_severity", self.max_severity, 1)
        if self.max_severity > cor.SEVERITIES:
            raise bad_param("max_severity", f"an integer in 1..{cor.SEVERITIES}",
                            self.max_severity)
        if self.statistic not in STATISTICS:
            raise bad_param("statistic", STATISTICS, self.statistic)
        pf = self.pool_fraction
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0.0 < pf < 0.9:
            raise bad_param("pool_fraction", "a float in (0, 0.9)", pf)
        self._pool_fraction = float(pf) if self.statistic == "profile" else 0.0
        if not isinstance(self.early_exit, (bool, np.bool_)):
            raise bad_param("early_exit", "true or false", self.early_exit)
        self.forwards_per_input = len(c) * int(self.max_severity)

    # -- scoring -------------------------------------------------------------------
    def _transitions(self, x: torch.Tensor
                     ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """Transition points ``B×K``, plain predictions and model evaluations per input
        (counting the plain one) for inputs on the device."""
        b, names, s_max = len(x), tuple(self.corruptions), int(self.max_severity)
        preds = logits_of(self._runner, x).argmax(1)
        seeds = input_seeds(x, self.seed)
        changed = np.zeros((b, len(names), s_max), dtype=bool)
        open_ = np.ones((b, len(names)), dtype=bool)
        forwards = np.ones(b)
        for sev in range(1, s_max + 1):
            parts, owners = [], []
            for k, name in enumerate(names):
                rows = np.flatnonzero(open_[:, k]) if self.early_exit else np.arange(b)
                if rows.size:
                    idx = torch.from_numpy(rows).to(x.device)
                    parts.append(cor.corrupt(x[idx], name, sev, seeds[rows]))
                    owners.append((k, rows))
            if not parts:
                break
            p = logits_of(self._runner, torch.cat(parts)).argmax(1)
            start = 0
            for k, rows in owners:
                got = p[start:start + rows.size]
                start += rows.size
                diff = (got != preds[torch.from_numpy(rows).to(x.device)]).cpu().numpy()
                changed[rows, k, sev - 1] = diff
                forwards[rows] += 1
                if self.early_exit:
                    open_[rows[diff], k] = False
        return tr.transition_points(changed), preds, forwards

    def _points(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Transition points and predictions of inputs ``x`` (any device), chunked."""
        points = np.empty((len(x), len(self.corruptions)), dtype=np.int64)
        preds = np.empty(len(x), dtype=np.int64)
        with self._borrowed(), torch.inference_mode():
            for sl in self._chunks(len(x)):
                pts, p, _ = self._transitions(x[sl].to(self.device_))
                points[sl], preds[sl] = pts, p.cpu().numpy()
        return points, preds

    def _prepare(self, pool: torch.Tensor, fit: torch.Tensor) -> None:
        self.kind_thresholds_ = np.zeros(len(ANY_KINDS))
        self.kind_scales_ = np.ones(len(ANY_KINDS))
        if self.statistic == "profile":
            self.profile_mean_, self.profile_scale_ = tr.profile_fit(self._points(pool)[0])

    def _fit_scores(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.statistic not in ("any", "tail"):
            return super()._fit_scores(x)
        points, preds = self._points(x)
        self.tails_ = tr.tail_fit(points, int(self.max_severity))
        if self.statistic == "tail":
            return tr.tail_scores(points, self.tails_), preds
        per_kind = self._kind_values(points)
        self.kind_thresholds_, self.kind_scales_, _ = any_kind_thresholds(
            per_kind, self.frr, self.threshold_method)
        return margins(per_kind, self.kind_thresholds_, self.kind_scales_), preds

    def _threshold(self, fit_scores: np.ndarray) -> float:
        return 0.0 if self.statistic == "any" else super()._threshold(fit_scores)

    def _kind_values(self, points: np.ndarray) -> np.ndarray:
        return np.stack([tr.deviation_scores(points), tr.tail_scores(points, self.tails_)],
                        axis=1)

    def _scores_of(self, points: np.ndarray) -> np.ndarray:
        if self.statistic == "profile":
            return tr.profile_scores(points, self.profile_mean_, self.profile_scale_)
        if self.statistic == "robustness":
            return tr.robustness_scores(points)
        if self.statistic == "tail":
            return tr.tail_scores(points, self.tails_)
        if self.statistic == "any":
            return margins(self._kind_values(points), self.kind_thresholds_,
                           self.kind_scales_)
        return tr.deviation_scores(points)

    def _score_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points, preds, _ = self._transitions(x)
        return torch.from_numpy(self._scores_of(points)).to(x.device), preds

    def _decide_chunk(self, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        points, preds, forwards = self._transitions(x)
        dev = x.device
        return (torch.from_numpy(self._scores_of(points)).to(dev), preds, None,
                torch.from_numpy(forwards).to(dev))

    def transition_points(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Transition points ``B×len(corruptions)`` of inputs ``x`` (1..max_severity, or
        ``max_severity + 1`` where the prediction never changed)."""
        self._check_fitted()
        return self._points(check_inputs(x, self.input_shape_))[0]

    def calibration_info(self) -> dict[str, Any]:
        return super().calibration_info() | {
            "corruptions": list(self.corruptions), "max_severity": int(self.max_severity),
            "early_exit": bool(self.early_exit), "statistic": self.statistic,
            "profile_mean": self.profile_mean_.tolist() if self.statistic == "profile"
            else None,
            "kind_thresholds": dict(zip(ANY_KINDS, map(float, self.kind_thresholds_),
                                        strict=True)) if self.statistic == "any" else None,
            "score": SCORE_TEXT[self.statistic],
        }
