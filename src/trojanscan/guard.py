"""A model behind a runtime backdoor filter: ``Guard(model, detector).predict(x)``.

The :class:`Guard` wraps a model and a calibrated input-level detector (STRIP, see
:mod:`trojanscan.detectors`); ``predict`` returns the model's predictions
with a flag and a suspicion score per input, in one pass (the detector's forward passes
include the plain one). :meth:`Guard.calibrate` builds both from a model and clean data.

:class:`MicroBatcher` is the serving helper: concurrent callers ``await submit(x)``; one
worker thread concatenates whatever is queued (up to ``max_batch`` inputs, waiting at
most ``max_wait_ms`` for more after the first) and runs a single ``predict``. Because
the detectors' per-input scores do not depend on the other inputs of a batch, batching
never changes an answer. No web framework is imported here (see
:mod:`trojanscan.serve` for the HTTP service).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .dataset import ImageDataset
from .detectors import create
from .detectors.base import InputDetector
from .exceptions import DataError, ParameterError, bad_param

RUNTIME_DETECTORS = ("strip", "teco")


@dataclass(frozen=True)
class GuardResult:
    """Predictions of the guarded model, one flag (triggered?) and one score per input."""

    predictions: np.ndarray
    flagged: np.ndarray
    scores: np.ndarray
    threshold: float
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.predictions)

    def to_dict(self) -> dict[str, Any]:
        """The HTTP answer: ``{"predictions", "flagged", "scores"}`` as plain lists."""
        return {
            "predictions": [int(p) for p in self.predictions],
            "flagged": [bool(f) for f in self.flagged],
            "scores": [_finite(s) for s in self.scores],
        }

    def slice(self, start: int, stop: int) -> GuardResult:
        return GuardResult(self.predictions[start:stop], self.flagged[start:stop],
                           self.scores[start:stop], self.threshold, self.seconds)


def _finite(v: float) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


class Guard:
    """A model and a calibrated input-level detector; ``predict`` filters triggered inputs.

    ``detector`` must already be fitted on ``model`` (``detector.fit(model, clean)``);
    use :meth:`calibrate` to do both. Thread-safe: calls are serialised by a lock
    (one model, one device).
    """

    def __init__(self, model: nn.Module, detector: InputDetector) -> None:
        if not hasattr(detector, "threshold_"):
            raise ParameterError("the detector is not calibrated: call detector.fit(model, "
                                 "clean) first, or use Guard.calibrate(...)")
        if getattr(detector, "model_", model) is not model:
            raise ParameterError("the detector was calibrated on a different model")
        self.model = model
        self.detector = detector
        self._lock = threading.Lock()

    @classmethod
    def calibrate(cls, model: nn.Module, clean: ImageDataset, *, detector: str = "strip",
                  frr: float = 0.01, seed: int = 0, device: str | None = None,
                  **params: Any) -> Guard:
        """Fit ``detector`` (``"strip"``) on ``clean`` at ``frr``."""
        if detector not in RUNTIME_DETECTORS:
            raise bad_param("detector", RUNTIME_DETECTORS, detector)
        det = create(detector, frr=frr, seed=seed, device=device, **params)
        det.fit(model, clean)
        return cls(model, det)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.detector.input_shape_)  # type: ignore[attr-defined]

    @property
    def threshold(self) -> float:
        return float(self.detector.threshold_)

    def info(self) -> dict[str, Any]:
        """Settings and calibration figures (for ``/healthz`` and logs)."""
        out: dict[str, Any] = {"detector": self.detector.name,
                               "input_shape": list(self.input_shape)}
        calib = getattr(self.detector, "calibration_info", None)
        if callable(calib):
            out.update(calib())
        return out

    def predict(self, x: torch.Tensor | np.ndarray) -> GuardResult:
        """Predictions, flags and scores for inputs ``N×C×H×W``: the detector's
        :meth:`~trojanscan.detectors.input_base.CalibratedInputDetector.decide`, so the
        same inputs get the same answers as from ``filter`` (sequential testing
        included; a flag is always ``score > threshold``)."""
        t0 = time.perf_counter()
        with self._lock:
            decide = getattr(self.detector, "decide", None)
            if callable(decide):  # the very decision ``filter`` reports
                d = decide(x)
                scores, preds, flagged = d.scores, d.predictions, d.flagged
            else:  # any InputDetector: filter gives all three
                res = self.detector.filter(x if isinstance(x, torch.Tensor)
                                           else torch.from_numpy(np.asarray(x, np.float32)))
                scores, preds, flagged = res.scores, res.predictions, res.flagged
        scores = np.asarray(scores, dtype=np.float64)
        flagged = np.asarray(flagged, dtype=bool)
        return GuardResult(np.asarray(preds, dtype=np.int64), flagged, scores, self.threshold,
                           time.perf_counter() - t0)


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[GuardResult]
    loop: asyncio.AbstractEventLoop


@dataclass
class BatchStats:
    """Counters of the micro-batcher (for metrics)."""

    batches: int = 0
    inputs: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)


class MicroBatcher:
    """Coalesce concurrent ``submit`` calls into batched ``guard.predict`` calls.

    Requests are queued; a single worker thread takes the first, then keeps adding
    queued requests while the total stays within ``max_batch`` inputs, waiting up to
    ``max_wait_ms`` for more, then runs one ``predict`` and splits the result back. A
    request larger than ``max_batch`` runs alone. ``close()`` stops the worker; requests
    still queued get a RuntimeError.
    """

    def __init__(self, guard: Guard, *, max_batch: int = 256, max_wait_ms: float = 2.0) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise bad_param("max_batch", "an integer >= 1", max_batch)
        if not isinstance(max_wait_ms, (int, float)) or max_wait_ms < 0:
            raise bad_param("max_wait_ms", "a number >= 0", max_wait_ms)
        self.guard = guard
        self.max_batch = max_batch
        self.max_wait = float(max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._queue: list[_Pending] = []
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="trojanscan-guard",
                                        daemon=True)
        self._thread.start()

    async def submit(self, x: np.ndarray) -> GuardResult:
        """Queue ``x`` (``n×C×H×W`` float32) and wait for its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[GuardResult] = loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the guard is shutting down")
            self._queue.append(_Pending(x, fut, loop))
            self._cv.notify()
        return await fut

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- worker ------------------------------------------------------------------
    def _take(self) -> list[_Pending] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed and not self._queue:
                return None
            batch = [self._queue.pop(0)]
            total = len(batch[0].x)
            deadline = time.monotonic() + self.max_wait
            while total < self.max_batch:
                if self._queue:
                    if total + len(self._queue[0].x) > self.max_batch:
                        break
                    item = self._queue.pop(0)
                    batch.append(item)
                    total += len(item.x)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(timeout=left)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            sizes = [len(p.x) for p in batch]
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                result = self.guard.predict(x)
            except BaseException as exc:  # deliver every failure to its callers
                for p in batch:
                    _resolve(p, exc=exc)
                continue
            self.stats.batches += 1
            self.stats.inputs += sum(sizes)
            self.stats.largest = max(self.stats.largest, sum(sizes))
            start = 0
            for p, n in zip(batch, sizes, strict=False):
                _resolve(p, value=result.slice(start, start + n))
                start += n


