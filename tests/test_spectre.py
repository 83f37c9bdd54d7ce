"""SPECTRE: robust covariance, whitening, QUE scores and the detector."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from trojanscan.detectors.spectral_signatures import SpectralSignatures
from trojanscan.detectors.spectre import Spectre
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.maths.robust import (
    consistency_factor,
    que_scores,
    robust_covariance,
    spectre_class_scores,
    whiten,
)


def hidden_cluster(n: int = 1600, d: int = 24, frac: float = 0.05, shift: float = 7.0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anisotropic Gaussian class whose poison is shifted along a *low*-variance
    direction: its top singular direction stays the class's own (SS misses it)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(4.0, 0.5, d)
    x = rng.normal(size=(n, d)) * scales
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, int(frac * n), replace=False)] = True
    x[mask, d - 1] += shift  # 14 standard deviations along the smallest direction
    return x, mask


def test_robust_covariance_ignores_outlying_cluster() -> None:
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(700, 4))
    outliers = rng.normal(size=(300, 4)) + np.array([8.0, 0, 0, 0])
    fit = robust_covariance(np.vstack([clean, outliers]))
    assert not fit.support[700:].any()
    assert np.abs(fit.mean).max() < 0.2
    # the support is the central 5/7 of the clean samples: the raw covariance shrinks,
    # and the factor for "central half of all" over-corrects it by < 50%
    assert (np.diag(fit.cov) < 0.9).all()
    cov = fit.cov * consistency_factor(4, fit.support.mean())
    assert ((np.diag(cov) > 0.8) & (np.diag(cov) < 1.5)).all()


def test_consistency_factor() -> None:
    assert consistency_factor(3, 1.0) == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200000, 3))
    d2 = (x**2).sum(1)
    central = x[d2 <= np.quantile(d2, 0.5)]
    np.testing.assert_allclose(np.var(central, axis=0) * consistency_factor(3, 0.5), 1.0,
                               atol=0.02)


def test_whitening_gives_identity_covariance() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 5))
    x = rng.normal(size=(5000, 5)) @ a
    z = whiten(x, x.mean(0), np.cov(x, rowvar=False, bias=True))
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(5), atol=1e-8)


def test_que_scores_limits() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4000, 6))
    z[:200, 0] += 5.0
    q0 = que_scores(z, alpha=0.0)
    np.testing.assert_allclose(q0.scores, (z**2).sum(1) / 6)  # α = 0: Mahalanobis / k
    q = que_scores(z, alpha=4.0)
    assert q.top_eigenvalue > 1.5 and abs(q.top_direction[0]) > 0.99
    labels = np.zeros(4000, dtype=bool)
    labels[:200] = True
    assert roc_auc_score(labels, q.scores) > roc_auc_score(labels, q0.scores)


def test_spectre_finds_what_spectral_signatures_misses() -> None:
    x, mask = hidden_cluster()
    centred = x - x.mean(0)
    _, vecs = np.linalg.eigh(np.cov(centred, rowvar=False))
    reps = centred @ vecs[:, ::-1]
    res = spectre_class_scores(reps)
    assert roc_auc_score(mask, res.scores) > 0.99
    y = np.zeros(len(x), dtype=np.int64)
    y[:5] = 1  # the detectors need two classes; the second is negligible
    ss = SpectralSignatures().fit_features(x, y)
    sp = Spectre().fit_features(x, y)
    recall_ss = (ss.flagged & mask).sum() / mask.sum()
    recall_sp = (sp.flagged & mask).sum() / mask.sum()
    precision_sp = (sp.flagged & mask).sum() / max(sp.flagged.sum(), 1)
    assert recall_ss < 0.5
    assert recall_sp >= 0.9 and precision_sp >= 0.9


def test_spectre_paper_mode_and_budget() -> None:
    x, mask = hidden_cluster(frac=0.1)
    y = (np.arange(len(x)) % 2).astype(np.int64)
    y[mask] = 0
    paper = Spectre(mode="paper", poison_rate_bound=0.1).fit_features(x, y)
    for c in (0, 1):
        n = int((y == c).sum())
        assert paper.flagged[y == c].sum() == int(np.floor(0.15 * n + 0.5))
    capped = Spectre(poison_rate_bound=0.01).fit_features(x, y)
    assert capped.flagged.sum() <= int(1.5 * 0.01 * len(y))
    assert mask[capped.flagged].all()


def test_spectre_clean_classes_flag_nothing() -> None:
    rng = np.random.default_rng(4)
    f = (rng.normal(size=(3000, 20)) * np.linspace(3, 0.5, 20)).astype(np.float32)
    y = rng.integers(0, 3, 3000)
    res = Spectre(poison_rate_bound=0.1).fit_features(f, y)
    assert res.verdict == "clean" and res.flagged.sum() == 0


@pytest.mark.parametrize("kwargs, name", [
    ({"mode": "x"}, "mode"), ({"alpha": -1}, "alpha"), ({"dims": (0,)}, "dims"),
    ({"dims": ()}, "dims"), ({"min_separation": 0}, "min_separation"),
    ({"max_fit_samples": 5}, "max_fit_samples"), ({"poison_rate_bound": 1.5},
                                                  "poison_rate_bound"),
    ({"mode": "paper"}, "poison_rate_bound"),
])
def test_spectre_bad_settings(kwargs: dict, name: str) -> None:
    x, _ = hidden_cluster(n=300)
    y = (np.arange(300) % 2).astype(np.int64)
    with pytest.raises(ParameterError, match=name):
        Spectre(**kwargs).fit_features(x, y)


def test_spectre_bad_inputs() -> None:
    x, _ = hidden_cluster(n=300)
    with pytest.raises(DataError):
        Spectre().fit_features(x, np.zeros(300, dtype=np.int64))
    with pytest.raises(DataError):
        Spectre().fit_features(x, np.arange(299) % 2)
    with pytest.raises(DataError):
        Spectre().fit_features(x, None)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_spectre_scores_invariant_to_order(seed: int) -> None:
    x, _ = hidden_cluster(n=900, seed=seed % 3)
    y = (np.arange(900) % 3).astype(np.int64)
    det = Spectre(max_fit_samples=10_000)
    base = det.fit_features(x, y)
    perm = np.random.default_rng(seed).permutation(900)
    again = det.fit_features(x[perm], y[perm])
    np.testing.assert_allclose(again.scores, base.scores[perm], rtol=1e-4, atol=1e-6)
    assert np.array_equal(again.flagged, base.flagged[perm])
