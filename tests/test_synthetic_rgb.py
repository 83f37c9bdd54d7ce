"""The synthetic RGB built-in: deterministic, balanced, in range, and not solvable by colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images

from trojanscan.exceptions import DataError, UnknownFormatError
from trojanscan.io import synthetic_rgb
from trojanscan.io.data import (
    BUILTINS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    load_dataset,
)

HAS_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor, str | None, str, tuple[str, ...] | None]:
    ds = load_dataset("synthetic-rgb:test", min_classes=10)
    return ds.x, ds.labels(), ds.sha256, ds.format, ds.class_names


def _nearest_centroid_accuracy(features: np.ndarray, y: np.ndarray) -> float:
    """Fit per-class mean features on even rows, classify odd rows by the nearest mean."""
    fit = np.arange(len(y)) % 2 == 0
    cents = np.stack([features[fit & (y == c)].mean(0) for c in range(10)])
    d = ((features[~fit, None] - cents[None]) ** 2).sum(-1)
    return float((d.argmin(1) == y[~fit]).mean())


def test_listed_and_described_as_synthetic() -> None:
    for split in ("train", "test"):
        desc = BUILTINS[f"synthetic-rgb:{split}"]
        assert "SYNTHETIC" in desc and "not CIFAR-10" in desc


def test_test_split_shape_balance_range(test_split) -> None:  # type: ignore[no-untyped-def]
    x, y, _, fmt, names = test_split
    assert tuple(x.shape) == (4000, 3, 32, 32) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [400] * 10
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # uint8-equivalent: every value is k/255
    assert torch.equal(torch.round(x * 255) / 255, x)
    if HAS_FMNIST:
        assert fmt == "builtin" and names == FASHION_MNIST_CLASSES
    # varied images: many distinct colours, no two images the same
    assert len(torch.unique(x[:200].flatten(1), dim=0)) == 200
    assert float(x.std()) > 0.15


def test_same_bytes_every_time(test_split) -> None:  # type: ignore[no-untyped-def]
    """A second generation hashes the same (the hash covers every byte of the split) and
    ``max_samples`` keeps exactly the rows ``select_rows`` picks from it."""
    x, y, sha, _, _ = test_split
    sub = load_dataset("synthetic-rgb:test", max_samples=300, seed=3)
    assert sub.sha256 == sha and sha is not None and len(sha) == 64
    rows = torch.randperm(4000, generator=torch.Generator().manual_seed(3))[:300].sort().values
    assert len(sub) == 300
    assert torch.equal(sub.x, x[rows]) and torch.equal(sub.labels(), y[rows])


def test_mean_colour_says_nothing_about_the_class(test_split) -> None:  # type: ignore[no-untyped-def]
    x, y, _, _, _ = test_split
    xn, yn = x.numpy(), y.numpy()
    mean_rgb = xn.mean(axis=(2, 3))
    assert _nearest_centroid_accuracy(mean_rgb, yn) < 0.2  # chance is 0.1
    # the shape does: the same classifier on the per-pixel "ink" (distance from the
    # image's median colour) beats chance clearly, so the task is learnable
    med = np.median(xn, axis=(2, 3), keepdims=True)
    ink = np.abs(xn - med).mean(1).reshape(len(xn), -1)
    assert _nearest_centroid_accuracy(ink, yn) > 0.17


def test_balanced_glyph_indices_reuse_a_short_class() -> None:
    labels = np.array([0, 1, 1, 1, 0, 1])
    idx = synthetic_rgb.balanced_glyph_indices(labels, 3, 2)
    assert idx.tolist() == [0, 4, 0, 1, 2, 3]
    with pytest.raises(DataError, match="class 2"):
        synthetic_rgb.balanced_glyph_indices(labels, 3, 3)


def test_fallback_to_digit_glyphs_says_so(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "absent"))
    ds = load_dataset("synthetic-rgb:test")
    assert "digit" in ds.format and "Fashion-MNIST not found" in ds.format
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert tuple(ds.x.shape) == (4000, 3, 32, 32)
    assert torch.bincount(ds.labels()).tolist() == [400] * 10


def test_unknown_split() -> None:
    with pytest.raises(UnknownFormatError, match="synthetic-rgb:test"):
        load_dataset("synthetic-rgb:validation")


def test_budget_refused_before_generating() -> None:
    with pytest.raises(DataError, match="data budget"):
        load_dataset("synthetic-rgb:train", max_bytes=1 << 20)


def test_render_is_a_pure_function_of_its_seed() -> None:
    rng = np.random.default_rng(0)
    glyphs = (rng.random((12, 28, 28)) * 255).astype(np.uint8)
    labels = np.arange(12) % 10
    photos = list(load_sample_images().images)
    a = synthetic_rgb.render(glyphs, labels, photos, seed=5)
    b = synthetic_rgb.render(glyphs, labels, photos, seed=5)
    c = synthetic_rgb.render(glyphs, labels, photos, seed=6)
    assert a.dtype == np.uint8 and a.shape == (12, 3, 32, 32)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(DataError, match="uint8"):
        synthetic_rgb.render(glyphs.astype(np.float32), labels, photos, seed=5)
