"""STRIP (Gao et al., ACSAC 2019): the maths on hand-made numbers, thresholds (with
property tests), and the detector on the tiny backdoored model and its clean twin."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.detectors import get
from trojanscan.detectors.base import count_hooks
from trojanscan.detectors.strip import Strip
from trojanscan.exceptions import DataError, ModelError, ParameterError
from trojanscan.maths import runtime as rt

# ---------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("probs", "bits"), [
    ([1.0, 0.0, 0.0, 0.0], 0.0),
    ([0.5, 0.5, 0.0, 0.0], 1.0),
    ([0.25, 0.25, 0.25, 0.25], 2.0),
    ([0.5, 0.25, 0.25, 0.0], 1.5),
    ([0.1] * 10, math.log2(10)),
])
def test_entropy_of_hand_made_probability_vectors(probs: list[float], bits: float) -> None:
    assert float(rt.entropy(torch.tensor(probs, dtype=torch.float64))) == pytest.approx(bits)
    assert float(rt.entropy(np.array(probs))) == pytest.approx(bits)


def test_entropy_from_logits_applies_softmax_first() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [-3.0, -3.0, -3.0]])
    expected = rt.entropy(torch.softmax(logits.double(), dim=1))
    assert torch.allclose(rt.entropy_from_logits(logits).double(), expected, atol=1e-6)
    # uniform logits (even negative ones) are log2(K) bits, not NaN
    assert float(rt.entropy_from_logits(logits)[2]) == pytest.approx(math.log2(3), abs=1e-6)


def test_entropy_from_extreme_logits_is_finite() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e30, 1e30, 5.0]])
    h = rt.entropy_from_logits(logits)
    assert torch.isfinite(h).all() and torch.allclose(h, torch.zeros(2), atol=1e-6)


def test_strip_entropy_is_over_classes_then_averaged_over_overlays() -> None:
    # every overlay gives a confident but *different* class: entropy over the classes of
    # each prediction is 0, so STRIP's entropy is 0 (entropy across overlays would be high)
    k = 4
    confident = torch.full((1, k, k), -50.0)
    for j in range(k):
        confident[0, j, j] = 50.0
    assert float(rt.strip_entropy(confident)[0]) == pytest.approx(0.0, abs=1e-6)
    # one uniform prediction among two overlays: mean of 2 bits and 0 bits
    mixed = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, -50.0, -50.0, -50.0]]])
    assert float(rt.strip_entropy(mixed)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(rt.strip_scores(mixed)[0]) == pytest.approx(-1.0, abs=1e-6)


def test_median_statistic_ignores_a_few_erased_triggers() -> None:
    # 10 overlays: 8 confident (0 bits), 2 uniform over 4 classes (2 bits each)
    confident = torch.tensor([50.0, -50.0, -50.0, -50.0])
    logits = torch.stack([confident] * 8 + [torch.zeros(4)] * 2).unsqueeze(0)
    assert float(rt.strip_entropy(logits)[0]) == pytest.approx(0.4, abs=1e-5)
    assert float(rt.strip_entropy(logits, "median")[0]) == pytest.approx(0.0, abs=1e-5)
    # even N: the median is the mean of the two middle entropies (0 and 2 bits here)
    half = torch.stack([confident] * 5 + [torch.zeros(4)] * 5).unsqueeze(0)
    assert float(rt.strip_entropy(half, "median")[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(rt.strip_scores(half, "median")[0]) == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ParameterError, match="statistic"):
        rt.strip_entropy(logits, "mode")


def test_tail_statistic_is_the_mean_of_the_highest_tenth() -> None:
    # 20 overlays: 17 confident (0 bits), 3 uniform over 4 classes (2 bits): the top 10%
    # (2 overlays) are both uniform, so the tail is 2 bits while the mean is 0.3
    confident = torch.tensor([50.0, -50.0, -50.0, -50.0])
    logits = torch.stack([confident] * 17 + [torch.zeros(4)] * 3).unsqueeze(0)
    assert float(rt.strip_entropy(logits)[0]) == pytest.approx(0.3, abs=1e-5)
    assert float(rt.strip_entropy(logits, "tail")[0]) == pytest.approx(2.0, abs=1e-5)
    assert float(rt.strip_scores(logits, "tail")[0]) == pytest.approx(-2.0, abs=1e-5)
    # one uniform overlay among 20: half the tail
    one = torch.stack([confident] * 19 + [torch.zeros(4)]).unsqueeze(0)
    assert float(rt.strip_entropy(one, "tail")[0]) == pytest.approx(1.0, abs=1e-5)
    # fewer than 10 overlays: the tail is the single highest entropy
    few = torch.stack([confident] * 3 + [torch.zeros(4)]).unsqueeze(0)
    assert float(rt.strip_entropy(few, "tail")[0]) == pytest.approx(2.0, abs=1e-5)


def test_strip_entropy_needs_three_dimensions() -> None:
    with pytest.raises(ParameterError, match="logits"):
        rt.strip_entropy(torch.zeros(3, 4))


def test_superimpose_blends() -> None:
    x = torch.full((2, 1, 2, 2), 0.8)
    o = torch.full((3, 1, 2, 2), 0.6)
    assert torch.allclose(rt.superimpose(x, o, "sum"), torch.full((2, 3, 1, 2, 2), 1.4))
    assert torch.allclose(rt.superimpose(x, o, "sum_clip"), torch.ones(2, 3, 1, 2, 2))
    assert torch.allclose(rt.superimpose(x, o, "average"), torch.full((2, 3, 1, 2, 2), 0.7))
    per_input = torch.stack([o, o * 0])  # B×N×C×H×W
    out = rt.superimpose(x, per_input, "sum")
    assert torch.allclose(out[1], torch.full((3, 1, 2, 2), 0.8))
    assert torch.allclose(rt.superimpose(x, o, "max"), torch.full((2, 3, 1, 2, 2), 0.8))
    with pytest.raises(ParameterError, match="blend"):
        rt.superimpose(x, o, "median")


# ---------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------


def test_normal_threshold_is_the_papers_rule() -> None:
    entropies = np.random.default_rng(0).normal(1.2, 0.3, size=500)
    # the paper: fit a normal to clean entropies, flag entropy below its FRR quantile
    mu, sigma = norm.fit(entropies)
    paper = norm.ppf(0.01, loc=mu, scale=sigma)
    # ours works on scores = -entropy, flagging score > threshold
    assert rt.normal_threshold(-entropies, 0.01) == pytest.approx(-paper)


def test_empirical_threshold_keeps_at_most_frr_of_clean_above() -> None:
    scores = np.arange(100, dtype=float)
    thr = rt.empirical_threshold(scores, 0.05)
    assert rt.flag(scores, thr).sum() == 5 and thr == 94.0
    # fewer than 1/frr samples: the maximum, nothing flagged
    assert rt.empirical_threshold(np.array([3.0, 1.0, 2.0]), 0.01) == 3.0


def test_threshold_input_errors() -> None:
    with pytest.raises(ParameterError, match="frr"):
        rt.normal_threshold([1.0, 2.0], 1.5)
    with pytest.raises(ParameterError, match="frr"):
        rt.empirical_threshold([1.0, 2.0], 0)
    with pytest.raises(ParameterError, match="threshold_method"):
        rt.fit_threshold([1.0, 2.0], 0.1, "gamma")
    with pytest.raises(DataError, match="NaN"):
        rt.normal_threshold([1.0, float("nan")], 0.1)
    with pytest.raises(DataError, match="zero"):
        rt.empirical_threshold([], 0.1)


def test_flag_never_lets_nan_through() -> None:
    assert rt.flag(np.array([0.0, np.nan, 2.0]), 1.0).tolist() == [False, True, True]


scores_st = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=200)
frr_st = st.floats(1e-4, 0.999)


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, a=frr_st, b=frr_st, method=st.sampled_from(rt.THRESHOLD_METHODS))
def test_threshold_monotone_in_frr(scores: list[float], a: float, b: float,
                                   method: str) -> None:
    lo, hi = min(a, b), max(a, b)
    t_lo = rt.fit_threshold(scores, lo, method)
    t_hi = rt.fit_threshold(scores, hi, method)
    assert t_hi <= t_lo + 1e-9 * max(1.0, abs(t_lo))  # a larger FRR never raises the bar
    # so the set of flagged inputs only grows with the FRR
    s = np.asarray(scores)
    assert rt.flag(s, t_lo).sum() <= rt.flag(s, t_hi).sum()


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, frr=frr_st)
def test_empirical_threshold_respects_frr_on_its_own_data(scores: list[float],
                                                          frr: float) -> None:
    s = np.asarray(scores)
    flagged = rt.flag(s, rt.empirical_threshold(s, frr)).sum()
    assert flagged <= math.floor(frr * len(s) + 1e-9)


@settings(max_examples=100, deadline=None)
@given(scores=scores_st, frr=frr_st)
def test_conservative_threshold_keeps_fewer_above_than_the_empirical_one(
        scores: list[float], frr: float) -> None:
    s = np.asarray(scores)
    t_c = rt.conservative_threshold(s, frr)
    assert t_c >= rt.empirical_threshold(s, frr) - 1e-12
    j = rt.conservative_rank(len(s), frr)
    assert rt.flag(s, t_c).sum() <= (j or 0)


def test_conservative_rank_values() -> None:
    # 1 − (1 − 1%)^n ≥ 90% needs n ≥ 230 even for the maximum
    assert rt.conservative_rank(229, 0.01) is None and rt.conservative_rank(230, 0.01) == 0
    assert rt.conservative_rank(3200, 0.01) == 24  # 0.75% of the scores above, not 1%
    ranks = [rt.conservative_rank(n, 0.01) or 0 for n in range(230, 5000, 97)]
    assert ranks == sorted(ranks)


def test_conservative_threshold_keeps_its_promise_on_fresh_data() -> None:
    """Over many calibrations on fresh normal samples the true FRR (known exactly from the
    normal's tail) is at most the target in about 90% of them; the empirical quantile
    only in about half."""
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    ok = {"conservative": 0, "empirical": 0}
    trials = 400
    for _ in range(trials):
        s = rng.standard_normal(1000)
        for method in ok:
            ok[method] += norm.sf(rt.fit_threshold(s, 0.02, method)) <= 0.02
    assert 0.85 <= ok["conservative"] / trials <= 0.95, ok
    assert ok["empirical"] / trials < 0.75, ok


def test_clopper_pearson_upper_bound() -> None:
    assert rt.clopper_pearson_upper(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300))
    assert 0.01 < rt.clopper_pearson_upper(3, 300) < 0.03
    assert rt.clopper_pearson_upper(5, 5) == 1.0


def test_calibration_split_is_disjoint_and_seeded() -> None:
    pool, fit, hold = rt.calibration_split(100, pool_fraction=0.2, holdout_fraction=0.3,
                                           seed=4)
    assert (len(pool), len(fit), len(hold)) == (20, 50, 30)
    assert len(set(pool) | set(fit) | set(hold)) == 100
    again = rt.calibration_split(100, pool_fraction=0.2, holdout_fraction=0.3, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(again, (pool, fit, hold), strict=True))
    with pytest.raises(DataError, match="more clean samples"):
        rt.calibration_split(4, pool_fraction=0.5, holdout_fraction=0.4, seed=0)
    with pytest.raises(ParameterError, match="holdout_fraction"):
        rt.calibration_split(10, pool_fraction=0.2, holdout_fraction=1.2, seed=0)


# ---------------------------------------------------------------------------
# the detector on the tiny models
# ---------------------------------------------------------------------------

FAST = {"n_overlays": 32, "blend": "sum_clip"}


@pytest.fixture(scope="module")
def strip_bd(tiny: Any) -> Strip:
    return Strip(**FAST, seed=0).fit(tiny.backdoored, tiny.test)


def test_registered_and_documented() -> None:
    cls = get("strip")
    assert cls is Strip and cls.level == "input"
    assert "Gao" in (__import__("trojanscan.detectors.strip", fromlist=["x"]).__doc__ or "")
    assert Strip.paper().get_params()["n_overlays"] == 100  # the paper's N
    assert Strip().get_params()["n_overlays"] == 32  # per superimposition kind


def test_flags_triggered_inputs_and_few_clean_ones(tiny: Any, strip_bd: Strip) -> None:
    trig = strip_bd.filter(tiny.triggered_test())
    assert trig.flagged.mean() >= 0.9, trig.flagged.mean()
    assert trig.verdict == "triggered"
    # held-out clean inputs: the FRR actually measured stays near the 1% asked for
    assert strip_bd.frr_measured_ is not None and strip_bd.frr_measured_ <= 0.05
    assert strip_bd.n_holdout_ > 50 and strip_bd.n_pool_ > 50
    assert strip_bd.filter(tiny.test.x).flagged.mean() <= 0.05
    # triggered inputs really have lower entropy (the paper's quantity, paper's settings)
    paper = Strip.paper(n_overlays=32, seed=0).fit(tiny.backdoored, tiny.test)
    clean_entropy = -paper.fit_scores_
    assert np.median(paper.entropy(tiny.triggered_test())) < np.median(clean_entropy)


def test_consistency_statistic_flags_triggered_inputs(tiny: Any) -> None:
    det = Strip(**FAST, statistic="consistency", threshold_method="empirical",
                seed=0).fit(tiny.backdoored, tiny.test)
    assert det.filter(tiny.triggered_test()).flagged.mean() >= 0.9
    assert det.filter(tiny.test.x).flagged.mean() <= 0.05
    assert "log-probability" in det.calibration_info()["score"]
    with pytest.raises(ParameterError, match="entropy"):
        det.entropy(tiny.test.x[:2])


def test_tail_statistic_with_conservative_threshold_flags_triggered_inputs(tiny: Any) -> None:
    # 238 fit scores give only their maximum as a 90%-sure 1% threshold: ask for 5%
    det = Strip(**FAST, statistic="tail", threshold_method="conservative", frr=0.05,
                seed=0).fit(tiny.backdoored, tiny.test)
    assert det.filter(tiny.triggered_test()).flagged.mean() >= 0.9
    assert det.filter(tiny.test.x).flagged.mean() <= 0.05
    assert det.entropy(tiny.test.x[:2]).shape == (2,)  # an entropy statistic


def test_stamped_inputs_pass_on_the_clean_twin(tiny: Any) -> None:
    det = Strip(**FAST, seed=0).fit(tiny.clean, tiny.test)
    assert det.filter(tiny.triggered_test()).flagged.mean() <= 0.1


def test_filter_result_contents(tiny: Any, strip_bd: Strip) -> None:
    x = tiny.test.x[:25]
    res = strip_bd.filter(x)
    with torch.no_grad():
        expected = tiny.backdoored(x).argmax(1).numpy()
    assert np.array_equal(res.predictions, expected)
    assert res.scores.shape == (25,) and res.flagged.dtype == bool
    assert np.array_equal(res.flagged, res.scores > strip_bd.threshold_)
    d = res.to_dict()
    for key in ("verdict", "flagged", "predictions", "threshold", "frr", "frr_measured",
                "num_holdout", "n_overlays", "blend"):
        assert key in d
    assert d["frr"] == 0.01 and d["blend"] == "sum_clip"


def _sub(det: Strip, x: torch.Tensor, bs: int) -> np.ndarray:
    return np.concatenate([det.score(x[i:i + bs]) for i in range(0, len(x), bs)])


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_scores_do_not_depend_on_batch_size_or_order(tiny: Any, strip_bd: Strip,
                                                     data: st.DataObject) -> None:
    x = tiny.test.x[:16]
    ref = strip_bd.score(x)
    perm = np.array(data.draw(st.permutations(list(range(16)))))
    bs = data.draw(st.integers(1, 16))
    np.testing.assert_allclose(_sub(strip_bd, x[torch.from_numpy(perm)], bs), ref[perm],
                               atol=1e-5)


@pytest.mark.parametrize("draw", ["per_input", "fixed"])
def test_batch_invariance_for_both_overlay_draws(tiny: Any, draw: str) -> None:
    det = Strip(n_overlays=8, blend="sum_clip", overlay_draw=draw, batch_size=64,
                seed=3).fit(tiny.backdoored, tiny.test)
    x = tiny.test.x[:30]
    ref = det.score(x)
    np.testing.assert_allclose(_sub(det, x, 7), ref, atol=1e-5)
    np.testing.assert_allclose(det.score(x.flip(0)), ref[::-1], atol=1e-5)
    idx = det.overlay_indices(x)
    assert idx.shape == (30, 8)
    if draw == "fixed":
        assert (idx == idx[0]).all()
    else:  # each input its own draw, without replacement from the pool
        assert len({tuple(r) for r in idx}) > 25
        assert all(len(set(r)) == 8 for r in idx)


def test_same_seed_same_scores_other_seed_other_overlays(tiny: Any) -> None:
    x = tiny.test.x[:10]
    a = Strip(n_overlays=8, seed=5).fit(tiny.backdoored, tiny.test)
    b = Strip(n_overlays=8, seed=5).fit(tiny.backdoored, tiny.test)
    c = Strip(n_overlays=8, seed=6).fit(tiny.backdoored, tiny.test)
    assert np.array_equal(a.score(x), b.score(x)) and a.threshold_ == b.threshold_
    assert not np.array_equal(a.overlay_indices(x), c.overlay_indices(x))


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.inner(x)


def test_perturbations_of_a_batch_run_as_one_inference(tiny: Any) -> None:
    model = _Counting(tiny.backdoored)
    det = Strip(n_overlays=20, batch_size=4096, blend="sum_clip", sequential=False
                ).fit(model, tiny.test)
    model.batches.clear()
    det.score(tiny.test.x[:30])
    # one batch of 30×20 perturbed inputs, one plain batch for the predictions
    assert sorted(model.batches) == [30, 600]
    model.batches.clear()
    Strip(n_overlays=20, batch_size=200, blend="sum_clip", sequential=False
          ).fit(model, tiny.test).score(tiny.test.x[:30])
    assert max(model.batches) <= 200


def test_model_left_untouched(tiny: Any, strip_bd: Strip) -> None:
    model = tiny.backdoored
    assert count_hooks(model) == 0
    model.train()
    try:
        strip_bd.score(tiny.test.x[:5])
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()


def test_bad_inputs_are_our_errors(tiny: Any, strip_bd: Strip) -> None:
    with pytest.raises(DataError, match=r"shape N×1×8×8"):
        strip_bd.score(torch.rand(3, 1, 28, 28))
    with pytest.raises(DataError, match="NaN"):
        strip_bd.score(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        strip_bd.score(torch.full((2, 1, 8, 8), 3.0))
    with pytest.raises(ParameterError, match="not calibrated"):
        Strip().score(tiny.test.x[:2])
    assert strip_bd.score(tiny.test.x[:0]).shape == (0,)


@pytest.mark.parametrize(("params", "name"), [
    ({"n_overlays": 0}, "n_overlays"), ({"blend": "median"}, "blend"), ({"frr": 0.0}, "frr"),
    ({"threshold_method": "gamma"}, "threshold_method"), ({"pool_fraction": 0.0},
                                                          "pool_fraction"),
    ({"holdout_fraction": 0.95}, "holdout_fraction"), ({"overlay_draw": "x"}, "overlay_draw"),
    ({"batch_size": 0}, "batch_size"), ({"max_samples": 2}, "max_samples"),
    ({"statistic": "mode"}, "statistic"), ({"blends": ("sum", "mode")}, "blends"),
    ({"statistic": "tail"}, "statistic"), ({"delta": 0.0}, "delta"),
    ({"min_headroom": 1.5}, "min_headroom"), ({"first_look": 1}, "first_look"),
    ({"sequential": "yes"}, "sequential"),
])
def test_bad_parameters_name_themselves(tiny: Any, params: dict[str, Any], name: str) -> None:
    with pytest.raises(ParameterError, match=name):
        Strip(**params).fit(tiny.backdoored, tiny.test)


def test_model_errors_are_reported(tiny: Any) -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls > 1:
                return self.lin(x.flatten(1)).unsqueeze(0)  # wrong rank after the probe
            return self.lin(x.flatten(1))

    with pytest.raises(ModelError, match="N×K logits"):
        Strip(n_overlays=4).fit(Broken(), ImageDataset(torch.rand(40, 1, 8, 8)))


def test_unclipped_sum_is_available_and_scores_out_of_range_superimpositions(
        tiny: Any) -> None:
    det = Strip(n_overlays=8, blend="sum", statistic="mean").fit(tiny.backdoored, tiny.test)
    s = det.score(tiny.test.x[:5])
    assert np.isfinite(s).all() and (s <= 0).all()  # negative entropies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cpu_model(tiny: Any) -> None:  # pragma: no cover - GPU only
    det = Strip(**FAST, device="cuda").fit(tiny.backdoored, tiny.test)
    assert next(tiny.backdoored.parameters()).device.type == "cpu"
    cpu = Strip(**FAST, device="cpu").fit(tiny.backdoored, tiny.test)
    np.testing.assert_allclose(det.score(tiny.test.x[:20]), cpu.score(tiny.test.x[:20]),
                               atol=1e-4)


def test_consistency_is_the_probability_kept_on_the_own_prediction() -> None:
    # input 0 keeps class 2 under every overlay; input 1 is confident but on *other*
    # classes (the overlays'): low entropy, yet no consistency
    big = 30.0
    keep = torch.full((4, 3), -big)
    keep[:, 2] = big
    swap = torch.full((4, 3), -big)
    swap[:2, 0] = big
    swap[2:, 1] = big
    logits = torch.stack([keep, swap])
    pred = torch.tensor([2, 2])
    c = rt.consistency(logits, pred)  # mean log-probability of the own class
    assert c.tolist() == pytest.approx([0.0, -2 * big], abs=1e-4)
    assert torch.equal(rt.strip_scores(logits, "consistency", pred), c)
    # entropy cannot tell them apart: both are confident everywhere
    assert rt.strip_entropy(logits).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(ParameterError, match="predicted"):
        rt.strip_scores(logits, "consistency")
    with pytest.raises(ParameterError, match="predicted"):
        rt.consistency(logits, torch.tensor([1, 2, 0]))
