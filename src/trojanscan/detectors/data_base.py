"""What the data-level detectors share: penultimate features extracted once
(:class:`Features`, :func:`extract`), the ``1.5·ε`` budget helpers, result construction
and :class:`FeatureDataDetector`, the base class of the detectors that work on
penultimate features class by class.

Layering: :mod:`trojanscan.maths` (pure functions) ← this module and the detectors ←
the orchestration (:mod:`trojanscan.data_scan`) and the command line.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..classifier import model_device
from ..dataset import ImageDataset
from ..exceptions import DataError, DetectorNotApplicable, bad_param
from ..progress import progress
from ..utils import batches, pick_device
from .base import DataDetector, DataScanResult, borrow_model

__all__ = ["FeatureDataDetector", "Features", "annotate_classes", "apply_budget",
           "blas_single_thread", "budget", "extract", "fresh_model", "make_result",
           "model_device", "seeded_subset"]

# ----------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def blas_single_thread() -> Iterator[None]:
    """Run small dense linear algebra (BLAS, OpenMP k-means) on one thread.

    The per-class matrices are at most a few hundred columns wide; multi-threaded
    BLAS only adds synchronisation there, and on a busy machine it was measured ~10×
    slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(limits=1):
        yield




@dataclass(frozen=True)
class Features:
    """Penultimate features of a training set, extracted once and shared."""

    features: np.ndarray       # N×D float32 (array or memmap)
    labels: np.ndarray         # N int64
    predictions: np.ndarray    # N int64 (the model's class per sample)
    seconds: float
    layer: str
    #: per sample, the class with the second-highest logit (None when unknown): a trace
    #: of the class a relabelled sample came from
    runner_up: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])


def _as_module(model: Any) -> nn.Module:
    inner = getattr(model, "module", model)
    if not isinstance(inner, nn.Module):
        raise bad_param("model", "a torch.nn.Module or a LoadedModel", type(model).__name__)
    return inner


