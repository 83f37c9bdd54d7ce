"""The synthetic RGB task: garment glyphs, tinted and composited on varied colour backgrounds.

This is a *synthetic* benchmark, not CIFAR-10: it exists so that RGB 3×32×32 models
(residual networks, VGG-style nets) can be trained and audited offline, with nothing
downloaded. Each image is made from one grayscale glyph (a Fashion-MNIST garment, or —
when Fashion-MNIST is not installed — a scikit-learn 8×8 digit upsampled to 28×28):

1. the glyph is resized to a random square size (:data:`GLYPH_SIZES`, 18–30 px, bilinear)
   and placed at a random position inside the 32×32 canvas;
2. it is tinted with a random colour that does not depend on the class, shaded by the
   glyph's own intensities (so the garment's texture survives);
3. it is alpha-composited (alpha = the glyph's intensity, boosted) onto one of three
   backgrounds, chosen at random: a linear gradient between two random colours in a
   random direction, low-frequency colour noise (a random 4×4 colour grid, bilinearly
   upsampled), or a random square crop (32–128 px, resized with antialiasing, randomly
   mirrored) of one of the two photos of :func:`sklearn.datasets.load_sample_images`;
4. where the tint's luminance is within :data:`MIN_CONTRAST` of the background under the
   glyph, the tint is darkened (on light backgrounds) or lightened (on dark ones), so the
   glyph stays visible; a little Gaussian noise (σ = 2/255) is added and the result is
   rounded to 8 bits.

The class is the glyph's class; colour, size, position and background are drawn
independently of it, so the mean colour of an image says nothing about its class.
Everything is drawn from one :class:`numpy.random.Generator` seeded with the caller's seed,
in a fixed order, so the same glyphs and seed give the same bytes every time.

Everything here is a pure function of its arguments (no file access): the built-in loader
(:mod:`trojanscan.io.data`) reads the glyphs and photos and calls :func:`render`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..exceptions import DataError

__all__ = [
    "GLYPH_SIZES",
    "IMAGE_SIZE",
    "MIN_CONTRAST",
    "balanced_glyph_indices",
    "render",
    "upsample_glyphs",
]

#: Output images are ``3×IMAGE_SIZE×IMAGE_SIZE``.
IMAGE_SIZE = 32
#: Smallest and largest glyph side in pixels (inclusive).
GLYPH_SIZES = (18, 30)
#: Smallest luminance difference kept between the tint and the background under the glyph.
MIN_CONTRAST = 0.3

_PHOTO_CROPS = (32, 128)
_NOISE_GRID = 4
_NOISE_SIGMA = 2.0 / 255.0
_CHUNK = 1024
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def balanced_glyph_indices(labels: np.ndarray, per_class: int, n_classes: int) -> np.ndarray:
    """Indices of ``per_class`` glyphs of each class 0..``n_classes``-1, in class order.

    Within a class the glyphs are taken in their stored order; a class with fewer glyphs
    than ``per_class`` reuses them cyclically (each reuse gets its own colour, size,
    position and background).
    """
    out = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            raise DataError(f"no glyph of class {c} to draw synthetic images from")
        out.append(np.resize(idx, per_class))
    return np.concatenate(out)


def upsample_glyphs(glyphs: np.ndarray, size: int = 28) -> np.ndarray:
    """Small grayscale glyphs (``N×h×w``, uint8) resized to ``N×size×size`` (bicubic)."""
    out = np.empty((len(glyphs), size, size), dtype=np.uint8)
    for i, g in enumerate(glyphs):
        out[i] = np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC))
    return out


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """``n_out×n_in`` bilinear (align-corners) interpolation weights."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def render(glyphs: np.ndarray, labels: np.ndarray, photos: Sequence[np.ndarray], *,
           seed: int) -> np.ndarray:
    """Render one ``3×32×32`` uint8 image per glyph (``N×H×W`` uint8) — see the module
    docstring. ``labels`` only checks the length; it is not used for drawing. ``photos``
    are ``H×W×3`` uint8 arrays at least 128 px on each side. Returns ``N×3×32×32`` uint8.
    """
    if glyphs.ndim != 3 or glyphs.dtype != np.uint8:
        raise DataError(f"glyphs must be N×H×W uint8, got {glyphs.dtype} {glyphs.shape}")
    if len(labels) != len(glyphs):
        raise DataError(f"{len(glyphs)} glyphs but {len(labels)} labels")
    if not photos or any(p.ndim != 3 or p.shape[2] != 3 or min(p.shape[:2]) < _PHOTO_CROPS[1]
                         for p in photos):
        raise DataError(f"photos must be H×W×3 arrays of at least {_PHOTO_CROPS[1]} px a side")
    n, s = len(glyphs), IMAGE_SIZE
    rng = np.random.default_rng(seed)
    # every random draw happens here, up front and in a fixed order
    kind = rng.integers(0, 3, n)
    colours = rng.random((n, 2, 3), dtype=np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi, n).astype(np.float32)
    grid = rng.random((n, 3, _NOISE_GRID, _NOISE_GRID), dtype=np.float32)
    photo = rng.integers(0, len(photos), n)
    crop = rng.integers(_PHOTO_CROPS[0], _PHOTO_CROPS[1] + 1, n)
    crop_pos = rng.random((n, 2))
    mirror = rng.random(n) < 0.5
    gsize = rng.integers(GLYPH_SIZES[0], GLYPH_SIZES[1] + 1, n)
    gpos = rng.random((n, 2))
    tint = rng.random((n, 3), dtype=np.float32)
    noise_seed = int(rng.integers(0, 2**63 - 1))

    pil_photos = [Image.fromarray(np.ascontiguousarray(p, dtype=np.uint8)) for p in photos]
    m = _interp_matrix(s, _NOISE_GRID)
    coord = (np.arange(s, dtype=np.float32) + 0.5) / s - 0.5
    out = np.empty((n, 3, s, s), dtype=np.uint8)
    noise_rng = np.random.default_rng(noise_seed)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        k = np.arange(sl.start, sl.stop)
        # backgrounds, N×3×S×S float32 in [0, 1]
        cos, sin = np.cos(angle[sl]), np.sin(angle[sl])
        t = (cos[:, None, None] * coord[None, None, :] + sin[:, None, None] * coord[None, :, None])
        t = (t - t.min(axis=(1, 2), keepdims=True))
        t /= np.maximum(t.max(axis=(1, 2), keepdims=True), 1e-6)
        c0, c1 = colours[sl, 0], colours[sl, 1]
        bg = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * t[:, None]
        noise_bg = np.einsum("ij,ncjk,lk->ncil", m, grid[sl], m, optimize=True)
        bg = np.where((kind[sl] == 1)[:, None, None, None], noise_bg, bg)
        alpha = np.zeros((len(k), s, s), dtype=np.float32)
        shade = np.zeros((len(k), s, s), dtype=np.float32)
        for j, i in enumerate(k):
            if kind[i] == 2:
                img = pil_photos[photo[i]]
                w, h = img.size
                c = int(crop[i])
                x0 = int(crop_pos[i, 0] * (w - c))
                y0 = int(crop_pos[i, 1] * (h - c))
                patch = img.resize((s, s), Image.Resampling.BILINEAR,
                                   box=(x0, y0, x0 + c, y0 + c))
                arr = np.asarray(patch, dtype=np.float32).transpose(2, 0, 1) / 255.0
                bg[j] = arr[:, :, ::-1] if mirror[i] else arr
            g = int(gsize[i])
            glyph = np.asarray(Image.fromarray(glyphs[i]).resize(
                (g, g), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
            gy = int(gpos[i, 0] * (s - g + 1))
            gx = int(gpos[i, 1] * (s - g + 1))
            alpha[j, gy:gy + g, gx:gx + g] = np.minimum(1.0, 1.6 * glyph)
            shade[j, gy:gy + g, gx:gx + g] = glyph
        # keep the glyph visible: compare the tint with the background under it
        lum_bg = np.einsum("c,ncij->nij", _LUMA, bg)
        weight = alpha.sum(axis=(1, 2))
        under = (lum_bg * alpha).sum(axis=(1, 2)) / np.maximum(weight, 1e-6)
        tn = tint[sl].copy()
        lum_t = tn @ _LUMA
        close = np.abs(lum_t - under) < MIN_CONTRAST
        darken = close & (under >= 0.5)
        lighten = close & (under < 0.5)
        tn[darken] *= 0.3
        tn[lighten] = 1.0 - 0.3 * (1.0 - tn[lighten])
        fg = tn[:, :, None, None] * (0.45 + 0.55 * shade[:, None])
        a = alpha[:, None]
        img_f = bg * (1.0 - a) + fg * a
        img_f += noise_rng.normal(0.0, _NOISE_SIGMA, img_f.shape).astype(np.float32)
        out[sl] = np.rint(np.clip(img_f, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out
