"""trojanscan — find backdoors in deep-learning models and poisoned samples in their data."""

from __future__ import annotations

__version__ = "0.1.0"

from .dataset import ImageDataset
from .exceptions import (
    DataError,
    DependencyError,
    DetectorNotApplicable,
    IncompatibleError,
    InputError,
    ModelError,
    ParameterError,
    TrojanscanError,
    UnknownFormatError,
    UnsafeModelError,
)

__all__ = [
    "DataError",
    "DependencyError",
    "DetectorNotApplicable",
    "ImageDataset",
    "IncompatibleError",
    "InputError",
    "ModelError",
    "ParameterError",
    "TrojanscanError",
    "UnknownFormatError",
    "UnsafeModelError",
    "__version__",
]
