"""Tests of the attack library: triggers, poisoning, spec parser and ASR metric.

Synthetic tensors and hand-made "models" only: every expected value is computed from
how the test data was built, not from the code under test.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trojanscan.attacks import (
    ATTACKS,
    SIG,
    AllToAll,
    Attack,
    BadNets,
    Blend,
    Multi,
    PoisonedData,
    SourceSpecific,
    WaNet,
    attack_success_rate,
    attack_success_rates,
    clean_accuracy,
    format_attack,
    parse_attack,
)
from trojanscan.attacks.badnets import LOCATIONS, PATCH_PATTERNS
from trojanscan.attacks.sig import sinusoid
from trojanscan.dataset import ImageDataset
from trojanscan.detectors.base import count_hooks
from trojanscan.exceptions import DataError, ParameterError, TrojanscanWarning

K = 5  # classes of the synthetic data


def make_ds(n: int = 200, c: int = 1, h: int = 12, w: int = 12, seed: int = 0) -> ImageDataset:
    """Mid-grey noise (values in [0.2, 0.8], so no pixel is white or clipped) and
    labels 0..K-1 in turn."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, c, h, w, generator=g)
    y = torch.arange(n) % K
    return ImageDataset(x, y)


def all_attacks() -> list[Attack]:
    """One instance of every registered attack (non-default targets where possible)."""
    return [
        BadNets(target=2),
        AllToAll(),
        Blend(target=3),
        SIG(target=1, frequency=5),
        WaNet(target=4, s=2.0, cross_ratio=1.0),
        SourceSpecific(source=(1, 3), target=0),
        Multi(attacks=(BadNets(target=1, location="top-left"),
                       BadNets(target=4, location="bottom-right"))),
    ]


ATTACK_IDS = [a.name for a in all_attacks()]


def test_every_registered_attack_is_exercised() -> None:
    assert {a.name for a in all_attacks()} == set(ATTACKS)


# ---------------------------------------------------------------------------
# contract checks, run for every attack
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_apply_is_pure_in_range_and_deterministic(attack: Attack) -> None:
    ds = make_ds(n=20)
    x = ds.x.clone()
    out = attack.apply(ds.x)
    assert torch.equal(ds.x, x), "apply mutated its input"
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.data_ptr() != x.data_ptr()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x), "the trigger changed nothing"
    assert torch.equal(attack.apply(ds.x), out)


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_apply_clamps_to_unit_range(attack: Attack) -> None:
    x = torch.rand(6, 1, 12, 12)
    x[:, :, ::2] = 1.0
    x[:, :, 1::4] = 0.0
    out = attack.apply(x)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_poison_contract(attack: Attack) -> None:
    ds = make_ds()
    x0, y0 = ds.x.clone(), ds.labels().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrojanscanWarning)
        pd = attack.poison(ds, 0.1, seed=3)
        again = attack.poison(ds, 0.1, seed=3)
    assert isinstance(pd, PoisonedData)
    assert torch.equal(ds.x, x0) and torch.equal(ds.labels(), y0), "poison mutated the input"
    assert pd.dataset.x.data_ptr() != ds.x.data_ptr()
    assert pd.poison_mask.dtype == bool and pd.poison_mask.shape == (len(ds),)
    assert pd.cover_mask.dtype == bool and pd.cover_mask.shape == (len(ds),)
    assert not (pd.poison_mask & pd.cover_mask).any()
    assert pd.num_poison > 0
    # untouched samples are exactly the originals
    clean = ~(pd.poison_mask | pd.cover_mask)
    assert torch.equal(pd.dataset.x[clean], x0[clean])
    assert torch.equal(pd.dataset.labels()[clean], y0[clean])
    # stamped samples changed; covers keep their labels
    marked = torch.from_numpy(pd.poison_mask | pd.cover_mask)
    assert bool((pd.dataset.x[marked] != x0[marked]).flatten(1).any(1).all())
    cover = torch.from_numpy(pd.cover_mask)
    assert torch.equal(pd.dataset.labels()[cover], y0[cover])
    # same seed -> identical result
    assert np.array_equal(again.poison_mask, pd.poison_mask)
    assert np.array_equal(again.cover_mask, pd.cover_mask)
    assert torch.equal(again.dataset.x, pd.dataset.x)
    assert torch.equal(again.dataset.labels(), pd.dataset.labels())
    # metadata travels, the summary is JSON-able
    assert pd.rate == 0.1 and pd.seed == 3 and pd.attack is attack
    json.dumps(pd.to_dict())


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_different_seed_selects_different_samples(attack: Attack) -> None:
    ds = make_ds(n=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrojanscanWarning)
        a = attack.poison(ds, 0.05, seed=0)
        b = attack.poison(ds, 0.05, seed=1)
    assert a.num_poison == b.num_poison
    assert not np.array_equal(a.poison_mask, b.poison_mask)


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_spec_round_trip_and_to_dict(attack: Attack) -> None:
    again = parse_attack(attack.spec)
    assert again == attack
    assert again is not None and again.spec == attack.spec
    assert format_attack(attack) == attack.spec
    d = json.loads(json.dumps(attack.to_dict()))
    assert d["name"] == attack.name and d["spec"] == attack.spec
    assert d["targets"] == list(attack.targets)


