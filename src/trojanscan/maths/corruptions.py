"""Common image corruptions at five severities, in torch, for any ``B×C×H×W`` batch in
[0, 1] (grayscale and RGB alike).

The corruptions and their severity parameters are those of ImageNet-C (Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019) as packaged by ``imagecorruptions`` (Michaelis et al., 2019),
which TeCo (Liu et al., CVPR 2023) applies to every input. The parameters are absolute
(pixels, intensities), as in that package, whatever the image size; the package refuses
images under 32 pixels, these functions do not.

Implemented here, of the 15 that TeCo uses: ``gaussian_noise``, ``shot_noise``,
``impulse_noise``, ``defocus_blur``, ``motion_blur``, ``zoom_blur``, ``brightness``,
``contrast``, ``elastic_transform``, ``pixelate``, ``jpeg_compression`` (11), and, beyond
them, ``gaussian_blur`` (one of ImageNet-C's four extra corruptions). Left out:
``frost`` (it blends in photographs of frost that ship with the package and are not
ours to redistribute), ``glass_blur`` (thousands of sequential random pixel swaps per
image, a Python loop that would cost more than every model evaluation of the method
together), and ``snow`` and ``fog`` (random layers — a zoomed, motion-blurred noise
field and a diamond-square plasma fractal — that are not implemented yet).

Randomness (the noises, the elastic field, the motion direction) comes from one NumPy
generator per input, seeded by ``seeds[i]``, the corruption and the severity, so that an
input's corruption does not depend on which other inputs share its batch.

Differences from the package, all small: every corruption works on the image's own
channels (the package turns grayscale images into three equal channels first, then
corrupts them, and for the noises draws per channel); the output is not quantised to
8 bits (except by ``jpeg_compression``, whose codec needs bytes); borders follow the
package's libraries (OpenCV's ``filter2D`` mirror for the defocus disk, SciPy's
half-sample mirror for the elastic field, edge replication for motion blur).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..exceptions import DataError, bad_param

#: the 15 corruptions of the TeCo paper, in its order
PAPER_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                     "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
                     "brightness", "contrast", "elastic_transform", "pixelate",
                     "jpeg_compression")
SEVERITIES = 5

_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT_NOISE = (60.0, 25.0, 12.0, 5.0, 3.0)
_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
_DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # radius, alias blur
_MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
_ZOOM = ((1.0, 1.11, 0.01), (1.0, 1.16, 0.01), (1.0, 1.21, 0.02), (1.0, 1.26, 0.02),
         (1.0, 1.31, 0.03))  # np.arange(start, stop, step) of zoom factors
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
_JPEG_QUALITY = (25, 18, 15, 10, 7)
_GAUSSIAN_BLUR = (1.0, 2.0, 3.0, 4.0, 6.0)


# -- helpers -------------------------------------------------------------------------


def _rng(seed: int, name: str, severity: int) -> np.random.Generator:
    tag = int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, tag, severity])


def _draw(x: torch.Tensor, seeds: np.ndarray, name: str, severity: int,
          fn: Callable[[np.random.Generator], np.ndarray]) -> torch.Tensor:
    """One random array per input from its own generator, stacked, on ``x``'s device."""
    arrs = [fn(_rng(int(s), name, severity)) for s in seeds]
    return torch.from_numpy(np.stack(arrs).astype(np.float32)).to(x.device)


def _pad_index(n: int, p: int, mode: str) -> torch.Tensor:
    """Source indices of a 1-d signal of length ``n`` padded by ``p`` on both sides:
    ``"mirror"`` (OpenCV's default, ``d c b | a b c d | c b a``), ``"symmetric"``
    (SciPy's ``reflect``, ``c b a | a b c | c b a``) or ``"edge"``; any ``p``."""
    i = torch.arange(-p, n + p)
    if mode == "edge" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "mirror":
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)
    period = 2 * n
    i = i.remainder(period)
    return torch.where(i >= n, period - 1 - i, i)


