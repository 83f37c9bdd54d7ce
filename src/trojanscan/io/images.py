"""Folders of image files (PNG, JPEG, PPM, …) read with Pillow.

Layout (as torchvision's ``ImageFolder``)::

    data/
      cat/  001.png 002.png …      -> class 0 ("cat")
      dog/  a.jpg sub/b.jpg …      -> class 1 ("dog")

* Class index = position of the sub-folder name in sorted (code-point) order; every
  non-hidden sub-folder is a class, even an empty one, so that a calibration set lacking
  a class keeps the training set's numbering. Images are found recursively inside a class
  folder, in sorted path order; files with other extensions and hidden files are skipped.
* A folder holding only image files (no sub-folders) is read *without labels*.
  Image files beside class sub-folders are an error (their class would be unknown).
* Modes: ``L``/``1``/``LA`` -> 1 channel; ``RGB`` -> 3; ``RGBA``/``P``/``CMYK``/…
  -> RGB (alpha is dropped, not composited); 16-bit grayscale (``I;16``, ``I``) -> 1
  channel scaled by 1/65535. 8-bit values are scaled by 1/255.
* All images must share the channel count after that conversion, and — unless a size is
  given — the same size; otherwise a :class:`~trojanscan.exceptions.DataError` names the
  first file that differs and, for sizes, the range of sizes found and how to resize.
* ``size=(w, h)`` (the ``folder:WxH`` spec of :mod:`trojanscan.io.data`, e.g.
  ``GTSRB/Final_Training/Images:32x32``) resizes every image to ``w×h`` pixels with
  Pillow's bilinear filter, which antialiases when shrinking; the aspect ratio is not kept
  (as ``torchvision.transforms.Resize((h, w))``). Images are converted to 8-bit grayscale
  or RGB (16-bit grayscale to 32-bit) before resizing.
* Netpbm files (``.ppm``, ``.pgm``, ``.pbm``, ``.pnm`` — GTSRB ships ``.ppm``) are read
  like the other formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..exceptions import DataError
from .limits import check_budget, resolve_budget, select_rows

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_RESIZE",
    "ImageFolderData",
    "image_to_array",
    "list_images",
    "read_image_folder",
]

#: Lower-case file extensions read as images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm"})

#: The only Pillow decoders tried, whatever a file's content claims: Pillow detects the
#: format from the bytes, and some decoders run external programs (an EPS file named
#: ``x.png`` would start Ghostscript).
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")

#: Largest width or height ``size`` may resize to.
MAX_RESIZE = 4096

_GRAY_MODES = {"1": "L", "L": "L", "LA": "L", "La": "L"}
_RGB_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_GRAY16_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass(frozen=True)
class ImageFolderData:
    """Pixels (float32 ``N×C×H×W`` in [0, 1]), labels (int64 or ``None``), class names, files."""

    x: np.ndarray
    y: np.ndarray | None
    class_names: tuple[str, ...] | None
    files: tuple[Path, ...]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def list_images(folder: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...] | None]:
    """Image files of ``folder`` with their class indices and the class names.

    Returns ``(files, labels, class_names)``; ``labels`` and ``class_names`` are ``None``
    for a flat folder of images.
    """
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    if not class_dirs:
        return loose, None, None
    if loose:
        raise DataError(
            f"{folder}: holds image files ({loose[0].name}, …) beside class sub-folders; "
            "expected every image inside a class sub-folder"
        )
    files: list[Path] = []
    labels: list[int] = []
    for k, d in enumerate(class_dirs):
        imgs = sorted(p for p in d.rglob("*") if _is_image(p)
                      and not any(part.startswith(".") for part in p.relative_to(d).parts))
        files += imgs
        labels += [k] * len(imgs)
    return files, labels, tuple(d.name for d in class_dirs)


def image_to_array(img: Image.Image, *, name: str) -> np.ndarray:
    """A Pillow image as float32 ``C×H×W`` in [0, 1] (see the module docstring for modes)."""
    mode = img.mode
    if mode in _GRAY_MODES:
        arr = np.asarray(img.convert("L"), dtype=np.float32)[None]
        arr /= 255.0
    elif mode in _RGB_MODES:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
        arr = np.ascontiguousarray(arr)
        arr /= 255.0
    elif mode in _GRAY16_MODES:
        raw = np.asarray(img)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise DataError(
                f"{name}: {mode} image has values in [{raw.min()}, {raw.max()}], "
                "expected 16-bit values 0..65535"
            )
        arr = raw.astype(np.float32)[None]
        arr /= 65535.0
    else:
        raise DataError(
            f"{name}: unsupported image mode {mode!r}; expected grayscale (L), RGB or RGBA"
        )
    return arr


def _channels(mode: str) -> int | None:
    if mode in _GRAY_MODES or mode in _GRAY16_MODES:
        return 1
    if mode in _RGB_MODES:
        return 3
    return None


def _pillow_formats() -> list[str]:
    """:data:`PILLOW_FORMATS` this Pillow build has a decoder for (JPEG covers MPO)."""
    Image.init()
    return [f for f in PILLOW_FORMATS if f in Image.OPEN]


class _SizeMismatch(Exception):
    """An image's size differs from the first one's (no resizing asked for)."""

    def __init__(self, path: Path, size: tuple[int, int]) -> None:
        super().__init__(str(path))
        self.path, self.size = path, size


def _resized(img: Image.Image, resize: tuple[int, int]) -> Image.Image:
    mode = img.mode
    if mode in _GRAY_MODES:
        img = img.convert("L")
    elif mode in _RGB_MODES:
        img = img.convert("RGB")
    elif mode in _GRAY16_MODES:
        img = img.convert("I")
    return img.resize(resize, Image.Resampling.BILINEAR)


def _open(path: Path, *, budget: int, size: tuple[int, int] | None = None,
          resize: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one image; its header is checked first: the decoded float32 image must fit
    ``budget``, and its size must be ``size`` when given (else :class:`_SizeMismatch`).
    With ``resize``, the image is resized to that ``(w, h)`` instead."""
    try:
        with Image.open(path, formats=_pillow_formats()) as img:
            channels = _channels(img.mode) or 4
            w, h = img.size
            check_budget(w * h * channels * 4, budget, name=str(path),
                         what=f"a {w}×{h} image")
            if resize is None and size is not None and (w, h) != size:
                raise _SizeMismatch(path, (w, h))
            img.load()
            if resize is not None:
                return image_to_array(_resized(img, resize), name=str(path))
            return image_to_array(img, name=str(path))
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def _sizes_found(files: list[Path]) -> list[tuple[int, int]]:
    """The sizes in the files' headers (unreadable files are left for the decoder)."""
    out = []
    for f in files:
        try:
            with Image.open(f, formats=_pillow_formats()) as img:
                out.append(img.size)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
                Image.DecompressionBombError):
            continue
    return out