@pytest.mark.parametrize("attack", all_attacks(), ids=ATTACK_IDS)
def test_apply_rejects_non_image_batches(attack: Attack) -> None:
    with pytest.raises(DataError, match="N×C×H×W"):
        attack.apply(torch.rand(12, 12))
    with pytest.raises(DataError):
        attack.apply(torch.zeros(2, 1, 12, 12, dtype=torch.int64))


# ---------------------------------------------------------------------------
# poisoning rules
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,rate,expected", [(200, 0.1, 20), (10, 0.25, 3), (10, 0.0, 0),
                                              (100, 0.015, 2), (7, 1 / 7, 1)])
def test_poison_count_is_rate_times_n_rounded_half_up(n: int, rate: float,
                                                      expected: int) -> None:
    ds = make_ds(n=n)
    pd = BadNets(target=0).poison(ds, rate, seed=0)
    assert pd.num_poison == expected == math.floor(rate * n + 0.5)


def test_all_to_one_poisons_only_non_target_samples_and_relabels_them() -> None:
    ds = make_ds()
    pd = BadNets(target=2).poison(ds, 0.2, seed=0)
    idx = torch.from_numpy(pd.poison_indices)
    assert idx.numel() == 40
    assert bool((ds.labels()[idx] != 2).all())
    assert bool((pd.dataset.labels()[idx] == 2).all())


def test_cap_when_fewer_candidates_than_asked_warns() -> None:
    ds = make_ds(n=50)  # 40 non-target samples
    with pytest.warns(TrojanscanWarning, match="only 40"):
        pd = BadNets(target=0).poison(ds, 0.9, seed=0)
    assert pd.num_poison == 40


