"""STRIP — Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan Attacks
on Deep Neural Networks", ACSAC 2019.

Needs: the model and clean inputs (no labels, no training data). Works on any model
that maps ``N×C×H×W`` inputs in [0, 1] to logits.

Each input is superimposed with ``n_overlays`` (paper: 100) clean images drawn from a
held-out overlay pool; the score is the mean, over the overlays, of the Shannon entropy
(bits) of each perturbed prediction *over the classes* (softmax first). A trigger that
dominates the prediction survives the superimposition, so triggered inputs keep low
entropy; the reported score is the **negative entropy** (higher = more suspicious).

Superimposition (``blend``): ``"sum"`` adds the two images pixel by pixel, unclipped —
literally what the reference code does (``cv2.addWeighted(bg, 1, overlay, 1, 0)`` on its
float, mean/std-normalised CIFAR images), so values reach 2; ``"sum_clip"`` (default) is
the same sum clipped to [0, 1] — what ``cv2.addWeighted`` does on ``uint8`` images, and
the faithful reading for models whose inputs live in [0, 1] as in our contract (the
unclipped sum feeds them values they never saw: on our Fashion-MNIST BadNets model it
let 25% of triggered inputs through at 1% FRR versus 2–3% clipped, see
docs/benchmarks/runtime.md); ``"max"`` takes the pixel-wise maximum (our addition, an
occlusion-like superimposition that never saturates beyond the brighter image; best of
the four on the Fashion-MNIST BadNets model); ``"average"`` takes their mean, staying in
[0, 1] (it weakens a patch trigger to half its intensity, but suits whole-image blends).

Summary over the overlays (``statistic``): ``"mean"`` entropy as in the paper, or the
``"median"`` (our addition): a triggered input whose trigger is covered and erased by a
few bright overlays (a white corner patch under a bag or a boot) gets a few high-entropy
overlays that pull its mean up, but not its median. Measured *worse* than the mean on our
Fashion-MNIST BadNets model (FAR 4.6% vs 1.9% at FRR ≤ 1%, docs/benchmarks/runtime.md):
clean inputs have many confident overlays too, and the mean's tail separates them.
``"consistency"`` (our addition, :func:`~trojanscan.maths.runtime.consistency`): the mean
log-probability the overlays leave on the input's *own* predicted class — entropy rewards any
confident prediction, including the overlay's class, while a trigger keeps the prediction
on its target. ``"tail"`` (our addition): the mean of the highest 10% of the overlays'
entropies — a clean input is confident on most overlays as well, and what sets it apart
is the few overlays that leave the model unsure, which the mean dilutes among the
confident ones; on the Fashion-MNIST BadNets and Blend models it cut the best achievable
FAR at a 1% FRR from 0.65–0.90% (mean) to 0.05–0.25%, but on the tiny digits model of the tests (32
overlays, so a tail of 3) it was worse than the mean (docs/benchmarks/runtime.md).
:meth:`Strip.entropy` is for the entropy statistics (mean, median, tail) only.

Calibration (``fit``): the clean data are split with ``seed`` into an overlay pool
(``pool_fraction``), a fit part and a holdout part (``holdout_fraction``). The threshold
is set on the fit part at the requested false-rejection rate ``frr`` — by the paper's
rule (``threshold_method="normal"``: fit a normal distribution to the clean entropies and
take its FRR quantile) or empirically (``"empirical"``: the clean scores' quantile) —
and the FRR actually obtained is measured on the holdout part (``frr_measured_``, with a
one-sided 95% Clopper–Pearson upper bound ``frr_upper_``). Overlays are never drawn from
the inputs they perturb during calibration. ``"conservative"`` (beyond the paper,
:func:`~trojanscan.maths.runtime.conservative_threshold`) picks the order statistic whose
true FRR is at most ``frr`` with 90% confidence: the empirical quantile meets the target
only on average, so the FRR measured on new clean inputs exceeds it about half of the
time (by up to 0.55 points at 1% with 1,200 fit scores in our benchmarks).

Vectorised: the ``n_overlays`` perturbed copies of a chunk of inputs go through the model
as one batch of about ``batch_size`` images. Per-input scores do not depend on which
other inputs share the batch: with ``overlay_draw="per_input"`` (default) each input's
overlays are drawn (without replacement when the pool is large enough) by a generator
seeded from ``seed`` and a hash of the input's own pixels — a fresh random draw per input,
as in the paper, yet reproducible and independent of batch size and order; with
``"fixed"`` every input uses the same ``n_overlays`` overlays drawn once from ``seed``.

Known to fail (the paper says so, and our benchmarks measure it): triggers that do not
dominate a superimposed image — source-specific (partial) backdoors, whose trigger only
works on some classes, and input-specific or faint whole-image triggers (WaNet, SIG,
low-alpha blends) — keep a clean-like entropy and pass.
"""

