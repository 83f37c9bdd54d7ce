"""Neural Cleanse: the outlier rule, the λ schedule, the optimiser and the detector.

The maths and the schedule are tested without any model; the detector on the tiny
digits fixture (BadNets 2×2 patch → class 0, and its clean twin) with a small budget.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.detectors._nc_reverse import (
    ReverseConfig,
    from_unit,
    label_generator,
    reverse_engineer,
    to_unit,
)
from trojanscan.detectors._nc_schedule import CostSchedule
from trojanscan.detectors.base import count_hooks
from trojanscan.detectors.neural_cleanse import NeuralCleanse, reversed_trigger
from trojanscan.exceptions import (
    DetectorNotApplicable,
    IncompatibleError,
    ModelError,
    ParameterError,
)
from trojanscan.maths.outliers import (
    anomaly_index,
    anomaly_p_values,
    flag_outliers,
    index_threshold,
    reference_p_values,
)

#: a small budget that still separates the tiny backdoored model from its twin
SMALL: dict[str, Any] = {"n_samples": 200, "batch_size": 16, "mini_batches": 2,
                         "max_steps": 150}


# -- the outlier rule (pure) -------------------------------------------------------

def test_mad_index_matches_hand_computation() -> None:
    norms = [1.0, 9.0, 10.0, 10.0, 11.0, 12.0, 40.0]
    # median 10; |x - 10| = 9,1,0,0,1,2,30 -> median 1 -> MAD 1.4826
    idx = anomaly_index(norms)
    assert idx[0] == pytest.approx(9 / 1.4826)
    assert idx[6] == pytest.approx(-30 / 1.4826)
    assert idx[2] == 0.0


def test_outlier_rule_is_one_sided() -> None:
    norms = [1.0, 9.0, 10.0, 10.0, 11.0, 12.0, 40.0]
    flags = flag_outliers(norms)
    # the big trigger (40) is 20 MADs away but above the median: never flagged
    assert flags.tolist() == [True, False, False, False, False, False, False]
    assert not flag_outliers([10.0, 11.0, 9.0, 10.5, 9.5, 100.0]).any()
    # threshold is "> 2": an index of exactly 2 is not flagged
    mad = 1.4826
    exact = [10.0 - 2 * mad, 9.0, 10.0, 10.0, 11.0]  # median 10, MAD 1.4826
    assert anomaly_index(exact)[0] == pytest.approx(2.0)
    assert not flag_outliers(exact)[0]


def test_mad_zero_and_bad_input() -> None:
    idx = anomaly_index([5.0, 5.0, 5.0, 1.0, 9.0])
    assert math.isinf(idx[3]) and idx[3] > 0 and idx[0] == 0.0 and idx[4] < 0
    assert not flag_outliers([3.0, 3.0, 3.0]).any()
    with pytest.raises(ParameterError, match="norms"):
        anomaly_index([1.0, 2.0])
    with pytest.raises(ParameterError, match="norms"):
        anomaly_index([1.0, float("nan"), 2.0])
    with pytest.raises(ParameterError, match="threshold"):
        flag_outliers([1.0, 2.0, 3.0], threshold=0)
    with pytest.raises(ParameterError, match="norms"):
        anomaly_p_values([1.0, 0.0, 2.0])


def test_p_values_are_calibrated_under_the_null() -> None:
    """With iid log-normal norms (no backdoor) min p < α happens about α of the time."""
    rng = np.random.default_rng(123)
    hits = [anomaly_p_values(np.exp(rng.normal(3.0, 0.3, 10))).min() < 0.05
            for _ in range(1500)]
    assert 0.03 <= float(np.mean(hits)) <= 0.07


def test_p_values_order_and_range() -> None:
    norms = np.array([2.0, 30.0, 28.0, 35.0, 31.0, 29.0, 33.0, 27.0, 32.0, 30.5])
    p = anomaly_p_values(norms)
    assert p.shape == (10,) and np.all((p > 0) & (p <= 1))
    assert p[0] < 0.01 and p.argmin() == 0
    # monotone: a smaller norm never gets a larger p-value
    order = np.argsort(norms)
    assert np.all(np.diff(p[order]) >= 0)
    # the calibrated threshold on the index is above the paper's 2 for K = 10
    assert index_threshold(10, 0.05) > 2.0


def test_reference_p_values_remove_class_intrinsic_small_norms() -> None:
    """Label 8 needs a small trigger in every clean model: not suspicious against
    references, while label 3's collapse is."""
    rng = np.random.default_rng(0)
    base = np.array([70.0, 65, 68, 72, 66, 75, 40, 250, 25, 70])
    refs = base * np.exp(rng.normal(0, 0.08, (4, 10)))
    clean = base * np.exp(rng.normal(0, 0.08, 10))
    backdoored = clean.copy()
    backdoored[3] = 6.0
    assert flag_outliers(clean)[8]  # the paper's rule false-alarms on label 8
    p_clean = reference_p_values(clean, refs)
    p_bd = reference_p_values(backdoored, refs)
    assert p_clean.min() > 0.05
    assert p_bd.argmin() == 3 and p_bd[3] < 1e-4 and p_bd[8] > 0.05
    assert np.all((p_bd >= 0) & (p_bd <= 1))
    with pytest.raises(ParameterError, match="reference"):
        reference_p_values(clean, refs[:1])
    with pytest.raises(ParameterError, match="reference"):
        reference_p_values(clean, refs[:, :5])