def test_poison_rejects_bad_rate_missing_labels_and_unknown_target() -> None:
    ds = make_ds(n=20)
    with pytest.raises(ParameterError, match=r"invalid rate: .*\[0, 1\].*1\.5"):
        BadNets().poison(ds, 1.5, seed=0)
    with pytest.raises(DataError, match="labels"):
        BadNets().poison(ImageDataset(ds.x), 0.1, seed=0)
    with pytest.raises(ParameterError, match=r"badnets\.target.*< 5.*7"):
        BadNets(target=7).poison(ds, 0.1, seed=0)
    with pytest.raises(DataError):
        BadNets().poison(ds.x, 0.1, seed=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# BadNets and all-to-all
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("location,margin,rows,cols", [
    ("bottom-right", 1, slice(8, 11), slice(8, 11)),
    ("bottom-right", 0, slice(9, 12), slice(9, 12)),
    ("top-left", 1, slice(1, 4), slice(1, 4)),
    ("top-right", 2, slice(2, 5), slice(7, 10)),
    ("bottom-left", 0, slice(9, 12), slice(0, 3)),
    ("center", 1, slice(4, 7), slice(4, 7)),
    ((5, 2), 1, slice(5, 8), slice(2, 5)),
])
def test_badnets_patch_is_where_expected_and_nothing_else_changes(location, margin, rows,
                                                                   cols) -> None:
    x = make_ds(n=4, c=3).x
    out = BadNets(size=3, location=location, margin=margin).apply(x)
    assert bool((out[:, :, rows, cols] == 1.0).all())
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[rows, cols] = False
    assert torch.equal(out[:, :, mask], x[:, :, mask])


def test_badnets_named_patterns() -> None:
    x = make_ds(n=2).x
    sl = (slice(None), 0, slice(1, 5), slice(1, 5))
    cb = BadNets(pattern="checkerboard", size=4, location="top-left").apply(x)[sl]
    expected = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    assert torch.equal(cb, expected.expand(2, 4, 4))
    black = BadNets(pattern="black", size=4, location="top-left").apply(x)[sl]
    assert bool((black == 0).all())


def test_badnets_random_pattern_is_seeded_binary_and_per_channel() -> None:
    x = make_ds(n=2, c=3).x
    a = BadNets(pattern="random", size=5, trigger_seed=1)
    patch = a.apply(x)[0, :, 6:11, 6:11]
    assert set(patch.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(patch[0], patch[1]), "channels should get their own draws"
    assert torch.equal(BadNets(pattern="random", size=5, trigger_seed=1).apply(x), a.apply(x))
    assert not torch.equal(BadNets(pattern="random", size=5, trigger_seed=2).apply(x),
                           a.apply(x))


def test_badnets_array_pattern_per_channel_and_from_npy_file(tmp_path) -> None:
    x = make_ds(n=2, c=3).x
    pat = np.stack([np.full((2, 2), v, np.float32) for v in (0.1, 0.5, 0.9)])
    out = BadNets(pattern=pat, size=2, location=(0, 0)).apply(x)
    for ch, v in enumerate((0.1, 0.5, 0.9)):
        assert torch.allclose(out[:, ch, 0:2, 0:2], torch.full((2, 2, 2), v))
    gray = np.array([[0, 255], [255, 0]], np.uint8)  # uint8 is scaled, 2-D goes to every channel
    out = BadNets(pattern=gray, size=2, location=(0, 0)).apply(x)
    assert torch.equal(out[:, :, 0, 1], torch.ones(2, 3))
    assert torch.equal(out[:, :, 0, 0], torch.zeros(2, 3))

    path = tmp_path / "pat.npy"
    np.save(path, pat)
    from_file = BadNets(pattern=str(path), size=2, location=(0, 0))
    assert torch.equal(from_file.apply(x), BadNets(pattern=pat, size=2, location=(0, 0)).apply(x))
    assert parse_attack(from_file.spec) == from_file
    # arrays cannot live in a spec; the message says what to do
    in_memory = BadNets(pattern=pat, size=2)
    assert "pattern=custom" in in_memory.spec
    with pytest.raises(ParameterError, match=r"\.npy"):
        parse_attack(in_memory.spec)


def test_badnets_png_pattern(tmp_path) -> None:
    from PIL import Image

    img = np.zeros((3, 3), np.uint8)
    img[1, 1] = 255
    path = tmp_path / "trigger.png"
    Image.fromarray(img).save(path)
    out = BadNets(pattern=str(path), size=3, location=(0, 0)).apply(make_ds(n=1).x)
    assert float(out[0, 0, 1, 1]) == 1.0 and float(out[0, 0, 0, 0]) == 0.0


def test_badnets_bad_settings_name_the_key() -> None:
    with pytest.raises(ParameterError, match=r"badnets\.pattern.*shape 3×3.*\(2, 2\)"):
        BadNets(pattern=np.zeros((2, 2)), size=3)
    with pytest.raises(ParameterError, match=r"badnets\.pattern.*\[0, 1\]"):
        BadNets(pattern=np.full((3, 3), 2.0), size=3)
    with pytest.raises(ParameterError, match=r"badnets\.pattern.*1 or 1 channels.*3"):
        BadNets(pattern=np.zeros((3, 3, 3)), size=3).apply(make_ds(n=1).x)
    with pytest.raises(ParameterError, match=r"badnets\.location.*fits a 12×12.*\(11, 11\)"):
        BadNets(size=3, location=(11, 11)).apply(make_ds(n=1).x)
    with pytest.raises(ParameterError, match=r"badnets\.location.*fits"):
        BadNets(size=13).apply(make_ds(n=1).x)
    with pytest.raises(ParameterError, match=r"badnets\.location"):
        BadNets(location=(-1, 2))
    with pytest.raises(ParameterError, match=r"badnets\.size.*>= 1.*True"):
        BadNets(size=True)


def test_all_to_all_labels_and_eligibility() -> None:
    ds = make_ds()
    a = AllToAll()
    assert a.target is None and a.targets == ()
    pd = a.poison(ds, 0.5, seed=0)
    idx = torch.from_numpy(pd.poison_indices)
    assert idx.numel() == 100
    assert torch.equal(pd.dataset.labels()[idx], (ds.labels()[idx] + 1) % K)
    assert bool(a.eligible(ds.labels()).all())
    assert torch.equal(AllToAll(offset=2).target_labels(torch.tensor([0, 3, 4]), num_classes=5),
                       torch.tensor([2, 0, 1]))
    with pytest.raises(ParameterError, match="num_classes"):
        a.target_labels(ds.labels())
    with pytest.raises(ParameterError, match=r"all2all\.offset.*5"):
        AllToAll(offset=5).poison(ds, 0.1, seed=0)


# ---------------------------------------------------------------------------
# Blend, SIG, WaNet
# ---------------------------------------------------------------------------

def test_blend_formula_is_exact() -> None:
    x = make_ds(n=3).x
    p = np.linspace(0, 1, 144, dtype=np.float32).reshape(12, 12)
    out = Blend(alpha=0.25, pattern=p).apply(x)
    expected = 0.75 * x + 0.25 * torch.from_numpy(p)
    assert torch.allclose(out, expected, atol=1e-7)


def test_blend_random_pattern_is_seeded_noise() -> None:
    x = make_ds(n=2, c=3).x
    a = Blend(alpha=1.0, trigger_seed=5)
    p = a.apply(x)
    assert torch.equal(p[0], p[1]), "alpha=1 shows the pattern, the same for every input"
    assert 0.3 < float(p.mean()) < 0.7 and float(p.std()) > 0.2
    assert torch.equal(Blend(alpha=1.0, trigger_seed=5).apply(x), p)
    assert not torch.equal(Blend(alpha=1.0, trigger_seed=6).apply(x), p)
    with pytest.raises(ParameterError, match=r"blend\.alpha.*\(0, 1\].*0"):
        Blend(alpha=0)
    with pytest.raises(ParameterError, match=r"blend\.pattern.*12×12"):
        Blend(pattern=np.zeros((5, 5))).apply(x)


def test_sig_adds_the_sinusoid_only() -> None:
    x = make_ds(n=3, w=24).x
    a = SIG(delta=0.05, test_delta=0.15, frequency=6)
    j = torch.arange(24, dtype=torch.float64)
    wave = torch.sin(2 * math.pi * j * 6 / 24).float()
    assert torch.allclose(a.apply(x) - x, (0.15 * wave).expand_as(x), atol=1e-6)
    assert torch.allclose(a.stamp(x, 0.05) - x, (0.05 * wave).expand_as(x), atol=1e-6)
    same = SIG(delta=0.05, test_delta=None)
    assert torch.allclose(same.apply(x) - x, (0.05 * wave).expand_as(x), atol=1e-6)
    assert torch.allclose(sinusoid(24, 0.05, 6), 0.05 * wave)


def test_sig_rejects_a_frequency_that_vanishes_on_the_width() -> None:
    with pytest.raises(ParameterError, match=r"sig\.frequency.*width-12.*6"):
        SIG(frequency=6).apply(make_ds(n=1).x)  # sin(2π j 6 / 12) = sin(π j) = 0


def test_sig_poisons_target_class_only_with_labels_kept_and_training_delta() -> None:
    ds = make_ds()
    a = SIG(target=1, delta=0.05, test_delta=0.2, frequency=5)
    pd = a.poison(ds, 0.1, seed=0)
    idx = torch.from_numpy(pd.poison_indices)
    assert idx.numel() == 20
    assert bool((ds.labels()[idx] == 1).all())
    assert torch.equal(pd.dataset.labels(), ds.labels()), "SIG is clean-label"
    assert torch.allclose(pd.dataset.x[idx] - ds.x[idx],
                          sinusoid(12, 0.05, 5).expand(20, 1, 12, 12), atol=1e-6)
    assert torch.equal(a.eligible(ds.labels()), ds.labels() != 1)


def test_sig_rate_is_capped_by_the_target_class() -> None:
    ds = make_ds()  # 40 samples of class 1
    with pytest.warns(TrojanscanWarning, match="only 40"):
        pd = SIG(target=1, frequency=5).poison(ds, 0.5, seed=0)
    assert pd.num_poison == 40


def test_wanet_zero_strength_is_identity() -> None:
    x = make_ds(n=4, h=16, w=20).x
    out = WaNet(s=0.0).apply(x)
    assert torch.allclose(out, x, atol=1e-5)


def test_wanet_moves_pixels_smoothly_and_is_seeded() -> None:
    x = make_ds(n=4, h=28, w=28).x
    a = WaNet(s=1.0, k=4, trigger_seed=0)
    out = a.apply(x)
    assert float((out - x).abs().mean()) > 0.01
    grid = a.field(28, 28)
    assert grid.shape == (1, 28, 28, 2)
    assert float(grid.abs().max()) <= 1.0
    ident = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28),
                                       indexing="ij")[::-1], dim=2)
    shift_px = (grid[0] - ident).abs() * 27 / 2
    assert 0.05 < float(shift_px.mean()) < 2.0, "a warp of a pixel or so, not a scramble"
    assert torch.equal(WaNet(s=1.0, trigger_seed=0).field(28, 28), grid)
    assert not torch.equal(WaNet(s=1.0, trigger_seed=1).field(28, 28), grid)
    # a constant image stays constant inside (bilinear resampling of a flat field)
    flat = torch.full((1, 1, 28, 28), 0.5)
    assert torch.allclose(WaNet(s=1.0, grid_rescale=0.9).apply(flat)[..., 4:-4, 4:-4],
                          flat[..., 4:-4, 4:-4], atol=1e-6)


