"""Which training samples are poisoned? Orchestration behind ``trojanscan scan-data``.

:func:`scan_data` extracts the model's penultimate features of the training set
*once* (in batches, written into one preallocated ``N×D`` float32 array — or a
memory-mapped file for data sets that do not fit in RAM) and hands the same array to
every data-level detector's ``fit_features``; the detectors' flags are combined into
one set (:func:`combine`). :func:`export_clean` writes the training set without the
flagged samples; :func:`verify_by_retraining` retrains the architecture on the cleaned
set and measures clean accuracy and attack success rate before and after.

The detectors (``spectral_signatures``, ``activation_clustering``, ``spectre``) also
run on their own through ``fit(model, train)``; the helpers they share live here.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .dataset import ImageDataset
from .detectors.base import DataDetector, DataScanResult, borrow_model
from .exceptions import DataError, DetectorNotApplicable, ParameterError, bad_param
from .progress import progress
from .utils import batches, pick_device

#: data-level detectors run by default, in this order
DEFAULT_DATA_DETECTORS = ("spectral_signatures", "activation_clustering", "spectre")
COMBINE_RULES = ("majority", "union", "intersection")


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


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Features:
    """Penultimate features of a training set, extracted once and shared."""

    features: np.ndarray       # N×D float32 (array or memmap)
    labels: np.ndarray         # N int64
    predictions: np.ndarray    # N int64 (the model's class per sample)
    seconds: float
    layer: str

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
    from .features import FeatureModel

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
                bar.advance(sl.stop - sl.start)
    finally:
        if moved:
            module.to(home)
    assert out is not None
    for sl in batches(n, 65536):  # chunked: no N×D temporary
        if not np.isfinite(out[sl]).all():
            raise DataError("the model's features contain NaN or infinite values")
    return Features(out, labels, preds, time.perf_counter() - t0, layer)


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
    from .maths.spectral import cap_to_budget

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
        from .io.models import build_arch

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


# ----------------------------------------------------------------------------- orchestration


@dataclass(frozen=True)
class DataScan:
    """Outcome of :func:`scan_data`: the combined flags and every detector's result."""

    verdict: str
    scores: np.ndarray             # float32, combined (mean per-detector rank), N
    flagged: np.ndarray            # bool, combined
    results: dict[str, DataScanResult]
    not_applicable: dict[str, str]
    features: Features
    combine: str
    seconds: float

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flagged)


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to their mid-rank percentile in (0, 1] (ties share a value)."""
    from scipy.stats import rankdata

    return (rankdata(scores, method="average") / max(len(scores), 1)).astype(np.float32)


def combine(results: Mapping[str, DataScanResult], rule: str = "majority"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Combine detectors: flags by ``rule`` and scores as the mean rank percentile.

    ``majority``: flagged by more than half of the detectors (by the only one when a
    single detector ran; by both when two ran); ``union``: by any; ``intersection``:
    by all.
    """
    if rule not in COMBINE_RULES:
        raise bad_param("combine", COMBINE_RULES, rule)
    if not results:
        raise ParameterError("no data-level detector could run")
    votes = np.sum([r.flagged for r in results.values()], axis=0)
    m = len(results)
    if rule == "union":
        flagged = votes >= 1
    elif rule == "intersection":
        flagged = votes >= m
    else:
        flagged = votes > m / 2
    scores = np.mean([rank_scores(r.scores) for r in results.values()], axis=0)
    return scores.astype(np.float32), flagged.astype(bool)


