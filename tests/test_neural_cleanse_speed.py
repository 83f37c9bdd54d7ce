"""Neural Cleanse at scale: passes sized to memory, label pruning, arm scheduling.

Pure rules are tested without a model; pruning on a hand-built model whose labels need
triggers of known, very different sizes (a 3-pixel target, six ~15-pixel labels and
three 40-pixel and more), so which labels can be retired is known in advance.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.detectors import _nc_memory
from trojanscan.detectors._nc_memory import per_sample_bytes, plan_pass_batch
from trojanscan.detectors._nc_reverse import (
    LabelTrigger,
    ReverseConfig,
    _prune,
    _select_arms,
    converged_estimate,
    median_upper_bound,
    reverse_engineer,
)
from trojanscan.detectors._nc_schedule import CostSchedule
from trojanscan.detectors.neural_cleanse import NeuralCleanse
from trojanscan.exceptions import ParameterError

# -- pass sizing (pure) ------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(per=st.floats(1.0, 1e8), budget=st.floats(0.0, 1e11), wanted=st.integers(1, 5000))
def test_pass_batch_fits_the_budget(per: float, budget: float, wanted: int) -> None:
    n = plan_pass_batch(per, budget, wanted)
    assert 1 <= n <= wanted
    assert n == 1 or n * per * _nc_memory.OVERHEAD <= budget
    # the largest that fits: one more would not (unless capped by what is wanted)
    assert n == wanted or (n + 1) * per * _nc_memory.OVERHEAD > budget
    assert plan_pass_batch(per, 2 * budget, wanted) >= n


def test_pass_batch_example() -> None:
    # 10 MiB per input, 1 GiB budget, ×2 for the backward pass: 51 inputs
    assert plan_pass_batch(10 * 2**20, 2**30, 320) == 51
    assert plan_pass_batch(10 * 2**20, 2**30, 32) == 32
    assert plan_pass_batch(10 * 2**20, 0.0, 32) == 1


def _convnet(width: int) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_activation_bytes_grow_with_the_activations() -> None:
    x = torch.rand(2, 3, 16, 16)
    narrow, wide = per_sample_bytes(_convnet(4), x), per_sample_bytes(_convnet(16), x)
    # two conv layers of W×16×16 float32 activations (plus their ReLUs) per input
    assert narrow >= 4 * 16 * 16 * 4
    assert 2.5 < wide / narrow < 5.5
    # per input: the same from one or from several example inputs
    assert per_sample_bytes(_convnet(16), torch.rand(5, 3, 16, 16)) == pytest.approx(wide)


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("pass_batch", [3, 8, 16])
def test_split_passes_give_the_same_optimisation(pass_batch: int) -> None:
    """Passes of 3 (inside a label), 8 (one label) or 16 (two labels) = one pass."""
    net = _Lin().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    base = ReverseConfig(max_steps=6, mini_batches=2, batch_size=8)
    split = ReverseConfig(max_steps=6, mini_batches=2, batch_size=8, pass_batch=pass_batch)
    one = reverse_engineer(net, x, [0, 1, 2, 3], 4, base, seed=3,
                           batch_gen=torch.Generator().manual_seed(9))
    many = reverse_engineer(net, x, [0, 1, 2, 3], 4, split, seed=3,
                            batch_gen=torch.Generator().manual_seed(9))
    for lab in range(4):
        assert torch.allclose(one[lab].mask, many[lab].mask, atol=1e-5)
        assert torch.allclose(one[lab].pattern, many[lab].pattern, atol=1e-5)
        assert one[lab].step_asr == pytest.approx(many[lab].step_asr)


# -- scheduling and pruning rules (pure) -------------------------------------------


def _sched(best: float) -> CostSchedule:
    s = CostSchedule()
    s.best_l1 = best
    return s


def test_arms_are_the_smallest_norms_so_far() -> None:
    scheds = {0: _sched(30.0), 1: _sched(5.0), 2: _sched(math.inf), 3: _sched(12.0),
              4: _sched(12.0)}
    assert _select_arms([0, 1, 2, 3, 4], scheds, 2) == [1, 3]
    assert _select_arms([0, 1, 2, 3, 4], scheds, 4) == [0, 1, 3, 4]
    assert _select_arms([0, 2], scheds, 1) == [0]       # unreached labels come last
    assert _select_arms([0, 1, 2], scheds, None) == [0, 1, 2]


def test_median_upper_bound() -> None:
    assert median_upper_bound([1.0, 3.0, 2.0]) == 2.0
    assert median_upper_bound([1.0, 2.0, 4.0, 8.0]) == 3.0
    assert math.isinf(median_upper_bound([1.0, math.inf, math.inf]))


def test_only_settled_labels_far_above_the_median_are_retired() -> None:
    """An early norm can still shrink several-fold: only settled labels are retired."""
    hist = {lab: [30.0] * 15 + [10.0] * 10 for lab in range(4)}
    hist[4] = [40.0] * 25
    scheds = {lab: _sched(h[-1]) for lab, h in hist.items()}
    scheds[4].up_flag = True            # λ went up but never came down: not settled
    retired: list[int] = []
    keep = _prune([0, 1, 2, 3, 4], scheds, hist, 1.5, lambda lab, why: retired.append(lab))
    assert retired == [] and keep == [0, 1, 2, 3, 4]
    scheds[4].down_flag = True          # settled, 4× the median: retired
    keep = _prune([0, 1, 2, 3, 4], scheds, hist, 1.5, lambda lab, why: retired.append(lab))
    assert retired == [4] and keep == [0, 1, 2, 3]
    # settled but within 1.5× the median: kept
    hist[4] = [40.0] * 15 + [14.0] * 10
    scheds[4] = _sched(14.0)
    scheds[4].up_flag = scheds[4].down_flag = True
    assert _prune([4], scheds, hist, 1.5, lambda lab, why: retired.append(lab)) == [4]


def test_converged_estimate_scales_by_the_finished_labels_shrink() -> None:
    finished = [[30.0] * 15 + [10.0] * 10, [20.0] * 15 + [10.0] * 10,
                [40.0] * 15 + [10.0] * 10]
    lo, mid, hi = converged_estimate([60.0] * 15, finished)  # type: ignore[misc]
    assert (lo, mid, hi) == pytest.approx((15.0, 20.0, 30.0))
    assert converged_estimate([60.0] * 30, finished) is None     # none ran that long
    assert converged_estimate([], finished) is None


def _trigger(lab: int, history: list[float], reason: str) -> LabelTrigger:
    return LabelTrigger(label=lab, mask=torch.zeros(4, 4), pattern=torch.zeros(1, 4, 4),
                        l1=history[-1], step_asr=1.0, reached=True, steps=len(history),
                        final_cost=0.0, moved=1.0, stop_reason=reason,
                        history=tuple(history))


def test_a_flag_that_needs_the_retired_norms_to_be_large_is_dropped() -> None:
    """Retired norms are upper bounds: a flag must also hold at their low estimate."""
    finals = [2.0, 27.0, 17.0, 28.0, 24.0, 28.0, 8.0]   # ran to their end
    triggers = {lab: _trigger(lab, [3 * v] * 15 + [v] * 10, "early_stop")
                for lab, v in enumerate(finals)}
    for lab, raw in zip((7, 8, 9), (32.0, 32.0, 56.0)):  # retired after 15 steps
        triggers[lab] = _trigger(lab, [raw] * 15, "pruned")
    det = NeuralCleanse(images=False)
    p = det.resolved_params()
    sub = ImageDataset(torch.rand(4, 1, 4, 4))
    plan = {"pass_batch": 1, "per_sample_bytes": None, "budget_bytes": None, "device": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = det._result(triggers, [1.0] * 10, sub, 10, p, plan, 0.0)
        ev = r.evidence
        assert ev["l1_norms"][7:] == [32.0, 32.0, 56.0]          # as measured
        assert ev["anomaly_index"] > 3.0                         # at the upper bound
        # every finished label shrank 3× from step 15: low estimates 32/3, 32/3, 56/3
        assert ev["pruned_norm_estimates"][0][0] == pytest.approx(32.0 / 3)
        assert r.verdict == "clean" and ev["index_flagged_labels"] == []
        assert ev["pruning_sensitive"] is True
        # had those norms been converged ones, label 0 (and the 8-norm label 6) is flagged
        for lab in (7, 8, 9):
            triggers[lab] = _trigger(lab, [triggers[lab].l1] * 15, "early_stop")
        again = det._result(triggers, [1.0] * 10, sub, 10, p, plan, 0.0)
    assert again.suspected_targets[0] == 0 and again.evidence["pruning_sensitive"] is False


# -- the detector on a model with known trigger sizes ------------------------------


class _Regions(nn.Module):
    """Label k wins when the mean of its own pixel set is high: its trigger must cover
    about that set, so the reversed norms follow the set sizes."""

    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.zeros(len(sizes), 64)
        for k, n in enumerate(sizes):
            w[k, torch.randperm(64, generator=g)[:n]] = 1.0 / n
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 30.0 * (x.flatten(1) @ self.w.T - 0.7)


SIZES = [3, 14, 15, 16, 17, 18, 19, 40, 44, 48]
RUN: dict[str, Any] = {"n_samples": 200, "batch_size": 16, "mini_batches": 2,
                       "max_steps": 150, "images": False, "seed": 0}


@pytest.fixture(scope="module")
def regions() -> dict[str, Any]:
    net = _Regions(SIZES).eval()
    data = ImageDataset(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"default": NeuralCleanse(**RUN).fit(net, data),
                "no_pruning": NeuralCleanse(**RUN, prune_ratio=1e9).fit(net, data)}


def test_pruning_keeps_and_names_the_target(regions: dict[str, Any]) -> None:
    fast, full = regions["default"], regions["no_pruning"]
    assert fast.verdict == full.verdict == "backdoored"
    assert fast.suspected_targets == full.suspected_targets == (0,)
    ev = fast.evidence
    assert ev["pruned_labels"] and 0 not in ev["pruned_labels"]
    assert ev["stop_reasons"][0] != "pruned"


def test_large_trigger_labels_stop_early(regions: dict[str, Any]) -> None:
    ev, full = regions["default"].evidence, regions["no_pruning"].evidence
    big, small = [7, 8, 9], [1, 2, 3, 4, 5, 6]
    # only large-trigger labels are retired, and the retired ones ran fewer steps
    assert set(ev["pruned_labels"]) <= set(big)
    for lab in ev["pruned_labels"]:
        assert ev["steps"][lab] < full["steps"][lab]
    # the largest two stop (early stop) well before any small-trigger label
    assert max(ev["steps"][lab] for lab in (8, 9)) < min(ev["steps"][lab] for lab in small)
    assert ev["total_steps"] < full["total_steps"] and full["pruned_labels"] == []
    # the norm a retired label converged to without pruning lies between its low
    # estimate (10% slack) and its norm when retired; the flags did not depend on it
    for lab, (lo, _mid, _hi) in zip(ev["pruned_labels"], ev["pruned_norm_estimates"]):
        assert lo * 0.9 <= full["l1_norms"][lab] <= ev["l1_norms"][lab]
    assert ev["pruning_sensitive"] is False


@pytest.mark.filterwarnings("ignore")
def test_arm_scheduling_runs_the_smallest_norm_labels_first() -> None:
    net = _Regions(SIZES).eval()
    data = ImageDataset(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    r = NeuralCleanse(**RUN, arms=4).fit(net, data)
    ev = r.evidence
    assert ev["arms"] == 4 and r.suspected_targets == (0,)
    # K-Arm scheduling only reorders the work: every label still ends settled or pruned
    assert all(why in ("early_stop", "pruned", "max_steps") for why in ev["stop_reasons"])


def test_pass_batch_is_chosen_from_the_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    net = _Regions(SIZES).eval()
    data = ImageDataset(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    per = per_sample_bytes(net, data.x[:2])
    budget = 20 * per * _nc_memory.OVERHEAD        # room for 20 stamped inputs per pass
    monkeypatch.setattr("trojanscan.detectors.neural_cleanse.memory_budget",
                        lambda dev: budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = NeuralCleanse(**{**RUN, "max_steps": 3, "n_samples": 64}).fit(net, data)
        given_ = NeuralCleanse(**{**RUN, "max_steps": 3, "n_samples": 64},
                               pass_batch=7).fit(net, data)
    ev = r.evidence
    assert ev["pass_batch"] == 20 < 10 * RUN["batch_size"]
    assert ev["per_sample_bytes"] == pytest.approx(per)
    assert ev["memory_budget_bytes"] == budget and ev["device"] == "cpu"
    assert given_.evidence["pass_batch"] == 7 and given_.evidence["per_sample_bytes"] is None
    # the split changes nothing but the passes
    assert given_.evidence["l1_norms"] == pytest.approx(ev["l1_norms"], rel=1e-4)


@pytest.mark.parametrize(("param", "value"), [("arms", 0), ("arms", "some"), ("arms", True),
                                              ("pass_batch", 0), ("pass_batch", 2.5)])
def test_bad_speed_params_name_the_parameter(param: str, value: Any) -> None:
    with pytest.raises(ParameterError, match=param):
        NeuralCleanse(**{param: value}).resolved_params()


def test_faithful_mode_runs_every_label_fully() -> None:
    p = NeuralCleanse(mode="faithful").resolved_params()
    assert p["arms"] == "all" and p["prune_ratio"] is None
    with pytest.raises(ParameterError, match="arms"):
        NeuralCleanse(mode="faithful", arms=3).resolved_params()
    cfg = NeuralCleanse(mode="faithful")._config(p, 10, 32)
    assert cfg.arms is None and cfg.stall_patience is None and cfg.prune_ratio is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_budget_is_free_device_memory() -> None:
    dev = torch.device("cuda")
    free, _ = torch.cuda.mem_get_info(dev)
    assert 0 < _nc_memory.memory_budget(dev) <= free
    net = _convnet(8).to(dev)
    assert per_sample_bytes(net, torch.rand(2, 3, 16, 16, device=dev)) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = NeuralCleanse(**{**RUN, "max_steps": 3, "n_samples": 64}, device="cuda").fit(
            _Regions(SIZES), ImageDataset(torch.rand(64, 1, 8, 8)))
    assert r.evidence["device"].startswith("cuda")
