"""The stamp-probing MNTD meta-classifier (trojanscan.mntd.stamps): its class-order-free
features (pure), its shapes and errors, and a quality floor on tiny digits models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trojanscan.exceptions import ModelError, ParameterError
from trojanscan.mntd.meta import raw_scores
from trojanscan.mntd.stamps import (
    StampConfig,
    StampMeta,
    pick_anchors,
    stamp_features,
)

K = 4


def _probs(logits: list[list[float]]) -> torch.Tensor:
    return torch.softmax(torch.tensor(logits), dim=-1)


def test_features_do_not_depend_on_which_class_is_the_target() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.softmax(torch.randn(8, K, generator=g), -1)
    stamped = torch.softmax(torch.randn(3, 8, K, generator=g), -1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    perm = torch.tensor([2, 0, 3, 1])  # class c is renamed perm[c]
    inv = torch.argsort(perm)
    f = stamp_features(base, stamped, labels)
    g2 = stamp_features(base[:, inv], stamped[..., inv], perm[labels])
    assert f.shape == (3, 2 * K)
    assert torch.allclose(f, g2, atol=1e-6)


def test_all_to_one_shift_tops_the_overall_gain_and_source_flip_tops_the_flips() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    base = torch.eye(K)[labels] * 0.9 + 0.025
    to_target = torch.eye(K)[torch.full((8,), 3)].unsqueeze(0) * 0.9 + 0.025
    only_source = base.clone().unsqueeze(0)
    only_source[0, labels == 1] = torch.eye(K)[2] * 0.9 + 0.025  # source 1 flips to 2
    unchanged = base.unsqueeze(0)
    f_all = stamp_features(base, to_target, labels)[0]
    f_src = stamp_features(base, only_source, labels)[0]
    f_none = stamp_features(base, unchanged, labels)[0]
    assert torch.allclose(f_none, torch.zeros(2 * K))
    # all-to-one: class 3 gains on the 6 anchors that were not 3 already
    assert f_all[0] == pytest.approx(0.9 * 6 / 8, abs=1e-5)
    assert f_all[K:K + 3].min() == pytest.approx(0.9, abs=1e-5)  # three sources flip to 3
    # source-specific: only one source flips, so one large flip feature and a small mean
    assert f_src[K] == pytest.approx(0.9, abs=1e-5) and f_src[K + 1] == pytest.approx(0.0)
    assert f_src[0] == pytest.approx(0.9 * 2 / 8, abs=1e-5)


def test_anchors_are_stratified_and_seeded() -> None:
    x = torch.rand(50, 1, 6, 6)
    y = torch.arange(50) % 5
    a1, l1 = pick_anchors(x, y, 3, torch.Generator().manual_seed(1))
    a2, l2 = pick_anchors(x, y, 3, torch.Generator().manual_seed(1))
    a3, _ = pick_anchors(x, y, 3, torch.Generator().manual_seed(2))
    assert torch.equal(a1, a2) and torch.equal(l1, l2) and not torch.equal(a1, a3)
    assert torch.bincount(l1).tolist() == [3] * 5
    few = pick_anchors(x[:7], y[:7], 3, torch.Generator().manual_seed(0))[1]
    assert torch.bincount(few).tolist() == [2, 2, 1, 1, 1]  # all of a class with fewer


def test_stamps_stay_images_and_gradients_reach_them() -> None:
    anchors = torch.rand(6, 1, 5, 5)
    meta = StampMeta(anchors, torch.tensor([0, 1, 2, 0, 1, 2]), 3, num_stamps=2, hidden=4)
    with torch.no_grad():
        meta.mask_logits.normal_(0, 3)
        meta.pattern_logits.normal_(0, 3)
    s = meta.stamped()
    s = s.detach()
    assert s.shape == (12, 1, 5, 5) and float(s.min()) >= 0 and float(s.max()) <= 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 3))
    meta([model]).sum().backward()
    assert meta.mask_logits.grad is not None and meta.mask_logits.grad.abs().sum() > 0
    assert meta.pattern_logits.grad is not None and meta.pattern_logits.grad.abs().sum() > 0


def test_wrong_model_shape_and_bad_settings_are_clear_errors() -> None:
    meta = StampMeta(torch.rand(4, 1, 5, 5), torch.tensor([0, 1, 2, 0]), 3, num_stamps=2)
    five_classes = nn.Sequential(nn.Flatten(), nn.Linear(25, 5))
    with pytest.raises(ModelError, match="stamped anchors"):
        raw_scores(meta, [five_classes])
    with pytest.raises(ParameterError, match="num_stamps"):
        StampConfig(num_stamps=0).validate()
    with pytest.raises(ParameterError, match="anchors"):
        StampMeta(torch.rand(4, 5, 5), torch.tensor([0, 1, 2, 0]), 3)
    assert np.isfinite(raw_scores(meta, [nn.Sequential(nn.Flatten(),
                                                             nn.Linear(25, 3))])).all()