def parse_detectors(spec: str | Sequence[str] | None) -> list[str]:
    """Detector names from ``"a,b"`` (default: every data-level detector)."""
    from . import detectors as registry

    if spec is None or spec == "" or spec == "all":
        return list(DEFAULT_DATA_DETECTORS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    for n in names:
        cls = registry.get(n)
        if getattr(cls, "level", None) != "data":
            allowed = ", ".join(DEFAULT_DATA_DETECTORS)
            raise bad_param("detectors", f"data-level detectors ({allowed})", n)
    if not names:
        raise bad_param("detectors", DEFAULT_DATA_DETECTORS, spec)
    return list(dict.fromkeys(names))


def scan_data(model: Any, train: ImageDataset, *,
              detectors: str | Sequence[str] | None = None,
              poison_rate_bound: float | None = None, seed: int = 0,
              device: str | torch.device | None = None, arch: Any = None,
              combine_rule: str = "majority", layer: str = "penultimate",
              batch_size: int = 256, params: Mapping[str, Mapping[str, Any]] | None = None,
              features_out: np.ndarray | None = None) -> DataScan:
    """Run the data-level detectors on ``train`` (which ``model`` was trained on).

    Features are extracted once and shared. ``params`` maps a detector name to extra
    constructor settings. ``arch`` is passed to Activation Clustering's exclusionary
    reclassification (retraining); detectors that cannot run are listed in
    ``not_applicable`` with the reason.
    """
    from . import detectors as registry
    from .maths.spectral import check_rate

    t0 = time.perf_counter()
    names = parse_detectors(detectors)
    eps = check_rate("poison_rate_bound", poison_rate_bound)
    if combine_rule not in COMBINE_RULES:
        raise bad_param("combine", COMBINE_RULES, combine_rule)
    train.require_classes(2)  # also raises when there are no labels
    feats = extract(model, train, layer=layer, batch_size=batch_size, device=device,
                    out=features_out)
    results: dict[str, DataScanResult] = {}
    skipped: dict[str, str] = {}
    for name in names:
        cls = registry.get(name)
        settings: dict[str, Any] = {"poison_rate_bound": eps, "seed": seed, "layer": layer,
                                    "batch_size": batch_size}
        if device is not None:
            settings["device"] = str(device)
        accepted = set(cls._param_names())
        if arch is not None and "arch" in accepted:
            settings["arch"] = arch
        settings.update((params or {}).get(name, {}))
        det = cls(**{k: v for k, v in settings.items() if k in accepted})
        try:
            results[name] = det.fit_features(feats, model=model, train=train)
        except DetectorNotApplicable as exc:
            skipped[name] = str(exc)
    if not results:
        raise DetectorNotApplicable("no data-level detector could run: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    scores, flagged = combine(results, combine_rule)
    verdict = "poisoned" if flagged.any() else "clean"
    return DataScan(verdict, scores, flagged, results, skipped, feats, combine_rule,
                    time.perf_counter() - t0)


# ----------------------------------------------------------------------------- export, verify


def export_clean(train: ImageDataset, flagged: np.ndarray, path: str | Path, *,
                 source_path: str | Path | None = None) -> Path:
    """Write ``train`` without the flagged samples to ``path`` (``.npz``, atomically).

    Refuses to write over the training data itself (``source_path`` or ``train.source``).
    """
    from .io.data import save_npz

    target = Path(path)
    if target.suffix.lower() != ".npz":
        raise bad_param("export_clean", "a path ending in .npz", str(path))
    for src in (source_path, train.source):
        if src is None:
            continue
        p = Path(str(src)).expanduser()
        with contextlib.suppress(OSError):
            if p.exists() and (p.resolve() == target.expanduser().resolve()
                               or (target.exists() and p.samefile(target))):
                raise bad_param("export_clean", "a path other than the training data",
                                str(path))
    flagged = np.asarray(flagged, dtype=bool)
    if flagged.shape != (len(train),):
        raise bad_param("flagged", f"a bool mask of length {len(train)}", flagged.shape)
    keep = np.flatnonzero(~flagged)
    if keep.size == 0:
        raise DataError("every sample is flagged: nothing left to export")
    return save_npz(target, train.subset(torch.from_numpy(keep)))


@dataclass(frozen=True)
class Verification:
    """Retraining on the cleaned data versus the model as given."""

    arch: str
    num_removed: int
    num_trained: int
    test_source: str
    clean_accuracy_before: float
    clean_accuracy_after: float
    asr_before: float | None
    asr_after: float | None
    attack: str | None
    seconds: float
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def verify_by_retraining(model: Any, train: ImageDataset, flagged: np.ndarray, *,
                         arch: Any, test: ImageDataset, attack: Any | None = None,
                         config: Any = None, seed: int = 0,
                         device: str | torch.device | None = None) -> Verification:
    """Retrain ``arch`` on ``train`` minus the flagged samples; compare with ``model``.

    Clean accuracy on ``test`` before (the given model) and after (the retrained one);
    attack success rate before and after when ``attack`` (the trigger) is known.
    """
    from .attacks import attack_success_rate
    from .training import TrainConfig, evaluate, train_model
    from .zoo import default_epochs

    t0 = time.perf_counter()
    flagged = np.asarray(flagged, dtype=bool)
    keep = torch.from_numpy(np.flatnonzero(~flagged))
    cleaned = train.subset(keep)
    cleaned.require_classes(2)
    k = max(train.num_classes, test.num_classes)
    module = _as_module(model)
    cfg = config or TrainConfig(epochs=default_epochs(len(cleaned)))
    net = fresh_model(model, arch=arch, input_shape=train.input_shape, num_classes=k,
                      seed=seed)
    retrained = train_model(net, cleaned, config=cfg, seed=seed, device=device,
                            num_classes=k, description="retraining on cleaned data")
    dev = model_device(module)
    before = evaluate(module, test, device=dev)
    after = evaluate(retrained, test, device="cpu")
    asr_b = asr_a = None
    if attack is not None:
        asr_b = float(attack_success_rate(module, attack, test, device=dev))
        asr_a = float(attack_success_rate(retrained, attack, test, device="cpu"))
    name = arch if isinstance(arch, str) else type(net).__name__
    return Verification(name, int(flagged.sum()), len(cleaned), test.source, before, after,
                        asr_b, asr_a, None if attack is None else attack.spec,
                        time.perf_counter() - t0, int(cfg.epochs))


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
                     model: Any = None, train: ImageDataset | None = None) -> DataScanResult:
        """Score precomputed features (a :class:`Features`, or an ``N×D`` array with
        ``labels``). ``model``/``train`` are only needed by steps that retrain."""
        from .maths.spectral import check_features

        self._check_params()
        extra_seconds = 0.0
        if isinstance(features, Features):
            if labels is None:
                labels = features.labels
            extra_seconds = features.seconds
            features = features.features
        f, y = check_features(features, labels)
        if train is not None and len(train) != len(y):
            raise DataError(f"{train.source}: {len(train)} samples but {len(y)} feature rows")
        t0 = time.perf_counter()
        with blas_single_thread():
            out = self._score(f, y, model=model, train=train)
        scoring = time.perf_counter() - t0
        evidence = dict(out.pop("evidence", {}))
        evidence.update(num_samples=len(y))
        return make_result(self.name, seconds=scoring + extra_seconds, seed=self.seed,
                           params=self.get_params(), evidence=evidence, **out)

    def _check_params(self) -> None:
        """Validate settings (raise ParameterError naming the bad one)."""

    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None) -> dict[str, Any]:
        raise NotImplementedError
