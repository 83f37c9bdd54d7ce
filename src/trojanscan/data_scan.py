"""Which training samples are poisoned? Orchestration behind ``trojanscan scan-data``.

:func:`scan_data` extracts the model's penultimate features of the training set
*once* (in batches, written into one preallocated ``N×D`` float32 array — or a
memory-mapped file for data sets that do not fit in RAM) and hands the same array to
every data-level detector's ``fit_features``; the detectors' flags are combined into
one set (:func:`combine`). :func:`export_clean` writes the training set without the
flagged samples; :func:`verify_by_retraining` retrains the architecture on the cleaned
set and measures clean accuracy and attack success rate before and after.

Combination (default ``"union"``): a sample is flagged when any detector flags it, and
the set is called poisoned when any detector fires — one confident detector is never
outvoted. Its false-alarm rate on clean sets is at most the sum of the detectors'
stated rates (:data:`STATED_FALSE_ALARM`, each measured on clean training sets; a
union bound), and the report says which detector(s) carried the verdict
(:func:`combination_evidence`). ``"majority"`` and ``"intersection"`` remain available.

The detectors (``spectral_signatures``, ``activation_clustering``, ``spectre``,
``scan``) also run on their own through ``fit(model, train)``; what they share lives in
:mod:`trojanscan.detectors.data_base` (re-exported here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import ImageDataset
from .detectors.base import DataScanResult
from .detectors.data_base import (
    FeatureDataDetector,
    Features,
    _as_module,
    apply_budget,
    blas_single_thread,
    budget,
    extract,
    fresh_model,
    make_result,
    model_device,
    seeded_subset,
)
from .exceptions import DataError, DetectorNotApplicable, ParameterError, bad_param

#: data-level detectors run by default, in this order. ``spectre`` and
#: ``activation_clustering`` run when named: on the development training sets of models
#: trained elsewhere (36 poisoned, 12 clean) every class SPECTRE flagged beyond Spectral
#: Signatures' was a clean class (6 classes; a false alarm on 2 of the 12 clean sets), and
#: Activation Clustering flagged only clean samples on 3 of 8 sets.
DEFAULT_DATA_DETECTORS = ("spectral_signatures", "scan")
COMBINE_RULES = ("union", "majority", "intersection")
DEFAULT_COMBINE = "union"
#: each detector's stated false-alarm rate per clean training set (the share of clean
#: sets on which it flags anything, default settings); the union's rate is at most their
#: sum. ``scan`` is calibrated to its rate by construction (family-wise across-class
#: null at ``alpha``); the others are measured on the 12 development clean training sets
#: of models trained elsewhere (Spectral Signatures 1/12, SPECTRE 2/12).
STATED_FALSE_ALARM: dict[str, float] = {
    "spectral_signatures": 0.08, "activation_clustering": 0.25, "spectre": 0.17,
    "scan": 0.01}

__all__ = [
    "COMBINE_RULES", "DEFAULT_COMBINE", "DEFAULT_DATA_DETECTORS", "STATED_FALSE_ALARM",
    "DataScan", "FeatureDataDetector", "Features", "Verification", "apply_budget",
    "blas_single_thread", "budget", "combination_evidence", "combine", "export_clean",
    "extract", "fresh_model", "make_result", "model_device", "parse_detectors",
    "rank_scores", "scan_data", "seeded_subset", "verify_by_retraining",
]


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
    evidence: Mapping[str, Any] | None = None

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flagged)


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to their mid-rank percentile in (0, 1] (ties share a value)."""
    from scipy.stats import rankdata

    return (rankdata(scores, method="average") / max(len(scores), 1)).astype(np.float32)


def combine(results: Mapping[str, DataScanResult], rule: str = DEFAULT_COMBINE
            ) -> tuple[np.ndarray, np.ndarray]:
    """Combine detectors: flags by ``rule`` and scores as the mean rank percentile.

    ``union`` (default): flagged by any detector; ``majority``: by more than half of
    them (by the only one when a single detector ran; by both when two ran);
    ``intersection``: by all.
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


def stated_false_alarm(names: Sequence[str], rule: str) -> float | None:
    """The combination's stated false-alarm rate per clean set: the union bound (sum of
    the detectors' stated rates) for ``union``; for ``majority`` and ``intersection``
    at most that too, but no better rate is stated. ``None`` when a detector has no
    stated rate."""
    rates = [STATED_FALSE_ALARM.get(n) for n in names]
    if any(r is None for r in rates):
        return None
    return float(min(1.0, sum(r for r in rates if r is not None)))


def combination_evidence(results: Mapping[str, DataScanResult], flagged: np.ndarray,
                         labels: np.ndarray, rule: str) -> dict[str, Any]:
    """Which detector(s) carried the combined verdict, class by class.

    ``carried_by``: detectors with at least one flag among the combined flags;
    ``per_class``: for each class holding combined flags, how many and which detectors
    flagged them; ``false_alarm_rate``: the stated rate of the combination
    (:func:`stated_false_alarm`).
    """
    carried = [n for n, r in results.items() if bool((r.flagged & flagged).any())]
    per_class: dict[str, Any] = {}
    for c in np.unique(labels[flagged]) if flagged.any() else []:
        sel = labels == c
        per_class[str(int(c))] = {
            "num_flagged": int(flagged[sel].sum()),
            "detectors": {n: int((r.flagged[sel] & flagged[sel]).sum())
                          for n, r in results.items() if bool(r.flagged[sel].any())}}
    return {"rule": rule, "carried_by": carried, "per_class": per_class,
            "false_alarm_rate": stated_false_alarm(list(results), rule),
            "stated_false_alarm_rates": {n: STATED_FALSE_ALARM.get(n) for n in results}}


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
              combine_rule: str = DEFAULT_COMBINE, layer: str = "penultimate",
              batch_size: int = 256, params: Mapping[str, Mapping[str, Any]] | None = None,
              features_out: np.ndarray | None = None) -> DataScan:
    """Run the data-level detectors on ``train`` (which ``model`` was trained on).

    Features are extracted once and shared. ``params`` maps a detector name to extra
    constructor settings. ``arch`` is passed to Activation Clustering's exclusionary
    reclassification (retraining); detectors that cannot run are listed in
    ``not_applicable`` with the reason. With ``poison_rate_bound`` (ε) the combined
    flags are also capped at ``⌊1.5·ε·N⌋``, the highest combined scores kept.
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
    flagged = apply_budget(flagged, scores, budget(eps, len(flagged)))
    verdict = "poisoned" if flagged.any() else "clean"
    evidence = combination_evidence(results, flagged, feats.labels, combine_rule)
    return DataScan(verdict, scores, flagged, results, skipped, feats, combine_rule,
                    time.perf_counter() - t0, evidence)


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
