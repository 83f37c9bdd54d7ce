"""scan-data decisions calibrated on the data at hand: SCAn's across-class rule, the union
combination's false-alarm rate, and a lone confident detector carrying the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from _data_poisoning_fixtures import PassThrough, planted_images
from trojanscan import detectors as registry
from trojanscan.data_scan import (
    DEFAULT_DATA_DETECTORS,
    combination_evidence,
    combine,
    make_result,
    scan_data,
    stated_false_alarm,
)
from trojanscan.detectors.scan_decomp import Scan
from trojanscan.exceptions import DetectorNotApplicable, ParameterError
from trojanscan.maths import decomposition as dc


def clean_classes(rng: np.random.Generator, *, k: int = 10, per_class: int = 300,
                  dim: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """``k`` Gaussian classes, each with its own mean and its own (random) covariance."""
    xs, ys = [], []
    for c in range(k):
        a = rng.normal(size=(dim, dim)) * rng.uniform(0.3, 1.0)
        x = rng.normal(size=(per_class, dim)) @ a + rng.normal(scale=8.0, size=dim)
        xs.append(x)
        ys.append(np.full(per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def plant(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, target: int,
          count: int) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``count`` samples of ``target`` by a separate population (a shifted copy of
    samples of other classes, relabelled): returns features and the poison mask."""
    x = x.copy()
    inside = np.flatnonzero(y == target)[:count]
    donors = rng.choice(np.flatnonzero(y != target), count, replace=False)
    centre = x[y == target].mean(axis=0)
    sd = x[y == target].std(axis=0).mean()
    direction = rng.normal(size=x.shape[1])
    direction /= np.linalg.norm(direction)
    x[inside] = (centre + 8 * sd * direction
                 + 0.3 * (x[donors] - x[donors].mean(axis=0))).astype(np.float32)
    mask = np.zeros(len(y), dtype=bool)
    mask[inside] = True
    return x, mask


def test_across_class_rule_flags_planted_subpopulation_and_nothing_in_clean_classes() -> None:
    rng = np.random.default_rng(0)
    x, y = clean_classes(rng)
    clean = Scan(seed=0).fit_features(x, y)
    assert clean.verdict == "clean", clean.evidence
    assert not clean.flagged.any()
    xp, mask = plant(x, y, rng, target=3, count=60)
    res = Scan(seed=0).fit_features(xp, y)
    assert res.evidence["classes_with_outliers"] == [3]
    hit = int((res.flagged & mask).sum())
    assert hit / mask.sum() >= 0.9 and hit / res.flagged.sum() >= 0.9
    entry = res.per_class["3"]
    assert entry["across_class_index"] > entry["threshold"]
    assert "other 9 classes" in entry["compared_with"]
    # every other class is below the threshold it was compared with
    assert all(e["across_class_index"] <= e["threshold"]
               for c, e in res.per_class.items() if c != "3")


def test_paper_mode_runs_the_reference_statistics() -> None:
    rng = np.random.default_rng(1)
    x, y = clean_classes(rng, k=5, per_class=120, dim=6)
    res = Scan(mode="paper", seed=0).fit_features(x, y)
    assert res.evidence["threshold"] == pytest.approx(np.exp(2))
    assert res.evidence["global_model_iterations"] >= 1
    assert all(np.isfinite(e["statistic"]) for e in res.per_class.values())


def test_scan_needs_three_classes_and_checks_its_settings() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.repeat([0, 1], 20)
    with pytest.raises(DetectorNotApplicable, match="at least 3 classes"):
        Scan().fit_features(x, y)
    with pytest.raises(ParameterError, match="alpha"):
        Scan(alpha=1.5).fit_features(x, y)
    with pytest.raises(ParameterError, match="mode"):
        Scan(mode="vote").fit_features(x, y)


def test_global_model_from_sufficient_statistics_matches_per_sample_em() -> None:
    """The EM on per-class statistics gives the reference's per-sample E-step result."""
    rng = np.random.default_rng(3)
    x, y = clean_classes(rng, k=4, per_class=50, dim=3)
    x = x.astype(np.float64)
    gm = dc.global_model(dc.class_stats(x, y), max_iter=1)
    # one reference iteration, per sample
    xc = x - x.mean(axis=0)
    means = np.stack([xc[y == k].mean(axis=0) for k in range(4)])
    su = np.cov(means[y].T)
    se = np.cov((xc - means[y]).T)
    f = np.linalg.pinv(se)
    um = np.zeros_like(means)
    for k in range(4):
        g = -np.linalg.pinv((y == k).sum() * su + se) @ su @ f
        um[k] = -(se @ g @ xc[y == k].T).sum(axis=1)
    np.testing.assert_allclose(gm.su, np.cov(um[y].T), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gm.se, np.cov((xc - um[y]).T), rtol=1e-6, atol=1e-9)


def test_union_false_alarm_rate_on_clean_sets_is_within_its_stated_bound() -> None:
    sets = 20
    bound = stated_false_alarm(DEFAULT_DATA_DETECTORS, "union")
    assert bound is not None and 0 < bound < 0.5
    alarms = 0
    for s in range(sets):
        x, y = clean_classes(np.random.default_rng(100 + s), per_class=150, dim=8)
        results = {n: registry.get(n)(seed=s).fit_features(x, y)
                   for n in DEFAULT_DATA_DETECTORS}
        _, flagged = combine(results, "union")
        alarms += int(flagged.any())
    # the count of false alarms is what a rate of at most ``bound`` allows (one-sided 99.9%)
    assert alarms <= binom.ppf(0.999, sets, bound), alarms


def test_one_confident_detector_is_not_outvoted() -> None:
    def res(name: str, flags: list[int]) -> object:
        f = np.zeros(12, dtype=bool)
        f[flags] = True
        return make_result(name, scores=f.astype(np.float32), flagged=f, seconds=0, seed=0,
                           params={}, per_class={})

    rs = {"spectral_signatures": res("spectral_signatures", []),
          "spectre": res("spectre", []), "scan": res("scan", [2, 3, 5])}
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 1, 2])
    _, flagged = combine(rs, "union")  # type: ignore[arg-type]
    assert np.flatnonzero(flagged).tolist() == [2, 3, 5]
    assert not combine(rs, "majority")[1].any()  # type: ignore[arg-type]
    ev = combination_evidence(rs, flagged, labels, "union")  # type: ignore[arg-type]
    assert ev["carried_by"] == ["scan"]
    assert ev["per_class"] == {"1": {"num_flagged": 3, "detectors": {"scan": 3}}}


def test_tiny_poisoned_set_where_only_one_detector_fires_is_called_poisoned() -> None:
    planted = planted_images(poison=30)
    # SPECTRE and SCAn set so strict that they cannot fire: Spectral Signatures alone
    params = {"spectre": {"min_separation": 1e6}, "scan": {"alpha": 1e-5}}
    scan = scan_data(PassThrough(), planted.data, params=params)
    fired = [n for n, r in scan.results.items() if r.flagged.any()]
    assert fired == ["spectral_signatures"]
    assert scan.verdict == "poisoned"
    assert scan.evidence is not None and scan.evidence["carried_by"] == fired
    hit = int((scan.flagged & planted.mask).sum())
    assert hit / planted.mask.sum() >= 0.9