def test_wanet_noise_mode_covers_keep_labels_and_differ_from_the_trigger() -> None:
    ds = make_ds()
    a = WaNet(target=4, s=1.0, cross_ratio=2.0)
    pd = a.poison(ds, 0.1, seed=0)
    assert pd.num_poison == 20 and int(pd.cover_mask.sum()) == 40
    cov = torch.from_numpy(pd.cover_mask)
    assert torch.equal(pd.dataset.labels()[cov], ds.labels()[cov])
    assert not torch.allclose(pd.dataset.x[cov], a.apply(ds.x[cov]), atol=1e-4)
    poi = torch.from_numpy(pd.poison_mask)
    assert torch.allclose(pd.dataset.x[poi], a.apply(ds.x[poi]))
    assert bool((pd.dataset.labels()[poi] == 4).all())
    assert int(WaNet().poison(ds, 0.1, seed=0).cover_mask.sum()) == 0


# ---------------------------------------------------------------------------
# source-specific and multi-trigger
# ---------------------------------------------------------------------------

def test_source_specific_flips_only_sources_and_covers_keep_labels() -> None:
    ds = make_ds(n=400)
    a = SourceSpecific(source=(1, 3), target=0, cover_ratio=0.5)
    pd = a.poison(ds, 0.1, seed=0)
    poi, cov = torch.from_numpy(pd.poison_mask), torch.from_numpy(pd.cover_mask)
    assert pd.num_poison == 40 and int(cov.sum()) == 20
    assert bool(torch.isin(ds.labels()[poi], torch.tensor([1, 3])).all())
    assert bool((pd.dataset.labels()[poi] == 0).all())
    assert not bool(torch.isin(ds.labels()[cov], torch.tensor([0, 1, 3])).any())
    assert torch.equal(pd.dataset.labels()[cov], ds.labels()[cov])
    assert torch.equal(pd.dataset.x[cov], a.apply(ds.x[cov]))
    assert torch.equal(a.eligible(ds.labels()), torch.isin(ds.labels(), torch.tensor([1, 3])))
    assert SourceSpecific(source=2).source == (2,)
    with pytest.raises(ParameterError, match=r"source\.target.*sources.*1"):
        SourceSpecific(source=1, target=1)
    with pytest.raises(ParameterError, match=r"source\.source.*distinct"):
        SourceSpecific(source=(1, 1))
    with pytest.raises(ParameterError, match=r"source\.source.*< 5.*9"):
        SourceSpecific(source=9).poison(ds, 0.1, seed=0)


