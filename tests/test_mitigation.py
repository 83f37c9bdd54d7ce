"""Unlearning (Neural Cleanse's mitigation) and the ``trojanscan mitigate`` command."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._cli import run_cli
from trojanscan.detectors.base import count_hooks
from trojanscan.exceptions import ParameterError
from trojanscan.io.data import save_npz
from trojanscan.mitigation import (
    Trigger,
    UnlearnConfig,
    mitigate,
    project_mask,
    refine_trigger,
    split_clean,
    unlearn,
)
from trojanscan.utils import sha256_file


def _true_trigger(label: int = 0) -> Trigger:
    """The fixture's trigger as a mask/pattern pair (2×2 white, bottom-right)."""
    mask = torch.zeros(8, 8)
    mask[-2:, -2:] = 1.0
    return Trigger(label, mask, torch.ones(1, 8, 8))


def test_trigger_apply_matches_the_stamp(tiny: Any) -> None:
    x = tiny.test.x[:5]
    assert torch.equal(_true_trigger().apply(x), tiny.stamp(x))
    grown = _true_trigger().dilated().mask
    assert grown.sum() == 9 and grown[-3:, -3:].sum() == 9  # 2×2 → 3×3 inside the image


def test_unlearning_removes_the_backdoor_and_keeps_accuracy(tiny: Any) -> None:
    model = copy.deepcopy(tiny.backdoored).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = count_hooks(model)
    cfg = UnlearnConfig(epochs=4)
    res = mitigate(model, tiny.train_clean, tiny.test, [_true_trigger()], config=cfg, seed=0)
    assert res.asr_before["reversed_0"] > 0.9
    assert res.asr_after["reversed_0"] < 0.2
    assert res.clean_accuracy_after >= res.clean_accuracy_before - 0.05
    # the user's model is untouched (weights, mode, hooks)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training and count_hooks(model) == hooks
    d = res.to_dict()
    assert d["labels"] == [0] and d["num_holdout"] == len(tiny.test)
    assert d["clean_accuracy_drop"] == pytest.approx(res.clean_accuracy_before
                                                     - res.clean_accuracy_after)


def test_distillation_unlearns_and_stays_closer_to_the_original(tiny: Any) -> None:
    """With ``distill`` the trigger is still unlearned, and the repaired model agrees with
    the original on clean inputs at least as often as plain unlearning's does."""
    x = tiny.test.x
    with torch.no_grad():
        orig = tiny.backdoored.eval()(x).argmax(1)
    agree = {}
    for d in (0.0, 0.8):
        res = mitigate(tiny.backdoored, tiny.train_clean, tiny.test, [_true_trigger()],
                       config=UnlearnConfig(epochs=4, distill=d, lr=2e-2), seed=0)
        assert res.asr_after["reversed_0"] < 0.2, d
        with torch.no_grad():
            agree[d] = float((res.model(x).argmax(1) == orig).float().mean())
    assert agree[0.8] >= agree[0.0] and agree[0.8] > 0.9, agree


@pytest.mark.parametrize("refresh", [0, 2])
def test_unlearning_is_deterministic(tiny: Any, refresh: int) -> None:
    cfg = UnlearnConfig(epochs=1, refresh=refresh)
    a = unlearn(tiny.backdoored, tiny.train_clean, [_true_trigger()], config=cfg, seed=3)
    b = unlearn(tiny.backdoored, tiny.train_clean, [_true_trigger()], config=cfg, seed=3)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_project_mask_meets_the_budget_and_keeps_the_core() -> None:
    m = torch.tensor([[1.0, 0.9, 0.2], [0.1, 0.0, 1.4]])
    out = project_mask(m, 2.0)
    assert float(out.sum()) == pytest.approx(2.0, abs=1e-4)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # a constant is subtracted: the order is kept and the small entries vanish first
    assert out[1, 0] == 0 and out[0, 2] == 0 and out[0, 0] > out[0, 1] > 0.4
    inside = torch.tensor([[0.5, 0.2], [0.0, 1.0]])
    assert torch.equal(project_mask(inside, 2.0), inside)  # feasible: unchanged
    assert torch.equal(project_mask(torch.tensor([[-1.0, 2.0]]), 5.0),
                       torch.tensor([[0.0, 1.0]]))  # only clipped


def _shifted_trigger() -> Trigger:
    """A reversed trigger that missed by a pixel: a 2×2 mask one row and column up-left
    of the real one (overlapping it in one pixel), with a grey (0.5) pattern."""
    mask = torch.zeros(8, 8)
    mask[5:7, 5:7] = 1.0
    return Trigger(0, mask, torch.full((1, 8, 8), 0.5))


def test_refine_trigger_moves_towards_the_backdoor_within_budget(tiny: Any) -> None:
    start = _shifted_trigger()
    model = tiny.backdoored.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = refine_trigger(model, tiny.train_clean.x, start, steps=50, budget=4.0,
                         gen=torch.Generator().manual_seed(0))
    assert float(out.mask.sum()) <= 4.0 + 1e-4 and out.label == 0
    assert float(out.pattern.min()) >= 0 and float(out.pattern.max()) <= 1
    keep = tiny.test.labels() != 0
    x = tiny.test.x[keep]
    with torch.no_grad():
        asr = [float((model(t.apply(x)).argmax(1) == 0).float().mean()) for t in (start, out)]
    assert asr[0] < 0.3 and asr[1] > asr[0] + 0.3, asr
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not model.training


