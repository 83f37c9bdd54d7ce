"""The shared machinery of calibrated input-level detectors (STRIP and its kin).

Input checks (:func:`check_inputs`), running a borrowed model on a device
(:func:`logits_of`, :func:`model_device`), the calibration split of the clean data, the
threshold at a requested false-rejection rate and its measurement on held-out clean
inputs, chunked scoring, and the one decision path that ``filter``, ``score`` and the
runtime :class:`~trojanscan.guard.Guard` all use (:meth:`CalibratedInputDetector.decide`),
so that an input gets the same answer whichever way it is asked.
"""

from __future__ import annotations

import copy
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..classifier import check_logits
from ..dataset import ImageDataset
from ..exceptions import DataError, ModelError, NotFittedError, bad_param
from ..maths import runtime as rt
from ..progress import progress
from ..utils import pick_device
from .base import FilterResult, InputDetector, borrow_model

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


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_param(name, f"an integer >= {minimum}", value)
    return int(value)


@dataclass(frozen=True)
class Decisions:
    """Per-input answers of a calibrated input detector: suspicion scores (higher = more
    suspicious), predicted classes, flags and the model evaluations each input cost.
    ``flagged[i]`` is ``scores[i] > threshold`` (or a NaN score) for every detector."""

    scores: np.ndarray
    predictions: np.ndarray
    flagged: np.ndarray
    forwards: np.ndarray

    @property
    def mean_forwards(self) -> float:
        return float(self.forwards.mean()) if len(self.forwards) else 0.0