def test_multi_splits_the_rate_over_disjoint_triggers() -> None:
    ds = make_ds()
    a, b = BadNets(target=1, location="top-left"), BadNets(target=4, location="bottom-right")
    m = Multi(attacks=(a, b))
    assert m.target is None and m.targets == (1, 4)
    pd = m.poison(ds, 0.105, seed=0)  # 21 samples: 11 + 10
    assert pd.num_poison == 21
    new_y = pd.dataset.labels()[torch.from_numpy(pd.poison_mask)]
    assert int((new_y == 1).sum()) == 11 and int((new_y == 4).sum()) == 10
    for i in pd.poison_indices:
        sub = a if int(pd.dataset.labels()[i]) == 1 else b
        assert int(ds.labels()[i]) != sub.target
        assert torch.equal(pd.dataset.x[i:i + 1], sub.apply(ds.x[i:i + 1]))
    # round robin at apply time
    x = ds.x[:4]
    out = m.apply(x)
    assert torch.equal(out[0::2], a.apply(x[0::2])) and torch.equal(out[1::2], b.apply(x[1::2]))
    assert torch.equal(m.target_labels(torch.tensor([0, 0, 2])), torch.tensor([1, 4, 1]))
    assert torch.equal(m.eligible(torch.tensor([1, 1, 4, 4])),
                       torch.tensor([False, True, True, False]))
    with pytest.raises(ParameterError, match=r"multi\.attacks"):
        Multi(attacks=())
    with pytest.raises(ParameterError, match=r"multi\.attacks"):
        Multi(attacks=(m,))