def _resolve(p: _Pending, *, value: GuardResult | None = None,
             exc: BaseException | None = None) -> None:
    def _set() -> None:
        if p.future.done():
            return
        if exc is not None:
            p.future.set_exception(exc)
        else:
            p.future.set_result(value)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # a closed loop: the caller is gone
        p.loop.call_soon_threadsafe(_set)


def as_inputs(x: Any, input_shape: tuple[int, int, int], *, max_batch: int | None = None
              ) -> np.ndarray:
    """Validate a request's inputs: float32 ``n×C×H×W`` (1 ≤ n ≤ max_batch), finite, in [0, 1].

    Raises :class:`DataError` with a message for the client (the HTTP layer maps it to
    a 4xx).
    """
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise DataError(f"inputs: not a rectangular array of numbers ({exc})") from exc
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer)
                                   or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"inputs: expected a rectangular array of numbers N×"
                        f"{'×'.join(map(str, input_shape))}, got dtype {arr.dtype}"
                        + (" (ragged nesting or non-numbers)" if arr.dtype == object else ""))
    want = "N×" + "×".join(map(str, input_shape))
    if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(input_shape):
        raise DataError(f"inputs: expected shape {want}, got {'×'.join(map(str, arr.shape))}"
                        if arr.ndim else f"inputs: expected shape {want}, got a scalar")
    n = int(arr.shape[0])
    if n == 0:
        raise DataError("inputs: expected at least one input, got 0")
    if max_batch is not None and n > max_batch:
        raise DataError(f"inputs: at most {max_batch} inputs per request, got {n}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise DataError("inputs: contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise DataError(f"inputs: values must lie in [0, 1], got min {lo:.4g} max {hi:.4g}")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0))


__all__ = ["RUNTIME_DETECTORS", "BatchStats", "Guard", "GuardResult", "MicroBatcher",
           "as_inputs"]