from __future__ import annotations

import copy
import hashlib
import time
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..classifier import check_logits
from ..dataset import ImageDataset
from ..exceptions import DataError, ModelError, ParameterError, bad_param
from ..maths import runtime as rt
from ..progress import progress
from ..utils import pick_device
from .base import FilterResult, InputDetector, borrow_model

OVERLAY_DRAWS = ("per_input", "fixed")
#: inputs may exceed [0, 1] by this much (rounding in clients) before they are refused
RANGE_TOLERANCE = 1e-4


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU when it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as an ``N×K`` float tensor (``K ≥ 2``), or a ModelError saying what
    went wrong."""
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelError(f"the model failed on a batch of shape {tuple(x.shape)}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    check_logits(out, int(x.shape[0]), what=f"a batch of shape {tuple(x.shape)}",
                 finite=False)
    return out.float()


def check_inputs(x: Any, input_shape: tuple[int, int, int] | None, who: str = "inputs"
                 ) -> torch.Tensor:
    """``x`` as a float32 CPU-or-device tensor ``N×C×H×W`` in [0, 1], or a DataError."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"{who}: expected real numbers, got an array of dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not isinstance(x, torch.Tensor) or x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"{who}: expected a float tensor N×C×H×W, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 4:
        want = "N×" + "×".join(map(str, input_shape)) if input_shape else "N×C×H×W"
        raise DataError(f"{who}: expected shape {want}, got {tuple(x.shape)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{who}: expected shape N×{'×'.join(map(str, input_shape))}, got "
                        f"{tuple(x.shape)}")
    x = x.float()
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"{who}: contains NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise DataError(f"{who}: values must lie in [0, 1], got min {lo:.4g} max {hi:.4g}")
        if lo < 0 or hi > 1:
            x = x.clamp(0.0, 1.0)
    return x


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_param(name, f"an integer >= {minimum}", value)
    return int(value)


