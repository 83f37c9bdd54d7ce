"""One contract test kit run over every registered detector (scikit-learn style).

For each detector available in this installation: ``fit`` returns the level's result
type (or, for input-level detectors, the calibrated detector), the user's model is left
exactly as it was (weights, hooks, training flags, ``requires_grad``) — also when ``fit``
raises — the same seed gives the same result, constructor parameters round-trip through
``get_params``, and bad input raises one of our exceptions with a clear message.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trojanscan import detectors as registry
from trojanscan.dataset import ImageDataset
from trojanscan.detectors.base import (
    DataScanResult,
    FilterResult,
    InputDetector,
    ModelScanResult,
)
from trojanscan.exceptions import TrojanscanError
from trojanscan.testing import _assert_unchanged, _comparable, _fit, _snapshot

NAMES = sorted(registry._REGISTRY)


def _get(name: str) -> Any:
    try:
        return registry.get(name)
    except TrojanscanError as exc:
        pytest.skip(f"{name}: {exc}")


def _data_for(cls: Any, tiny: Any) -> ImageDataset:
    return tiny.train_poisoned if cls.level == "data" else tiny.test


def _model_for(cls: Any, tiny: Any) -> nn.Module:
    # a private copy, so a buggy detector cannot spoil the shared fixture
    return copy.deepcopy(tiny.backdoored)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry(name: str) -> None:
    cls = _get(name)
    assert cls.name == name and cls.level in ("model", "data", "input")
    det = cls()
    params = det.get_params()
    assert "seed" in params
    assert type(det)(**params).get_params() == params


@pytest.mark.parametrize("name", NAMES)
def test_fit_result_and_model_untouched(name: str, tiny: Any) -> None:
    cls = _get(name)
    model, data = _model_for(cls, tiny), _data_for(cls, tiny)
    model.train()  # detectors must restore whatever mode they found
    snap = _snapshot(model)
    det = cls(seed=0)
    params_before = det.get_params()
    result = _fit(det, model, data)
    _assert_unchanged(model, snap)
    assert det.get_params() == params_before, "fit changed constructor parameters"
    if cls.level == "model":
        assert isinstance(result, ModelScanResult)
        assert result.verdict in ("backdoored", "clean") and 0.0 <= result.score <= 1.0
        assert result.seconds >= 0 and result.detector == name
    elif cls.level == "data":
        assert isinstance(result, DataScanResult)
        assert result.scores.shape == (len(data),) and result.flagged.shape == (len(data),)
        assert result.flagged.dtype == bool and np.isfinite(result.scores).all()
    else:
        assert result is det and np.isfinite(det.threshold_)
        out = det.filter(tiny.triggered_test()[:20])
        assert isinstance(out, FilterResult) and out.flagged.shape == (20,)
        _assert_unchanged(model, snap)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_result(name: str, tiny: Any) -> None:
    cls = _get(name)
    model, data = _model_for(cls, tiny), _data_for(cls, tiny)
    a = _fit(cls(seed=1), model, data)
    det_b = cls(seed=1)
    b = _fit(det_b, model, data)
    det_a = a if isinstance(a, InputDetector) else cls(seed=1)
    assert _comparable(a, det_a, data) == _comparable(b, det_b, data)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_our_error_and_model_untouched(name: str, tiny: Any) -> None:
    cls = _get(name)
    model = _model_for(cls, tiny)
    snap = _snapshot(model)
    wrong_shape = ImageDataset(torch.rand(30, 3, 5, 5), torch.arange(30) % 3)
    with pytest.raises(TrojanscanError, match=r"shape|model|input"):
        cls(seed=0).fit(model, wrong_shape)
    too_many_labels = ImageDataset(torch.rand(30, 1, 8, 8), torch.arange(30))
    with pytest.raises(TrojanscanError, match="labels"):
        cls(seed=0).fit(model, too_many_labels)
    _assert_unchanged(model, snap)


class _Exploding(nn.Module):
    """Fine on the probe, then raises inside the detector's own work."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.parametrize("name", NAMES)
def test_model_restored_when_fit_raises(name: str, tiny: Any) -> None:
    cls = _get(name)
    model = _Exploding(_model_for(cls, tiny))
    model.train()
    snap = _snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 - any error; what matters is the model
        cls(seed=0).fit(model, _data_for(cls, tiny))
    _assert_unchanged(model, snap)


def _assert_fires_on_positive_fixture(det: Any, tiny: Any) -> None:
    """An input-level detector calibrated on the backdoored fixture must flag most of its
    triggered inputs: a shipped detector that never fires is a broken one."""
    caught = float(det.filter(tiny.triggered_test()).flagged.mean())
    assert caught >= 0.5, (f"{det.name} flags {caught:.0%} of the fixture's triggered "
                           "inputs: a registered detector must fire on its positive case")


@pytest.mark.parametrize("name", NAMES)
def test_input_detector_fires_on_its_positive_fixture(name: str, tiny: Any) -> None:
    cls = _get(name)
    if cls.level != "input":
        pytest.skip("model- and data-level detectors have quality floors in their own tests")
    det = _fit(cls(seed=0), _model_for(cls, tiny), tiny.test)
    _assert_fires_on_positive_fixture(det, tiny)


def test_a_detector_that_never_fires_fails_the_kit(tiny: Any) -> None:
    from trojanscan.detectors.strip import Strip

    class NeverFires(Strip):
        name = "never_fires"

        def _threshold(self, fit_scores: np.ndarray) -> float:
            return float("inf")  # a threshold no score can pass

    det = NeverFires(n_overlays=8, blend="sum_clip", seed=0).fit(tiny.backdoored, tiny.test)
    with pytest.raises(AssertionError, match="must fire"):
        _assert_fires_on_positive_fixture(det, tiny)
