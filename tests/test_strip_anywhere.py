"""STRIP's default rule on a trigger in the middle of the object, and its sequential cost.

A tiny digits CNN backdoored with a 2×2 checker stamped in the *centre* of the 8×8 image
— where every overlay's strokes lie too, so pixel-sum superimposition saturates it to
white and the paper's rule lets nearly all triggered inputs through. The default (any of several
overlay kinds, own-class confidence, sequential) must catch many times more of them at the
requested false-rejection rate, with fewer model evaluations than the fixed-N rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from trojanscan.dataset import ImageDataset
from trojanscan.detectors.strip import Strip, any_kind_thresholds, margins
from trojanscan.training import TrainConfig, train_model

TARGET = 0


def stamp_centre(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, 3:5, 3:5] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return x


@pytest.fixture(scope="module")
def centred(tiny: Any) -> tuple[torch.nn.Module, ImageDataset, torch.Tensor]:
    train = tiny.train_clean
    rng = np.random.default_rng(3)
    cand = np.flatnonzero(train.labels().numpy() != TARGET)
    chosen = torch.from_numpy(rng.choice(cand, int(0.1 * len(train)), replace=False))
    xp, yp = train.x.clone(), train.labels().clone()
    xp[chosen] = stamp_centre(xp[chosen])
    yp[chosen] = TARGET
    model = train_model("small_cnn", train.with_data(xp, yp),
                        config=TrainConfig(epochs=20, batch_size=64, lr=2e-3), seed=0,
                        device="cpu")
    keep = tiny.test.labels() != TARGET
    trig = stamp_centre(tiny.test.x[keep])
    with torch.no_grad():
        asr = float((model(trig).argmax(1) == TARGET).float().mean())
    assert asr > 0.9, f"the centred backdoor did not take (ASR {asr:.2f})"
    return model, tiny.test, trig


def test_default_catches_a_centred_trigger(centred: Any) -> None:
    model, clean, trig = centred
    det = Strip(seed=0).fit(model, clean)
    caught = det.filter(trig).flagged.mean()
    paper = Strip.paper(n_overlays=32, seed=0).fit(model, clean).filter(trig).flagged.mean()
    # measured: 0.40 by default (the pixel-minimum kind keeps the checker under the
    # overlay's strokes) against 0.01 with the paper's pixel sum, which saturates it
    assert caught >= 0.3 and caught >= 5 * paper, (caught, paper)
    assert "min" in det.kinds_
    assert det.filter(clean.x).flagged.mean() <= 0.05
    assert det.frr_measured_ is not None and det.frr_measured_ <= 0.05


def test_sequential_same_answers_fewer_evaluations(centred: Any) -> None:
    model, clean, trig = centred
    x = torch.cat([trig[:60], clean.x[:120]])
    seq = Strip(seed=0).fit(model, clean)
    fixed = Strip(seed=0, sequential=False).fit(model, clean)
    a, b = seq.decide(x), fixed.decide(x)
    assert float((a.flagged != b.flagged).mean()) <= 0.02
    # clean inputs, far below the thresholds, stop early; inputs at the margin do not
    clean_cost = float(a.forwards[60:].mean())
    # measured: 59 of 129 evaluations (90 when every kind drew as long as the slowest)
    assert clean_cost < 0.6 * b.mean_forwards, (clean_cost, b.mean_forwards)
    assert a.mean_forwards <= b.mean_forwards
    # each overlay kind stops on its own: an input is charged only the draws each kind
    # made, not the slowest kind's draws for every kind
    uniform = {1 + len(seq.kinds_) * n for n in (4, 8, 16, 32)}
    assert any(int(f) not in uniform for f in a.forwards), sorted(set(a.forwards.tolist()))
    assert np.array_equal(a.flagged, a.scores > seq.threshold_)
    # the decision does not depend on the batch it came in
    alone = np.concatenate([seq.decide(x[i:i + 7]).flagged for i in range(0, len(x), 7)])
    assert np.array_equal(alone, a.flagged)


def test_any_kind_thresholds_hold_the_joint_rate() -> None:
    rng = np.random.default_rng(0)
    per_kind = rng.normal(size=(4000, 3)) + rng.normal(size=(4000, 1))  # correlated kinds
    thr, scales, _ = any_kind_thresholds(per_kind, 0.02, "empirical")
    joint = float((margins(per_kind, thr, scales) > 0).mean())
    assert 0.01 <= joint <= 0.025, joint
    fresh = rng.normal(size=(20000, 3)) + rng.normal(size=(20000, 1))
    assert abs(float((margins(fresh, thr, scales) > 0).mean()) - 0.02) < 0.007


def test_paper_settings() -> None:
    p = Strip.paper().get_params()
    assert (p["n_overlays"], p["blend"], p["statistic"], p["sequential"],
            p["threshold_method"]) == (100, "sum_clip", "mean", False, "normal")
