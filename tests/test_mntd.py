"""MNTD (Xu et al., IEEE S&P 2021): jumbo triggers, shadows, executor, meta-classifier,
shipped bundles, the detector and ``trojanscan mntd train``.

The quality test trains a handful of tiny 8×8-digits MLP shadows and meta-classifier
in seconds; everything else runs without training more than a few one-epoch models.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trojanscan import archs
from trojanscan.dataset import ImageDataset
from trojanscan.detectors import create
from trojanscan.detectors.base import count_hooks
from trojanscan.detectors.mntd import MNTD
from trojanscan.exceptions import (
    DataError,
    DetectorNotApplicable,
    IncompatibleError,
    ModelError,
    ParameterError,
    TrojanscanWarning,
)
from trojanscan.io.data import load_dataset
from trojanscan.mntd import calibration, executor, jumbo, regime, shadows
from trojanscan.mntd.meta import (
    MetaClassifier,
    MetaConfig,
    _pick_queries,
    fit_meta,
    init_queries,
    normalise_responses,
    raw_scores,
)
from trojanscan.mntd.pipeline import (
    TrainSettings,
    check_member_data,
    defender_share,
    fit_bundle,
    load_shadow_split,
    query_pool_split,
    train_shadow_set,
)
from trojanscan.mntd.pretrained import (
    BUILTINS,
    MetaBundle,
    available_builtins,
    builtin_path,
    load_bundle,
    save_bundle,
)
from trojanscan.mntd.recipe import Recipe, legacy_recipe, trained_recipe
from trojanscan.training import TrainConfig, train_model

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "trojanscan" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _with_recipe(bundle: MetaBundle, stem: Path, calibration: str = "shadows",
                 **parts: float) -> Path:
    """``bundle`` saved under ``stem`` with a recipe of ``parts`` (name=weight)."""
    recipe = Recipe(tuple((n, float(w)) for n, w in parts.items()), calibration)
    return save_bundle(stem, dataclasses.replace(bundle, recipe=recipe))[1]


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits:train")


# -- jumbo distribution (pure) -----------------------------------------------------------

@given(seed=st.integers(0, 2**32 - 1), h=st.sampled_from([8, 12, 28, 32]))
@settings(max_examples=60, deadline=None)
def test_jumbo_triggers_stay_inside_the_paper_ranges(seed: int, h: int) -> None:
    t = jumbo.sample_trigger(np.random.default_rng(seed), (1, h, h), 10)
    mh, mw = t.size
    assert 0 <= t.row <= h - mh and 0 <= t.col <= h - mw
    assert 1 <= int(t.mask.sum()) <= mh * mw - 1
    assert set(np.unique(t.mask)) <= {0.0, 1.0}
    assert 0 <= t.target < 10 and 0.05 <= t.rate <= 0.5
    if t.kind == "blend":
        assert (mh, mw) == (h, h) and 0.05 <= t.alpha <= 0.2
    else:
        assert mh == mw and mh in jumbo.patch_sides(h, h) and mh <= h // 2
        assert t.alpha == 1.0 or 0.2 <= t.alpha <= 0.5


def test_jumbo_distribution_mixes_patches_blends_and_opaque_patches() -> None:
    rng = np.random.default_rng(0)
    ts = [jumbo.sample_trigger(rng, (1, 28, 28), 10) for _ in range(400)]
    blends = np.mean([t.kind == "blend" for t in ts])
    opaque = np.mean([t.alpha == 1.0 for t in ts if t.kind == "patch"])
    assert 0.12 < blends < 0.28  # 1/5
    assert 0.15 < opaque < 0.35  # 1/4
    assert {t.size[0] for t in ts if t.kind == "patch"} == {2, 3, 4, 5}
    assert len({t.target for t in ts}) == 10


def test_trigger_stamps_only_its_region_and_round_trips() -> None:
    t = jumbo.JumboTrigger("patch", 1, 2, np.array([[1, 0], [0, 1]], np.float32), 1.0, 3, 0.1)
    x = torch.full((2, 1, 6, 6), 0.5)
    y = t.apply(x)
    assert torch.equal(x, torch.full((2, 1, 6, 6), 0.5))  # input untouched
    assert y[0, 0, 1, 2] == 1.0 and y[0, 0, 1, 3] == 0.0 and y[0, 0, 2, 3] == 1.0
    y[:, :, 1:3, 2:4] = 0.5
    assert torch.equal(y, x)
    half = jumbo.JumboTrigger("patch", 0, 0, np.ones((2, 2), np.float32), 0.5, 0, 0.1)
    assert torch.allclose(half.apply(torch.zeros(1, 1, 4, 4))[0, 0, :2, :2], torch.tensor(0.5))
    back = jumbo.JumboTrigger.from_dict(json.loads(json.dumps(t.to_dict())))
    assert back.to_dict() == t.to_dict() and np.array_equal(back.mask, t.mask)


def test_poisoning_replaces_a_share_in_place(digits: ImageDataset) -> None:
    ds = digits.subset(slice(0, 200))
    before = ds.x.clone()
    t = jumbo.sample_trigger(np.random.default_rng(1), ds.input_shape, 10)
    out = jumbo.poison_with(ds, t, np.random.default_rng(2), "replace")
    assert len(out) == 200 and torch.equal(ds.x, before)  # same size, input untouched
    changed = (out.x != ds.x).flatten(1).any(1) | (out.labels() != ds.labels())
    k = round(t.rate / (1 + t.rate) * 200)
    assert int(changed.sum()) <= k and int((out.labels() == t.target).sum()) >= k
    assert torch.equal(out.x[changed], t.apply(ds.x[changed]))
    assert jumbo.poison_fraction(0.5) == pytest.approx(1 / 3)


def test_poisoning_by_appending_as_the_reference(digits: ImageDataset) -> None:
    ds = digits.subset(slice(0, 200))
    t = jumbo.sample_trigger(np.random.default_rng(1), ds.input_shape, 10)
    out = jumbo.poison_with(ds, t, np.random.default_rng(2), "append")
    k = round(t.rate * 200)
    assert len(out) == 200 + k
    assert torch.equal(out.x[:200], ds.x) and torch.equal(out.labels()[:200], ds.labels())
    assert bool((out.labels()[200:] == t.target).all())
    with pytest.raises(ParameterError, match="poisoning"):
        jumbo.poison_with(ds, t, np.random.default_rng(2), "mix")


def test_wide_family_adds_source_specific_triggers_and_keeps_the_paper_trigger() -> None:
    rng = np.random.default_rng(0)
    ts = [jumbo.sample_trigger(rng, (1, 28, 28), 10, family="wide") for _ in range(600)]
    share = np.mean([bool(t.sources) for t in ts])
    assert abs(share - jumbo.SOURCE_SPECIFIC_SHARE) < 0.06
    src = [t for t in ts if t.sources]
    assert all(t.target not in t.sources and 1 <= len(t.sources) <= 3 for t in src)
    assert {len(t.sources) for t in src} == {1, 2, 3}
    for seed in range(20):  # same seed: the same trigger, only the label mode differs
        a = jumbo.sample_trigger(np.random.default_rng(seed), (1, 28, 28), 10)
        b = jumbo.sample_trigger(np.random.default_rng(seed), (1, 28, 28), 10, family="wide")
        assert (a.kind, a.row, a.col, a.alpha, a.target, a.rate) == (
            b.kind, b.row, b.col, b.alpha, b.target, b.rate)
        assert np.array_equal(a.mask, b.mask) and a.sources == ()
    three = jumbo.sample_trigger(np.random.default_rng(3), (1, 8, 8), 3, family="wide")
    assert len(three.sources) <= 1  # 3 classes: one source at most, one left as cover
    back = jumbo.JumboTrigger.from_dict(json.loads(json.dumps(src[0].to_dict())))
    assert back.sources == src[0].sources
    with pytest.raises(ParameterError, match="jumbo_family"):
        jumbo.sample_trigger(rng, (1, 28, 28), 10, family="huge")


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_source_specific_poisoning_relabels_sources_and_keeps_cover_labels(mode: str) -> None:
    y = torch.arange(1000) % 10
    ds = ImageDataset(torch.full((1000, 1, 8, 8), 0.25), y)
    t = jumbo.JumboTrigger("patch", 0, 0, np.ones((2, 2), np.float32), 1.0, 2, 0.3, (5, 7))
    out = jumbo.poison_with(ds, t, np.random.default_rng(1), mode)
    stamped = (out.x[:, 0, :2, :2] == 1.0).flatten(1).all(1)
    yo = out.labels()
    flipped = stamped & (yo == 2)
    n_src = 200 if mode == "append" else 100  # all source samples, or half of them
    assert int(flipped.sum()) == n_src
    assert int((stamped & (yo != 2)).sum()) == n_src  # as many covers
    assert not bool((stamped & ((yo == 5) | (yo == 7))).any())  # no source kept its label
    assert int(((yo == 5) | (yo == 7)).sum()) == 200 - (0 if mode == "append" else n_src)
    if mode == "replace":  # covers come from the other non-target classes, labels kept
        cov = stamped & (yo != 2)
        assert torch.equal(yo[cov], y[cov]) and not bool(torch.isin(y[cov], torch.tensor(
            [2, 5, 7])).any())
    assert t.eligible(torch.tensor([5, 7, 2, 0])).tolist() == [True, True, False, False]


# -- shadow training recipes (pure) --------------------------------------------------------

@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_random_recipes_stay_inside_their_ranges(seed: int) -> None:
    r = regime.sample_regime(np.random.default_rng(seed))
    assert regime.EPOCHS[0] <= r.epochs <= regime.EPOCHS[1]
    assert r.batch_size in regime.BATCH_SIZES and r.weight_decay in regime.WEIGHT_DECAYS
    assert regime.LR[0] <= r.lr <= regime.LR[1] * (1 + 1e-6)
    assert regime.SUBSAMPLE[0] <= r.subsample <= regime.SUBSAMPLE[1]
    cfg = r.config()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.lr_decay) == (
        r.epochs, r.batch_size, r.lr, r.weight_decay, r.lr_decay)


def test_random_recipes_vary_per_shadow_and_repeat_per_seed() -> None:
    specs = shadows.plan_shadows(40, ("mlp",), seed=2, regime="random")
    recipes = [s.recipe() for s in specs]
    assert recipes == [s.recipe() for s in shadows.plan_shadows(40, ("mlp",), seed=2,
                                                               regime="random")]
    assert len({(r.epochs, r.lr) for r in recipes}) > 70  # 80 shadows, (nearly) all differ
    assert {r.batch_size for r in recipes} == set(regime.BATCH_SIZES)
    assert {r.lr_decay for r in recipes} == {True, False}
    short = [r.epochs for r in recipes if r.epochs <= 12]
    assert 0.2 < len(short) / len(recipes) < 0.7  # log-uniform: ~57% at or below 12
    # both kinds draw from the same distribution: the recipe is no cue for the label
    benign = [r.epochs for s, r in zip(specs, recipes) if s.kind == "benign"]
    jumbo_ = [r.epochs for s, r in zip(specs, recipes) if s.kind == "jumbo"]
    assert abs(np.median(benign) - np.median(jumbo_)) < 8
    fixed = shadows.plan_shadows(2, ("mlp",), seed=2, epochs=7, batch_size=32, lr=2e-3,
                                 subsample=0.5)[0].recipe()
    assert fixed == regime.Regime(7, 32, 2e-3, 0.0, True, 0.5)
    with pytest.raises(ParameterError, match="regime"):
        shadows.plan_shadows(2, ("mlp",), regime="wild")


def test_random_recipe_shadow_records_it_and_refuses_a_fixed_rerun(
        digits: ImageDataset, tmp_path: Path) -> None:
    data = shadows.ShadowData(digits.subset(slice(0, 120)), 10)
    s = dataclasses.replace(_tiny_settings(2), shadow_regime="random")
    train_shadow_set(data, tmp_path, s, seed=4, backend="sequential")
    meta = shadows.read_shadow_meta(tmp_path / "benign-0000.safetensors")
    spec = s.specs(4)[0]
    assert meta["regime"] == "random" and meta["recipe"] == spec.recipe().to_dict()
    assert meta["train_samples"] == round(spec.recipe().subsample * 120)
    with pytest.raises(DataError, match="regime='random'"):
        train_shadow_set(data, tmp_path, _tiny_settings(2), seed=4, backend="sequential")


def test_wide_family_shadow_records_its_sources_and_refuses_a_paper_rerun(
        digits: ImageDataset, tmp_path: Path) -> None:
    data = shadows.ShadowData(digits.subset(slice(0, 200)), 10, digits.subset(slice(200, 400)))
    s = dataclasses.replace(_tiny_settings(6), jumbo_family="wide")
    train_shadow_set(data, tmp_path, s, seed=4, backend="sequential")
    metas = [shadows.read_shadow_meta(p) for p in shadows.list_shadows(tmp_path, "jumbo")]
    assert {m["family"] for m in metas} == {"wide"}
    src = [m for m in metas if m["trigger"]["sources"]]
    assert src, "six wide jumbo shadows, seed 4: some are source-specific"
    m = src[0]
    t = jumbo.JumboTrigger.from_dict(m["trigger"])
    model, _ = shadows.load_shadow(shadows.shadow_path(tmp_path, s.specs(4)[6 + m["index"]]))
    ev = data.eval
    assert ev is not None
    keep = torch.isin(ev.labels(), torch.tensor(t.sources))  # ASR over source inputs only
    with torch.no_grad():
        hit = model(t.apply(ev.x[keep])).argmax(1) == t.target
    assert m["asr"] == pytest.approx(float(hit.float().mean()))
    with pytest.raises(DataError, match="family='wide'"):
        train_shadow_set(data, tmp_path, _tiny_settings(6), seed=4, backend="sequential")
    with pytest.raises(ParameterError, match="jumbo_family"):
        dataclasses.replace(_tiny_settings(6), jumbo_family="huge").validate()


# -- query_holdout: the members' query pool kept out of shadow training --------------------

def test_query_pool_split_is_stratified_disjoint_and_seeded(digits: ImageDataset) -> None:
    data = digits.subset(slice(0, 300))
    labels = data.labels()
    shadow_part, pool = query_pool_split(data, 0.1, seed=4)
    assert len(shadow_part) + len(pool) == len(data)
    for c in range(10):  # per class round(0.1·n), at least one
        n = int((labels == c).sum())
        assert int((pool.labels() == c).sum()) == max(1, round(0.1 * n))
    rows = {tuple(r.flatten().tolist()) for r in data.x}
    a = {tuple(r.flatten().tolist()) for r in shadow_part.x}
    b = {tuple(r.flatten().tolist()) for r in pool.x}
    assert not a & b and a | b == rows  # digits has no duplicate images
    again = query_pool_split(data, 0.1, seed=4)[1]
    other = query_pool_split(data, 0.1, seed=5)[1]
    assert torch.equal(again.x, pool.x) and not torch.equal(other.x, pool.x)
    same = query_pool_split(data, 0.0)
    assert same[0] is data and same[1] is data  # the recipe before query_holdout
    tiny = ImageDataset(data.x[:3], torch.tensor([0, 0, 1]))
    s3, p3 = query_pool_split(tiny, 0.5)
    # one of class 0's two images; class 1's only image stays with the shadows (at most n-1)
    assert p3.labels().tolist() == [0] and s3.labels().tolist() == [0, 1]
    with pytest.raises(ParameterError, match="query_holdout"):
        query_pool_split(data, 0.6)
    with pytest.raises(DataError, match="labelled"):
        query_pool_split(ImageDataset(data.x), 0.1)
    with pytest.raises(ParameterError, match=r"query_holdout.*data_members"):
        TrainSettings(num_shadows=2, num_val=1, query_holdout=0.1).validate()


def test_query_holdout_keeps_the_pool_out_of_the_shadows_and_starts_the_queries_there(
        digits: ImageDataset, tmp_path: Path) -> None:
    share = digits.subset(slice(0, 200))
    settings_ = dataclasses.replace(_tiny_settings(2), data_members=1, query_holdout=0.2,
                                    variants=("qt",))
    train_shadow_set(shadows.ShadowData(share, 10), tmp_path, settings_, seed=2,
                     backend="sequential")
    shadow_part, pool = query_pool_split(share, 0.2, seed=2)
    metas = [shadows.read_shadow_meta(p) for p in shadows.list_shadows(tmp_path, "benign")]
    assert {m["train_samples"] for m in metas} == {len(shadow_part)}
    assert {m["holdout"] for m in metas} == {0.2}
    bundle = fit_bundle(tmp_path, settings_, name="held", data=share, seed=2, device="cpu")
    data_info = bundle.info["training"]["data"]
    assert (data_info["shadow_samples"], data_info["query_pool_samples"]) == (len(shadow_part),
                                                                              len(pool))
    q = bundle.variants["qt_data.0"].queries.flatten(1)

    def nearest(images: ImageDataset) -> torch.Tensor:  # L∞ distance to the closest image
        return (q[:, None, :] - images.x.flatten(1)[None]).abs().amax(-1).amin(1)

    eps = settings_.data_query_eps
    assert bool((nearest(pool) <= eps + 1e-5).all())  # every query started in the pool
    assert bool((nearest(shadow_part) > eps + 1e-5).any())
    # resuming with another holdout would mix shadows trained on different data: refused
    with pytest.raises(DataError, match="holdout"):
        train_shadow_set(shadows.ShadowData(share, 10), tmp_path,
                         dataclasses.replace(settings_, query_holdout=0.0), seed=2,
                         backend="sequential")


# -- calibration (pure) --------------------------------------------------------------------

@given(st.lists(st.floats(-50, 50), min_size=1, max_size=40), st.floats(-60, 60))
@settings(max_examples=80, deadline=None)
def test_p_value_and_ecdf_are_bounded_and_monotone(benign: list[float], raw: float) -> None:
    p = calibration.p_value(raw, benign)
    assert 1 / (len(benign) + 1) <= p <= 1
    assert calibration.p_value(raw + 1.0, benign) <= p
    e = calibration.ecdf_score(raw, benign)
    assert 0 <= e <= 1 and calibration.ecdf_score(raw + 1.0, benign) >= e


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=60), st.floats(0.01, 0.5))
@settings(max_examples=80, deadline=None)
def test_threshold_flags_at_most_the_asked_share(benign: list[float], fpr: float) -> None:
    thr = calibration.threshold_at_fpr(benign, fpr)
    assert np.mean(np.asarray(benign) > thr) <= fpr + 1e-12


def test_combine_standardised_sums_z_scores_against_the_benign_shadows() -> None:
    # variant a: benign mean 1, std 1; variant b: benign mean 10, std 2
    raw, shadows = calibration.combine_standardised([3.0, 14.0],
                                                    [[0.0, 2.0], [8.0, 12.0]])
    assert raw == pytest.approx(2.0 + 2.0)
    assert shadows == pytest.approx([-2.0, 2.0])  # each benign shadow's own sum
    raw, shadows = calibration.combine_standardised([3.0, 14.0], [[0.0, 2.0], [8.0, 12.0]],
                                                    weights=[0.5, 2.0])
    assert raw == pytest.approx(0.5 * 2.0 + 2.0 * 2.0)
    assert shadows == pytest.approx([-2.5, 2.5])
    with pytest.raises(ValueError, match="one weight"):
        calibration.standardised_sums([[1.0]], [[0.0, 1.0]], weights=[1.0, 1.0])
    # a variant whose benign outputs do not vary is centred only
    raw, _ = calibration.combine_standardised([5.0], [[4.0, 4.0]])
    assert raw == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same benign shadows"):
        calibration.combine_standardised([1.0, 2.0], [[0.0, 1.0], [0.0]])
    with pytest.raises(ValueError, match="one list"):
        calibration.combine_standardised([1.0], [[0.0], [1.0]])


def test_auroc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = np.round(rng.normal(size=50) + y, 1)  # with ties
    assert calibration.auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(calibration.auroc([1, 1], [0.1, 0.2]))


def test_response_normalisations_have_their_invariances() -> None:
    out = torch.randn(4, 10)
    z = normalise_responses(out, "zscore")
    assert torch.allclose(normalise_responses(3.0 * out + 7.0, "zscore"), z, atol=1e-4)
    assert torch.allclose(normalise_responses(out, "logits"), out)
    p = normalise_responses(out, "softmax")
    assert torch.allclose(p.sum(1), torch.ones(4)) and torch.allclose(
        normalise_responses(out + 5.0, "softmax"), p, atol=1e-6)
    s = normalise_responses(out, "sorted")  # class order does not matter
    assert torch.allclose(normalise_responses(out[:, torch.randperm(10)], "sorted"), s)
    assert bool((s.mean(0)[:-1] >= s.mean(0)[1:]).all())
    sc = normalise_responses(out, "scaled")  # per-query shift, one scale for all queries
    shift = torch.randn(4, 1)
    assert torch.allclose(normalise_responses(3.0 * out + shift, "scaled"), sc, atol=1e-4)
    assert torch.allclose(sc.mean(1), torch.zeros(4), atol=1e-5)
    assert not torch.allclose(sc, z, atol=1e-2)  # keeps how confident each query is


# -- executor and resumable shadow training -----------------------------------------------

def _tiny_settings(n: int) -> TrainSettings:
    return TrainSettings(num_shadows=n, num_val=1, archs=("mlp",), shadow_epochs=1,
                         shadow_batch_size=32, meta_epochs=1)


def test_shadow_training_resumes_without_retraining(digits: ImageDataset, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = shadows.ShadowData(digits.subset(slice(0, 120)), 10)
    first = train_shadow_set(data, tmp_path, _tiny_settings(2), seed=3, backend="sequential")
    assert len(first.ran) == 4 and not first.skipped  # "killed" after 2 per kind
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    calls: list[str] = []
    real = shadows.train_shadow

    def counting(spec: shadows.ShadowSpec, d: shadows.ShadowData) -> object:
        calls.append(spec.key)
        return real(spec, d)

    monkeypatch.setattr(shadows, "train_shadow", counting)
    again = train_shadow_set(data, tmp_path, _tiny_settings(3), seed=3, backend="sequential")
    assert sorted(calls) == ["benign-0002", "jumbo-0002"]  # only the missing ones
    assert set(again.skipped) == {"benign-0000", "benign-0001", "jumbo-0000", "jumbo-0001"}
    assert {n: (tmp_path / n).stat().st_mtime_ns for n in stamps} == stamps
    assert len(list(tmp_path.glob("*.tmp"))) == 0
    other = dataclasses.replace(_tiny_settings(3), shadow_epochs=2)
    with pytest.raises(DataError, match=r"epochs=1.*epochs=2"):
        train_shadow_set(data, tmp_path, other, seed=3, backend="sequential")


def test_stamp_family_shadows_go_to_their_own_folder_and_resume(digits: ImageDataset,
                                                                tmp_path: Path) -> None:
    """Stamp members of another jumbo family train on the same benign shadows and their
    own jumbo shadows (jumbo-wide/); the paper's set is untouched."""
    data = shadows.ShadowData(digits.subset(slice(0, 120)), 10)
    settings_ = dataclasses.replace(_tiny_settings(2), stamp_members=1, stamp_family="wide")
    run = train_shadow_set(data, tmp_path, settings_, seed=3, backend="sequential")
    assert len(run.ran) == 6
    assert sorted(p.name for p in (tmp_path / "jumbo-wide").iterdir()) == [
        "jumbo-0000.safetensors", "jumbo-0001.safetensors"]
    train, val = load_shadow_split(tmp_path, settings_, 3, stamps=True)
    paper_train, paper_val = load_shadow_split(tmp_path, settings_, 3)
    fam = [m.get("family") for m in train.meta + val.meta if m["kind"] == "jumbo"]
    assert fam == ["wide", "wide"]
    assert [m.get("family", "paper") for m in paper_train.meta + paper_val.meta
            if m["kind"] == "jumbo"] == ["paper", "paper"]
    assert [m["seed"] for m in train.meta if m["kind"] == "benign"] == [
        m["seed"] for m in paper_train.meta if m["kind"] == "benign"]  # shared benign
    again = train_shadow_set(data, tmp_path, settings_, seed=3, backend="sequential")
    assert not again.ran and len(again.skipped) == 6


