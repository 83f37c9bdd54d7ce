"""The detector contract as checks anyone can run, like scikit-learn's
``parametrize_with_checks``.

Every detector — built in or written elsewhere — promises the same things: the
constructor only stores its settings and they round-trip through ``get_params``;
``fit`` returns the level's result (input-level detectors return themselves,
calibrated); the user's model is left exactly as it was (weights, hooks, training
flags, ``requires_grad``), also when ``fit`` raises; the same seed gives the same
result; bad input raises one of trojanscan's exceptions with a clear message; and on a
model (or data, or inputs) that does carry a backdoor, it flags something.

Each check is a function ``check(detector_class, case)``; :data:`CHECKS` lists them
(extend it with your own). A :class:`Case` holds what the checks run on: a small
backdoored model, data for the detector's level and the ground truth.

In a pytest suite::

    from trojanscan.testing import Case, parametrize_with_checks

    @parametrize_with_checks([MyDetector])
    def test_my_detector(detector, check, my_case):
        check(detector, my_case)   # my_case: a Case built by a fixture

A check that cannot apply (the detector says the case is out of its scope with
:class:`~trojanscan.exceptions.DetectorNotApplicable`) raises
:class:`unittest.SkipTest`, which pytest reports as a skip.
"""

from __future__ import annotations

import contextlib
import copy
import re
import unittest
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .classifier import count_hooks
from .dataset import ImageDataset
from .detectors.base import InputDetector
from .exceptions import DetectorNotApplicable, TrojanscanError
from .results import DataScanResult, FilterResult, ModelScanResult

__all__ = ["CHECKS", "Case", "check_bad_input_is_our_error", "check_detector",
           "check_fit_result_and_model_untouched", "check_flags_positive_case",
           "check_get_params_round_trip", "check_model_restored_when_fit_raises",
           "check_same_seed_same_result", "parametrize_with_checks",
           "registered_detectors"]


@dataclass(frozen=True)
class Case:
    """What the checks run on.

    ``model``: a backdoored classifier (each check works on a private copy).
    ``clean``: clean inputs with labels (model- and input-level detectors fit on it).
    ``train``: the model's poisoned training set (data-level detectors fit on it), with
    ``poison_mask`` marking its poisoned samples.
    ``triggered``: inputs carrying the trigger (input-level detectors score them).
    ``params``: constructor settings per detector name (e.g. fewer steps for speed);
    ``seed`` is always set by the checks.
    """

    model: nn.Module
    clean: ImageDataset
    train: ImageDataset | None = None
    poison_mask: np.ndarray | None = None
    triggered: torch.Tensor | None = None
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: seed-0 fits shared between checks (a fit is the slow part)
    _fits: dict[Any, tuple[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    def data_for(self, detector: Any) -> ImageDataset:
        """The data a detector of this level fits on."""
        if detector.level == "data":
            if self.train is None:
                raise unittest.SkipTest("the case has no training set for a data-level "
                                        "detector")
            return self.train
        return self.clean

    def make(self, detector: Any, **overrides: Any) -> Any:
        """The detector with the case's settings for it (and ``overrides``)."""
        params = {**self.params.get(getattr(detector, "name", ""), {}), **overrides}
        return detector(**params)

    def model_copy(self) -> nn.Module:
        """A private copy of the model, so a faulty detector cannot spoil the case."""
        return copy.deepcopy(self.model)


# -- helpers -------------------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "hooks": count_hooks(model),
    }


def _assert_unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    state = model.state_dict()
    assert set(state) == set(snap["state"]), "the model's parameters changed names"
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), f"parameter/buffer {k} changed"
    assert [m.training for m in model.modules()] == snap["training"], "training flags changed"
    assert [p.requires_grad for p in model.parameters()] == snap["grad"], \
        "requires_grad changed"
    assert count_hooks(model) == snap["hooks"], "hooks were left on the model"


def _fit(det: Any, model: nn.Module, data: ImageDataset) -> Any:
    try:
        return det.fit(model, data)
    except DetectorNotApplicable as exc:
        raise unittest.SkipTest(f"{type(det).__name__} does not apply to this case: "
                                f"{exc}") from exc


def _comparable(result: Any, det: Any, data: ImageDataset) -> Any:
    if isinstance(det, InputDetector):
        return det.score(data.x[:40]).tolist()
    d = result.to_dict()
    d.pop("seconds", None)
    return d


