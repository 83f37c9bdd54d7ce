"""Is this model backdoored? Run the model-level detectors and fuse their evidence.

``scan_model`` is the library entry point behind ``trojanscan scan``: it runs each
requested (or every applicable) model-level detector on a borrowed model, records
detectors that cannot apply with their reason instead of failing, and fuses the rest
with :func:`trojanscan.maths.fusion.fuse` (Bonferroni min-p, documented there).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import detectors as registry
from .classifier import check_classifier, known_classifier
from .dataset import ImageDataset
from .exceptions import DetectorNotApplicable, ParameterError
from .maths.fusion import Evidence, Fused, fuse
from .results import ModelScanResult

#: model-level detectors run by default, in this order
DEFAULT_MODEL_DETECTORS = ("neural_cleanse", "mntd")
#: model-level detectors run by default without clean data (``scan`` without ``--data``)
DATA_FREE_DETECTORS = ("mmbd", "mntd")


@dataclass(frozen=True)
class ScanResult:
    """The fused verdict and every detector's outcome."""

    verdict: str
    score: float
    p_value: float
    suspected_targets: tuple[int, ...]
    results: dict[str, ModelScanResult]
    not_applicable: dict[str, str]
    fused: Fused
    seconds: float
    seed: int
    alpha: float
    params: dict[str, Any] = field(default_factory=dict)

    def detectors_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: r.to_dict() for name, r in self.results.items()}
        for name, reason in self.not_applicable.items():
            out[name] = {"verdict": "not_applicable", "reason": reason, "score": None,
                         "suspected_targets": [], "seconds": 0.0}
        return out


def parse_detectors(spec: str | Sequence[str] | None, level: str) -> list[str]:
    """Names from ``--detectors`` (comma-separated), checked against the registry."""
    if spec is None:
        return list(DEFAULT_MODEL_DETECTORS) if level == "model" else []
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ParameterError("invalid detectors: expected a comma-separated list, got ''")
    for n in names:
        cls = registry.get(n)
        if cls.level != level:
            raise ParameterError(f"invalid detectors: {n!r} is a {cls.level}-level detector; "
                                 f"this command runs {level}-level detectors")
    return names


def data_free_detectors(names: Sequence[str]) -> list[str]:
    """The detectors among ``names`` that run without clean data (``data_free``)."""
    out = []
    for n in names:
        try:
            if getattr(registry.get(n), "data_free", False):
                out.append(n)
        except ParameterError:
            continue
    return out


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    try:
        dims = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) < 1 or isinstance(input_shape, (str, bytes)):
        raise ParameterError(f"invalid input_shape: expected (C, H, W) with positive "
                             f"integers, got {input_shape!r}")
    return dims[0], dims[1], dims[2]


def scan_model(
    model: nn.Module,
    clean: ImageDataset | None = None,
    *,
    detectors: str | Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    alpha: float = 0.05,
    detector_params: dict[str, dict[str, Any]] | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> ScanResult:
    """Run model-level detectors on ``model`` with clean data ``clean`` and fuse them.

    Without ``clean`` (``None``) only the data-free detectors run (by default
    :data:`DATA_FREE_DETECTORS`; naming another is an error) on inputs of
    ``input_shape`` (C, H, W), which is then required. The model is checked once
    (:func:`trojanscan.classifier.check_classifier`); the detectors reuse that answer
    instead of probing it again.
    """
    if not 0.0 < alpha < 1.0:
        raise ParameterError(f"invalid alpha: expected a float in (0, 1), got {alpha!r}")
    if clean is None:
        return _scan_data_free(model, detectors=detectors, seed=seed, device=device,
                               alpha=alpha, detector_params=detector_params,
                               input_shape=input_shape)
    names = parse_detectors(detectors, "model")
    if not isinstance(clean, ImageDataset):
        raise ParameterError(f"invalid clean data: expected an ImageDataset, got "
                             f"{type(clean).__name__}")
    k = check_classifier(model, clean.x[:2], what="clean data",
                         num_labels=None if clean.y is None else clean.num_classes)
    with known_classifier(model, clean.input_shape, k):
        return _scan(model, clean, names, explicit=detectors is not None, seed=seed,
                     device=device, alpha=alpha, detector_params=detector_params)


def data_free_names(detectors: str | Sequence[str] | None,
                    how: str = "give clean data") -> list[str]:
    """The detectors a scan without clean data runs: ``detectors`` (default
    :data:`DATA_FREE_DETECTORS`), refused with one line naming any that need data."""
    names = (list(DATA_FREE_DETECTORS) if detectors is None
             else parse_detectors(detectors, "model"))
    needs_data = [n for n in names if n not in data_free_detectors([n])]
    if needs_data:
        raise ParameterError(f"{', '.join(needs_data)} need{'s' if len(needs_data) == 1 else ''}"
                             f" clean data: {how}, or run only the data-free detectors "
                             f"({', '.join(DATA_FREE_DETECTORS)})")
    return names


def _scan_data_free(model: nn.Module, *, detectors: str | Sequence[str] | None, seed: int,
                    device: str | torch.device | None, alpha: float,
                    detector_params: dict[str, dict[str, Any]] | None,
                    input_shape: tuple[int, int, int] | None) -> ScanResult:
    if input_shape is None:
        raise ParameterError("scanning without clean data needs the model's input shape: "
                             "give input_shape (C, H, W)")
    shape = _check_input_shape(input_shape)
    names = data_free_names(detectors)
    probe = torch.full((2, *shape), 0.5)
    k = check_classifier(model, probe, what=f"inputs of shape {'×'.join(map(str, shape))}")
    params = {n: {"input_shape": shape, **(detector_params or {}).get(n, {})} for n in names}
    with known_classifier(model, shape, k):
        return _scan(model, None, names, explicit=detectors is not None, seed=seed,
                     device=device, alpha=alpha, detector_params=params)


def _scan(model: nn.Module, clean: ImageDataset | None, names: list[str], *, explicit: bool,
          seed: int, device: str | torch.device | None, alpha: float,
          detector_params: dict[str, dict[str, Any]] | None) -> ScanResult:
    t0 = time.perf_counter()
    results: dict[str, ModelScanResult] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            registry.get(name)
        except ParameterError as exc:  # registered but not importable (yet)
            if explicit:
                raise
            skipped[name] = str(exc)
            continue
        params = {"seed": seed, "device": None if device is None else str(device)}
        params.update((detector_params or {}).get(name, {}))
        det = registry.create(name, **params)
        try:
            results[name] = det.fit(model, clean)
        except DetectorNotApplicable as exc:
            skipped[name] = str(exc)
    if not results:
        reasons = "; ".join(f"{n}: {r}" for n, r in skipped.items())
        raise DetectorNotApplicable(
            f"no detector could run on this model, so no verdict can be given ({reasons})")
    evidence = [Evidence(n, r.verdict == "backdoored", r.p_value, tuple(r.suspected_targets),
                         r.label_p_values)
                for n, r in results.items()]
    fused = fuse(evidence, alpha=alpha)
    verdict = "backdoored" if fused.backdoored else "clean"
    return ScanResult(verdict, fused.score, fused.p_value, fused.suspected_targets, results,
                      skipped, fused, time.perf_counter() - t0, seed, alpha,
                      {"detectors": names, "alpha": alpha})