class CalibratedInputDetector(InputDetector):
    """Shared machinery of STRIP and its kin: device handling, the calibration split,
    the threshold at a chosen FRR and its measurement on held-out clean inputs,
    chunked scoring, and :meth:`decide` — the one decision path of ``filter``, ``score``
    and the runtime guard.

    Subclasses set ``forwards_per_input`` and implement :meth:`_prepare` (anything
    learned from the clean data besides the threshold) and :meth:`_score_chunk`
    (scores and predictions of one chunk of inputs already on the device, with every
    evaluation the method allows). A subclass that can stop early on clear inputs
    overrides :meth:`_decide_chunk`; its scores must still satisfy
    ``flagged == score > threshold``.
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
            check_int("max_samples", self.max_samples, 4)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)

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
        fit_scores, fit_preds = self._fit_scores(x[torch.from_numpy(fit)])
        self._after_fit_scores(fit_scores, fit_preds)
        fit_scores = self._finalise(fit_scores, fit_preds)
        self.fit_scores_ = fit_scores
        self.threshold_ = self._threshold(fit_scores)
        self.frr_fit_ = rt.rejection_rate(fit_scores, self.threshold_)
        self.calibration_warning_: str | None = None
        if (self.threshold_method == "conservative"
                and rt.conservative_rank(len(fit_scores), self.frr) is None):
            self.calibration_warning_ = (
                f"{len(fit_scores)} clean scores are too few for a threshold whose FRR is at "
                f"most {self.frr:g} with {rt.CONSERVATIVE_CONFIDENCE:.0%} confidence: the "
                "threshold is their maximum; calibrate on more clean inputs")
        self._after_threshold(fit_scores)
        if len(hold):
            hold_dec = self._decide(x[torch.from_numpy(hold)], "measuring FRR")
            flagged = hold_dec.flagged
            self.holdout_scores_ = hold_dec.scores
            self.holdout_forwards_: float | None = hold_dec.mean_forwards
            self.frr_measured_: float | None = float(flagged.mean())
            self.frr_upper_: float | None = rt.clopper_pearson_upper(int(flagged.sum()),
                                                                      len(flagged))
        else:
            self.holdout_scores_ = np.empty(0)
            self.holdout_forwards_ = None
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
            raise NotFittedError(f"{type(self).__name__} is not calibrated: call fit(model, "
                                 "clean) first")

    # -- hooks for subclasses ----------------------------------------------------
    def _prepare(self, pool: torch.Tensor, fit: torch.Tensor) -> None:
        """Learn what the method needs from the clean pool / fit inputs (default: nothing)."""

    def _fit_scores(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw scores and predictions of the clean fit inputs (default: every evaluation)."""
        return self._score_and_predict(x, "calibrating")

    def _threshold(self, fit_scores: np.ndarray) -> float:
        """The threshold at ``frr`` from the clean fit scores (``threshold_method``)."""
        return rt.fit_threshold(fit_scores, self.frr, self.threshold_method)

    def _after_fit_scores(self, scores: np.ndarray, preds: np.ndarray) -> None:
        """Learn from the raw clean fit scores before thresholding (default: nothing)."""

    def _finalise(self, scores: np.ndarray, preds: np.ndarray) -> np.ndarray:
        """Turn raw scores into final ones (default: unchanged)."""
        return scores

    def _after_threshold(self, fit_scores: np.ndarray) -> None:
        """Learn what depends on the threshold (default: nothing)."""

    def _decide_chunk(self, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Raw scores, predictions, flags (``None``: threshold the final scores) and
        model evaluations per input, for inputs on the device (default: every
        evaluation, :meth:`_score_chunk`)."""
        s, p = self._score_chunk(x)
        # every evaluation, plus the plain one for the prediction
        return s, p, None, torch.full((len(x),), float(self.forwards_per_input + 1))

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

    def _decide(self, x: torch.Tensor, what: str = "scoring") -> Decisions:
        n = len(x)
        scores = np.empty(n, dtype=np.float64)
        preds = np.empty(n, dtype=np.int64)
        flags = np.zeros(n, dtype=bool)
        forwards = np.empty(n, dtype=np.float64)
        own_flags = np.zeros(n, dtype=bool)
        if n:
            chunks = list(self._chunks(n))
            with self._borrowed(), torch.inference_mode(), \
                    progress(f"{self.name}: {what}", len(chunks)) as bar:
                for sl in chunks:
                    s, p, f, k = self._decide_chunk(x[sl].to(self.device_, non_blocking=True))
                    scores[sl] = s.detach().cpu().numpy()
                    preds[sl] = p.detach().cpu().numpy()
                    forwards[sl] = k.detach().cpu().numpy()
                    if f is not None:
                        flags[sl] = f.detach().cpu().numpy()
                        own_flags[sl] = True
                    bar.advance()
        scores = self._finalise(scores, preds)
        flagged = np.where(own_flags, flags, rt.flag(scores, self.threshold_)) if n else flags
        return Decisions(scores, preds, flagged.astype(bool), forwards)

    def decide(self, x: torch.Tensor | np.ndarray) -> Decisions:
        """Scores, predictions, flags and evaluations per input of ``x`` — the decision
        that ``filter`` reports and the guard serves."""
        self._check_fitted()
        return self._decide(check_inputs(x, self.input_shape_))

    def score_and_predict(self, x: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Suspicion scores (higher = more suspicious) and predicted classes of ``x``."""
        d = self.decide(x)
        return d.scores, d.predictions

    def score(self, x: torch.Tensor) -> np.ndarray:
        """Per-input suspicion scores (higher = more suspicious)."""
        return self.score_and_predict(x)[0]

    def filter(self, x: torch.Tensor) -> FilterResult:
        """Decide for every input of ``x`` whether it carries a trigger."""
        t0 = time.perf_counter()
        d = self.decide(x)
        scores, preds, flagged = d.scores, d.predictions, d.flagged
        return FilterResult(
            detector=self.name,
            verdict="triggered" if flagged.any() else "clean",
            scores=scores, flagged=flagged, predictions=preds,
            threshold=float(self.threshold_), frr=float(self.frr),
            seconds=time.perf_counter() - t0, seed=self.seed, params=self.get_params(),
            evidence=self.calibration_info() | {
                "num_inputs": len(scores),
                "mean_forwards_per_input": d.mean_forwards,
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
            "holdout_mean_forwards_per_input": self.holdout_forwards_,
            "calibration_seconds": round(self.fit_seconds_, 3),
        }