# -- the λ schedule (pure state machine) -------------------------------------------

def _run(asrs: list[float], l1s: list[float] | None = None, **kw: Any) -> tuple[
        CostSchedule, list[float], list[bool]]:
    s = CostSchedule(**kw)
    costs, best = [], []
    for i, a in enumerate(asrs):
        best.append(s.update(a, l1s[i] if l1s else 100.0 - i))
        costs.append(s.cost)
        if s.stopped:
            break
    return s, costs, best


def test_schedule_starts_at_zero_then_init_cost_after_patience() -> None:
    s, costs, _ = _run([1.0] * 4)
    assert costs == [0.0] * 4
    s, costs, _ = _run([1.0] * 5)
    assert costs[-1] == 1e-3 and not s.up_flag
    # a failure while λ is 0 resets the count
    s, costs, _ = _run([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert costs == [0.0] * 7
    s, costs, _ = _run([1.0, 1.0, 0.5] + [1.0] * 5)
    assert costs[-1] == 1e-3


def test_schedule_up_by_two_down_by_two_to_the_1_5() -> None:
    # 5 successes set λ (the 5th also counts as the first success at 1e-3), then every
    # 5 consecutive successes double it: steps 9 and 14
    s, costs, _ = _run([1.0] * 14)
    assert costs[4] == 1e-3 and costs[7] == 1e-3
    assert costs[8] == pytest.approx(2e-3) and costs[13] == pytest.approx(4e-3)
    assert s.up_flag and not s.down_flag
    # then 5 failures divide by 2**1.5 (not by sqrt 2 as the reference's comment says)
    s, costs, _ = _run([1.0] * 9 + [0.0] * 5)
    assert costs[-1] == pytest.approx(2e-3 / 2 ** 1.5)
    assert s.down_flag
    # a success breaks a run of failures
    s, costs, _ = _run([1.0] * 9 + [0.0] * 4 + [1.0] + [0.0] * 4)
    assert costs[-1] == pytest.approx(2e-3)


def test_schedule_best_is_lowest_l1_among_successful_steps() -> None:
    asrs = [0.5, 0.995, 0.98, 0.99, 1.0]
    l1s = [1.0, 50.0, 5.0, 40.0, 45.0]
    s, _, best = _run(asrs, l1s)
    # 1.0 and 5.0 came with ASR < 0.99: not eligible; 0.99 is eligible (>=)
    assert best == [False, True, False, True, False]
    assert s.best_l1 == 40.0 and s.reached
    s, _, best = _run([0.9] * 30)
    assert not s.reached and not any(best) and math.isinf(s.best_l1)


def test_schedule_early_stop_needs_both_directions_and_patience() -> None:
    # λ only ever goes up: never stops, however long nothing improves
    s, _, _ = _run([1.0] * 200, [10.0] * 200)
    assert not s.stopped and s.steps == 200
    # up (step 9), then down (5 failures), then 25 steps without improvement -> stop
    asrs = [1.0] * 9 + [0.0] * 5 + [1.0] * 40
    s, _, _ = _run(asrs, [10.0] * len(asrs))
    assert s.up_flag and s.down_flag and s.stopped
    # the counter started at step 1 (a best exists from step 1 on); both flags are
    # set at step 14; the counter reaches 25 at step 26
    assert s.steps == 26
    # an improvement resets the counter
    l1s = [10.0] * 20 + [9.0] + [9.0] * 40
    s2, _, _ = _run(asrs, l1s)
    assert s2.stopped and s2.steps == 21 + 25


def test_schedule_early_stop_threshold_requires_relative_improvement() -> None:
    asrs = [1.0] * 9 + [0.0] * 5 + [1.0] * 60
    l1s = [100.0 - 0.1 * i for i in range(len(asrs))]  # tiny improvements every step
    strict, _, _ = _run(asrs, l1s)
    loose, _, _ = _run(asrs, l1s, early_stop_threshold=0.99)
    assert not strict.stopped  # 1.0: every strict improvement resets the counter
    assert loose.stopped       # 0.99: 0.1% improvements do not count


# -- the optimiser -----------------------------------------------------------------

class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_joint_optimisation_equals_separate_runs() -> None:
    """Stacking labels in one batch is the same maths as optimising each alone."""
    net = _Lin().eval()
    x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cfg = ReverseConfig(max_steps=8, mini_batches=2, batch_size=8)
    joint = reverse_engineer(net, x, [0, 2], 4, cfg, seed=3,
                             batch_gen=torch.Generator().manual_seed(9))
    for lab in (0, 2):
        alone = reverse_engineer(net, x, [lab], 4, cfg, seed=3,
                                 batch_gen=torch.Generator().manual_seed(9))[lab]
        assert torch.allclose(joint[lab].mask, alone.mask, atol=1e-5)
        assert torch.allclose(joint[lab].pattern, alone.pattern, atol=1e-5)
        assert joint[lab].steps == alone.steps == 8


def test_tanh_parameterisation_round_trip() -> None:
    v = torch.rand(100)
    assert torch.allclose(to_unit(from_unit(v)), v, atol=1e-5)
    assert float(to_unit(torch.tensor([50.0, -50.0])).max()) <= 1.0


# -- the detector on the tiny fixture ----------------------------------------------

@pytest.fixture(scope="module")
def results(tiny: Any) -> dict[str, Any]:
    """One small-budget fast run on each tiny model (shared by the tests below)."""
    return {"backdoored": NeuralCleanse(seed=0, **SMALL).fit(tiny.backdoored, tiny.test),
            "clean": NeuralCleanse(seed=0, **SMALL).fit(tiny.clean, tiny.test)}


def test_backdoored_model_flagged_with_its_target(results: dict[str, Any], tiny: Any) -> None:
    r = results["backdoored"]
    assert r.verdict == "backdoored" and r.suspected_targets == (tiny.target,)
    ev = r.evidence
    assert ev["min_label"] == tiny.target and ev["anomaly_index"] > 2.0
    assert ev["flagged_labels"] == [tiny.target]
    # the target's reversed trigger is the smallest and works on held-out inputs
    norms = ev["l1_norms"]
    assert norms[tiny.target] < 0.6 * float(np.median(norms))
    assert ev["asr"][tiny.target] > 0.9
    assert 0.0 <= r.score <= 1.0 and r.p_value == pytest.approx(min(ev["p_values"]))
    assert r.score == pytest.approx(1.0 - r.p_value)


def test_clean_twin_not_flagged(results: dict[str, Any]) -> None:
    r = results["clean"]
    assert r.verdict == "clean" and r.suspected_targets == ()
    assert r.evidence["flagged_labels"] == [] and r.evidence["anomaly_index"] <= 2.0
    assert r.score < results["backdoored"].score


def test_evidence_per_label_and_images(results: dict[str, Any]) -> None:
    r = results["backdoored"]
    ev = r.evidence
    for key in ("l1_norms", "asr", "anomaly_indices", "p_values", "reached_threshold",
                "steps", "stop_reasons"):
        assert len(ev[key]) == 10, key
    assert all(ev["reached_threshold"])
    # the only warning: a flag by the paper's rule, taken without clean references
    assert len(r.warnings) == 1 and "without clean reference models" in r.warnings[0]
    assert not results["clean"].warnings  # nothing flagged, nothing to qualify
    for k in range(10):
        assert r.images[f"mask_{k}"].shape == (8, 8)
        assert r.images[f"pattern_{k}"].shape == (8, 8)
        assert r.images[f"stamped_{k}"].shape == (8, 8)
        for kind in ("mask", "pattern", "stamped"):
            img = r.images[f"{kind}_{k}"]
            assert img.min() >= 0.0 and img.max() <= 1.0
        # the L1 norm reported is the mask's
        assert float(np.abs(r.images[f"mask_{k}"]).sum()) == pytest.approx(ev["l1_norms"][k],
                                                                            rel=1e-5)
    d = r.to_dict()
    assert d["flagged_labels"] == [0] and "mask_0" not in d
    mask, pattern = reversed_trigger(r, 0)
    assert mask.shape == (8, 8) and pattern.shape == (1, 8, 8)
    # the reversed trigger of the target sits on the true trigger (bottom-right 2×2)
    assert float(mask[-3:, -3:].sum()) > 0.5 * float(mask.sum())


def test_every_mask_moves_from_its_random_start(results: dict[str, Any]) -> None:
    """A peer's port reset the learning rate to 0: every mask stayed at its start."""
    for name in ("backdoored", "clean"):
        r = results[name]
        for k in range(10):
            start = to_unit(from_unit(torch.rand(8, 8, generator=label_generator(0, k, 0))))
            moved = np.abs(r.images[f"mask_{k}"] - start.numpy()).max()
            assert moved > 0.3, (name, k)


def _reference(norms: list[float]) -> np.ndarray:
    """Two "clean reference models": the clean twin's norms and a jittered copy."""
    n = np.asarray(norms)
    jitter = np.exp(0.05 * np.where(np.arange(n.size) % 2 == 0, 1.0, -1.0))
    return np.stack([n, n * jitter])


def test_same_seed_same_norms_and_verdict(tiny: Any, results: dict[str, Any]) -> None:
    first = results["backdoored"]
    # same seed again (this time with the reference decision, which does not change the
    # optimisation): the same norms, bit for bit, and the same verdict
    ref = _reference(results["clean"].evidence["l1_norms"])
    again = NeuralCleanse(seed=0, reference=ref, **SMALL).fit(tiny.backdoored, tiny.test)
    assert again.evidence["l1_norms"] == first.evidence["l1_norms"]
    assert again.evidence["decision"] == "reference"
    assert again.suspected_targets == first.suspected_targets == (tiny.target,)
    assert again.evidence["reference_flagged_labels"] == [tiny.target]
    assert again.p_value == pytest.approx(min(again.evidence["reference_p_values"]))
    other = NeuralCleanse(seed=1, **{**SMALL, "max_steps": 20}).fit(tiny.backdoored, tiny.test)
    assert other.evidence["l1_norms"] != first.evidence["l1_norms"]


def test_reference_files_and_mode_check(results: dict[str, Any], tmp_path: Any) -> None:
    from trojanscan.detectors.neural_cleanse import load_reference, write_reference

    clean = results["clean"]
    write_reference([clean, clean], tmp_path / "ref.json")
    ref = load_reference(tmp_path / "ref.json", "fast")
    assert ref is not None and ref.shape == (2, 10)
    assert ref[0].tolist() == clean.evidence["l1_norms"]
    # a scan report holding a neural_cleanse result counts as one reference model
    report = {"detectors": {"neural_cleanse": clean.to_dict()}}
    (tmp_path / "dir").mkdir()
    for i in range(3):
        (tmp_path / "dir" / f"report{i}.json").write_text(json.dumps(report))
    assert load_reference(tmp_path / "dir", "fast").shape == (3, 10)
    with pytest.raises(ParameterError, match="reference"):
        load_reference(tmp_path / "ref.json", "faithful")  # norms of another mode
    with pytest.raises(ParameterError, match="reference"):
        load_reference([[1.0, 2.0, 3.0]])  # a single reference model is not enough
    with pytest.raises(ParameterError, match="reference"):
        NeuralCleanse(decision="reference").resolved_params()


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "grad": [p.requires_grad for p in model.parameters()],
            "hooks": count_hooks(model)}


def _unchanged(model: nn.Module, snap: dict[str, Any]) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snap["state"].items())
    assert [m.training for m in model.modules()] == snap["training"]
    assert [p.requires_grad for p in model.parameters()] == snap["grad"]
    assert count_hooks(model) == snap["hooks"]


