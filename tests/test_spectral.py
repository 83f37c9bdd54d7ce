"""Spectral Signatures: the pure scoring maths and the detector on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from trojanscan.detectors.spectral_signatures import SpectralSignatures
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.maths.spectral import (
    check_features,
    check_rate,
    class_groups,
    class_signature,
    decide_population,
    gaussian_mixture_split,
    group_spread,
    moments,
    paper_removal_count,
    spectral_signature_scores,
    suspect_side,
    top_k_mask,
    two_split,
    valley_ratio,
)


def planted(n: int = 1500, d: int = 24, frac: float = 0.1, shift: float = 10.0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features (decaying variances) with a shifted cluster of ``frac``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(1.5, 0.5, d)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, int(frac * n), replace=False)] = True
    u = rng.normal(size=d)
    x[mask] += shift * u / np.linalg.norm(u)
    return x, mask


def multiclass(seed: int = 0, poison_frac: float = 0.15) -> tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """Five classes of 400 samples; class 2 holds a planted shifted cluster."""
    rng = np.random.default_rng(seed)
    feats, labels, masks = [], [], []
    for c in range(5):
        x = rng.normal(size=(400, 16)) + 6.0 * np.eye(16)[c]
        m = np.zeros(400, dtype=bool)
        if c == 2:
            m[rng.choice(400, int(poison_frac * 400), replace=False)] = True
            x[m] += 9.0 * np.eye(16)[10]
        feats.append(x)
        labels.append(np.full(400, c))
        masks.append(m)
    perm = rng.permutation(2000)
    return (np.concatenate(feats)[perm].astype(np.float32), np.concatenate(labels)[perm],
            np.concatenate(masks)[perm])


def test_moments_match_numpy_for_any_chunk_size() -> None:
    x, _ = planted(n=503)
    index = np.arange(503)
    for chunk in (1, 7, 100, 1000):
        mom = moments(x, index, chunk=chunk)
        np.testing.assert_allclose(mom.mean, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mom.cov, np.cov(x, rowvar=False, bias=True), rtol=1e-9,
                                   atol=1e-12)


def test_signature_scores_find_planted_cluster() -> None:
    x, mask = planted()
    sig = class_signature(x, np.arange(len(x)), 0)
    assert roc_auc_score(mask, sig.scores) > 0.99
    top = top_k_mask(sig.scores, int(1.5 * mask.sum()))
    assert (top & mask).sum() / mask.sum() >= 0.95


def test_uncentred_scores_differ_from_centred_when_mean_is_large() -> None:
    x, _ = planted()
    x = x + 50.0  # a large common offset dominates the uncentred top direction
    y = np.zeros(len(x), dtype=np.int64)
    y[:10] = 1
    centred = spectral_signature_scores(x, y)
    raw = spectral_signature_scores(x, y, centre=False)
    assert not np.allclose(centred, raw)
    # uncentred: the direction is the mean's, every sample scores about the same
    assert raw[y == 0].std() / raw[y == 0].mean() < 0.1


def test_two_split_separation_calibration() -> None:
    rng = np.random.default_rng(1)
    gauss = two_split(rng.normal(size=20000))
    assert 2.5 < gauss.separation < 2.8  # theory: 2.65 for a unimodal Gaussian
    bimodal = two_split(np.concatenate([rng.normal(size=900), 12 + rng.normal(size=100)]))
    assert bimodal.separation > 8
    assert bimodal.n_high == 100 and bimodal.minority_high


def test_decide_population_needs_a_density_valley() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(size=900), 10 + rng.normal(size=100)])
    dec = decide_population(values)
    assert dec.detected and dec.upper[900:].all() and not dec.upper[:900].any()
    assert dec.valley < 0.05
    flat = decide_population(rng.normal(size=1000))
    assert not flat.detected and flat.valley > 0.5
    # heavy tails stretch d' but leave no valley: not a population
    tails = decide_population(rng.standard_t(2, size=3000))
    assert not tails.detected
    # two wide groups with an empty gap between them: d' is modest, the valley is deep
    wide = np.concatenate([rng.uniform(0, 4, 1000), rng.uniform(5, 9, 1000)])
    assert decide_population(wide).detected


def test_gaussian_mixture_moves_boundary_towards_tight_group() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.normal(0, 0.5, 1000), rng.normal(6, 2.5, 300)])
    truth = np.arange(1300) >= 1000
    two = values > two_split(values).threshold
    refined = gaussian_mixture_split(values, two)
    assert (refined == truth).mean() > (two == truth).mean()
    assert (refined == truth).mean() > 0.99


def test_suspect_side_minority_or_spread() -> None:
    rng = np.random.default_rng(4)
    tight = rng.normal(size=(500, 5)) * 0.2
    wide = rng.normal(size=(500, 5)) * 2.0 + 5
    f = np.concatenate([tight, wide])
    index = np.arange(1000)
    upper = np.arange(1000) >= 500
    side, rule = suspect_side(f, index, upper)
    assert rule == "spread" and side[500:].all() and not side[:500].any()
    small = np.arange(1000) >= 900
    side, rule = suspect_side(f, index, small)
    assert rule == "minority" and side.sum() == 100
    assert group_spread(f, index[upper]) > 50 * group_spread(f, index[~upper])


def test_valley_ratio_bounds() -> None:
    rng = np.random.default_rng(5)
    assert valley_ratio(np.zeros(100)) == 1.0
    assert 0.5 < valley_ratio(rng.normal(size=5000)) <= 1.5


def test_paper_removal_count_and_top_k() -> None:
    assert paper_removal_count(1000, 0.1) == 150
    assert paper_removal_count(10, 0.5) == 8
    mask = top_k_mask(np.array([0.1, 5.0, 5.0, 3.0]), 2)
    assert mask.tolist() == [False, True, True, False]


@pytest.mark.parametrize("bad", [0.0, 0.6, -0.1, True, "0.1", float("nan")])
def test_rate_out_of_range(bad: object) -> None:
    with pytest.raises(ParameterError, match="poison_rate_bound"):
        check_rate("poison_rate_bound", bad)  # type: ignore[arg-type]


def test_bad_features_and_labels() -> None:
    x = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(DataError, match="at least 2 classes"):
        check_features(x, np.zeros(10, dtype=np.int64))
    with pytest.raises(DataError, match="labels are needed"):
        check_features(x, None)
    with pytest.raises(DataError, match="10 rows but labels have 9"):
        check_features(x, np.arange(9) % 2)
    with pytest.raises(DataError, match="N×D"):
        check_features(np.zeros(10), np.arange(10) % 2)


# ----------------------------------------------------------------------------- detector


def test_detector_adaptive_flags_only_the_poisoned_class() -> None:
    f, y, mask = multiclass()
    res = SpectralSignatures().fit_features(f, y)
    flagged = res.flagged
    assert res.verdict == "poisoned"
    assert (flagged & mask).sum() / mask.sum() >= 0.95
    assert (flagged & mask).sum() / flagged.sum() >= 0.95
    assert res.evidence["classes_with_outliers"] == [2]
    assert res.scores.dtype == np.float32 and res.scores.shape == (len(y),)
    assert roc_auc_score(mask, res.scores) > 0.99


def test_detector_paper_mode_removes_fixed_share_of_every_class() -> None:
    f, y, mask = multiclass()
    res = SpectralSignatures(mode="paper", poison_rate_bound=0.05).fit_features(f, y)
    for c, index in class_groups(y).items():
        assert res.flagged[index].sum() == paper_removal_count(len(index), 0.05)
        assert res.per_class[str(c)]["num_flagged"] == 30
    # 1.5·ε·n per class caps recall in the poisoned class (60 poisoned, 30 removed)
    assert (res.flagged & mask).sum() <= 30


def test_detector_clean_features_flag_nothing() -> None:
    rng = np.random.default_rng(3)
    f = rng.normal(size=(2000, 16)).astype(np.float32)
    y = rng.integers(0, 4, 2000)
    res = SpectralSignatures(poison_rate_bound=0.05).fit_features(f, y)
    assert res.verdict == "clean" and not res.flagged.any()


def test_detector_budget_caps_flags() -> None:
    f, y, mask = multiclass(poison_frac=0.3)
    res = SpectralSignatures(poison_rate_bound=0.02).fit_features(f, y)
    assert res.flagged.sum() == int(1.5 * 0.02 * len(y)) == res.evidence["budget"]
    assert mask[res.flagged].all()  # the highest-scored ones are kept


def test_detector_bad_settings() -> None:
    f, y, _ = multiclass()
    with pytest.raises(ParameterError, match="mode"):
        SpectralSignatures(mode="fixed").fit_features(f, y)
    with pytest.raises(ParameterError, match="poison_rate_bound"):
        SpectralSignatures(mode="paper").fit_features(f, y)
    with pytest.raises(ParameterError, match="poison_rate_bound"):
        SpectralSignatures(poison_rate_bound=0.9).fit_features(f, y)
    with pytest.raises(DataError):
        SpectralSignatures().fit_features(f, np.zeros(len(y), dtype=np.int64))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 700))
def test_scores_invariant_to_order_and_chunk_size(seed: int, chunk: int) -> None:
    f, y, _ = multiclass(seed=seed % 7)
    base = spectral_signature_scores(f, y)
    perm = np.random.default_rng(seed).permutation(len(y))
    shuffled = spectral_signature_scores(f[perm], y[perm], chunk=chunk)
    np.testing.assert_allclose(shuffled, base[perm], rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_detector_flags_invariant_to_order(seed: int) -> None:
    f, y, _ = multiclass(seed=seed % 5)
    base = SpectralSignatures().fit_features(f, y)
    perm = np.random.default_rng(seed).permutation(len(y))
    again = SpectralSignatures().fit_features(f[perm], y[perm])
    assert np.array_equal(again.flagged, base.flagged[perm])
    np.testing.assert_allclose(again.scores, base.scores[perm], rtol=1e-4, atol=1e-5)
