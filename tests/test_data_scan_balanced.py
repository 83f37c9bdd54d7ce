"""A poison sub-population as large as its class's own samples is still found: balanced
splits are oriented by the variety of the runner-up classes, not by size or spread."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _data_poisoning_fixtures import PassThrough, planted_images
from trojanscan.detectors.data_base import extract
from trojanscan.detectors.scan_decomp import Scan
from trojanscan.detectors.spectral_signatures import SpectralSignatures
from trojanscan.exceptions import ParameterError
from trojanscan.maths.spectral import source_variety, suspect_side

K = 10


def half_poisoned(seed: int = 0, *, per_class: int = 300, poison: int = 310, dim: int = 12,
                  target: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ten Gaussian classes; ``poison`` samples of other classes, shifted and relabelled
    ``target``, make a sub-population of about half of that class (here slightly more
    than half, and tighter than the class's own samples, so neither the minority nor the
    spread rule finds it). Runner-up classes: a class's own samples are confused with
    one neighbour, the poison with its source classes. Returns ``x, y, runner_up, mask``."""
    rng = np.random.default_rng(seed)
    xs, ys, rus = [], [], []
    for c in range(K):
        a = rng.normal(size=(dim, dim)) * rng.uniform(0.5, 1.0)
        xs.append(rng.normal(size=(per_class, dim)) @ a + rng.normal(scale=8.0, size=dim))
        ys.append(np.full(per_class, c))
        rus.append(np.where(rng.random(per_class) < 0.9, (c + 1) % K, (c + 2) % K))
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    donors = rng.choice(np.flatnonzero(y != target), poison, replace=False)
    centre = x[y == target].mean(axis=0)
    sd = x[y == target].std(axis=0).mean()
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    px = centre + 6 * sd * direction + 0.2 * (x[donors] - x[donors].mean(axis=0))
    x = np.concatenate([x, px]).astype(np.float32)
    ru = np.concatenate([*rus, y[donors]]).astype(np.int64)
    y = np.concatenate([y, np.full(poison, target)]).astype(np.int64)
    mask = np.zeros(len(y), dtype=bool)
    mask[-poison:] = True
    return x, y, ru, mask


def test_half_of_a_class_poisoned_is_found_with_runner_up_classes() -> None:
    x, y, ru, mask = half_poisoned()
    assert 0.5 < mask[y == 3].mean() < 0.52  # the poison is (just) the majority
    res = Scan(seed=0).fit_features(x, y, runner_up=ru)
    assert res.evidence["classes_with_outliers"] == [3]
    hit = int((res.flagged & mask).sum())
    assert hit / mask.sum() >= 0.9 and hit / res.flagged.sum() >= 0.9
    assert res.per_class["3"]["orientation"].startswith("runner-up variety")
    # without the runner-up classes the minority (the class's own samples) is flagged
    blind = Scan(seed=0).fit_features(x, y)
    assert blind.per_class["3"]["orientation"] == "minority"
    assert int((blind.flagged & mask).sum()) <= 0.1 * mask.sum()


def test_spectral_signatures_orients_a_balanced_split_by_runner_up_variety() -> None:
    x, y, ru, mask = half_poisoned(seed=1)
    res = SpectralSignatures().fit_features(x, y, runner_up=ru)
    entry = res.per_class["3"]
    assert entry["detected"] and entry["orientation"].startswith("runner-up variety")
    hit = int((res.flagged & mask).sum())
    assert hit / mask.sum() >= 0.9 and hit / res.flagged.sum() >= 0.9


def test_suspect_side_rules() -> None:
    f = np.zeros((10, 2))
    index = np.arange(10)
    upper = np.arange(10) < 5
    ru = np.array([0, 0, 0, 0, 0, 1, 2, 3, 4, 5])
    side, rule = suspect_side(f, index, upper, runner_up=ru)
    assert not side[:5].any() and side[5:].all() and rule.startswith("runner-up variety")
    side, rule = suspect_side(f, index, np.arange(10) < 2, runner_up=ru)
    assert rule == "minority" and side[:2].all() and not side[2:].any()
    assert source_variety(np.array([1, 1, 1])) == 0.0
    assert source_variety(np.array([0, 1])) == pytest.approx(np.log(2))
    assert source_variety(np.array([], dtype=np.int64)) == 0.0


def test_extract_returns_each_samples_runner_up_class() -> None:
    planted = planted_images(poison=10)
    model = PassThrough()
    feats = extract(model, planted.data, batch_size=64)
    assert feats.runner_up is not None
    with torch.no_grad():
        logits = model(planted.data.x.float()).numpy()
    order = np.argsort(-logits, axis=1)
    assert np.array_equal(feats.predictions, order[:, 0])
    assert np.array_equal(feats.runner_up, order[:, 1])


def test_runner_up_must_match_the_labels() -> None:
    x, y, ru, _ = half_poisoned()
    with pytest.raises(ParameterError, match="runner_up"):
        Scan().fit_features(x, y, runner_up=ru[:-1])
    with pytest.raises(ParameterError, match="balance"):
        Scan(balance=0.7).fit_features(x, y)