class _FailsLater(nn.Module):
    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("boom")
        return self.inner(x)


@pytest.mark.filterwarnings("ignore:neural_cleanse")
def test_model_untouched_after_fit_and_after_error(tiny: Any) -> None:
    model = copy.deepcopy(tiny.backdoored).train()
    model.register_forward_hook(lambda *a: None)
    snap = _snapshot(model)
    NeuralCleanse(seed=0, **{**SMALL, "max_steps": 5}).fit(model, tiny.test)
    _unchanged(model, snap)
    failing = _FailsLater(copy.deepcopy(tiny.backdoored), after=6).train()
    snap = _snapshot(failing)
    with pytest.raises(ModelError, match="boom"):
        NeuralCleanse(seed=0, **SMALL).fit(failing, tiny.test)
    _unchanged(failing, snap)


def test_torchscript_model(tiny: Any, results: dict[str, Any]) -> None:
    scripted = torch.jit.script(copy.deepcopy(tiny.backdoored).eval())
    r = NeuralCleanse(seed=0, **SMALL).fit(scripted, tiny.test)
    # the same computation as the eager module: the same norms
    assert np.allclose(r.evidence["l1_norms"], results["backdoored"].evidence["l1_norms"],
                       rtol=1e-3)
    assert r.suspected_targets == (tiny.target,)


