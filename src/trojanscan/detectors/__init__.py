"""Registry of detectors by name (snake_case, as used by ``--detectors`` and reports).

Modules are imported lazily, so a detector whose optional dependency is missing
does not break the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..exceptions import ParameterError
from .base import (
    DataDetector,
    DataScanResult,
    FilterResult,
    InputDetector,
    ModelDetector,
    ModelScanResult,
    borrow_model,
)

#: name -> "module:Class" (relative to this package)
_REGISTRY: dict[str, str] = {
    "neural_cleanse": "neural_cleanse:NeuralCleanse",
    "mntd": "mntd:MNTD",
    "spectral_signatures": "spectral_signatures:SpectralSignatures",
    "activation_clustering": "activation_clustering:ActivationClustering",
    "spectre": "spectre:Spectre",
    "strip": "strip:Strip",
    "scale_up": "scale_up:ScaleUp",
}


def available() -> dict[str, str]:
    """Names of the registered detectors mapped to their level (model/data/input);
    detectors whose module is not importable here are left out."""
    out: dict[str, str] = {}
    for name in _REGISTRY:
        try:
            out[name] = get(name).level
        except (ImportError, ParameterError):
            continue
    return out


def get(name: str) -> Any:
    """The detector class registered under ``name``."""
    if name not in _REGISTRY:
        raise ParameterError(
            f"unknown detector {name!r}: expected one of {', '.join(sorted(_REGISTRY))}"
        )
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{module_name}":
            raise ParameterError(f"detector {name!r} is not available yet") from exc
        raise
    return getattr(module, cls_name)


def parameters(name: str) -> dict[str, Any]:
    """The settings the detector ``name`` takes (its keyword-only arguments) and defaults."""
    import inspect

    return {n: prm.default for n, prm in inspect.signature(get(name).__init__).parameters.items()
            if prm.kind is inspect.Parameter.KEYWORD_ONLY}


def create(name: str, **params: Any) -> Any:
    """Instantiate the detector ``name`` with ``params`` (unknown names: ParameterError)."""
    accepted = parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        from ..exceptions import ParameterError

        raise ParameterError(f"{name}: unknown parameter(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(accepted)}")
    return get(name)(**params)


__all__ = [
    "DataDetector",
    "DataScanResult",
    "FilterResult",
    "InputDetector",
    "ModelDetector",
    "ModelScanResult",
    "available",
    "borrow_model",
    "create",
    "get",
    "parameters",
]