def extract(model: Any, train: ImageDataset, *, layer: str = "penultimate",
            batch_size: int = 256, device: str | torch.device | None = None,
            out: np.ndarray | None = None) -> Features:
    """Features and predictions of ``train`` in batches (the model is borrowed).

    Each batch's features are written straight into ``out`` (a preallocated ``N×D``
    float32 array or ``np.memmap``; allocated after the first batch when not given),
    so no second copy of the whole matrix is ever made. ``device``: where to run (the
    model's own device by default; a CPU model is moved there and back).
    """
    from ..features import FeatureModel

    if not isinstance(train, ImageDataset):
        raise DataError(f"expected an ImageDataset, got {type(train).__name__}")
    labels = train.labels().numpy().astype(np.int64)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise bad_param("batch_size", "a positive integer", batch_size)
    module = _as_module(model)
    home = model_device(module)
    dev = home if device is None else pick_device(device)
    n = len(train)
    preds = np.empty(n, dtype=np.int64)
    second = np.empty(n, dtype=np.int64)
    t0 = time.perf_counter()
    moved = dev != home
    try:
        if moved:
            module.to(dev)
        with borrow_model(module), torch.no_grad(), progress("extracting features",
                                                             n) as bar:
            fm = FeatureModel(module, layer)
            for sl in batches(n, batch_size):
                logits, feats = fm(train.x[sl].to(dev))
                f = feats.detach().float().cpu().numpy()
                if out is None:
                    out = np.empty((n, f.shape[1]), dtype=np.float32)
                elif out.shape != (n, f.shape[1]):
                    raise bad_param("out", f"an array of shape {(n, f.shape[1])}",
                                    tuple(out.shape))
                out[sl] = f
                preds[sl] = logits.argmax(1).cpu().numpy()
                if logits.shape[1] >= 2:
                    second[sl] = logits.topk(2, dim=1).indices[:, 1].cpu().numpy()
                else:
                    second[sl] = preds[sl]
                bar.advance(sl.stop - sl.start)
    finally:
        if moved:
            module.to(home)
    assert out is not None
    for sl in batches(n, 65536):  # chunked: no N×D temporary
        if not np.isfinite(out[sl]).all():
            raise DataError("the model's features contain NaN or infinite values")
    return Features(out, labels, preds, time.perf_counter() - t0, layer, runner_up=second)


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted row positions of a seeded random subset of ``limit`` out of ``n``
    (``None`` when all ``n`` are to be used)."""
    if limit is None or n <= limit:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, int(limit), replace=False))


def budget(poison_rate_bound: float | None, n: int, factor: float = 1.5) -> int | None:
    """Most samples a detector may flag in total: ``⌊factor·ε·N⌋`` (None without ε)."""
    if poison_rate_bound is None:
        return None
    return int(np.floor(factor * poison_rate_bound * n))


def apply_budget(flagged: np.ndarray, scores: np.ndarray, limit: int | None) -> np.ndarray:
    """Keep at most ``limit`` flags, the highest-scored ones."""
    from ..maths.spectral import cap_to_budget

    return cap_to_budget(flagged, scores, limit)


def make_result(name: str, *, scores: np.ndarray, flagged: np.ndarray, seconds: float,
                seed: int, params: Mapping[str, Any], per_class: Mapping[str, Any],
                evidence: Mapping[str, Any] | None = None,
                warnings: Sequence[str] = (),
                images: Mapping[str, np.ndarray] | None = None) -> DataScanResult:
    """A :class:`DataScanResult` with the invariants checked (float32 scores, bool flags)."""
    scores = np.asarray(scores, dtype=np.float32)
    flagged = np.asarray(flagged, dtype=bool)
    if scores.shape != flagged.shape or scores.ndim != 1:
        raise AssertionError("scores and flags must be vectors of the same length")
    if not np.isfinite(scores).all():
        scores = np.nan_to_num(scores, nan=0.0, posinf=np.finfo(np.float32).max)
    verdict: Literal["poisoned", "clean"] = "poisoned" if bool(flagged.any()) else "clean"
    return DataScanResult(detector=name, verdict=verdict, scores=scores, flagged=flagged,
                          seconds=float(seconds), seed=int(seed), params=dict(params),
                          per_class=dict(per_class), evidence=dict(evidence or {}),
                          images=dict(images or {}), warnings=tuple(warnings))


def fresh_model(model: Any, *, arch: str | Callable[..., nn.Module] | None,
                input_shape: tuple[int, int, int], num_classes: int,
                seed: int) -> nn.Module:
    """A freshly initialised network of the model's architecture (for retraining).

    ``arch``: a built-in name (:mod:`trojanscan.archs`), ``package.module:factory``, or a
    callable — the caller's own choice (``--arch``), never something read from beside the
    model, since a factory is code that runs; without it a plain ``nn.Module`` is
    deep-copied and every submodule's ``reset_parameters`` (and ``reset_running_stats``)
    is called. TorchScript and ONNX models need ``arch`` (their Python class is not
    available): :class:`DetectorNotApplicable` otherwise.
    """
    torch.manual_seed(seed)
    if callable(arch) and not isinstance(arch, str):
        net = arch()
    elif isinstance(arch, str):
        from ..io.models import build_arch

        net = build_arch(arch, input_shape=input_shape, num_classes=num_classes)
    else:
        module = _as_module(model)
        if isinstance(module, torch.jit.ScriptModule) or type(module).__name__ == "OnnxModule":
            raise DetectorNotApplicable(
                "retraining needs the architecture: give --arch (a built-in name or "
                "package.module:factory)")
        net = copy.deepcopy(module).cpu()
        for m in net.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            stats = getattr(m, "reset_running_stats", None)
            if callable(stats):
                stats()
    if not isinstance(net, nn.Module):
        raise bad_param("arch", "a factory returning a torch.nn.Module", type(net).__name__)
    return net


# ----------------------------------------------------------------------------- detector base


class FeatureDataDetector(DataDetector):
    """A data-level detector working on penultimate features, class by class.

    ``fit(model, train)`` extracts the features and calls ``fit_features``; the
    orchestration (:func:`scan_data`) extracts them once and calls ``fit_features``
    of every detector with the same :class:`Features`. Subclasses implement
    ``_score(f, y, ...)``.
    """

    layer: str
    batch_size: int
    seed: int
    device: str | None

    def fit(self, model: nn.Module, train: ImageDataset) -> DataScanResult:
        self._check_params()
        feats = extract(model, train, layer=self.layer, batch_size=self.batch_size,
                        device=self.device)
        return self.fit_features(feats, model=model, train=train)

    def fit_features(self, features: Features | np.ndarray | torch.Tensor,
                     labels: np.ndarray | torch.Tensor | None = None, *,
                     model: Any = None, train: ImageDataset | None = None,
                     runner_up: np.ndarray | None = None) -> DataScanResult:
        """Score precomputed features (a :class:`Features`, or an ``N×D`` array with
        ``labels``). ``model``/``train`` are only needed by steps that retrain;
        ``runner_up`` (each sample's class with the second-highest logit; taken from a
        :class:`Features`) orients balanced splits (see
        :func:`trojanscan.maths.spectral.suspect_side`)."""
        from ..maths.spectral import check_features

        self._check_params()
        extra_seconds = 0.0
        if isinstance(features, Features):
            if labels is None:
                labels = features.labels
            extra_seconds = features.seconds
            if runner_up is None:
                runner_up = features.runner_up
            features = features.features
        f, y = check_features(features, labels)
        if train is not None and len(train) != len(y):
            raise DataError(f"{train.source}: {len(train)} samples but {len(y)} feature rows")
        if runner_up is not None:
            runner_up = np.asarray(runner_up, dtype=np.int64).ravel()
            if runner_up.shape != y.shape:
                raise bad_param("runner_up", f"a vector of {len(y)} class indices",
                                f"shape {runner_up.shape}")
        t0 = time.perf_counter()
        with blas_single_thread():
            out = self._score(f, y, model=model, train=train, runner_up=runner_up)
        scoring = time.perf_counter() - t0
        evidence = dict(out.pop("evidence", {}))
        evidence.update(num_samples=len(y))
        return make_result(self.name, seconds=scoring + extra_seconds, seed=self.seed,
                           params=self.get_params(), evidence=evidence, **out)

    def _check_params(self) -> None:
        """Validate settings (raise ParameterError naming the bad one)."""

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None, runner_up: np.ndarray | None = None
               ) -> dict[str, Any]:
        raise NotImplementedError


def annotate_classes(per_class: dict[str, Any], key: str, compared_with: str) -> None:
    """Say in every class entry what its decision compared, and where the class's
    ``key`` statistic lies among the other classes of the same set (one-sided index
    ``(value − median) / MAD``, evidence only: ``<key>_across_class_index``)."""
    from ..maths.decomposition import one_sided_index

    labels = [c for c, e in per_class.items() if isinstance(e.get(key), (int, float))]
    index = (one_sided_index(np.array([float(per_class[c][key]) for c in labels]))
             if len(labels) >= 3 else None)
    for pos, c in enumerate(labels):
        if index is not None:
            per_class[c][f"{key}_across_class_index"] = round(float(index[pos]), 4)
    for entry in per_class.values():
        entry["compared_with"] = compared_with