# ---------------------------------------------------------------------------
# spec parser
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("badnets", BadNets()),
    ("badnets:size=4,location=bottom-right,target=0", BadNets(size=4)),
    ("  badnets : size = 4 , target = 2 ", BadNets(size=4, target=2)),
    ("badnets(size=4)", BadNets(size=4)),
    ("badnets:location=(2,3),pattern=checkerboard", BadNets(location=(2, 3),
                                                           pattern="checkerboard")),
    ("blend:alpha=0.1,target=3", Blend(alpha=0.1, target=3)),
    ("blend:alpha=1", Blend(alpha=1.0)),
    ("sig:target=2", SIG(target=2)),
    ("sig:test_delta=none,delta=5e-2", SIG(test_delta=None, delta=0.05)),
    ("wanet", WaNet()),
    ("wanet:", WaNet()),
    ("WaNet:k=8,s=0.75,cross_ratio=2", WaNet(k=8, s=0.75, cross_ratio=2.0)),
    ("badnets:mode=all2all", AllToAll()),
    ("badnets:mode=all2one,target=3", BadNets(target=3)),
    ("all2all:offset=2", AllToAll(offset=2)),
    ("all_to_all", AllToAll()),
    ("source:source=1,target=7", SourceSpecific(source=1, target=7)),
    ("source_specific:source=(1,2),target=7", SourceSpecific(source=(1, 2), target=7)),
    ("multi:badnets(size=3,location=top-left,target=1)+badnets(size=3,location=bottom-right,"
     "target=5)", Multi(attacks=(BadNets(location="top-left", target=1),
                                 BadNets(location="bottom-right", target=5)))),
    ("badnets(target=1)+blend(target=2)", Multi(attacks=(BadNets(target=1), Blend(target=2)))),
    ("multi:source(source=(1,2),target=0)+wanet()",
     Multi(attacks=(SourceSpecific(source=(1, 2)), WaNet()))),
    ("multi:sig", Multi(attacks=(SIG(),))),
])
def test_parse_examples(spec: str, expected: Attack) -> None:
    got = parse_attack(spec)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("spec", ["none", "clean", " None ", None])
def test_no_attack_specs(spec) -> None:
    assert parse_attack(spec) is None
    assert format_attack(None) == "none"


