"""MM-BD: the maximum-margin null's p-values on synthetic statistics, and the detector on
a model with a planted backdoor, its clean twin and the trained tiny BadNets fixture."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import binom
from torch import nn

from trojanscan.detectors.mmbd import MMBD
from trojanscan.exceptions import DetectorNotApplicable, ParameterError
from trojanscan.maths.margins import (
    calibrated_log_p,
    fit_gamma_null,
    label_p_values,
    log_max_p_value,
    margins,
)

K = 10
FAST = {"n_init": 8, "steps": 100}


def _null_draws(seed: int, k: int = K) -> np.ndarray:
    return np.random.default_rng(seed).gamma(3.0, 1.0, size=k)


def test_margins_are_own_logit_minus_largest_other() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    got = margins(logits, torch.tensor([0, 2]))
    assert torch.allclose(got, torch.tensor([1.0, -6.0]))


def test_planted_outlier_gets_a_small_p_value_and_is_the_named_class() -> None:
    stats = _null_draws(0)
    stats[4] = 30.0
    logs, nulls = label_p_values(stats)
    assert int(np.argmin(logs)) == 4
    assert math.exp(logs[4]) < 0.01
    assert nulls[4].kind == "gamma" and 4 not in [i for i, v in enumerate(nulls[4].values)
                                                   if v == 30.0]
    cal, _ = calibrated_log_p(30.0, np.delete(stats, 4), draws=200, seed=0)
    assert math.exp(cal) < 0.01
    # an ordinary class of the same model is not significant
    assert math.exp(logs[int(np.argsort(stats)[K // 2])]) > 0.05


def test_calibrated_p_is_roughly_uniform_under_the_null() -> None:
    """K null statistics and no outlier: the calibrated p of the largest falls below α
    about α of the time (within a binomial bound over many seeds)."""
    n, alpha = 60, 0.1
    ps = []
    for seed in range(n):
        s = _null_draws(seed)
        i = int(np.argmax(s))
        ps.append(math.exp(calibrated_log_p(float(s[i]), np.delete(s, i), draws=60,
                                            seed=seed)[0]))
    alarms = sum(p < alpha for p in ps)
    assert binom.ppf(0.0005, n, alpha) <= alarms <= binom.ppf(0.9995, n, alpha), alarms
    assert 0.3 < float(np.median(ps)) < 0.7


def test_the_papers_p_is_anti_conservative_under_the_null() -> None:
    """The paper's p (Gamma fitted to the K-1 smallest) falls below α far more often
    than α: why the calibrated mode exists, and what the docs warn about."""
    n, alpha = 40, 0.05
    alarms = 0
    for seed in range(n):
        s = _null_draws(seed)
        i = int(np.argmax(s))
        null = fit_gamma_null(np.delete(s, i))
        alarms += math.exp(log_max_p_value(float(s[i]), null, K)) < alpha
    assert alarms > binom.ppf(0.999, n, alpha)


def test_degenerate_statistics_fall_back_to_the_empirical_null() -> None:
    logs, nulls = label_p_values(np.full(5, 2.0))
    assert all(n.kind == "empirical" for n in nulls)
    assert np.all(np.isfinite(logs)) and np.all(np.exp(logs) > 0.05)
    with pytest.raises(ValueError, match="at least 3"):
        label_p_values(np.array([1.0, 2.0]))


class Planted(nn.Module):
    """A linear 8×8 classifier whose class rows are permutations of one vector (so clean
    classes reach similar margins) plus, when ``backdoor``, a gate that adds 40 to the
    target's logit when the bottom-right 2×2 patch is near white."""

    def __init__(self, backdoor: bool, target: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(64, generator=g)
        w = torch.stack([base[torch.randperm(64, generator=g)] for _ in range(K)])
        self.lin = nn.Linear(64, K)
        with torch.no_grad():
            self.lin.weight.copy_(0.3 * w)
            self.lin.bias.zero_()
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., -2:, -2:] = 1
        self.register_buffer("mask", mask)
        gain = torch.zeros(K)
        gain[target] = 40.0 if backdoor else 0.0
        self.register_buffer("gain", gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.relu((x * self.mask).sum((1, 2, 3)) - 3.0)
        return self.lin(x.flatten(1)) + gate[:, None] * self.gain


def test_fires_on_a_planted_backdoor_names_its_target_and_spares_the_clean_twin() -> None:
    bd = MMBD(input_shape=(1, 8, 8), **FAST).fit(Planted(backdoor=True))
    assert bd.verdict == "backdoored" and bd.suspected_targets == (3,)
    assert bd.p_value is not None and bd.p_value < 0.01
    assert bd.label_p_values is not None and len(bd.label_p_values) == K
    assert int(np.argmin(bd.label_p_values)) == 3
    assert bd.evidence["calibrated_p_value"] < 0.05 and bd.evidence["data_used"] is False
    clean = MMBD(input_shape=(1, 8, 8), **FAST).fit(Planted(backdoor=False))
    assert clean.verdict == "clean" and clean.suspected_targets == ()
    assert clean.p_value is not None and clean.p_value > 0.05
    # the optimiser moved: the trigger's margin is found from random starts
    assert bd.evidence["max_margins"][3] > 4 * np.median(clean.evidence["max_margins"])


def test_same_seed_same_statistics_other_seed_other_starts() -> None:
    model = Planted(backdoor=False)
    a = MMBD(input_shape=(1, 8, 8), seed=5, **FAST).fit(model)
    b = MMBD(input_shape=(1, 8, 8), seed=5, **FAST).fit(model)
    c = MMBD(input_shape=(1, 8, 8), seed=6, n_init=8, steps=3).fit(model)
    assert a.evidence["max_margins"] == b.evidence["max_margins"]
    assert a.label_p_values == b.label_p_values
    assert c.evidence["max_margins"] != a.evidence["max_margins"]


def test_names_the_target_of_the_trained_tiny_badnets_model(tiny: Any) -> None:
    """On the trained 8×8 fixture the backdoor target reaches the largest margin, well
    above what the same class reaches in the clean twin. (The verdict itself is not
    asserted: the clean twin's class 2 also stands out, see docs/detectors/mmbd.md.)"""
    bd = MMBD(seed=0).fit(tiny.backdoored, tiny.test)
    clean = MMBD(seed=0).fit(tiny.clean, tiny.test)
    assert bd.evidence["tested_class"] == tiny.target
    t = tiny.target
    assert bd.evidence["max_margins"][t] > 1.2 * clean.evidence["max_margins"][t]
    assert bd.label_p_values is not None
    assert int(np.argmin(bd.label_p_values)) == tiny.target


def test_needs_the_input_shape_without_data_and_three_classes() -> None:
    with pytest.raises(ParameterError, match="input_shape"):
        MMBD().fit(Planted(backdoor=False))
    with pytest.raises(ParameterError, match="mode"):
        MMBD(mode="fast", input_shape=(1, 8, 8)).fit(Planted(backdoor=False))

    class TwoClass(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :2]

    with pytest.raises(DetectorNotApplicable, match="at least 3 classes"):
        MMBD(input_shape=(1, 8, 8)).fit(TwoClass())
