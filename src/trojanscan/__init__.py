"""trojanscan — find backdoors in deep-learning models and poisoned samples in their data."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .dataset import ImageDataset
from .exceptions import (
    DataError,
    DependencyError,
    DetectorNotApplicable,
    IncompatibleError,
    InputError,
    ModelError,
    NotAClassifierError,
    NotFittedError,
    ParameterError,
    TrojanscanError,
    UnknownFormatError,
    UnsafeModelError,
)

if TYPE_CHECKING:
    from .api import filter_inputs, load_dataset, load_model, scan_data, scan_model
    from .detectors.activation_clustering import ActivationClustering
    from .detectors.mmbd import MMBD
    from .detectors.mntd import MNTD
    from .detectors.neural_cleanse import NeuralCleanse
    from .detectors.scan_decomp import Scan
    from .detectors.spectral_signatures import SpectralSignatures
    from .detectors.spectre import Spectre
    from .detectors.strip import Strip
    from .detectors.teco import TeCo

#: public name -> module that defines it (imported on first use)
_LAZY = {
    "scan_model": "api",
    "scan_data": "api",
    "filter_inputs": "api",
    "load_model": "api",
    "load_dataset": "api",
    "NeuralCleanse": "detectors.neural_cleanse",
    "MNTD": "detectors.mntd",
    "MMBD": "detectors.mmbd",
    "SpectralSignatures": "detectors.spectral_signatures",
    "ActivationClustering": "detectors.activation_clustering",
    "Spectre": "detectors.spectre",
    "Strip": "detectors.strip",
    "TeCo": "detectors.teco",
    "Scan": "detectors.scan_decomp",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trojanscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "MMBD",
    "MNTD",
    "ActivationClustering",
    "DataError",
    "DependencyError",
    "DetectorNotApplicable",
    "ImageDataset",
    "IncompatibleError",
    "InputError",
    "ModelError",
    "NeuralCleanse",
    "NotAClassifierError",
    "NotFittedError",
    "ParameterError",
    "Scan",
    "SpectralSignatures",
    "Spectre",
    "Strip",
    "TeCo",
    "TrojanscanError",
    "UnknownFormatError",
    "UnsafeModelError",
    "__version__",
    "filter_inputs",
    "load_dataset",
    "load_model",
    "scan_data",
    "scan_model",
]
