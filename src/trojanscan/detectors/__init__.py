"""Registry of detectors by name (snake_case, as used by ``--detectors`` and reports).

Modules are imported lazily, so a detector whose optional dependency is missing
does not break the others.
"""

from __future__ import annotations

import collections.abc
import importlib
import math
import os
import types
import typing
from typing import Any

import numpy as np

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
    "mmbd": "mmbd:MMBD",
    "spectral_signatures": "spectral_signatures:SpectralSignatures",
    "activation_clustering": "activation_clustering:ActivationClustering",
    "spectre": "spectre:Spectre",
    "scan": "scan_decomp:Scan",
    "strip": "strip:Strip",
    "teco": "teco:TeCo",
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


def _hints(name: str) -> dict[str, Any]:
    try:
        return typing.get_type_hints(get(name).__init__)
    except Exception:  # an annotation that cannot be resolved here: check nothing
        return {}


def _describe(hint: Any) -> str:
    """``hint`` in words, for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        if len(set(inner)) != 1:
            return "a list"
        each = _describe(inner[0])
        return "a list of " + (each.split(" ", 1)[1] + "s" if each.startswith(("a ", "an "))
                               else each)
    return {type(None): "null", bool: "true or false", int: "an integer",
            float: "a finite number", str: "a string"}.get(hint, getattr(hint, "__name__",
                                                                         str(hint)))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (what cannot be told passes)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        inner = args[0] if args else Any
        return all(_conforms(v, inner) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float, np.integer, np.floating))
                and not isinstance(value, bool) and math.isfinite(float(value)))
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    return True


def check_params(name: str, params: dict[str, Any]) -> None:
    """Refuse ``params`` the detector ``name`` does not take, or whose values do not fit
    its constructor's annotations (a string or NaN where a number goes, ...), naming
    the parameter, what it accepts and what it got."""
    accepted = parameters(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ParameterError(f"{name}: unknown parameter(s) {', '.join(unknown)}; "
                             f"accepted: {', '.join(accepted)}")
    hints = _hints(name)
    for key, value in params.items():
        hint = hints.get(key, Any)
        if not _conforms(value, hint):
            raise ParameterError(f"invalid {name}.{key}: expected {_describe(hint)}, got "
                                 f"{value!r}")


def create(name: str, **params: Any) -> Any:
    """Instantiate the detector ``name`` with ``params``; unknown names and values that do
    not fit the constructor's annotations raise a ParameterError (:func:`check_params`)."""
    check_params(name, params)
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
    "check_params",
    "create",
    "get",
    "parameters",
]