def test_shadow_files_round_trip_and_record_the_trigger(digits: ImageDataset,
                                                        tmp_path: Path) -> None:
    data = shadows.ShadowData(digits.subset(slice(0, 120)), 10, digits.subset(slice(200, 260)))
    spec = shadows.plan_shadows(1, ("mlp",), seed=5, epochs=1, kinds=("jumbo",))[0]
    model, meta = shadows.train_shadow(spec, data)
    path = shadows.save_shadow(tmp_path / "jumbo-0000.safetensors", model, meta)
    back, meta2 = shadows.load_shadow(path)
    x = digits.x[:5]
    assert torch.equal(back(x), model(x))
    assert meta2["trigger"]["target"] == meta["trigger"]["target"] and meta2["asr"] is not None
    assert not any(p.requires_grad for p in back.parameters())
    (tmp_path / "bogus.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="bogus"):
        shadows.load_shadow(tmp_path / "bogus.safetensors")


def test_shadow_seeds_do_not_depend_on_order_or_count() -> None:
    a = {s.key: s.seed for s in shadows.plan_shadows(3, ("mlp", "lenet"), seed=1)}
    b = {s.key: s.seed for s in shadows.plan_shadows(5, ("mlp", "lenet"), seed=1)}
    assert all(b[k] == v for k, v in a.items())
    assert len(set(b.values())) == len(b)
    assert [s.arch for s in shadows.plan_shadows(3, ("mlp", "lenet"), kinds=("benign",))] == [
        "mlp", "lenet", "mlp"]


def test_executor_rejects_duplicate_keys_and_bad_backends() -> None:
    t = executor.Task("a")
    with pytest.raises(ParameterError, match="unique keys"):
        executor.run_tasks(_echo, [t, t], backend="sequential")
    with pytest.raises(ParameterError, match="backend"):
        executor.run_tasks(_echo, [t], backend="threads")


def _echo(task: executor.Task, shared: object) -> tuple[str, object, int]:
    return task.key, shared, torch.get_num_threads()


def test_executor_sequential_runs_with_one_thread_and_restores() -> None:
    before = torch.get_num_threads()
    res = executor.run_tasks(_echo, [executor.Task("a"), executor.Task("b")], shared=7,
                             backend="sequential")
    assert res.results == {"a": ("a", 7, 1), "b": ("b", 7, 1)}
    assert torch.get_num_threads() == before


@pytest.mark.slow  # a few seconds on an idle machine; Ray start-up is slow under load
def test_ray_backend_gives_the_same_shadows_as_sequential(digits: ImageDataset,
                                                          tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="ray not installed (optional extra trojanscan[ray])")
    data = shadows.ShadowData(digits.subset(slice(0, 100)), 10)
    seq = train_shadow_set(data, tmp_path / "seq", _tiny_settings(2), seed=9,
                           backend="sequential")
    ray = train_shadow_set(data, tmp_path / "ray", _tiny_settings(2), seed=9, backend="ray",
                           workers=2)
    assert ray.backend == "ray" and sorted(ray.ran) == sorted(seq.ran)
    from safetensors.torch import load_file

    for name in ("benign-0000.safetensors", "jumbo-0001.safetensors"):
        a, b = load_file(str(tmp_path / "seq" / name)), load_file(str(tmp_path / "ray" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # Ray start-up
def test_a_local_ray_runs_its_workers_at_normal_priority(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Ray would start them at niceness 15, where a busy machine starves them."""
    ray = pytest.importorskip("ray", reason="ray not installed (optional extra trojanscan[ray])")
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    mine = os.nice(0)
    res = executor.run_tasks(lambda task, shared: os.nice(0), [executor.Task("a")],
                             backend="ray", workers=1)
    assert res.results == {"a": mine}


# -- meta-classifier quality on tiny models ------------------------------------------------

def _tiny_backdoor(ds: ImageDataset, target: int, corner: int, seed: int) -> ImageDataset:
    """BadNets-like: an opaque 2×2 white patch in a corner, 15% relabelled to ``target``."""
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.sort(rng.choice(len(ds), int(0.15 * len(ds)), replace=False)))
    x, y = ds.x.clone(), ds.labels().clone()
    r, c = [(0, 0), (0, 6), (6, 0), (6, 6)][corner]
    x[idx, :, r:r + 2, c:c + 2] = 1.0
    y[idx] = target
    return ds.with_data(x, y)


@pytest.fixture(scope="module")
def tiny_meta(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8+8 jumbo/benign MLP shadows on one half of digits; 4+4 test models on the other."""
    with executor.torch_threads(1):  # tiny models: threads only add contention
        return _tiny_meta(digits, tmp_path_factory)


def _tiny_meta(digits: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("mntd-shadows")
    half = len(digits) // 2
    share, attacker = digits.subset(slice(0, half)), digits.subset(slice(half, None))
    settings_ = TrainSettings(num_shadows=8, num_val=2, archs=("mlp",), shadow_epochs=15,
                              shadow_lr=3e-3, meta_epochs=30, variants=("qt", "one_class"),
                              response="softmax", shadow_poisoning="replace",
                              data_members=2, stamp_members=2, stamp_count=4, stamp_epochs=10)
    train_shadow_set(shadows.ShadowData(share, 10), folder, settings_, seed=0,
                     backend="sequential")
    bundle = fit_bundle(folder, settings_, name="tiny", data=share, seed=0, device="cpu")
    cfg = TrainConfig(epochs=15, batch_size=64, lr=3e-3)
    models, labels = [], []
    for i in range(8):
        backdoored = i % 2 == 1
        data = _tiny_backdoor(attacker, (3 * i) % 10, i % 4, i) if backdoored else attacker
        models.append(train_model("mlp", data, config=cfg, seed=100 + i, device="cpu"))
        labels.append(int(backdoored))
    return {"bundle": bundle, "models": models, "labels": labels, "folder": folder}


def test_tiny_meta_classifier_separates_clean_and_backdoored_models(tiny_meta: dict) -> None:
    """The one-class variant (benign shadows only, softmax responses) ranks 4 BadNets-like
    models above 4 clean ones trained on *other* data (chance: 0.5; measured 0.81–1.0 over
    seeds; with raw logits it was at chance at this size). The
    query-tuned binary variant learns the jumbo shadows (held-out shadows separate) but
    at this size (6 shadows per kind) does not transfer to models trained on other data
    (measured 0.06–0.63), so only its held-out-shadow AUROC is asserted."""
    bundle: MetaBundle = tiny_meta["bundle"]
    meta, _ = bundle.variant("one_class")
    scores = raw_scores(meta, tiny_meta["models"])
    assert calibration.auroc(tiny_meta["labels"], scores) >= 0.75
    assert bundle.calibration["qt"]["val_auroc"] >= 0.75


def test_tiny_stamp_ensemble_separates_clean_and_backdoored_models(tiny_meta: dict,
                                                                   digits: ImageDataset,
                                                                   ) -> None:
    """The stamp members (4 stamps, 6 training shadows per kind) rank the 4 BadNets-like
    models above the 4 clean ones trained on other data; single members measured
    0.56–1.0 over fixture seeds 0–2 (qt_data's members 0.06–0.56 on the same models),
    the two-member ensemble through the detector is asserted."""
    bundle: MetaBundle = tiny_meta["bundle"]
    sidecar = _with_recipe(bundle, tiny_meta["folder"].parent / "stamp-bundle", stamp=1)
    det = MNTD(meta_classifier=str(sidecar))
    scores = [det.fit(m, digits).evidence["raw_score"] for m in tiny_meta["models"]]
    assert calibration.auroc(tiny_meta["labels"], scores) >= 0.75


def test_one_class_variant_stays_finite(tiny_meta: dict) -> None:
    meta, cal = tiny_meta["bundle"].variant("one_class")
    assert np.all(np.isfinite(raw_scores(meta, tiny_meta["models"])))
    assert np.isfinite(float(meta.r)) and len(cal["benign_raw"]) == 2


def test_bundle_round_trip_and_tamper_check(tiny_meta: dict, tmp_path: Path) -> None:
    weights, sidecar = save_bundle(tmp_path / "m", tiny_meta["bundle"])
    back = load_bundle(sidecar)
    assert back.input_shape == (1, 8, 8) and back.num_classes == 10
    m0 = tiny_meta["models"][0]
    for v in ("qt", "one_class"):
        a = raw_scores(tiny_meta["bundle"].variants[v], [m0])
        b = raw_scores(back.variants[v], [m0])
        assert np.allclose(a, b, atol=1e-5)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match="SHA-256"):
        load_bundle(sidecar)


def test_detector_with_user_bundle_is_deterministic_and_borrows(tiny_meta: dict,
                                                                tmp_path: Path,
                                                                digits: ImageDataset) -> None:
    _, sidecar = save_bundle(tmp_path / "m", tiny_meta["bundle"])
    model = tiny_meta["models"][1]
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    det = create("mntd", meta_classifier=str(sidecar))
    r1, r2 = det.fit(model, digits), det.fit(model, digits)
    assert r1.score == r2.score and r1.verdict == r2.verdict
    assert 0 <= r1.score <= 1 and 0 < r1.p_value <= 1 and r1.suspected_targets == ()
    assert r1.to_dict()["meta_classifier"] == "tiny"
    assert model.training and count_hooks(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())
    # auto: the recipe 'mntd train' wrote for what it trained
    assert r1.evidence["variant"] == "auto"
    assert r1.evidence["recipe"] == {"parts": {"stamp": 1.0, "qt_data": 1.0, "one_class": 1.0},
                                     "calibration": "shadows", "fpr": 0.05}
    assert len(r1.evidence["component_raw_scores"]) == 5
    assert r1.images["mntd_queries"].shape == (8, 4 * 9)  # the first part's: 4 stamps
    with pytest.raises(ParameterError, match=r"variant.*no_qt"):  # not in this bundle
        MNTD(meta_classifier=str(sidecar), variant="no_qt").fit(model, digits)
    with pytest.raises(ParameterError, match="variant"):
        MNTD(meta_classifier=str(sidecar), variant="ensemble").fit(model, digits)
    # a recipe of two parts: qt + one_class standardised against the same benign shadows
    both = _with_recipe(tiny_meta["bundle"], tmp_path / "both", qt=1, one_class=1)
    c1 = MNTD(meta_classifier=str(both)).fit(model, digits)
    c2 = MNTD(meta_classifier=str(both)).fit(model, digits)
    assert c1.score == c2.score and 0 <= c1.score <= 1 and 0 < c1.p_value <= 1
    parts = c1.evidence["component_raw_scores"]
    assert set(parts) == {"qt", "one_class"}
    cal = tiny_meta["bundle"].calibration
    want, _ = calibration.combine_standardised(
        [parts["qt"], parts["one_class"]],
        [cal["qt"]["benign_raw"], cal["one_class"]["benign_raw"]])
    assert c1.evidence["raw_score"] == pytest.approx(want)
    single = MNTD(meta_classifier=str(sidecar), variant="qt").fit(model, digits)
    assert parts["qt"] == pytest.approx(single.evidence["raw_score"])
    assert single.evidence["recipe"]["parts"] == {"qt": 1.0}
    assert single.score == pytest.approx(calibration.sigmoid(parts["qt"]))  # the paper's
    model.eval()


# -- qt_data: queries started from the defender's images ------------------------------------

@given(seed=st.integers(0, 2**31 - 1), q=st.integers(1, 25))
@settings(max_examples=40, deadline=None)
def test_stratified_query_pick_takes_the_classes_in_turn(seed: int, q: int) -> None:
    labels = torch.tensor([0] * 2 + [1] * 5 + [2] * 9 + [3] * 9)  # 25 images, 4 classes
    idx = _pick_queries(q, 25, labels, torch.Generator().manual_seed(seed))
    assert len(set(idx.tolist())) == q  # distinct
    counts = torch.bincount(labels[idx], minlength=4).tolist()
    cap = [2, 5, 9, 9]
    # round robin: a class lags another by two or more only once it has run out of images
    for a in range(4):
        for b in range(4):
            assert counts[a] >= counts[b] - 1 or counts[a] == cap[a]
    assert torch.equal(idx, _pick_queries(q, 25, labels, torch.Generator().manual_seed(seed)))


def test_data_started_queries_stay_in_their_ball(digits: ImageDataset) -> None:
    meta = MetaClassifier((1, 8, 8), 10, num_queries=10)
    images, labels = digits.x[:200], digits.labels()[:200]
    init_queries(meta, 0.5, 0.25, torch.Generator().manual_seed(0), True, images, labels)
    start = meta.queries.detach().clone()
    # every query is one of the images, one per class
    match = [(images == q).flatten(1).all(1).nonzero().flatten() for q in start]
    assert all(m.numel() >= 1 for m in match)
    assert sorted(int(labels[m[0]]) for m in match) == list(range(10))
    models = [archs.build("mlp", (1, 8, 8), 10) for _ in range(4)]
    cfg = MetaConfig(epochs=3, query_init="data", query_range="unit", query_eps=0.05,
                     num_queries=10)
    fit = fit_meta(models, [0, 1, 0, 1], config=cfg, input_shape=(1, 8, 8), num_classes=10,
                   seed=0, device="cpu", query_images=images, query_labels=labels)
    q = fit.meta.queries.detach()
    moved = q - start
    assert float(moved.abs().max()) <= 0.05 + 1e-6 and float(moved.abs().max()) > 0
    assert float(q.min()) >= 0 and float(q.max()) <= 1
    with pytest.raises(ParameterError, match="query_images"):
        fit_meta(models, [0, 1, 0, 1], config=cfg, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ParameterError, match="query_eps"):
        MetaConfig(query_eps=0.0).validate()


def test_qt_data_ensemble_round_trips_and_scores_as_summed_z(tiny_meta: dict, tmp_path: Path,
                                                             digits: ImageDataset) -> None:
    bundle: MetaBundle = tiny_meta["bundle"]
    assert bundle.ensembles["qt_data"] == ("qt_data.0", "qt_data.1")
    cal = bundle.calibration
    assert cal["qt_data.0"]["kind"] == "qt" and cal["qt_data.0"]["query_init"] == "data"
    # the two members have different queries (different seeds), both near real images
    q0, q1 = (bundle.variants[m].queries for m in ("qt_data.0", "qt_data.1"))
    assert not torch.equal(q0, q1) and float(q0.min()) >= 0 and float(q0.max()) <= 1
    _, sidecar = save_bundle(tmp_path / "m", bundle)
    doc = json.loads(sidecar.read_text())
    assert doc["format_version"] == 3 and doc["ensembles"]["qt_data"] == ["qt_data.0",
                                                                          "qt_data.1"]
    assert doc["recipe"]["parts"] == {"stamp": 1.0, "qt_data": 1.0, "one_class": 1.0}
    back = load_bundle(sidecar)
    assert back.ensembles == bundle.ensembles
    # re-saving a loaded bundle under a new name keeps the new name and structure
    _, again = save_bundle(tmp_path / "again", dataclasses.replace(back, name="renamed"))
    assert load_bundle(again).name == "renamed"
    assert load_bundle(again).ensembles == bundle.ensembles
    model = tiny_meta["models"][1]
    members = _with_recipe(back, tmp_path / "members", qt_data=1)
    r1 = MNTD(meta_classifier=str(members)).fit(model, digits)
    r2 = MNTD(meta_classifier=str(members)).fit(model, digits)
    assert r1.score == r2.score and r1.verdict == r2.verdict and 0 <= r1.score <= 1
    plain = MNTD(meta_classifier="digits").fit(model, digits)  # the paper's qt
    assert plain.evidence["recipe"]["parts"] == {"qt": 1.0}
    parts = r1.evidence["component_raw_scores"]
    assert set(parts) == {"qt_data.0", "qt_data.1"}
    want, _ = calibration.combine_standardised(  # an ensemble's members share its weight
        [parts[m] for m in ("qt_data.0", "qt_data.1")],
        [cal[m]["benign_raw"] for m in ("qt_data.0", "qt_data.1")], (0.5, 0.5))
    assert r1.evidence["raw_score"] == pytest.approx(want)
    assert parts["qt_data.0"] == pytest.approx(float(raw_scores(back.variants["qt_data.0"],
                                                                [model])[0]), abs=1e-5)
    # a recipe naming what the bundle does not hold is refused on load
    doc["recipe"]["parts"] = {"qt_data": 1.0, "search": 2.0}
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"does not hold"):
        load_bundle(sidecar)
    for bad_recipe, why in (({"parts": {"qt": -1}}, "weigh"), ({"parts": {}}, "at least one"),
                            ({"parts": {"qt": 1}, "calibration": "x"}, "calibration"),
                            ({"parts": {"qt": 1}, "fpr": 2}, "fpr"), ([1], "parts")):
        doc["recipe"] = bad_recipe
        sidecar.write_text(json.dumps(doc))
        with pytest.raises(ModelError, match=why):
            load_bundle(sidecar)
    del doc["recipe"]
    for bad, why in ((["qt_data.0", "qt_data.7"], r"missing entries \['qt_data.7'\]"),
                     (["qt_data.0", "qt_data.0"], "twice"), ("qt_data.0", "must list"),
                     ([], "must list")):
        doc["ensembles"]["qt_data"] = bad
        sidecar.write_text(json.dumps(doc))
        with pytest.raises(ModelError, match=why):
            load_bundle(sidecar)
    with pytest.raises(ValueError, match="missing entries"):
        save_bundle(tmp_path / "bad", dataclasses.replace(back, ensembles={"x": ("nope",)}))
    # too few defender images for the members' queries: refused before any training
    few = TrainSettings(num_shadows=2, num_val=1, data_members=1)
    with pytest.raises(DataError, match="--share"):
        check_member_data(few, digits.subset(slice(0, 5)))
    check_member_data(dataclasses.replace(few, data_members=0), digits.subset(slice(0, 5)))


# -- stamp: learned stamps on the defender's images (trojanscan.mntd.stamps) ---------------

def test_stamp_ensemble_round_trips_and_scores_as_summed_z(tiny_meta: dict, tmp_path: Path,
                                                           digits: ImageDataset) -> None:
    bundle: MetaBundle = tiny_meta["bundle"]
    assert bundle.ensembles["stamp"] == ("stamp.0", "stamp.1")
    cal = bundle.calibration
    assert cal["stamp.0"]["kind"] == "stamp" and cal["stamp.0"]["num_anchors"] == 20
    s0, s1 = (bundle.variants[m] for m in ("stamp.0", "stamp.1"))
    assert not torch.equal(s0.mask_logits, s1.mask_logits)  # seeds apart
    _, sidecar = save_bundle(tmp_path / "m", bundle)
    doc = json.loads(sidecar.read_text())
    assert doc["variants"]["stamp.1"]["num_stamps"] == 4
    back = load_bundle(sidecar)
    assert back.ensembles == bundle.ensembles
    model = tiny_meta["models"][1]
    for m in ("stamp.0", "stamp.1"):
        assert np.allclose(raw_scores(bundle.variants[m], [model]),
                           raw_scores(back.variants[m], [model]), atol=1e-6)
    stamp_only = _with_recipe(back, tmp_path / "stamp", stamp=1)
    r1 = MNTD(meta_classifier=str(stamp_only)).fit(model, digits)
    r2 = MNTD(meta_classifier=str(stamp_only)).fit(model, digits)
    assert r1.score == r2.score and r1.verdict == r2.verdict and 0 <= r1.score <= 1
    parts = r1.evidence["component_raw_scores"]
    want, _ = calibration.combine_standardised(
        [parts[m] for m in ("stamp.0", "stamp.1")],
        [cal[m]["benign_raw"] for m in ("stamp.0", "stamp.1")])
    assert r1.evidence["raw_score"] == pytest.approx(want / 2)  # the members weigh 1/2
    assert r1.images["mntd_queries"].shape == (8, 4 * 9)  # the 4 stamps on an anchor
    # the stamp ensemble's mean z-score plus the paper's qt's z-score

    def z(name: str, raw: float) -> float:
        b = np.asarray(cal[name]["benign_raw"])
        return float((raw - b.mean()) / b.std())

    mix = MNTD(meta_classifier=str(_with_recipe(back, tmp_path / "sq", stamp=1, qt=1))
               ).fit(model, digits)
    got = mix.evidence["component_raw_scores"]
    assert set(got) == {"stamp.0", "stamp.1", "qt"}
    assert mix.evidence["raw_score"] == pytest.approx(r1.evidence["raw_score"]
                                                      + z("qt", got["qt"]))
    assert 0 < mix.p_value <= 1
    # the default this bundle was trained with: each named part weighs 1
    three = MNTD(meta_classifier=str(sidecar)).fit(model, digits)
    got = three.evidence["component_raw_scores"]
    assert set(got) == {"stamp.0", "stamp.1", "qt_data.0", "qt_data.1", "one_class"}
    want3 = (sum(z(m, got[m]) for m in ("stamp.0", "stamp.1")) / 2
             + sum(z(m, got[m]) for m in ("qt_data.0", "qt_data.1")) / 2
             + z("one_class", got["one_class"]))
    assert three.evidence["raw_score"] == pytest.approx(want3)
    # an entry whose kind does not match its tensors is refused, not misread
    doc["variants"]["stamp.0"]["kind"] = "qt"
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="not a valid MNTD meta-classifier"):
        load_bundle(sidecar)


# -- recipes: what the default reads ----------------------------------------------------------

def test_recipes_expand_ensembles_and_read_their_json() -> None:
    r = Recipe.from_dict({"parts": {"stamp": 1, "one_class": 1, "search": 2},
                          "calibration": "reference"})
    names, weights = r.entries({"stamp": ("stamp.0", "stamp.1")})
    assert names == ("stamp.0", "stamp.1", "one_class", "search")
    assert weights == (0.5, 0.5, 1.0, 2.0) and r.fpr == 0.05
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.summed({}) and not Recipe((("qt", 1.0),)).summed({})
    assert Recipe((("qt_data", 1.0),)).summed({"qt_data": ("qt_data.0",)})
    assert Recipe((("qt", 2.0),)).summed({})
    with pytest.raises(ValueError, match="unknown recipe keys"):
        Recipe.from_dict({"parts": {"qt": 1}, "mixes": 1})


def test_trained_recipe_sums_what_was_trained_beyond_the_paper() -> None:
    full = trained_recipe({"qt", "no_qt", "one_class", "stamp", "search", "search_flow"},
                          ("qt", "no_qt", "one_class"))
    shipped = load_bundle(builtin_path("fashion-mnist")).recipe
    assert full.parts == shipped.parts and full.calibration == "shadows"
    assert dict(trained_recipe({"qt", "one_class", "qt_data", "stamp"},
                               ("qt", "one_class")).parts) == {
        "stamp": 1.0, "qt_data": 1.0, "one_class": 1.0}
    assert dict(trained_recipe({"qt", "one_class"}, ("qt", "one_class")).parts) == {"qt": 1}
    assert dict(trained_recipe({"no_qt"}, ("no_qt",)).parts) == {"no_qt": 1.0}


def test_bundles_without_a_recipe_score_what_the_default_used_to(tiny_meta: dict) -> None:
    """A bundle written before recipes: the first of the former default's choices whose
    parts it holds; an ensemble alone summed its members at weight 1 each."""
    bundle: MetaBundle = tiny_meta["bundle"]

    def legacy(b: MetaBundle, names: set[str]) -> dict[str, float]:
        kept = dataclasses.replace(
            b, variants={k: v for k, v in b.variants.items() if k not in names},
            calibration={k: v for k, v in b.calibration.items() if k not in names},
            ensembles={k: m for k, m in b.ensembles.items() if not set(m) & names},
            recipe=None)
        assert kept.recipe.calibration == "shadows"
        return dict(kept.recipe.parts)

    assert legacy(bundle, set()) == {"stamp": 1, "qt_data": 1, "one_class": 1}
    assert legacy(bundle, {"one_class"}) == {"stamp": 1, "qt_data": 1}
    assert legacy(bundle, {"one_class", "stamp.0"}) == {"qt_data": 2}
    assert legacy(bundle, {"qt_data.0"}) == {"stamp": 1, "one_class": 1}
    assert legacy(bundle, {"stamp.0", "qt_data.0"}) == {"qt": 1}
    every = {"stamp", "one_class", "search", "search_flow", "qt"}
    assert dict(legacy_recipe({"stamp": 3}, every - {"stamp"}, every, 0.05).parts) == {
        "stamp": 1, "one_class": 1, "search": 2, "search_flow": 2}
    assert dict(legacy_recipe({"stamp": 3}, every - {"stamp", "search_flow"}, every,
                              0.05).parts) == {"stamp": 1, "one_class": 1, "search": 2}
    # calibrated on the reference models only when every part has them
    assert legacy_recipe({}, {"qt"}, {"qt"}, 0.05).calibration == "reference"
    assert legacy_recipe({}, {"qt", "search"}, set(), 0.05).calibration == "shadows"


def test_an_old_format_bundle_file_is_translated_on_load(tmp_path: Path, tiny) -> None:
    """The digits bundle as shipped in format 1 (no recipe, no ensembles): its default is
    the paper's qt, and it scores exactly as the shipped format-3 file of the same
    weights."""
    old = tmp_path / "mntd_digits.json"
    old.write_text((FIXTURES / "mntd_digits_v1.json").read_text())
    (tmp_path / "mntd_digits.safetensors").write_bytes(
        builtin_path("digits").with_suffix(".safetensors").read_bytes())
    doc = json.loads(old.read_text())
    assert doc["format_version"] == 1 and "recipe" not in doc
    back = load_bundle(old)
    assert back.recipe == Recipe((("qt", 1.0),), "shadows", 0.05)
    for variant in ("auto", "one_class"):
        a = MNTD(meta_classifier=str(old), variant=variant).fit(tiny.backdoored, tiny.test)
        b = MNTD(variant=variant).fit(tiny.backdoored, tiny.test)
        assert (a.score, a.verdict, a.evidence["raw_score"]) == (
            b.score, b.verdict, b.evidence["raw_score"])
    _, again = save_bundle(tmp_path / "v3", back)  # re-saved: the current format
    assert json.loads(again.read_text())["recipe"]["parts"] == {"qt": 1.0}


# -- shape checks ------------------------------------------------------------------------

def test_explicit_meta_classifier_of_another_shape_is_a_clear_error(digits: ImageDataset,
                                                                    ) -> None:
    model = archs.build("mlp", (1, 8, 8), 10)
    with pytest.raises(IncompatibleError, match=r"1×28×28 → 10.*1×8×8 → 10"):
        MNTD(meta_classifier="fashion-mnist").fit(model, digits)


def test_no_meta_classifier_for_the_shape_is_not_applicable() -> None:
    ds = ImageDataset(torch.rand(4, 3, 8, 8), torch.arange(4))
    model = archs.build("mlp", (3, 8, 8), 10)
    with pytest.raises(DetectorNotApplicable, match=r"3×8×8 → 10.*mntd train"):
        MNTD().fit(model, ds)
    five = archs.build("mlp", (1, 8, 8), 5)
    d = load_dataset("digits:test")
    with pytest.raises(DetectorNotApplicable, match=r"1×8×8 → 5"):
        MNTD().fit(five, ImageDataset(d.x, d.labels() % 5))


def test_bad_settings_name_the_parameter(digits: ImageDataset, tmp_path: Path) -> None:
    model = archs.build("mlp", (1, 8, 8), 10)
    with pytest.raises(ParameterError, match=r"variant.*'qt'.*'bogus'"):
        MNTD(variant="bogus").fit(model, digits)
    with pytest.raises(ParameterError, match=r"meta_classifier.*nope"):
        MNTD(meta_classifier=str(tmp_path / "nope.json")).fit(model, digits)
    with pytest.raises(ParameterError, match="response"):
        MetaConfig(response="probits").validate()  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="labels"):
        fit_meta([model], [1], config=MetaConfig(epochs=1), input_shape=(1, 8, 8),
                 num_classes=10)


# -- shipped meta-classifiers ---------------------------------------------------------------

def test_shipped_bundles_load_are_small_and_documented() -> None:
    found = available_builtins()
    assert set(found) == set(BUILTINS)
    assert found["fashion-mnist"].input_shape == (1, 28, 28)
    assert found["digits"].input_shape == (1, 8, 8)
    for name, bundle in found.items():
        path = builtin_path(name)
        assert json.loads(path.read_text())["format_version"] == 3
        assert path.with_suffix(".safetensors").stat().st_size < 400_000
        info = bundle.info
        assert info["produced_by"]["script"] == "scripts/make_mntd_pretrained.py"
        assert info["training"]["settings"]["num_shadows"] <= 256
        for cal in bundle.calibration.values():
            assert len(cal["benign_raw"]) == info["training"]["settings"]["num_val"]
    # Fashion-MNIST: only what its recipe reads; digits: the paper's three
    fm = found["fashion-mnist"]
    assert set(fm.variants) == set(fm.recipe.entries(fm.ensembles)[0])
    assert fm.ensembles == {"stamp": ("stamp.0", "stamp.1", "stamp.2")}
    assert fm.info["training"]["stamp_shadows"]["family"] == "wide"
    assert set(found["digits"].variants) == {"qt", "no_qt", "one_class"}
    assert not list(DATA_DIR.glob("mntd_*.pt")) and not list(DATA_DIR.glob("mntd_*.pkl"))


def test_shipped_fashion_mnist_bundle_has_no_paper_qt_and_says_so() -> None:
    model = archs.build("mlp", (1, 28, 28), 10)
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    with pytest.raises(ParameterError, match=r"variant.*one_class.*'qt'"):
        MNTD(variant="qt").fit(model, shape_only)


@pytest.mark.parametrize("variant", ["auto", "qt", "no_qt", "one_class"])
def test_shipped_digits_meta_classifier_scores_the_tiny_fixtures(tiny, variant: str) -> None:
    det = MNTD(variant=variant)
    bad, good = det.fit(tiny.backdoored, tiny.test), det.fit(tiny.clean, tiny.test)
    for r in (bad, good):
        assert r.evidence["meta_classifier"] == "digits"
        assert 0 <= r.score <= 1 and 0 < r.p_value <= 1
        assert np.isfinite(r.evidence["raw_score"])
    assert count_hooks(tiny.backdoored) == 0


# -- command line --------------------------------------------------------------------------

def test_cli_train_writes_a_usable_bundle_and_resumes(tmp_path: Path, digits: ImageDataset,
                                                      capsys: pytest.CaptureFixture) -> None:
    from trojanscan.cli import main

    args = ["mntd", "train", "--data", "digits:train", "--share", "0.1", "--out",
            str(tmp_path), "--num-shadows", "2", "--num-val", "1", "--archs", "mlp",
            "--shadow-epochs", "1", "--meta-epochs", "1", "--data-members", "1",
            "--stamp-members", "1", "--reference-models", "2", "--no-search-probe", "--no-ray",
            "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    sidecar = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert sidecar == tmp_path / "mntd_1x8x8_10.json"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")
              if p.parent != tmp_path}
    assert len(stamps) == 8  # shadows, the stamp member's own (wide) jumbo ones, references
    assert len(list((tmp_path / "references").glob("*.safetensors"))) == 2
    r = MNTD(meta_classifier=str(sidecar)).fit(archs.build("mlp", (1, 8, 8), 10), digits)
    assert r.detector == "mntd" and r.evidence["recipe"]["parts"] == {
        "stamp": 1.0, "qt_data": 1.0, "one_class": 1.0}
    assert r.evidence["recipe"]["calibration"] == "reference"
    assert r.evidence["calibration"]["source"] == "reference_models"
    assert r.evidence["calibration"]["reference_models"] == 2
    bundle = load_bundle(sidecar)
    assert bundle.ensembles == {"qt_data": ("qt_data.0",), "stamp": ("stamp.0",)}
    assert bundle.info["reference"]["count"] == 2
    # the references train outside the shadows' share: no image of theirs in it
    full = load_dataset("digits:train")
    share = defender_share(full, 0.1, seed=0)
    assert bundle.info["reference"]["data"]["outside_share"] == 0.1
    assert bundle.info["reference"]["data"]["samples"] == len(full) - len(share)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(SystemExit) as exc:
        main([*args[:-2], "--variants", "qt,bogus", "--quiet"])
    assert exc.value.code == 2
    assert "variants" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the option reaches the shadows' specs
        main([*args, "--jumbo-family", "wide"])
    assert exc.value.code == 2
    assert "family='wide'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # one reference model is no distribution
        main([*args, "--reference-models", "1"])
    assert exc.value.code == 2
    assert "--reference-models" in capsys.readouterr().err
    # 0: calibrated on the held-out shadows, no references trained
    with pytest.raises(SystemExit) as exc:
        main([*args, "--reference-models", "0", "--name", "shadow_null"])
    assert exc.value.code == 0
    assert "reference" not in load_bundle(tmp_path / "shadow_null.json").info