def _size_error(folder: Path, files: list[Path], first: Path, mismatch: _SizeMismatch,
                size: tuple[int, int]) -> DataError:
    sizes = _sizes_found(files)
    counts: dict[tuple[int, int], int] = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    common = max(counts, key=lambda s: (counts[s], s)) if counts else size
    by_area = sorted(counts, key=lambda s: (s[0] * s[1], s))
    span = (f"{len(counts)} different sizes from {by_area[0][0]}×{by_area[0][1]} to "
            f"{by_area[-1][0]}×{by_area[-1][1]}" if counts else "different sizes")
    w, h = mismatch.size
    return DataError(
        f"{folder}: images do not all have the same size: {span} ({mismatch.path} is {w}×{h}, "
        f"{first} is "
        f"{size[0]}×{size[1]}); append the size the model expects to resize every image, "
        f"e.g. {folder}:{common[0]}x{common[1]} (bilinear, aspect ratio not kept)"
    )


def read_image_folder(folder: str | Path, *, max_samples: int | None = None, seed: int = 0,
                      max_bytes: int | None = None,
                      size: tuple[int, int] | None = None) -> ImageFolderData:
    """Read the images under ``folder`` into one float32 array (layout in the module docstring).

    ``max_samples``/``seed``: decode only the files :func:`~trojanscan.io.limits.select_rows`
    picks. ``max_bytes``: the data budget (:mod:`trojanscan.io.limits`); the first image's
    header × the number of images is checked against it before the array is allocated.
    ``size``: ``(width, height)`` every image is resized to (otherwise all must match).
    """
    folder = Path(folder)
    budget = resolve_budget(max_bytes)
    if size is not None and not (len(size) == 2 and all(
            isinstance(v, int) and 1 <= v <= MAX_RESIZE for v in size)):
        raise DataError(f"{folder}: resize to {size!r} is not a size; expected width and "
                        f"height from 1 to {MAX_RESIZE}")
    try:
        files, labels, class_names = list_images(folder)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    if not files:
        where = "its class sub-folders" if class_names else "it"
        raise DataError(
            f"{folder}: no images found in {where} (looked for "
            + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
        )
    n = len(files)
    keep = select_rows(n, max_samples, seed)
    if keep is not None:
        files = [files[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    first = _open(files[0], budget=budget, resize=size)
    need = len(files) * first.nbytes + (0 if keep is None else 8 * n)
    c, h, w = first.shape
    check_budget(need, budget, name=str(folder),
                 what=f"{len(files):,} of its {n:,} images ({w}×{h}, {c} channel(s), float32)")
    x = np.empty((len(files), *first.shape), dtype=np.float32)
    x[0] = first
    for i, f in enumerate(files[1:], start=1):
        try:
            arr = _open(f, budget=budget, size=(w, h), resize=size)
        except _SizeMismatch as mismatch:
            raise _size_error(folder, files, files[0], mismatch, (w, h)) from None
        if arr.shape != first.shape:
            raise DataError(
                f"{f}: image is {_describe(arr.shape)} but {files[0]} is "
                f"{_describe(first.shape)}; expected all images to have the same size and "
                "channels (resize or convert them first)"
            )
        x[i] = arr
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    return ImageFolderData(x, y, class_names, tuple(files))


def _describe(shape: tuple[int, ...]) -> str:
    c, h, w = shape
    kind = "grayscale" if c == 1 else "RGB"
    return f"{w}×{h} {kind}"
