"""SCALE-UP — Guo, Li, Chen, Guo, Sun & Liu, "SCALE-UP: An Efficient Black-box Input-level
Backdoor Detection via Analyzing Scaled Prediction Consistency", ICLR 2023.

Needs: the model (predicted labels suffice for ``consistency="labels"``) and clean
inputs without labels for the threshold. The cheap sibling of STRIP: one forward pass
of the input plus one per scale (5 with the paper's scale set) instead of 100.

Each input's pixels are multiplied by every factor in ``scales`` (paper and BackdoorBox:
3, 5, 7, 9, 11) and clipped to [0, 1]. Backdoor triggers keep their grip on amplified
images, so a triggered input's class stays the same across scales while clean inputs'
classes drift ("scaled prediction consistency", SPC).

``consistency="labels"`` is the paper's SPC: the share of scaled copies predicted as the
input's own class; it takes only ``len(scales) + 1`` values, so a threshold at a small
FRR often cannot separate the many clean inputs that tie at 1.0 from triggered ones.
``consistency="soft"`` (default) is our refinement: the mean softmax probability of the
input's own class over the scaled copies — same passes, a continuous score.

``normalize="class"`` (default) standardises the score with the mean and standard
deviation of clean scores *of the same predicted class* (the paper's data-limited
setting, as we read it: benign samples of each class summarise the SPC they normally
reach; classes with fewer than 5 clean samples use the global statistics); BackdoorBox
standardises with one global mean/std, which leaves the ranking unchanged (``"none"``).
The threshold at ``frr`` is then set and its FRR measured exactly as for STRIP (fit and
holdout parts of the clean data, ``threshold_method`` normal, empirical or conservative).

Known to fail: on images that saturate when amplified (dark backgrounds with bright
objects, e.g. Fashion-MNIST silhouettes stay recognisable at any scale) many clean
inputs are consistent too; and triggers that amplification destroys (dark or low-contrast
patterns, blends) lose their consistency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from ..maths import runtime as rt
from .strip import CalibratedInputDetector, logits_of

CONSISTENCIES = ("soft", "labels")
NORMALIZATIONS = ("class", "none")


class ScaleUp(CalibratedInputDetector):
    """SCALE-UP (Guo et al., ICLR 2023): prediction consistency under pixel amplification."""

    name: ClassVar[str] = "scale_up"

    def __init__(self, *, scales: Sequence[float] = (3, 5, 7, 9, 11),
                 consistency: str = "soft", normalize: str = "class", frr: float = 0.01,
                 threshold_method: str = "normal", holdout_fraction: float = 0.2,
                 max_samples: int | None = 5000, batch_size: int = 4096, seed: int = 0,
                 device: str | None = None) -> None:
        self.scales = scales
        self.consistency = consistency
        self.normalize = normalize
        self.frr = frr
        self.threshold_method = threshold_method
        self.holdout_fraction = holdout_fraction
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _validate(self) -> None:
        self._validate_common()
        try:
            scales = tuple(float(s) for s in self.scales)
        except (TypeError, ValueError):
            raise bad_param("scales", "a non-empty sequence of numbers > 0", self.scales) from None
        if not scales or not all(np.isfinite(s) and s > 0 for s in scales):
            raise bad_param("scales", "a non-empty sequence of numbers > 0", self.scales)
        if self.consistency not in CONSISTENCIES:
            raise bad_param("consistency", CONSISTENCIES, self.consistency)
        if self.normalize not in NORMALIZATIONS:
            raise bad_param("normalize", NORMALIZATIONS, self.normalize)
        self._scales = scales
        self.forwards_per_input = 1 + len(scales)

    def _score_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = x.shape[0], len(self._scales)
        batch = torch.cat([x.unsqueeze(1), rt.scale_inputs(x, self._scales)], dim=1)
        logits = logits_of(self._runner, batch.reshape(b * (1 + s), *x.shape[1:]))
        logits = logits.view(b, 1 + s, -1)
        preds = logits[:, 0].argmax(1)
        if self.consistency == "labels":
            score = rt.scale_consistency(logits[:, 1:].argmax(2), preds)
        else:
            score = rt.soft_scale_consistency(logits[:, 1:], preds)
        return score, preds

    def _after_fit_scores(self, scores: np.ndarray, preds: np.ndarray) -> None:
        self.class_stats_, self.global_stats_ = rt.class_statistics(scores, preds)

    def _finalise(self, scores: np.ndarray, preds: np.ndarray) -> np.ndarray:
        if self.normalize == "none":
            return scores
        return rt.class_standardise(scores, preds, self.class_stats_, self.global_stats_)

    def calibration_info(self) -> dict[str, Any]:
        return super().calibration_info() | {
            "scales": list(self._scales), "consistency": self.consistency,
            "normalize": self.normalize,
            "score": ("scaled prediction consistency"
                      + (" (soft)" if self.consistency == "soft" else "")
                      + (", standardised per predicted class" if self.normalize == "class"
                         else "")),
        }