def test_onnx_converted_model(tiny: Any, tmp_path: Any) -> None:
    pytest.importorskip("onnx")
    from trojanscan.io.models import load_model

    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(tiny.backdoored).eval(), (tiny.test.x[:2],), str(path),
                          dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    loaded = load_model(path, device="cpu")
    r = NeuralCleanse(seed=0, **SMALL).fit(loaded.module, tiny.test)
    assert r.suspected_targets == (tiny.target,)


@pytest.mark.filterwarnings("ignore:neural_cleanse")
def test_faithful_mode_runs_the_reference_schedule(tiny: Any) -> None:
    det = NeuralCleanse(mode="faithful", n_samples=64, max_steps=3)
    p = det.resolved_params()
    assert (p["mini_batches"], p["batch_size"], p["early_stop_patience"],
            p["early_stop_threshold"], p["prune_ratio"]) == (2, 32, 25, 1.0, None)
    full = NeuralCleanse(mode="faithful").resolved_params()
    assert (full["mini_batches"], full["max_steps"], full["n_samples"]) == (31, 1000, 1000)
    assert (full["lr"], full["init_cost"], full["attack_success"], full["patience"]) == (
        0.1, 1e-3, 0.99, 5)
    r = det.fit(tiny.backdoored, tiny.test)
    assert r.evidence["steps"] == [3] * 10
    assert set(r.evidence["stop_reasons"]) == {"max_steps"}