def _pad(x: torch.Tensor, ph: int, pw: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    x = x.index_select(-2, _pad_index(h, ph, mode).to(x.device))
    return x.index_select(-1, _pad_index(w, pw, mode).to(x.device))


def _conv_same(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Every channel correlated with one 2-d ``kernel`` (odd sides), borders by ``mode``."""
    kh, kw = kernel.shape
    b, c, h, w = x.shape
    xp = _pad(x.reshape(b * c, 1, h, w), kh // 2, kw // 2, mode)
    k = kernel.to(x.device, x.dtype).view(1, 1, kh, kw)
    return F.conv2d(xp, k).view(b, c, h, w)


def _gauss1d(sigma: float, truncate: float) -> torch.Tensor:
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _gaussian_filter(x: torch.Tensor, sigma: tuple[float, float], truncate: float,
                     mode: str) -> torch.Tensor:
    """SciPy-style separable Gaussian filter over the last two axes of ``B×C×H×W``."""
    ky, kx = _gauss1d(sigma[0], truncate), _gauss1d(sigma[1], truncate)
    x = _conv_same(x, ky.view(-1, 1).float(), mode)
    return _conv_same(x, kx.view(1, -1).float(), mode)


def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk on a grid of at least 17×17,
    smoothed by a small Gaussian (3×3 up to radius 8, 5×5 beyond) against aliasing."""
    half = 8 if radius <= 8 else int(radius)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    size = 3 if radius <= 8 else 5
    g = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (g / alias_blur) ** 2)
    g /= g.sum()
    out = _conv_same(disk.view(1, 1, *disk.shape), torch.outer(g, g), "mirror")
    return out[0, 0].float()


def _box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's BOX resampling from ``n_in`` to ``n_out`` samples as an ``n_out×n_in``
    matrix (each output averages the inputs whose centres fall in its span)."""
    scale = n_in / n_out
    support = 0.5 * max(scale, 1.0)
    ss = 1.0 / max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        centre = (j + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        for i in range(lo, hi):
            u = (i - centre + 0.5) * ss
            if -0.5 < u <= 0.5:
                m[j, i] = 1.0
        total = m[j].sum()
        if total > 0:
            m[j] /= total
    return m


def _nearest_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL's NEAREST resampling as an ``n_out×n_in`` 0/1 matrix (the source of each
    output taken from PIL itself, whose rounding at exact half-way points is its own)."""
    from PIL import Image

    row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None], mode="I")
    src = np.asarray(row.resize((n_out, 1), Image.Resampling.NEAREST), dtype=np.int64)[0]
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), torch.from_numpy(src.clip(0, n_in - 1))] = 1.0
    return m


# -- the corruptions -----------------------------------------------------------------