@pytest.mark.parametrize("spec,pattern", [
    ("badnet", r"invalid attack: expected one of 'badnets'.*got 'badnet'"),
    ("badnets:sise=3", r"badnets setting: expected one of 'target', 'pattern', 'size'.*'sise'"),
    ("badnets:size=0", r"badnets\.size: expected an integer >= 1, got 0"),
    ("badnets:size=big", r"badnets\.size: expected an integer.*'big'"),
    ("badnets:target=1.5", r"badnets\.target.*1\.5"),
    ("badnets:location=middle", r"badnets\.location: expected one of bottom-right.*'middle'"),
    ("badnets:pattern=stripes", r"badnets\.pattern: expected one of white.*'stripes'"),
    ("badnets:mode=both", r"badnets\.mode: expected one of 'all2one', 'all2all', got 'both'"),
    ("badnets:mode=all2all,target=1", r"all2all setting.*'offset'.*got 'target'"),
    ("blend:alpha=2", r"blend\.alpha: expected a number in \(0, 1\], got 2"),
    ("sig:delta=-0.1", r"sig\.delta.*-0\.1"),
    ("wanet:k=1", r"wanet\.k: expected an integer >= 2, got 1"),
    ("badnets:size=3,size=4", r"each setting at most once.*'size'"),
    ("badnets:size=3,", r"expected a setting name"),
    ("badnets:size", r"expected '='"),
    ("badnets(size=3", r"expected '\)'"),
    ("badnets:size=3)", r"expected ',' or the end"),
    ("multi:multi(badnets)", r"multi\.attacks.*no nesting"),
    ("", r"attack spec"),
    ("=3", r"expected an attack name"),
])
def test_parse_errors_name_key_allowed_and_received(spec: str, pattern: str) -> None:
    with pytest.raises(ParameterError, match=pattern):
        parse_attack(spec)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ParameterError, match="attack spec"):
        parse_attack(3)  # type: ignore[arg-type]


_floats01 = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)
_classes = st.integers(0, 9)
_location = st.one_of(st.sampled_from(LOCATIONS),
                      st.tuples(st.integers(0, 30), st.integers(0, 30)))
_patch = {"pattern": st.sampled_from(PATCH_PATTERNS), "size": st.integers(1, 8),
          "location": _location, "margin": st.integers(0, 4),
          "trigger_seed": st.integers(0, 2**31)}


def _source_specific() -> st.SearchStrategy[Attack]:
    @st.composite
    def build(draw) -> Attack:
        target = draw(_classes)
        sources = draw(st.lists(_classes.filter(lambda c: c != target), min_size=1,
                                max_size=3, unique=True))
        return SourceSpecific(source=tuple(sources), target=target,
                              cover_ratio=draw(st.floats(0, 5)),
                              **{k: draw(v) for k, v in _patch.items()})
    return build()


_single = st.one_of(
    st.builds(BadNets, target=_classes, **_patch),
    st.builds(AllToAll, offset=st.integers(1, 9), **_patch),
    st.builds(Blend, target=_classes, alpha=_floats01, trigger_seed=st.integers(0, 99)),
    st.builds(SIG, target=_classes, delta=_floats01,
              test_delta=st.one_of(st.none(), _floats01),
              frequency=st.floats(0.5, 20)),
    st.builds(WaNet, target=_classes, k=st.integers(2, 8), s=st.floats(0, 4),
              grid_rescale=_floats01, cross_ratio=st.floats(0, 4),
              trigger_seed=st.integers(0, 99)),
    _source_specific(),
)
_any_attack = st.one_of(_single, st.lists(_single, min_size=1, max_size=3).map(
    lambda subs: Multi(attacks=tuple(subs))))


@settings(max_examples=150, deadline=None)
@given(_any_attack)
def test_property_parse_inverts_spec(attack: Attack) -> None:
    again = parse_attack(attack.spec)
    assert again == attack
    assert again is not None and again.get_params().keys() == attack.get_params().keys()
    assert again.spec == attack.spec


# ---------------------------------------------------------------------------
# metrics on hand-made models
# ---------------------------------------------------------------------------

class RuleModel(nn.Module):
    """Predicts ``target`` for inputs where pixel (r, c) is white (and, with ``marker``,
    pixel (0, 0) is above 0.85); otherwise ``default``. First matching rule wins."""

    def __init__(self, rules: list[tuple[int, int, int]], default: int = 1,
                 marker: bool = False) -> None:
        super().__init__()
        self.rules, self.default, self.marker = rules, default, marker
        self.scale = nn.Parameter(torch.ones(1))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        pred = torch.full((x.shape[0],), self.default, dtype=torch.int64)
        done = torch.zeros(x.shape[0], dtype=torch.bool)
        for r, c, t in self.rules:
            hit = (x[:, 0, r, c] > 0.999) & ~done
            if self.marker:
                hit &= x[:, 0, 0, 0] > 0.85
            pred[hit] = t
            done |= hit
        return nn.functional.one_hot(pred, K).float() * self.scale