def _raises(kind: type[BaseException], pattern: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except kind as exc:
        assert re.search(pattern, str(exc)), f"message {str(exc)!r} does not match {pattern!r}"
        return
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


class _Exploding(nn.Module):
    """Fine on the first call (the input check), then raises inside the method."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("boom")
        out: torch.Tensor = self.inner(x)
        return out


# -- the checks ----------------------------------------------------------------------


def check_get_params_round_trip(detector: Any, case: Case) -> None:
    """Name and level are declared; the constructor's settings (``seed`` among them)
    round-trip through ``get_params``."""
    assert isinstance(getattr(detector, "name", None), str), "the class declares no name"
    assert detector.level in ("model", "data", "input"), f"unknown level {detector.level!r}"
    det = detector()
    params = det.get_params()
    assert "seed" in params, "the constructor takes no seed"
    assert type(det)(**params).get_params() == params, "get_params does not round-trip"


def check_fit_result_and_model_untouched(detector: Any, case: Case) -> None:
    """``fit`` returns the level's result and leaves the model and the settings as they
    were (the model is handed over in training mode: it must come back so)."""
    model, data = case.model_copy(), case.data_for(detector)
    model.train()
    snap = _snapshot(model)
    det = case.make(detector, seed=0)
    params_before = det.get_params()
    result = _fit(det, model, data)
    case._fits[detector] = (det, result)
    _assert_unchanged(model, snap)
    assert det.get_params() == params_before, "fit changed constructor parameters"
    if detector.level == "model":
        assert isinstance(result, ModelScanResult)
        assert result.verdict in ("backdoored", "clean") and 0.0 <= result.score <= 1.0
        assert result.seconds >= 0 and result.detector == detector.name
    elif detector.level == "data":
        assert isinstance(result, DataScanResult)
        assert result.scores.shape == (len(data),) and result.flagged.shape == (len(data),)
        assert result.flagged.dtype == bool and np.isfinite(result.scores).all()
    else:
        assert result is det and np.isfinite(det.threshold_), "fit must return self"
        x = case.triggered[:20] if case.triggered is not None else data.x[:20]
        out = det.filter(x)
        assert isinstance(out, FilterResult) and out.flagged.shape == (len(x),)
        _assert_unchanged(model, snap)


def check_same_seed_same_result(detector: Any, case: Case) -> None:
    """Two fits with the same seed give the same result."""
    model, data = case.model_copy(), case.data_for(detector)
    det_a, det_b = case.make(detector, seed=1), case.make(detector, seed=1)
    a = _fit(det_a, model, data)
    b = _fit(det_b, model, data)
    assert _comparable(a, det_a, data) == _comparable(b, det_b, data), \
        "the same seed gave different results"


def check_bad_input_is_our_error(detector: Any, case: Case) -> None:
    """Data the model cannot process, or labels beyond its outputs, raise a
    :class:`TrojanscanError` that says what is wrong; the model is left as it was."""
    model = case.model_copy()
    snap = _snapshot(model)
    c, h, w = case.clean.input_shape
    k = int(case.clean.num_classes) if case.clean.y is not None else 2
    wrong_shape = ImageDataset(torch.rand(30, 3 if c != 3 else 1, max(h // 2, 3),
                                          max(w // 2, 3)), torch.arange(30) % 3)
    _raises(TrojanscanError, r"shape|model|input",
            lambda: case.make(detector, seed=0).fit(model, wrong_shape))
    too_many = ImageDataset(torch.rand(k + 30, c, h, w), torch.arange(k + 30))
    _raises(TrojanscanError, "labels", lambda: case.make(detector, seed=0).fit(model, too_many))
    _assert_unchanged(model, snap)


def check_model_restored_when_fit_raises(detector: Any, case: Case) -> None:
    """A model that fails inside the method is still handed back as it was."""
    model = _Exploding(case.model_copy())
    model.train()
    snap = _snapshot(model)
    with contextlib.suppress(Exception):  # any error; what matters is the model
        case.make(detector, seed=0).fit(model, case.data_for(detector))
    _assert_unchanged(model, snap)


def check_flags_positive_case(detector: Any, case: Case) -> None:
    """On the backdoored case the detector flags something, and the right thing: a
    model-level detector says ``backdoored``; a data-level one flags poisoned samples
    at a higher rate than clean ones; an input-level one flags triggered inputs at a
    higher rate than clean ones."""
    data = case.data_for(detector)
    if detector in case._fits:  # the seed-0 fit of check_fit_result_and_model_untouched
        det, result = case._fits[detector]
    else:
        det = case.make(detector, seed=0)
        result = _fit(det, case.model_copy(), data)
    if detector.level == "model":
        assert result.verdict == "backdoored", \
            f"{detector.name} calls the backdoored case {result.verdict!r} (score {result.score})"
    elif detector.level == "data":
        if case.poison_mask is None:
            raise unittest.SkipTest("the case has no poison mask")
        poison = np.asarray(case.poison_mask, dtype=bool)
        flagged = np.asarray(result.flagged, dtype=bool)
        assert flagged.any(), f"{detector.name} flags no training sample"
        assert flagged[poison].mean() > flagged[~poison].mean(), \
            f"{detector.name} flags clean samples as often as poisoned ones"
    else:
        if case.triggered is None:
            raise unittest.SkipTest("the case has no triggered inputs")
        on_trigger = det.filter(case.triggered).flagged.mean()
        on_clean = det.filter(data.x).flagged.mean()
        assert on_trigger > on_clean, \
            f"{detector.name} flags {on_trigger:.2f} of triggered and {on_clean:.2f} of clean"


#: the contract, in the order the checks run; extend with your own checks
CHECKS: tuple[Callable[[Any, Case], None], ...] = (
    check_get_params_round_trip,
    check_fit_result_and_model_untouched,
    check_same_seed_same_result,
    check_bad_input_is_our_error,
    check_model_restored_when_fit_raises,
    check_flags_positive_case,
)


def registered_detectors() -> list[Any]:
    """The classes of every detector registered and importable here, by name."""
    from . import detectors as registry

    return [registry.get(name) for name in sorted(registry.available())]


def check_detector(detector: Any, case: Case,
                   checks: Iterable[Callable[[Any, Case], None]] = CHECKS) -> None:
    """Run every check on ``detector``; the first failure raises."""
    for check in checks:
        check(detector, case)


def parametrize_with_checks(detectors: Iterable[Any],
                            checks: Iterable[Callable[[Any, Case], None]] = CHECKS) -> Any:
    """A ``pytest.mark.parametrize`` over (detector, check) pairs, with readable ids;
    the test takes ``detector`` and ``check`` and calls ``check(detector, case)``."""
    import pytest

    pairs = [(d, c) for d in detectors for c in checks]
    ids = [f"{getattr(d, 'name', d.__name__)}-{c.__name__.removeprefix('check_')}"
           for d, c in pairs]
    return pytest.mark.parametrize(("detector", "check"), pairs, ids=ids)