def test_cli_train_adds_the_search_probe_read_against_the_references(
        tmp_path: Path, digits: ImageDataset, capsys: pytest.CaptureFixture) -> None:
    from trojanscan.cli import main

    args = ["mntd", "train", "--data", "digits:train", "--share", "0.1", "--out",
            str(tmp_path), "--num-shadows", "4", "--num-val", "1", "--archs", "mlp",
            "--shadow-epochs", "1", "--meta-epochs", "1", "--data-members", "0",
            "--stamp-members", "0", "--reference-models", "3", "--no-ray", "--quiet"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    sidecar = Path(capsys.readouterr().out.strip().splitlines()[-1])
    bundle = load_bundle(sidecar)
    cal = bundle.calibration["search"]
    assert cal["normalised_on"] == "reference_models" and cal["normalised_count"] == 3
    assert len(cal["reference_raw"]) == 3 and len(cal["benign_raw"]) == 1
    assert dict(bundle.recipe.parts) == {"one_class": 1.0, "search": 2.0, "search_flow": 2.0}
    model = archs.build("mlp", (1, 8, 8), 10)
    r = MNTD(meta_classifier=str(sidecar)).fit(model, digits)
    assert r.evidence["calibration"]["source"] == "reference_models"
    # slim: only what the recipe reads, scoring the same
    with pytest.raises(SystemExit) as exc:
        main(["mntd", "slim", str(sidecar), "--out", str(tmp_path / "slim")])
    assert exc.value.code == 0
    slim = load_bundle(tmp_path / "slim.json")
    assert set(slim.variants) == {"one_class", "search", "search_flow"}
    assert "benign_costs" not in slim.calibration["search"]
    r2 = MNTD(meta_classifier=str(tmp_path / "slim.json")).fit(model, digits)
    assert (r2.score, r2.evidence["raw_score"]) == (r.score, r.evidence["raw_score"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # never over its own input
        main(["mntd", "slim", str(sidecar), "--out", str(sidecar.with_suffix(""))])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # too few benign shadows to read against
        main([*args[:9], "3", *args[10:], "--name", "few"])
    assert exc.value.code == 2
    assert "--no-search-probe" in capsys.readouterr().err
    two = [a if a != "3" else "2" for a in args]  # two reference models: no distribution
    with pytest.raises(SystemExit) as exc:
        main([*two, "--name", "two_refs"])
    assert exc.value.code == 2
    assert "at least 3 with the search probe" in capsys.readouterr().err
    assert not (tmp_path / "two_refs.json").exists()

    # add-references: clean models join the null, read exactly as a suspect is read
    extra = archs.build("mlp", (1, 8, 8), 10).eval()
    torch.manual_seed(3)
    with torch.no_grad():  # a different clean-looking model than the one scanned
        for prm in extra.parameters():
            prm.mul_(2.0)
    ts = tmp_path / "extra.pt"
    torch.jit.trace(extra, torch.zeros(1, 1, 8, 8)).save(str(ts))
    before = {n: list(c["reference_raw"]) for n, c in bundle.calibration.items()}
    with pytest.raises(SystemExit) as exc:
        main(["mntd", "add-references", str(sidecar), str(ts), "--out",
              str(tmp_path / "added"), "--label", "test models"])
    assert exc.value.code == 0
    added = load_bundle(tmp_path / "added.json")
    seen = MNTD(meta_classifier=str(sidecar)).fit(torch.jit.load(str(ts)), digits)
    for name, cal in added.calibration.items():
        assert cal["reference_raw"][:3] == before[name]  # the recipe's own ones untouched
        assert len(cal["reference_raw"]) == 4
    # the added output is the detector's reading of that model (the recipe's sum)
    r3 = MNTD(meta_classifier=str(tmp_path / "added.json")).fit(torch.jit.load(str(ts)),
                                                                 digits)
    assert r3.evidence["raw_score"] == pytest.approx(seen.evidence["raw_score"], abs=1e-4)
    assert r3.evidence["calibration"]["reference_models"] == 4
    assert r3.evidence["calibration"]["reference_added"] == [{"label": "test models", "count": 1}]
    assert r3.p_value >= seen.p_value  # a null that holds the model itself
    info = added.info["reference"]
    assert info["total"] == 4 and info["added"][0]["count"] == 1
    assert info["added"][0]["label"] == "test models" and len(info["added"][0]["sha256"]) == 1
    assert {n: c["reference_raw"] for n, c in load_bundle(sidecar).calibration.items()
            } == before  # the input bundle is not modified
    capsys.readouterr()
    for bad in (["--out", str(sidecar)],  # never over its input bundle
                ["--out", str(tmp_path / "x"), "--seed", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(["mntd", "add-references", str(sidecar), str(ts), *bad])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    wrong = tmp_path / "wrong.pt"  # a model of another shape: one clear line
    torch.jit.trace(archs.build("mlp", (1, 28, 28), 10).eval(),
                    torch.zeros(1, 1, 28, 28)).save(str(wrong))
    with pytest.raises(SystemExit) as exc:
        main(["mntd", "add-references", str(sidecar), str(wrong), "--out",
              str(tmp_path / "y")])
    assert exc.value.code == 2 and not (tmp_path / "y.json").exists()
    err = capsys.readouterr().err.strip()
    assert "wrong.pt" in err and "1×8×8" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 and len(err) < 300, err


def test_cli_module_imports_only_typer_and_pathlib_at_top_level() -> None:
    import ast

    import trojanscan.commands.mntd_cli as m

    tree = ast.parse(Path(m.__file__).read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "pathlib", "typing", "typer"}
    names = [c.callback.__name__ for c in m.app.registered_commands if c.callback]
    assert {"train", "slim", "add_references"} <= set(names)


# -- reference calibration: clean models trained outside the share (beyond the paper) -------

def test_reference_plan_is_seeded_pure_and_inside_its_ranges() -> None:
    from trojanscan.mntd import reference as ref

    plan = ref.plan_references(12, ("mlp", "lenet"), pool_size=50_000, seed=3)
    assert plan[:5] == ref.plan_references(5, ("mlp", "lenet"), pool_size=50_000, seed=3)
    assert plan != ref.plan_references(12, ("mlp", "lenet"), pool_size=50_000, seed=4)
    assert [s.arch for s in plan[:4]] == ["mlp", "lenet", "mlp", "lenet"]
    for s in plan:
        assert ref.SAMPLES[0] <= s.samples <= ref.SAMPLES[1]
        assert ref.EPOCHS[0] <= s.epochs <= ref.EPOCHS[1] and s.batch_size in ref.BATCH_SIZES
    assert len({s.samples for s in plan}) > 6  # recipes vary per model
    assert {s.samples for s in ref.plan_references(4, ("mlp",), pool_size=700)} == {700}
    with pytest.raises(ParameterError, match="reference_models"):
        ref.plan_references(0, ("mlp",), pool_size=100)


def test_reference_pool_leaves_out_the_share_and_refuses_too_little(digits: ImageDataset
                                                                     ) -> None:
    from trojanscan.mntd import reference as ref

    idx = torch.arange(0, len(digits), 3)
    pool = ref.outside_share(digits, idx)
    assert len(pool) == len(digits) - len(idx)
    with pytest.raises(DataError, match="outside the defender's share"):
        ref.outside_share(digits, torch.arange(len(digits) - 50))


def test_reference_calibration_moves_threshold_and_p_not_the_raw_score(
        tiny_meta: dict, digits: ImageDataset, tmp_path: Path) -> None:
    from trojanscan.mntd import reference as ref

    bundle: MetaBundle = tiny_meta["bundle"]
    pool = digits.subset(slice(len(digits) // 2, None))  # the half the shadows never saw
    folder = tmp_path / "refs"
    with executor.torch_threads(1):
        calibrated, run = ref.calibrate(bundle, pool, folder, num=3, archs=("mlp",),
                                        backend="sequential")
        assert len(run.ran) == 3
        again, rerun = ref.calibrate(bundle, pool, folder, num=3, archs=("mlp",),
                                     backend="sequential")
    assert len(rerun.ran) == 0 and len(rerun.skipped) == 3  # resumable: files are reused
    assert again.calibration == calibrated.calibration
    assert calibrated.info["reference"]["count"] == 3
    assert all(len(c["reference_raw"]) == 3 for c in calibrated.calibration.values())
    assert calibrated.recipe.calibration == "reference"
    sidecars = {"qt": save_bundle(tmp_path / "cal", calibrated)[1],
                "qt_data": _with_recipe(calibrated, tmp_path / "members", "reference",
                                        qt_data=2)}
    model = tiny_meta["models"][1]
    for variant in ("qt", "qt_data"):
        sidecar, name = sidecars[variant], ("qt" if variant == "qt" else "auto")
        shadow = MNTD(meta_classifier=str(sidecar), variant=name,
                      calibration="shadows").fit(model, digits)
        refd = MNTD(meta_classifier=str(sidecar), variant=name).fit(model, digits)
        assert refd.evidence["raw_score"] == shadow.evidence["raw_score"]
        assert shadow.evidence["calibration"]["source"] == "benign_shadows"
        assert refd.evidence["calibration"]["source"] == "reference_models"
        assert refd.evidence["calibration"]["reference_models"] == 3
        assert not refd.warnings  # the reference null needs no caveat
        assert bool(shadow.warnings) == (shadow.verdict == "backdoored")
        cal = calibrated.calibration
        parts = calibrated.members("qt_data") if variant == "qt_data" else ("qt",)
        null = (calibration.standardised_sums([cal[v]["reference_raw"] for v in parts],
                                              [cal[v]["benign_raw"] for v in parts])
                if variant == "qt_data" else np.asarray(cal["qt"]["reference_raw"]))
        raw = refd.evidence["raw_score"]
        assert refd.p_value == pytest.approx(calibration.p_value(raw, null))
        assert refd.score == pytest.approx(calibration.ecdf_score(raw, null))
        assert refd.evidence["threshold"] == pytest.approx(
            calibration.threshold_at_fpr(null, 0.05))
    # a rerun asking for another recipe under the same keys is refused, not mixed in
    other = [dataclasses.replace(s, epochs=s.epochs + 1) for s in
             ref.plan_references(3, ("mlp",), pool_size=len(pool))]
    with pytest.raises(DataError, match="epochs"):
        ref.train_reference_set(ref.ReferenceData(pool, 10), folder, other,
                                backend="sequential")


def test_a_flag_on_the_shadow_null_says_so(tiny_meta: dict, digits: ImageDataset,
                                           tmp_path: Path) -> None:
    """Clean models trained on other data out-score the held-out shadows (on fresh
    Fashion-MNIST models the shadow threshold flagged 11-69% of the clean ones), so a
    backdoored verdict on that null carries a warning; a clean one, or one at the user's
    own threshold, does not."""
    bundle: MetaBundle = tiny_meta["bundle"]
    assert "reference" not in bundle.info
    _, sidecar = save_bundle(tmp_path / "m", bundle)
    flagged = 0
    for model in tiny_meta["models"]:
        for variant in ("qt", "auto"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = MNTD(meta_classifier=str(sidecar), variant=variant).fit(model, digits)
            assert r.evidence["calibration"]["source"] == "benign_shadows"
            said = [str(w.message) for w in caught
                    if issubclass(w.category, TrojanscanWarning)]
            if r.verdict == "backdoored":
                flagged += 1
                assert len(r.warnings) == 1 and "--reference-models" in r.warnings[0]
                assert said == list(r.warnings)
            else:
                assert not r.warnings and not said
            own = MNTD(meta_classifier=str(sidecar), variant=variant,
                       threshold=-1e9).fit(model, digits)
            assert own.verdict == "backdoored" and not own.warnings
    assert flagged >= 1


def test_reference_calibration_without_references_is_a_clear_error(
        tiny_meta: dict, digits: ImageDataset, tmp_path: Path) -> None:
    _, sidecar = save_bundle(tmp_path / "m", tiny_meta["bundle"])
    model = tiny_meta["models"][0]
    with pytest.raises(ModelError, match="reference models"):
        MNTD(meta_classifier=str(sidecar), calibration="reference").fit(model, digits)
    with pytest.raises(ParameterError, match="calibration"):
        MNTD(meta_classifier=str(sidecar), calibration="references").fit(model, digits)
    auto = MNTD(meta_classifier=str(sidecar)).fit(model, digits)
    assert auto.evidence["calibration"]["source"] == "benign_shadows"


def test_shipped_fashion_mnist_bundle_is_calibrated_on_reference_models() -> None:
    b = load_bundle(builtin_path("fashion-mnist"))
    assert b is not None and b.info["reference"]["count"] == 64  # of its own recipe
    added = b.info["reference"]["added"]  # and clean models trained elsewhere
    assert [a["count"] for a in added] == [36] and len(added[0]["sha256"]) == 36
    assert b.info["reference"]["total"] == 100
    assert all(len(c["reference_raw"]) == 100 for c in b.calibration.values())


def test_shipped_fashion_mnist_default_reads_stamps_one_class_and_search(
        tmp_path: Path) -> None:
    """The default scores with the three stamp members, the one-class meta-classifier and
    both readouts of the trigger search, against its 100 reference models. A bundle of
    an older format without the flow readout scores the search's cost alone, twice."""
    model = archs.build("lenet", (1, 28, 28), 10)
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    r = MNTD().fit(model, shape_only)
    assert r.evidence["variant"] == "auto"
    parts = r.evidence["component_raw_scores"]
    assert set(parts) == {"stamp.0", "stamp.1", "stamp.2", "one_class", "search",
                          "search_flow"}
    assert r.evidence["calibration"]["source"] == "reference_models"
    assert r.evidence["calibration"]["reference_models"] == 100
    assert [a["count"] for a in r.evidence["calibration"]["reference_added"]] == [36]
    assert 0 <= r.score <= 1 and 0 < r.p_value <= 1
    # below the conformal floor 1/101 only through the fitted tail, beyond every reference
    assert (r.p_value < 1 / 101) == (r.evidence["p_value_source"] != "empirical")
    # references="own": only the recipe's own 64, the same raw output read against them
    own = MNTD(references="own").fit(model, shape_only)
    assert own.evidence["calibration"]["reference_models"] == 64
    assert own.evidence["calibration"]["reference_added"] == []
    assert own.evidence["raw_score"] == r.evidence["raw_score"]
    assert own.evidence["threshold"] < r.evidence["threshold"]  # the added ones score higher
    with pytest.raises(ParameterError, match="references"):
        MNTD(references="some").fit(model, shape_only)
    shipped = load_bundle(builtin_path("fashion-mnist"))
    older = dataclasses.replace(shipped, variants={
        k: v for k, v in shipped.variants.items() if k != "search_flow"}, calibration={
        k: v for k, v in shipped.calibration.items() if k != "search_flow"}, recipe=None)
    assert dict(older.recipe.parts) == {"stamp": 1, "one_class": 1, "search": 2}
    _, sidecar = save_bundle(tmp_path / "older", older)
    r_old = MNTD(meta_classifier=str(sidecar)).fit(model, shape_only)
    assert r_old.evidence["component_raw_scores"]["search"] == pytest.approx(parts["search"])
    assert "search_flow" not in r_old.evidence["component_raw_scores"]