class LabelReader(nn.Module):
    """Reads the true class from pixel (0, 1) (= y / 10); adds 1 when (9, 9) is white."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.round(x[:, 0, 0, 1] * 10).long()
        c = torch.where(x[:, 0, 9, 9] > 0.999, (c + 1) % K, c)
        return nn.functional.one_hot(c, K).float()


def _marked_test_set() -> tuple[ImageDataset, torch.Tensor]:
    ds = make_ds(n=60)
    marked = torch.arange(60) % 3 == 0
    x = ds.x.clone()
    x[marked, 0, 0, 0] = 0.9
    return ImageDataset(x, ds.labels()), marked


def test_asr_on_a_hand_made_model_is_exact() -> None:
    ds, marked = _marked_test_set()
    model = RuleModel([(9, 9, 2)], default=1, marker=True)  # BadNets 3×3 at (8..10, 8..10)
    attack = BadNets(target=2)
    eligible = ds.labels() != 2
    expected = float((marked & eligible).sum()) / float(eligible.sum())
    assert 0.2 < expected < 0.5
    assert attack_success_rate(model, attack, ds, batch_size=7) == pytest.approx(expected)
    assert attack_success_rates(model, attack, ds) == pytest.approx(
        {"trigger_0": expected, "mean": expected})
    assert clean_accuracy(model, ds, batch_size=7) == pytest.approx(float((ds.labels() == 1).mean(
        dtype=torch.float64)))
    # a trigger the model does not know: ASR 0
    assert attack_success_rate(model, BadNets(target=2, location="top-left"), ds) == 0.0


def test_asr_source_specific_counts_source_inputs_only() -> None:
    ds, marked = _marked_test_set()
    model = RuleModel([(9, 9, 0)], default=1, marker=True)
    attack = SourceSpecific(source=(2, 3), target=0)
    src = (ds.labels() == 2) | (ds.labels() == 3)
    expected = float((marked & src).sum()) / float(src.sum())
    assert attack_success_rate(model, attack, ds) == pytest.approx(expected)


def test_asr_all_to_all_and_clean_accuracy_with_a_label_reader() -> None:
    ds = make_ds(n=50)
    x = ds.x.clone()
    x[:, 0, 0, 1] = ds.labels().float() / 10
    ds = ImageDataset(x, ds.labels())
    model = LabelReader()
    assert clean_accuracy(model, ds) == 1.0
    assert attack_success_rate(model, AllToAll(), ds) == 1.0
    assert attack_success_rate(model, AllToAll(offset=2), ds) == 0.0


def test_asr_multi_reports_each_trigger_and_the_mean() -> None:
    ds, _ = _marked_test_set()
    # knows the top-left trigger (pixel (2, 2)) -> 3; the bottom-right one is not learned
    model = RuleModel([(2, 2, 3)], default=1)
    m = Multi(attacks=(BadNets(target=3, location="top-left"),
                       BadNets(target=4, location="bottom-right")))
    rates = attack_success_rates(model, m, ds)
    assert rates == {"trigger_0": 1.0, "trigger_1": 0.0, "mean": 0.5}
    assert attack_success_rate(model, m, ds) == 0.5


def test_metrics_borrow_the_model() -> None:
    ds, _ = _marked_test_set()
    model = RuleModel([(9, 9, 2)])
    model.train()
    hooks = count_hooks(model)
    attack_success_rate(model, BadNets(target=2), ds)
    clean_accuracy(model, ds)
    assert model.seen_training and not any(model.seen_training), "not run in eval mode"
    assert model.training and model.scale.requires_grad
    assert count_hooks(model) == hooks


def test_metrics_errors() -> None:
    ds = make_ds(n=20)
    only_target = ImageDataset(ds.x[ds.labels() == 2], ds.labels()[ds.labels() == 2])
    with pytest.raises(DataError, match="no test input is eligible"):
        attack_success_rate(RuleModel([]), BadNets(target=2), only_target)
    with pytest.raises(ParameterError, match=r"badnets\.target.*< 5.*7"):
        attack_success_rate(RuleModel([]), BadNets(target=7), ds)
    with pytest.raises(ParameterError, match="attack"):
        attack_success_rate(RuleModel([]), "badnets", ds)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="batch_size"):
        clean_accuracy(RuleModel([]), ds, batch_size=0)
