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
The result dataclasses live in :mod:`trojanscan.results`.

Every ``score`` is a float where higher means more suspicious. Detectors *borrow*
the user's model: use :func:`trojanscan.classifier.borrow_model` so that training
mode, ``requires_grad`` flags and hooks are restored even when the method raises.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..classifier import borrow_model, check_classifier, count_hooks
from ..dataset import ImageDataset
from ..exceptions import ModelError, ParameterError
from ..results import DataScanResult, FilterResult, ModelScanResult

__all__ = ["DataDetector", "DataScanResult", "FilterResult", "InputDetector",
           "ModelDetector", "ModelScanResult", "borrow_model", "check_model_on",
           "count_hooks"]


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

    :func:`trojanscan.classifier.check_classifier` on ``data``: raises
    :class:`IncompatibleError` when the model cannot process the data's input shape or
    has fewer outputs than the labels need, and
    :class:`~trojanscan.exceptions.NotAClassifierError` when it does not return ``N×K``
    finite logits with ``K ≥ 2``.
    """
    if not isinstance(data, ImageDataset):
        raise ParameterError(f"invalid {what}: expected an ImageDataset, got "
                             f"{type(data).__name__}")
    return check_classifier(model, data.x[:2], what=what,
                            num_labels=data.num_classes if data.y is not None else None)


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