def test_unreached_threshold_is_reported_not_hidden(tiny: Any) -> None:
    det = NeuralCleanse(seed=0, n_samples=64, max_steps=2, attack_success=1.0, batch_size=32)
    with pytest.warns(UserWarning, match="never reached"):
        r = det.fit(tiny.clean, tiny.test)
    assert not all(r.evidence["reached_threshold"])
    unreached = [k for k, ok in enumerate(r.evidence["reached_threshold"]) if not ok]
    assert not set(unreached) & set(r.evidence["flagged_labels"])
    assert any("never reached" in w for w in r.warnings)


@pytest.mark.parametrize(("param", "value"), [
    ("mode", "slow"), ("decision", "vote"), ("n_samples", 0), ("batch_size", -1),
    ("max_steps", 0), ("mini_batches", 1.5), ("lr", 0.0), ("init_cost", -1.0),
    ("attack_success", 1.5), ("patience", 0), ("early_stop_patience", 0),
    ("early_stop_threshold", 2.0), ("prune_ratio", 0.5), ("threshold", 0),
    ("alpha", 1.0), ("images", "yes"), ("seed", -1), ("reference", [[1.0, 2.0, 3.0]]),
    ("reference", "/nonexistent/ref.json"),
])
def test_bad_params_name_the_parameter(param: str, value: Any, tiny: Any) -> None:
    with pytest.raises(ParameterError, match=param):
        NeuralCleanse(**{param: value}).fit(tiny.clean, tiny.test)


def test_pruning_is_refused_in_faithful_mode() -> None:
    with pytest.raises(ParameterError, match="prune_ratio"):
        NeuralCleanse(mode="faithful", prune_ratio=2.0).resolved_params()


def test_not_applicable_and_incompatible(tiny: Any) -> None:
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(DetectorNotApplicable, match="3 classes"):
        NeuralCleanse(**SMALL).fit(two, ImageDataset(torch.rand(20, 1, 8, 8)))

    class NoGrad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 5) + x.detach().mean()

    with pytest.raises(DetectorNotApplicable, match="gradients"):
        NeuralCleanse(**SMALL).fit(NoGrad(), ImageDataset(torch.rand(20, 1, 8, 8)))
    with pytest.raises(IncompatibleError, match="labels"):
        NeuralCleanse(**SMALL).fit(tiny.clean, ImageDataset(torch.rand(20, 1, 8, 8),
                                                            torch.arange(20)))
