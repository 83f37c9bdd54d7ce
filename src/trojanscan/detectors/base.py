"""The detector contract shared by every method.

Three levels, one shape (scikit-learn style): the constructor only stores its
keyword arguments (all have defaults, ``seed`` and ``device`` among them); ``fit``
does the work and returns a frozen result dataclass with ``to_dict()``.

* model-level (``ModelDetector``): ``fit(model, clean) -> ModelScanResult`` — is this
  model backdoored?
* data-level (``DataDetector``): ``fit(model, train) -> DataScanResult`` — which
  training samples are poisoned? (``model`` was trained on ``train``)
* input-level (``InputDetector``): ``fit(model, clean) -> self`` calibrates a
  threshold (``threshold_``); ``score(x)`` gives per-input suspicion,
  ``filter(x) -> FilterResult``.

The base classes validate ``fit``'s inputs before the method runs
(:func:`check_model_on`: the model processes the data's shape, returns ``N×K`` finite
logits with ``K`` covering the labels), so every detector fails the same clear way.

Every ``score`` is a float where higher means more suspicious. Detectors *borrow*
the user's model: use :func:`borrow_model` so that training mode, ``requires_grad``
flags and hooks are restored even when the method raises.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..classifier import check_logits
from ..dataset import ImageDataset
from ..exceptions import IncompatibleError, ModelError, ParameterError, bad_param


def _jsonable(value: Any) -> Any:
    """Convert numpy / torch scalars and arrays (recursively) to JSON-able values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


@dataclass(frozen=True)
class ModelScanResult:
    """Outcome of a model-level detector."""

    detector: str
    verdict: Literal["backdoored", "clean"]
    score: float
    suspected_targets: tuple[int, ...]
    seconds: float
    seed: int
    params: Mapping[str, Any]
    p_value: float | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (images are not included; reports save them as files)."""
        return _jsonable({
            "verdict": self.verdict,
            "score": float(self.score),
            "p_value": self.p_value,
            "suspected_targets": list(self.suspected_targets),
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            "warnings": list(self.warnings),
            **dict(self.evidence),
        })


@dataclass(frozen=True)
class DataScanResult:
    """Outcome of a data-level detector: one score and one flag per training sample."""

    detector: str
    verdict: Literal["poisoned", "clean"]
    scores: np.ndarray
    flagged: np.ndarray
    seconds: float
    seed: int
    params: Mapping[str, Any]
    per_class: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flagged)

    @property
    def score(self) -> float:
        """Share of samples flagged (higher = more suspicious)."""
        return float(self.flagged.mean()) if self.flagged.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "verdict": self.verdict,
            "score": self.score,
            "num_flagged": int(self.flagged.sum()),
            "flagged_indices": self.flagged_indices,
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            "per_class": dict(self.per_class),
            "warnings": list(self.warnings),
            **dict(self.evidence),
        })


@dataclass(frozen=True)
class FilterResult:
    """Outcome of an input-level detector on a batch of inputs."""

    detector: str
    verdict: Literal["triggered", "clean"]
    scores: np.ndarray
    flagged: np.ndarray
    predictions: np.ndarray
    threshold: float
    frr: float
    seconds: float
    seed: int
    params: Mapping[str, Any]
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "verdict": self.verdict,
            "flagged": self.flagged.astype(bool),
            "predictions": self.predictions,
            "threshold": self.threshold,
            "frr": self.frr,
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            **dict(self.evidence),
        })


class _Params:
    """``get_params`` from the constructor's signature, as in scikit-learn."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def check_model_on(model: nn.Module, data: ImageDataset, *, what: str = "data") -> int:
    """Probe ``model`` on two samples of ``data``; return its number of outputs ``K``.

    Raises :class:`IncompatibleError` when the model cannot process the data's input
    shape or has fewer outputs than the labels need, and
    :class:`~trojanscan.exceptions.NotAClassifierError` (a ``ModelError`` and an
    ``IncompatibleError``) when it does not return ``N×K`` logits with ``K ≥ 2`` or
    returns NaN or infinity (:func:`trojanscan.classifier.check_logits`).
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    if not isinstance(data, ImageDataset):
        raise ParameterError(f"invalid {what}: expected an ImageDataset, got "
                             f"{type(data).__name__}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = data.x[:2].to(device)
    with borrow_model(model), torch.no_grad():
        try:
            out = model(x)
        except Exception as exc:  # the model's own error, e.g. a shape mismatch in a conv
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise IncompatibleError(
                f"the model cannot process the {what}: input shape "
                f"{tuple(data.x.shape[1:])} (C×H×W) failed with: {first}") from exc
    k = check_logits(out, int(x.shape[0]), what=f"the {what}")
    if data.y is not None and data.num_classes > k:
        raise IncompatibleError(f"the {what} has labels up to {data.num_classes - 1} but the "
                                f"model has only {k} outputs")
    return k


def _checked_fit(fit: Any, what: str) -> Any:
    """Wrap a detector's ``fit`` so inputs are validated uniformly before it runs."""

    @functools.wraps(fit)
    def checked(self: Any, model: nn.Module, data: ImageDataset | None = None,
                *args: Any, **kwargs: Any) -> Any:
        if data is None:
            if not isinstance(model, nn.Module):
                raise ModelError(f"expected a torch.nn.Module as the model, got "
                                 f"{type(model).__name__}")
        else:
            check_model_on(model, data, what=what)
        return fit(self, model, data, *args, **kwargs)

    checked._trojanscan_checked = True  # type: ignore[attr-defined]
    return checked


