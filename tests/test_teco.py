"""TeCo (Liu et al., CVPR 2023): the corruptions on their own (shape, range, severity,
randomness per input), the transition-point maths on hand-made numbers, and the
detector on the tiny backdoored digits model."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from trojanscan import detectors as registry
from trojanscan.detectors.teco import TeCo
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.guard import RUNTIME_DETECTORS
from trojanscan.maths import corruptions as cor
from trojanscan.maths import transitions as tr


def _images(n: int, c: int, side: int) -> torch.Tensor:
    """Digits scaled up to ``side`` pixels (object on a dark background, like the data
    the corruptions are meant for), tinted per channel for RGB."""
    d = torch.from_numpy((load_digits().images[:n] / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(d, size=(side, side), mode="bilinear", align_corners=False)
    tint = torch.linspace(0.4, 1.0, c).view(1, c, 1, 1)
    return (x * tint).clamp(0.0, 1.0)


GRAY, RGB = _images(12, 1, 28), _images(6, 3, 32)


# ---------------------------------------------------------------------------
# corruptions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(cor.CORRUPTIONS))
@pytest.mark.parametrize("x", [GRAY, RGB], ids=["gray28", "rgb32"])
def test_corruption_keeps_shape_range_and_input(name: str, x: torch.Tensor) -> None:
    before = x.clone()
    for sev in range(1, cor.SEVERITIES + 1):
        y = cor.corrupt(x, name, sev, np.arange(len(x)))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert not torch.equal(y, x), f"{name} at severity {sev} changed nothing"
    assert torch.equal(x, before), "the input was modified"


@pytest.mark.parametrize("name", list(cor.CORRUPTIONS))
def test_severity_is_monotone(name: str) -> None:
    # mean absolute change from the plain image never shrinks as severity grows
    for x in (GRAY, RGB):
        seeds = np.arange(len(x))
        change = [float((cor.corrupt(x, name, s, seeds) - x).abs().mean())
                  for s in range(1, cor.SEVERITIES + 1)]
        assert all(b >= a - 1e-3 for a, b in itertools.pairwise(change)), (name, change)
        assert change[-1] > change[0], (name, change)


def test_small_images_work() -> None:
    x = _images(3, 1, 8)
    for name in cor.CORRUPTIONS:
        y = cor.corrupt(x, name, 5, [1, 2, 3])
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise",
                                  "motion_blur", "elastic_transform"])
def test_random_corruptions_are_per_input_and_seeded(name: str) -> None:
    x, seeds = GRAY[:6], np.array([5, 6, 7, 8, 9, 10])
    full = cor.corrupt(x, name, 3, seeds)
    assert torch.equal(full, cor.corrupt(x, name, 3, seeds)), "not deterministic"
    # an input's corruption does not depend on the other inputs of its batch
    alone = torch.cat([cor.corrupt(x[i:i + 1], name, 3, seeds[i:i + 1]) for i in range(6)])
    assert torch.allclose(full, alone, atol=1e-6)
    assert not torch.equal(full, cor.corrupt(x, name, 3, seeds + 100)), "seed ignored"


def test_pixelate_matches_pil_box_then_nearest() -> None:
    img = (np.random.default_rng(0).random((28, 28)) * 255).round().astype(np.uint8)
    x = torch.from_numpy(img.astype(np.float32) / 255.0)[None, None]
    for sev, c in enumerate((0.6, 0.5, 0.4, 0.3, 0.25), start=1):
        n = int(28 * c)
        ref = Image.fromarray(img).resize((n, n), Image.Resampling.BOX) \
            .resize((28, 28), Image.Resampling.NEAREST)
        ours = cor.corrupt(x, "pixelate", sev)[0, 0].numpy() * 255.0
        # PIL rounds its box averages to 8 bits
        assert np.abs(ours - np.asarray(ref, dtype=np.float64)).max() <= 1.0 + 1e-3


def test_brightness_keeps_hue_and_contrast_keeps_mean() -> None:
    x = RGB[:2]
    y = cor.corrupt(x, "brightness", 2)
    v, v2 = x.amax(1), y.amax(1)
    lit = v > 0.05
    ratio = y / x.clamp_min(1e-6)
    # RGB: every channel scaled by the same factor V'/V (hue and saturation kept)
    assert torch.allclose(ratio[:, 0][lit], (v2 / v)[lit], atol=1e-4)
    assert torch.allclose(ratio[:, 2][lit], (v2 / v)[lit], atol=1e-4)
    g = cor.corrupt(GRAY[:2], "brightness", 1)
    assert torch.allclose(g, (GRAY[:2] + 0.1).clamp(0, 1))
    c = cor.corrupt(GRAY[:2], "contrast", 3)
    assert torch.allclose(c.mean((2, 3)), GRAY[:2].mean((2, 3)), atol=1e-5)


def test_disk_kernel_sums_to_one_and_widens() -> None:
    small, large = cor.disk_kernel(3, 0.1), cor.disk_kernel(10, 0.5)
    assert float(small.sum()) == pytest.approx(1.0, abs=1e-4)
    # the anti-aliasing blur mirrors the disk at the grid's edge, as OpenCV does
    assert float(large.sum()) == pytest.approx(1.0, abs=0.02)
    assert large.shape[0] > small.shape[0] and float(small.max()) > float(large.max())


def test_corrupt_refuses_bad_arguments() -> None:
    with pytest.raises(ParameterError, match="corruption"):
        cor.corrupt(GRAY, "frost", 1)
    with pytest.raises(ParameterError, match="severity"):
        cor.corrupt(GRAY, "contrast", 6)
    with pytest.raises(ParameterError, match="seeds"):
        cor.corrupt(GRAY, "contrast", 1, [1, 2])
    with pytest.raises(DataError, match="B×C×H×W"):
        cor.corrupt(GRAY[0], "contrast", 1)


def test_the_docstring_names_every_paper_corruption() -> None:
    doc = cor.__doc__ or ""
    for name in cor.PAPER_CORRUPTIONS:
        assert f"``{name}``" in doc, name
    assert len(cor.IMPLEMENTED_PAPER) == 11


# ---------------------------------------------------------------------------
# transition points and their deviation
# ---------------------------------------------------------------------------


def test_transition_points_by_hand() -> None:
    changed = np.zeros((2, 3, 5), dtype=bool)
    changed[0, 0, 2:] = True         # first change at severity 3
    changed[0, 1, [0, 3]] = True     # severity 1 (later changes do not matter)
    changed[1, 2, 4] = True          # severity 5; corruptions 0 and 1 never change
    pts = tr.transition_points(changed)
    assert pts.tolist() == [[3, 1, 6], [6, 6, 5]]
    dev = tr.deviation_scores(pts)
    assert dev[0] == pytest.approx(np.std([3, 1, 6]))
    assert dev[1] == pytest.approx(np.sqrt(2 / 9))  # population std of (6, 6, 5)
    assert tr.deviation_scores(np.array([[4, 4, 4]]))[0] == 0.0


def test_tail_scores_by_hand() -> None:
    clean = np.array([[1, 6], [2, 6], [6, 6], [1, 1]])
    tails = tr.tail_fit(clean, 5)
    # P(point >= v), add-one smoothed: corruption 0 has 4, 2, 1, 1, 1, 1 of 4 at v = 1..6
    assert tails[0].tolist() == pytest.approx([1.0, 0.6, 0.4, 0.4, 0.4, 0.4])
    assert tails[1].tolist() == pytest.approx([1.0, 0.8, 0.8, 0.8, 0.8, 0.8])
    s = tr.tail_scores(np.array([[6, 6], [1, 1], [2, 1]]), tails)
    assert s[0] == pytest.approx(-np.log(0.4) - np.log(0.8))
    assert s[1] == 0.0  # breaking at once is never suspicious on this side
    assert s[2] == pytest.approx(-np.log(0.6))


def test_profile_scores_by_hand() -> None:
    clean = np.array([[2, 4], [4, 4], [3, 4], [3, 4]])
    mean, scale = tr.profile_fit(clean, floor=0.5)
    assert mean.tolist() == [3.0, 4.0]
    assert scale.tolist() == pytest.approx([np.sqrt(0.5), 0.5])
    s = tr.profile_scores(np.array([[3, 4], [3, 6]]), mean, scale)
    assert s[0] == 0.0 and s[1] == pytest.approx((2 / 0.5) ** 2 / 2)


# ---------------------------------------------------------------------------
# the detector
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tiny: Any) -> TeCo:
    return TeCo(seed=0).fit(tiny.backdoored, tiny.test)


def test_registered_and_served_by_filter_and_guard() -> None:
    assert registry.available()["teco"] == "input"
    assert "teco" in RUNTIME_DETECTORS
    assert registry.get("teco") is TeCo


def test_flags_triggered_inputs_of_the_tiny_backdoored_model(tiny: Any, fitted: TeCo) -> None:
    trig = fitted.filter(tiny.triggered_test())
    clean = fitted.filter(tiny.test.x)
    assert trig.flagged.mean() >= 0.5, trig.flagged.mean()
    assert clean.flagged.mean() <= 0.05
    assert fitted.frr_measured_ is not None and fitted.frr_measured_ <= 0.05


def test_early_exit_same_scores_fewer_evaluations(tiny: Any, fitted: TeCo) -> None:
    x = torch.cat([tiny.triggered_test()[:20], tiny.test.x[:20]])
    full = copy.copy(fitted)  # the same calibration, every severity evaluated
    full.early_exit = False
    a, b = fitted.decide(x), full.decide(x)
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.flagged, b.flagged)
    assert b.forwards.tolist() == [1.0 + fitted.forwards_per_input] * len(x)
    assert a.mean_forwards < b.mean_forwards


def test_scores_do_not_depend_on_batch_size_or_order(tiny: Any, fitted: TeCo) -> None:
    x = torch.cat([tiny.triggered_test()[:15], tiny.test.x[:15]])
    whole = fitted.score(x)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    assert np.allclose(fitted.score(x[perm]), whole[perm.numpy()])
    split = np.concatenate([fitted.score(x[:7]), fitted.score(x[7:])])
    assert np.allclose(split, whole)


def test_guard_gives_the_same_answers_as_filter(tiny: Any, fitted: TeCo) -> None:
    import json

    from trojanscan.guard import Guard

    x = torch.cat([tiny.triggered_test()[:10], tiny.test.x[:10]])
    served = Guard(tiny.backdoored, fitted).predict(x)
    offline = fitted.filter(x)
    assert np.array_equal(served.flagged, offline.flagged)
    assert np.allclose(served.scores, offline.scores)
    assert json.loads(json.dumps(Guard(tiny.backdoored, fitted).info()))["detector"] == "teco"


def test_transition_points_of_the_paper_statistic(tiny: Any) -> None:
    det = TeCo.paper(seed=0).fit(tiny.backdoored, tiny.test)
    assert det.statistic == "deviation" and det.max_severity == 5
    pts = det.transition_points(tiny.test.x[:10])
    assert pts.shape == (10, len(cor.IMPLEMENTED_PAPER))
    assert pts.min() >= 1 and pts.max() <= 6
    assert np.allclose(det.score(tiny.test.x[:10]), pts.std(axis=1))


@pytest.mark.parametrize(("params", "match"), [
    ({"corruptions": ("contrast",)}, "corruptions"),
    ({"corruptions": ("contrast", "frost")}, "corruptions"),
    ({"corruptions": "contrast,brightness"}, "corruptions"),
    ({"max_severity": 6}, "max_severity"),
    ({"statistic": "mean"}, "statistic"),
    ({"pool_fraction": 0.95, "statistic": "profile"}, "pool_fraction"),
    ({"frr": 1.5}, "frr"),
])
def test_bad_settings_are_refused(tiny: Any, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ParameterError, match=match):
        TeCo(**params).fit(tiny.backdoored, tiny.test)