class CalibratedInputDetector(InputDetector):
    """Shared machinery of STRIP and SCALE-UP: device handling, the calibration split,
    the threshold at a chosen FRR and its measurement on held-out clean inputs,
    chunked scoring and ``filter``.

    Subclasses set ``forwards_per_input`` and implement :meth:`_prepare` (anything
    learned from the clean data besides the threshold) and :meth:`_score_chunk`
    (scores and predictions of one chunk of inputs already on the device).
    """

    name: ClassVar[str]
    #: model evaluations per scored input (for chunking and throughput estimates)
    forwards_per_input: int = 1
    #: share of the clean data kept aside for something else than the threshold
    _pool_fraction: float = 0.0

    frr: float
    threshold_method: str
    holdout_fraction: float
    max_samples: int | None
    batch_size: int
    seed: int
    device: str | None

    # -- validation --------------------------------------------------------------
    def _validate_common(self) -> None:
        rt.check_frr(self.frr)
        if self.threshold_method not in rt.THRESHOLD_METHODS:
            raise bad_param("threshold_method", rt.THRESHOLD_METHODS, self.threshold_method)
        hf = self.holdout_fraction
        if isinstance(hf, bool) or not isinstance(hf, (int, float)) or not 0.0 <= hf < 0.9:
            raise bad_param("holdout_fraction", "a float in [0, 0.9)", hf)
        if self.max_samples is not None:
            _check_int("max_samples", self.max_samples, 4)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)

    # -- fitting -----------------------------------------------------------------
    def fit(self, model: nn.Module, clean: ImageDataset) -> CalibratedInputDetector:
        """Calibrate on clean inputs (labels not needed); returns ``self``."""
        t0 = time.perf_counter()
        self._validate()
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(clean, ImageDataset):
            raise DataError(f"clean: expected an ImageDataset, got {type(clean).__name__}")
        x = check_inputs(clean.x, None, f"{clean.source}")
        c, h, w = (int(s) for s in x.shape[1:])
        self.input_shape_: tuple[int, int, int] = (c, h, w)
        n_all = len(x)
        if self.max_samples is not None and n_all > self.max_samples:
            keep = np.sort(np.random.default_rng(self.seed).permutation(n_all)[:self.max_samples])
            x = x[torch.from_numpy(keep)]
        pool, fit, hold = rt.calibration_split(len(x), pool_fraction=self._pool_fraction,
                                               holdout_fraction=self.holdout_fraction,
                                               seed=self.seed + 1)
        self._attach(model)
        self._prepare(x[torch.from_numpy(pool)], x[torch.from_numpy(fit)])
        fit_scores, fit_preds = self._score_and_predict(x[torch.from_numpy(fit)], "calibrating")
        self._after_fit_scores(fit_scores, fit_preds)
        fit_scores = self._finalise(fit_scores, fit_preds)
        self.fit_scores_ = fit_scores
        self.threshold_ = rt.fit_threshold(fit_scores, self.frr, self.threshold_method)
        self.frr_fit_ = rt.rejection_rate(fit_scores, self.threshold_)
        self.calibration_warning_: str | None = None
        if (self.threshold_method == "conservative"
                and rt.conservative_rank(len(fit_scores), self.frr) is None):
            self.calibration_warning_ = (
                f"{len(fit_scores)} clean scores are too few for a threshold whose FRR is at "
                f"most {self.frr:g} with {rt.CONSERVATIVE_CONFIDENCE:.0%} confidence: the "
                "threshold is their maximum; calibrate on more clean inputs")
        if len(hold):
            hold_scores, hold_preds = self._score_and_predict(x[torch.from_numpy(hold)],
                                                              "measuring FRR")
            hold_scores = self._finalise(hold_scores, hold_preds)
            flagged = rt.flag(hold_scores, self.threshold_)
            self.holdout_scores_ = hold_scores
            self.frr_measured_: float | None = float(flagged.mean())
            self.frr_upper_: float | None = rt.clopper_pearson_upper(int(flagged.sum()),
                                                                      len(flagged))
        else:
            self.holdout_scores_ = np.empty(0)
            self.frr_measured_ = None
            self.frr_upper_ = None
        self.n_clean_ = n_all
        self.n_pool_, self.n_fit_, self.n_holdout_ = len(pool), len(fit), len(hold)
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def _validate(self) -> None:
        self._validate_common()

    def _attach(self, model: nn.Module) -> None:
        """Keep the user's model; run on ``device`` (a private copy if it lives elsewhere)."""
        self.model_ = model
        dev = pick_device(self.device)
        self.device_ = dev
        if model_device(model) != dev:
            try:
                runner = copy.deepcopy(model).to(dev).eval()
            except Exception as exc:
                raise ModelError(f"cannot run the model on {dev}: {exc}") from exc
            for p in runner.parameters():
                p.requires_grad_(False)
            self._runner: nn.Module = runner
            self._private = True
        else:
            self._runner = model
            self._private = False

    def _borrowed(self) -> Any:
        import contextlib

        if self._private:
            return contextlib.nullcontext(self._runner)
        return borrow_model(self._runner)

    def _check_fitted(self) -> None:
        if not hasattr(self, "threshold_"):
            raise ParameterError(f"{type(self).__name__} is not calibrated: call fit(model, "
                                 "clean) first")

    # -- hooks for subclasses ----------------------------------------------------
    def _prepare(self, pool: torch.Tensor, fit: torch.Tensor) -> None:
        """Learn what the method needs from the clean pool / fit inputs (default: nothing)."""

    def _after_fit_scores(self, scores: np.ndarray, preds: np.ndarray) -> None:
        """Learn from the raw clean fit scores before thresholding (default: nothing)."""

    def _finalise(self, scores: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Turn raw scores into final ones (default: unchanged)."""
        return scores

    @abstractmethod
    def _score_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores (float64, ``B``) and predictions (``B``) of inputs on the device."""

    # -- scoring -----------------------------------------------------------------
    def _chunks(self, n: int) -> Iterator[slice]:
        step = max(1, self.batch_size // max(1, self.forwards_per_input))
        for start in range(0, n, step):
            yield slice(start, min(start + step, n))

    def _score_and_predict(self, x: torch.Tensor, what: str = "scoring"
                           ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.empty(len(x), dtype=np.float64)
        preds = np.empty(len(x), dtype=np.int64)
        if len(x) == 0:
            return scores, preds
        chunks = list(self._chunks(len(x)))
        with self._borrowed(), torch.inference_mode(), \
                progress(f"{self.name}: {what}", len(chunks)) as bar:
            for sl in chunks:
                s, p = self._score_chunk(x[sl].to(self.device_, non_blocking=True))
                scores[sl] = s.detach().cpu().numpy()
                preds[sl] = p.detach().cpu().numpy()
                bar.advance()
        return scores, preds

    def score_and_predict(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Suspicion scores (higher = more suspicious) and predicted classes of ``x``."""
        self._check_fitted()
        x = check_inputs(x, self.input_shape_)
        scores, preds = self._score_and_predict(x)
        return self._finalise(scores, preds), preds

    def score(self, x: torch.Tensor) -> np.ndarray:
        """Per-input suspicion scores (higher = more suspicious)."""
        return self.score_and_predict(x)[0]

    def filter(self, x: torch.Tensor) -> FilterResult:
        """Score ``x`` and flag inputs above the calibrated threshold."""
        t0 = time.perf_counter()
        scores, preds = self.score_and_predict(x)
        flagged = rt.flag(scores, self.threshold_)
        return FilterResult(
            detector=self.name,
            verdict="triggered" if flagged.any() else "clean",
            scores=scores, flagged=flagged, predictions=preds,
            threshold=float(self.threshold_), frr=float(self.frr),
            seconds=time.perf_counter() - t0, seed=self.seed, params=self.get_params(),
            evidence=self.calibration_info() | {
                "num_inputs": len(scores),
                "num_flagged": int(flagged.sum()),
                "flagged_indices": np.flatnonzero(flagged).tolist(),
            },
        )

    def calibration_info(self) -> dict[str, Any]:
        """What the calibration measured (for reports and ``/healthz``)."""
        self._check_fitted()
        return {
            "frr_target": float(self.frr),
            "frr_measured": self.frr_measured_,
            "frr_measured_upper95": self.frr_upper_,
            "frr_fit": self.frr_fit_,
            "threshold": float(self.threshold_),
            "threshold_method": self.threshold_method,
            "calibration_warning": self.calibration_warning_,
            "num_clean": self.n_clean_,
            "num_overlay_pool": self.n_pool_,
            "num_fit": self.n_fit_,
            "num_holdout": self.n_holdout_,
            "clean_score_mean": float(np.mean(self.fit_scores_)),
            "clean_score_std": float(np.std(self.fit_scores_)),
            "forwards_per_input": self.forwards_per_input,
            "calibration_seconds": round(self.fit_seconds_, 3),
        }


class Strip(CalibratedInputDetector):
    """STRIP (Gao et al., ACSAC 2019): entropy of superimposed predictions; see the module."""

    name: ClassVar[str] = "strip"

    def __init__(self, *, n_overlays: int = 100, blend: str = "sum_clip", frr: float = 0.01,
                 threshold_method: str = "normal", pool_fraction: float = 0.2,
                 holdout_fraction: float = 0.2, max_samples: int | None = 2000,
                 overlay_draw: str = "per_input", batch_size: int = 4096, seed: int = 0,
                 device: str | None = None, statistic: str = "mean") -> None:
        self.n_overlays = n_overlays
        self.statistic = statistic
        self.blend = blend
        self.frr = frr
        self.threshold_method = threshold_method
        self.pool_fraction = pool_fraction
        self.holdout_fraction = holdout_fraction
        self.max_samples = max_samples
        self.overlay_draw = overlay_draw
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _validate(self) -> None:
        self._validate_common()
        _check_int("n_overlays", self.n_overlays, 1)
        if self.blend not in rt.BLENDS:
            raise bad_param("blend", rt.BLENDS, self.blend)
        if self.statistic not in rt.STATISTICS:
            raise bad_param("statistic", rt.STATISTICS, self.statistic)
        if self.overlay_draw not in OVERLAY_DRAWS:
            raise bad_param("overlay_draw", OVERLAY_DRAWS, self.overlay_draw)
        pf = self.pool_fraction
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0.0 < pf < 0.9:
            raise bad_param("pool_fraction", "a float in (0, 0.9)", pf)
        self._pool_fraction = float(pf)
        self.forwards_per_input = int(self.n_overlays)

    def _prepare(self, pool: torch.Tensor, fit: torch.Tensor) -> None:
        self.pool_ = pool.to(self.device_)
        n_pool = len(pool)
        self._replace = n_pool < self.n_overlays
        rng = np.random.default_rng([self.seed, 0x5712])
        self._fixed_idx = rng.choice(n_pool, self.n_overlays, replace=self._replace)

    def overlay_indices(self, x: torch.Tensor) -> np.ndarray:
        """Indices into the overlay pool, ``B×n_overlays``, for inputs ``x`` (see module)."""
        b = len(x)
        if self.overlay_draw == "fixed":
            return np.broadcast_to(self._fixed_idx, (b, self.n_overlays))
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        n_pool = len(self.pool_)
        out = np.empty((b, self.n_overlays), dtype=np.int64)
        for i in range(b):
            digest = hashlib.blake2b(arr[i].tobytes(), digest_size=8).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
            out[i] = rng.choice(n_pool, self.n_overlays, replace=self._replace)
        return out

    def _score_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        idx = torch.from_numpy(np.ascontiguousarray(self.overlay_indices(x))).to(x.device)
        perturbed = rt.superimpose(x, self.pool_[idx], self.blend)  # B×N×C×H×W
        logits = logits_of(self._runner, perturbed.reshape(b * self.n_overlays, *x.shape[1:]))
        preds = logits_of(self._runner, x).argmax(1)
        scores = rt.strip_scores(logits.view(b, self.n_overlays, -1), self.statistic,
                                 preds).double()
        return scores, preds

    def entropy(self, x: torch.Tensor) -> np.ndarray:
        """The paper's quantity: mean (or median, or tail) entropy (bits) per input
        (``= -score``)."""
        if self.statistic not in rt.ENTROPY_STATISTICS:
            raise bad_param("statistic", f"one of {rt.ENTROPY_STATISTICS} for entropy()",
                            self.statistic)
        return -self.score(x)

    def calibration_info(self) -> dict[str, Any]:
        return super().calibration_info() | {
            "n_overlays": self.n_overlays, "blend": self.blend,
            "overlay_draw": self.overlay_draw, "statistic": self.statistic,
            "score": ("mean log-probability of the input's own prediction over the overlays"
                      if self.statistic == "consistency" else
                      f"negative {self.statistic} entropy (bits) over the overlays"),
        }
