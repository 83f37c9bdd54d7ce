"""Activation Clustering: the cluster rules, exclusionary reclassification, the detector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _data_poisoning_fixtures import PassThrough, planted_images
from trojanscan.detectors.activation_clustering import ActivationClustering, reduce_class
from trojanscan.detectors.base import count_hooks
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.maths.robust import (
    cluster_decision,
    reclassification_verdict,
    silhouette_sampled,
)


def classes_with_cluster(frac: float = 0.15, seed: int = 0, poisoned: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four Gaussian classes of 500 in 20-d; class 1 holds a far cluster of ``frac``."""
    rng = np.random.default_rng(seed)
    f, y, m = [], [], []
    for c in range(4):
        x = rng.normal(size=(500, 20)) * np.linspace(2, 0.5, 20) + 8 * np.eye(20)[c]
        mask = np.zeros(500, dtype=bool)
        if poisoned and c == 1:
            mask[: int(frac * 500)] = True
            x[mask] += 14 * np.eye(20)[15]
        f.append(x)
        y.append(np.full(500, c))
        m.append(mask)
    return (np.concatenate(f).astype(np.float32), np.concatenate(y),
            np.concatenate(m))


def test_relative_size_and_silhouette_rules() -> None:
    assign = np.array([0] * 80 + [1] * 20)
    hit = cluster_decision(assign, 0.6, size_threshold=0.35, silhouette_threshold=0.4)
    assert hit.detected and hit.suspect.sum() == 20 and hit.suspect[80:].all()
    # a good clustering into two halves is never flagged: not "always the smaller one"
    halves = cluster_decision(np.array([0] * 55 + [1] * 45), 0.9)
    assert not halves.detected and not halves.suspect.any()
    # a small but poorly separated cluster is not flagged either
    loose = cluster_decision(assign, 0.1, silhouette_threshold=0.4)
    assert not loose.detected


def test_silhouette_sampled_is_bounded_and_seeded() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(3000, 3)), 10 + rng.normal(size=(1000, 3))])
    a = (np.arange(4000) >= 3000).astype(int)
    s1 = silhouette_sampled(x, a, max_samples=500, seed=1)
    assert s1 == silhouette_sampled(x, a, max_samples=500, seed=1)
    assert s1 > 0.7
    assert silhouette_sampled(x, np.zeros(4000, dtype=int)) == 0.0


def test_reclassification_verdict() -> None:
    poison, info = reclassification_verdict(np.array([3] * 90 + [0] * 10), 0)
    assert poison and info["source_class"] == 3 and info["own_share"] == 0.1
    legit, _ = reclassification_verdict(np.array([0] * 70 + [3] * 30), 0)
    assert not legit
    # still predicted as its label more often than any other class: legitimate
    plural, _ = reclassification_verdict(np.array([0] * 40 + [3] * 30 + [5] * 30), 0)
    assert not plural


@pytest.mark.parametrize("method", ["pca", "ica"])
def test_reduce_class_shapes(method: str) -> None:
    x = np.random.default_rng(0).normal(size=(300, 40))
    x[:, 30:] = 0.0  # dead units: rank-deficient activations must not break ICA
    z = reduce_class(x, method=method, n_components=10, seed=0)
    assert z.shape == (300, 10) and np.isfinite(z).all()


def test_detector_finds_planted_cluster_and_spares_clean_classes() -> None:
    f, y, m = classes_with_cluster()
    res = ActivationClustering(reclassify=False).fit_features(f, y)
    assert res.evidence["classes_with_outliers"] == [1]
    tp = (res.flagged & m).sum()
    assert tp / m.sum() >= 0.95 and tp / res.flagged.sum() >= 0.95
    assert not res.flagged[y != 1].any()


def test_detector_clean_data_flags_nothing() -> None:
    f, y, _ = classes_with_cluster(poisoned=False)
    for reduction in ("pca", "ica"):
        res = ActivationClustering(reclassify=False, reduction=reduction).fit_features(f, y)
        assert res.verdict == "clean" and res.flagged.sum() == 0


def test_half_sized_cluster_is_not_flagged() -> None:
    """A cluster as large as the rest of its class fails the relative-size rule."""
    f, y, _ = classes_with_cluster(frac=0.5)
    res = ActivationClustering(reclassify=False).fit_features(f, y)
    assert not res.flagged.any()
    assert res.per_class["1"]["relative_size"] > 0.35


def test_exclusionary_reclassification_confirms_poison() -> None:
    planted = planted_images(poison=30)
    model = PassThrough()
    det = ActivationClustering(reclassify_epochs=15)
    res = det.fit(model, planted.data)
    info = res.per_class["0"]["reclassification"]
    assert info["poisonous"] and info["source_class"] != 0
    tp = (res.flagged & planted.mask).sum()
    assert tp / planted.mask.sum() >= 0.9 and tp / res.flagged.sum() >= 0.9
    assert count_hooks(model) == 0


def test_exclusionary_reclassification_releases_legitimate_cluster() -> None:
    """A distinct sub-population that still looks like its class is released."""
    planted = planted_images(poison=0)
    x, y = planted.data.x.clone(), planted.data.labels().clone()
    ones = torch.nonzero(y == 1).flatten()[:25]
    x[ones, :, 1, :] = 1.0  # a distinct style of class 1: its own pixels brighter
    data = planted.data.with_data(x, y)
    res = ActivationClustering(reclassify_epochs=15, silhouette_threshold=0.2).fit(
        PassThrough(), data)
    entry = res.per_class["1"]
    assert entry["num_suspect"] == 25  # the style cluster was suspected ...
    assert not entry["reclassification"]["poisonous"]  # ... and released
    assert entry["reclassification"]["own_share"] > 0.9
    assert not res.flagged.any() and res.verdict == "clean"


def test_reclassification_needs_the_architecture_for_torchscript() -> None:
    planted = planted_images(poison=30)
    scripted = torch.jit.script(PassThrough())
    res = ActivationClustering().fit(scripted, planted.data)
    assert any("reclassification skipped" in w for w in res.warnings)
    assert res.flagged[planted.mask].mean() > 0.9  # the clustering result is kept


@pytest.mark.parametrize("kwargs, name", [
    ({"reduction": "tsne"}, "reduction"), ({"n_components": 0}, "n_components"),
    ({"size_threshold": 0.7}, "size_threshold"),
    ({"silhouette_threshold": 2.0}, "silhouette_threshold"),
    ({"min_own_share": 0.0}, "min_own_share"), ({"max_fit_samples": 10}, "max_fit_samples"),
    ({"reclassify_epochs": 0}, "reclassify_epochs"),
    ({"poison_rate_bound": 0.0}, "poison_rate_bound"),
])
def test_bad_settings(kwargs: dict, name: str) -> None:
    f, y, _ = classes_with_cluster()
    with pytest.raises(ParameterError, match=name):
        ActivationClustering(**kwargs).fit_features(f, y)


def test_bad_inputs() -> None:
    f, y, _ = classes_with_cluster()
    with pytest.raises(DataError):
        ActivationClustering().fit_features(f, np.zeros(len(y), dtype=np.int64))
    with pytest.raises(DataError):
        ActivationClustering().fit_features(f[:10], y)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_flags_invariant_to_sample_order(seed: int) -> None:
    f, y, _ = classes_with_cluster(seed=seed % 3)
    det = ActivationClustering(reclassify=False)
    base = det.fit_features(f, y)
    perm = np.random.default_rng(seed).permutation(len(y))
    again = det.fit_features(f[perm], y[perm])
    assert np.array_equal(again.flagged, base.flagged[perm])