class _Validated:
    """Subclasses get their ``fit`` wrapped by :func:`check_model_on`."""

    _fit_data_name: ClassVar[str] = "data"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fit = cls.__dict__.get("fit")
        if fit is not None and not getattr(fit, "__isabstractmethod__", False) \
                and not getattr(fit, "_trojanscan_checked", False):
            cls.fit = _checked_fit(fit, cls._fit_data_name)  # type: ignore[attr-defined]


class ModelDetector(_Validated, _Params, ABC):
    """Is this model backdoored? (needs the model, usually some clean data)."""

    name: ClassVar[str]
    level: ClassVar[str] = "model"
    _fit_data_name: ClassVar[str] = "clean data"

    @abstractmethod
    def fit(self, model: nn.Module, clean: ImageDataset) -> ModelScanResult: ...


class DataDetector(_Validated, _Params, ABC):
    """Which of the training samples are poisoned? (model trained on ``train``)."""

    name: ClassVar[str]
    level: ClassVar[str] = "data"
    _fit_data_name: ClassVar[str] = "training data"

    @abstractmethod
    def fit(self, model: nn.Module, train: ImageDataset) -> DataScanResult: ...


class InputDetector(_Validated, _Params, ABC):
    """Which inputs carry a trigger? Calibrated on clean data, then scores inputs."""

    name: ClassVar[str]
    level: ClassVar[str] = "input"
    _fit_data_name: ClassVar[str] = "calibration data"
    threshold_: float

    @abstractmethod
    def fit(self, model: nn.Module, clean: ImageDataset) -> InputDetector: ...

    @abstractmethod
    def score(self, x: torch.Tensor) -> np.ndarray: ...

    @abstractmethod
    def filter(self, x: torch.Tensor) -> FilterResult: ...


def check_probability(name: str, value: float, *, open_low: bool = True) -> float:
    """Validate a probability-like setting, raising a ParameterError that names it."""
    ok = (0.0 < value < 1.0) if open_low else (0.0 <= value < 1.0)
    if not isinstance(value, (int, float)) or not ok:
        raise bad_param(name, "a float in (0, 1)", value)
    return float(value)


@contextlib.contextmanager
def borrow_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Use a user's model without leaving traces.

    Puts it in eval mode and freezes its parameters for the duration; restores the
    training flags of every submodule, each parameter's ``requires_grad`` and removes
    any hook added meanwhile — also when the body raises.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    hook_ids = [_hook_keys(m) for m in modules]
    try:
        if eval_mode:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        for m, keys in zip(modules, hook_ids):
            _drop_new_hooks(m, keys)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_keys(m: nn.Module) -> dict[str, set[Any]]:
    out: dict[str, set[Any]] = {}
    for attr in _HOOK_DICTS:
        d = m.__dict__.get(attr)
        if isinstance(d, dict):
            out[attr] = set(d.keys())
    return out


def _drop_new_hooks(m: nn.Module, before: dict[str, set[Any]]) -> None:
    for attr, keys in before.items():
        d = m.__dict__.get(attr)
        if isinstance(d, dict):
            for k in [k for k in d if k not in keys]:
                del d[k]


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks registered on any submodule (for tests)."""
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                     "_backward_pre_hooks"):
            d = m.__dict__.get(attr)
            if isinstance(d, dict):
                total += len(d)
    return total