def test_refresh_unlearns_more_of_the_real_trigger(tiny: Any) -> None:
    """Unlearning a trigger that missed by a pixel leaves much of the backdoor; refreshing
    it against the model being fine-tuned removes more of the real trigger's success."""
    extra = {"true_trigger": (tiny.stamp, 0)}
    asr = {}
    for refresh in (0, 2):
        res = mitigate(tiny.backdoored, tiny.train_clean, tiny.test, [_shifted_trigger()],
                       config=UnlearnConfig(epochs=2, refresh=refresh), seed=0, extra=extra)
        asr[refresh] = res.asr_after["true_trigger"]
        assert res.clean_accuracy_after >= res.clean_accuracy_before - 0.03
    assert asr[2] < asr[0] - 0.2, asr


@pytest.mark.parametrize(("field", "value"), [("stamp_fraction", 0.0), ("stamp_fraction", 1.0),
                                              ("epochs", 0), ("lr", -1.0), ("batch_size", 1),
                                              ("optimizer", "rmsprop"), ("dilate", 1.5),
                                              ("distill", -0.1), ("distill", True),
                                              ("refresh", -1), ("refresh", 1.5),
                                              ("refresh_steps", 0)])
def test_bad_unlearning_settings(field: str, value: Any, tiny: Any) -> None:
    with pytest.raises(ParameterError, match=field):
        unlearn(tiny.backdoored, tiny.train_clean, [_true_trigger()],
                config=UnlearnConfig(**{field: value}))


def test_no_trigger_and_bad_split(tiny: Any) -> None:
    with pytest.raises(ParameterError, match="triggers"):
        unlearn(tiny.backdoored, tiny.train_clean, [])
    with pytest.raises(ParameterError, match="holdout"):
        split_clean(tiny.test, 1.5, 0)
    fine, held = split_clean(tiny.test, 0.2, 0)
    assert len(fine) + len(held) == len(tiny.test) and len(held) == round(0.2 * len(tiny.test))


# -- the command -------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mitigate")
    model = d / "backdoored.pt"
    torch.jit.save(torch.jit.script(copy.deepcopy(tiny.backdoored).eval()), str(model))
    data = d / "clean.npz"
    both = tiny.train_clean.with_data(torch.cat([tiny.train_clean.x, tiny.test.x]),
                                      torch.cat([tiny.train_clean.labels(), tiny.test.labels()]))
    save_npz(data, both)
    return {"model": model, "data": data, "dir": d}


def test_mitigate_command_writes_a_repaired_model(files: dict[str, Path], tiny: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    before = sha256_file(files["model"])
    out = files["dir"] / "repaired.pt"
    rep = files["dir"] / "report"
    res = run_cli(capsys, "mitigate", str(files["model"]), "--data", str(files["data"]),
                  "--out", str(out), "--report", str(rep), "--device", "cpu")
    assert res.code == 1, res.err
    assert sha256_file(files["model"]) == before  # the input is never modified
    doc = json.loads((rep / "report.json").read_text())
    assert doc["command"] == "mitigate" and doc["verdict"] == "backdoored"
    assert doc["suspected_targets"] == [tiny.target]
    mit = doc["mitigation"]
    assert mit["model_written"] and mit["labels"] == [tiny.target]
    key = f"reversed_{tiny.target}"
    assert mit["asr_after"][key] < 0.2 < mit["asr_before"][key]
    assert mit["clean_accuracy_drop"] <= 0.05
    assert (rep / "report.html").exists()
    repaired = torch.jit.load(str(out))
    with torch.no_grad():
        hit = (repaired(tiny.triggered_test()).argmax(1) == tiny.target).float().mean()
    assert float(hit) < 0.5  # the true trigger is unlearned too


def test_mitigate_refuses_to_overwrite_the_input(files: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = sha256_file(files["model"])
    res = run_cli(capsys, "mitigate", str(files["model"]), "--data", str(files["data"]),
                  "--out", str(files["model"]), "--report", str(files["dir"] / "r2"))
    assert res.code == 2 and "out" in res.err and "Traceback" not in res.err
    assert sha256_file(files["model"]) == before


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--stamp-fraction", "1.5", "stamp-fraction"), ("--dilate", "-0.1", "dilate"),
    ("--distill", "1.5", "distill"), ("--refresh", "-1", "refresh"),
    ("--unlearn-epochs", "0", "epochs"),
    ("--nc-reference", "no-such-reports", "reference")])
def test_mitigate_bad_settings_fail_before_any_work(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str], option: str, value: str,
        needle: str) -> None:
    out = files["dir"] / "never.pt"
    res = run_cli(capsys, "mitigate", str(files["model"]), "--data", str(files["data"]),
                  "--out", str(out), "--report", str(files["dir"] / "r3"), option, value)
    assert res.code == 2 and needle in res.err and "Traceback" not in res.err
    assert not out.exists()