def gaussian_noise(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    sd = _GAUSSIAN_NOISE[severity - 1]
    noise = _draw(x, seeds, "gaussian_noise", severity,
                  lambda r: r.normal(0.0, sd, size=tuple(x.shape[1:])))
    return (x + noise).clamp(0.0, 1.0)


def shot_noise(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    lam = _SHOT_NOISE[severity - 1]
    arr = x.detach().double().cpu().numpy()
    out = np.stack([_rng(int(s), "shot_noise", severity).poisson(a * lam) / lam
                    for s, a in zip(seeds, arr, strict=True)])
    return torch.from_numpy(out.astype(np.float32)).to(x.device).clamp(0.0, 1.0)


def impulse_noise(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    amount = _IMPULSE_NOISE[severity - 1]
    shape = tuple(x.shape[1:])
    # per pixel: hit with probability `amount`, then salt or pepper with equal odds
    u = _draw(x, seeds, "impulse_noise", severity, lambda r: r.random((2, *shape)))
    hit, salt = u[:, 0] <= amount, u[:, 1] <= 0.5
    out = torch.where(hit & salt, torch.ones_like(x), x)
    return torch.where(hit & ~salt, torch.zeros_like(x), out)


def defocus_blur(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    radius, alias = _DEFOCUS[severity - 1]
    return _conv_same(x, disk_kernel(radius, alias), "mirror").clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    s = _GAUSSIAN_BLUR[severity - 1]
    return _gaussian_filter(x, (s, s), 4.0, "edge").clamp(0.0, 1.0)


def motion_blur(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """A Gaussian-weighted streak of ``2·radius + 1`` shifted copies along a random
    direction in [−45°, 45°] per input; shifted-in borders repeat the edge."""
    radius, sigma = _MOTION[severity - 1]
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2.0 * sigma ** 2))
    k /= k.sum()
    b, c, h, w = x.shape
    ang = np.radians([_rng(int(s), "motion_blur", severity).uniform(-45.0, 45.0)
                      for s in seeds])
    py, px = width * np.sin(ang), width * np.cos(ang)
    hyp = np.hypot(py, px)
    i = np.arange(width)[None, :]
    dy = -np.ceil(i * (py / hyp)[:, None] - 0.5).astype(np.int64)  # B×width
    dx = -np.ceil(i * (px / hyp)[:, None] - 0.5).astype(np.int64)
    # the streak stops where it first leaves the image (the weights are not renormalised)
    valid = np.cumprod((np.abs(dy) < h) & (np.abs(dx) < w), axis=1).astype(bool)
    weights = torch.from_numpy(np.where(valid, k[None, :], 0.0)).to(x.device, x.dtype)
    dev = x.device
    rows = (torch.arange(h, device=dev)[None, None, :]
            - torch.from_numpy(dy).to(dev)[:, :, None]).clamp(0, h - 1)  # B×width×H
    cols = (torch.arange(w, device=dev)[None, None, :]
            - torch.from_numpy(dx).to(dev)[:, :, None]).clamp(0, w - 1)  # B×width×W
    src = x.unsqueeze(2).expand(b, c, width, h, w)
    src = src.gather(3, rows[:, None, :, :, None].expand(b, c, width, h, w))
    src = src.gather(4, cols[:, None, :, None, :].expand(b, c, width, h, w))
    out = (src * weights[:, None, :, None, None]).sum(2)
    return out.clamp(0.0, 1.0)


def zoom_blur(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """The mean of the image and centre crops of it zoomed back to full size (bilinear,
    corner-aligned as SciPy's ``zoom``), factors from 1 to 1.1–1.3."""
    start, stop, step = _ZOOM[severity - 1]
    factors = np.arange(start, stop, step)
    h, w = x.shape[-2:]
    out = x.clone()
    for z in factors:
        ch, cw = math.ceil(h / z), math.ceil(w / z)
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = x[:, :, top:top + ch, left:left + cw]
        size = (max(h, round(ch * z)), max(w, round(cw * z)))
        zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)
        out = out + zoomed[:, :, :h, :w]
    return (out / (len(factors) + 1)).clamp(0.0, 1.0)


def brightness(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """Raise the HSV value by ``c`` (RGB: hue and saturation kept, so every channel is
    scaled by ``V′/V``; other channel counts: each channel plus ``c``)."""
    c = _BRIGHTNESS[severity - 1]
    if x.shape[1] != 3:
        return (x + c).clamp(0.0, 1.0)
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0.0, 1.0)
    scaled = x * (v2 / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, v2.expand_as(x)).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    c = _CONTRAST[severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * c + mean).clamp(0.0, 1.0)


def elastic_transform(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """Each pixel moved by a smoothed random field (σ = 1% of the side, amplitude
    ``alpha · 0.5%`` of the height), sampled bilinearly with mirrored borders."""
    h, w = x.shape[-2:]
    alpha = _ELASTIC_ALPHA[severity - 1]
    md = h * 0.005
    field = _draw(x, seeds, "elastic_transform", severity,
                  lambda r: r.uniform(-md, md, size=(2, h, w)))
    field = _gaussian_filter(field, (h * 0.01, w * 0.01), 3.0, "symmetric") * alpha
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype),
                            torch.arange(w, device=x.device, dtype=x.dtype), indexing="ij")
    sy, sx = yy + field[:, 1], xx + field[:, 0]
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)
    return out.clamp(0.0, 1.0)


def pixelate(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """Down to ``c`` of each side by box averaging, back up by nearest neighbour (PIL's
    BOX and NEAREST)."""
    c = _PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    nh, nw = max(1, int(h * c)), max(1, int(w * c))
    my = (_nearest_matrix(nh, h) @ _box_matrix(h, nh)).to(x.device, x.dtype)
    mx = (_nearest_matrix(nw, w) @ _box_matrix(w, nw)).to(x.device, x.dtype)
    return (my @ x @ mx.T).clamp(0.0, 1.0)


def jpeg_compression(x: torch.Tensor, severity: int, seeds: np.ndarray) -> torch.Tensor:
    """Encode and decode with PIL's JPEG codec at quality 25, 18, 15, 10, 7 (inputs are
    rounded to 8 bits; RGB as one colour image, any other channel as a gray one)."""
    from PIL import Image

    quality = _JPEG_QUALITY[severity - 1]
    arr = (x.detach().cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)

    def codec(img: np.ndarray, mode: str) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img, mode=mode).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            return np.asarray(dec.convert(mode), dtype=np.uint8)

    out = np.empty_like(arr)
    for n in range(len(arr)):
        if arr.shape[1] == 3:
            out[n] = codec(np.ascontiguousarray(arr[n].transpose(1, 2, 0)), "RGB") \
                .transpose(2, 0, 1)
        else:
            for ch in range(arr.shape[1]):
                out[n, ch] = codec(np.ascontiguousarray(arr[n, ch]), "L")
    return torch.from_numpy(out.astype(np.float32) / 255.0).to(x.device)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, np.ndarray], torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "gaussian_blur": gaussian_blur,
}
#: the paper's corruptions implemented here, in the paper's order
IMPLEMENTED_PAPER = tuple(n for n in PAPER_CORRUPTIONS if n in CORRUPTIONS)


def corrupt(x: torch.Tensor, name: str, severity: int,
            seeds: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """``x`` (``B×C×H×W`` in [0, 1]) under corruption ``name`` at ``severity`` (1–5); a new
    tensor of the same shape, device and range. ``seeds``: one non-negative integer per
    input for the random corruptions (default 0 for every input); ``x`` is not changed."""
    if name not in CORRUPTIONS:
        raise bad_param("corruption", tuple(CORRUPTIONS), name)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or not 1 <= severity <= SEVERITIES:
        raise bad_param("severity", f"an integer in 1..{SEVERITIES}", severity)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DataError(f"corrupt: expected a tensor B×C×H×W, got "
                        f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
    s = np.zeros(len(x), dtype=np.int64) if seeds is None else np.asarray(seeds, np.int64)
    if s.shape != (len(x),) or (s < 0).any():
        raise bad_param("seeds", f"{len(x)} non-negative integers (one per input)",
                        f"{s.shape[0] if s.ndim else s} of them")
    if len(x) == 0:
        return x.clone()
    out = CORRUPTIONS[name](x.float(), int(severity), s)
    return out.to(x.dtype)


__all__ = ["CORRUPTIONS", "IMPLEMENTED_PAPER", "PAPER_CORRUPTIONS", "SEVERITIES", "corrupt",
           "disk_kernel"]
