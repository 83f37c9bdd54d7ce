"""Loading users' data sets into :class:`~trojanscan.dataset.ImageDataset` (and saving them).

What :func:`load_dataset` accepts (the "Data files" section of the contract):

``.npz`` archive (any name; recognised by the ``.npz`` suffix or the zip magic bytes)
    ``x`` and, where labels are needed, ``y`` — read with ``allow_pickle=False``, so object
    arrays are refused, never unpickled. ``x`` is ``uint8`` (scaled by 1/255) or float in
    [0, 1] (values within 1e-6 outside are clipped; anything further is an error); its shape
    is ``N×C×H×W``, ``N×H×W`` (one channel) or ``N×H×W×C`` with ``C`` in {1, 3}, the last
    one recognised when dimension 1 is neither 1 nor 3. ``y`` holds class indices ≥ 0 of any
    integer dtype (floats holding whole numbers are accepted; shape ``N`` or ``N×1``).
    An optional ``class_names`` array of strings names the classes.
folder of class sub-folders of images (PNG, JPEG, PPM, …)
    class index = position of the sub-folder name in sorted order; see
    :mod:`trojanscan.io.images`. A folder of images without sub-folders loads without labels.
    All images must have one size, unless the folder is given as ``folder:WxH``
    (``GTSRB/Final_Training/Images:32x32``): every image is then resized to W×H.
CIFAR-10 / CIFAR-100 (binary or python layout, see :mod:`trojanscan.io.cifar`)
    A folder holding both splits is named with ``:train`` or ``:test``
    (``cifar-10-batches-py:test``); a folder holding one split, or one batch file
    (``data_batch_3.bin``, ``test_batch``, ``cifar-100-python/test``), loads as it is.
    CIFAR-100 uses its fine labels. The pickles are read by a restricted unpickler.
folder with MNIST-style IDX files (``*images-idx3-ubyte[.gz]``, ``*labels-idx1-ubyte[.gz]``)
    One images/labels pair just loads. A folder holding several splits (``train-…`` and
    ``t10k-…``) needs one chosen by appending ``:<split>`` to the folder —
    ``data/mnist:train``, ``data/mnist:t10k`` (``:test`` also selects ``t10k``); without it
    the error lists the splits found. A path to an images file itself
    (``data/mnist/t10k-images-idx3-ubyte.gz``) loads that file with its labels file beside
    it. See :mod:`trojanscan.io.idx`.
built-in data sets (:data:`BUILTINS`)
    ``fashion-mnist:train`` and ``fashion-mnist:test`` read the Debian package
    ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or the folder named by
    the ``TROJANSCAN_FASHION_MNIST_DIR`` environment variable; nothing is ever downloaded.
    ``digits`` is scikit-learn's 8×8 digits (values 0..16 divided by 16, shape 1×8×8);
    ``digits:train``/``digits:test`` split it deterministically: within each class, in the
    original order, every fifth sample (positions 4, 9, 14, …) goes to ``test`` (355 samples)
    and the others to ``train`` (1,442).
    ``synthetic-rgb:train`` (20,000) and ``synthetic-rgb:test`` (4,000) are a *synthetic*
    3×32×32 task (not CIFAR-10) generated deterministically by
    :mod:`trojanscan.io.synthetic_rgb` from Fashion-MNIST's train/test glyphs (scikit-learn
    digits, upsampled, when Fashion-MNIST is absent — the ``format`` then says so).

An existing file or folder always wins over a built-in of the same name (write ``./digits``
or not — a folder called ``digits`` in the working directory is loaded as a folder).

Memory is bounded (:mod:`trojanscan.io.limits`): each loader reads the header first (the
``.npy`` member headers inside the zip, the IDX dimensions, the first image's size), checks
it against the zip directory or the file's size, and refuses, before allocating, a data set
whose decoded arrays would exceed the data budget (4 GiB by default; the environment
variable ``TROJANSCAN_MAX_DATA_BYTES`` or ``load_dataset(..., max_bytes=...)`` change it).
With ``max_samples`` the payload is streamed and only the selected rows are kept, as stored
(``uint8`` stays ``uint8``) until they are converted to float32.

Every problem is a :class:`~trojanscan.exceptions.DataError` (or its subclass
:class:`~trojanscan.exceptions.UnknownFormatError`) naming the file, what is wrong and what
was expected. Input files are only ever read.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, UnknownFormatError, bad_param, printable, printable_errors
from ..utils import atomic_path, sha256_file, sha256_tree
from . import cifar, synthetic_rgb
from . import idx as idx_io
from .images import IMAGE_EXTENSIONS, MAX_RESIZE, read_image_folder
from .limits import MAX_CLASS_INDEX, check_budget, check_max_samples, resolve_budget, select_rows
from .npz import NpyMember, NpzReader

__all__ = [
    "BUILTINS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "SYNTHETIC_RGB_PER_CLASS",
    "check_image_header",
    "check_label_header",
    "digits_test_mask",
    "images_to_tensor",
    "labels_to_tensor",
    "load_dataset",
    "printable",
    "save_npz",
]

#: Built-in data set names -> one-line description.
BUILTINS: Mapping[str, str] = MappingProxyType({
    "fashion-mnist:train": "Fashion-MNIST training set: 60,000 28×28 grayscale images, 10 classes"
                           " (Debian package dataset-fashion-mnist)",
    "fashion-mnist:test": "Fashion-MNIST test set: 10,000 28×28 grayscale images, 10 classes"
                          " (Debian package dataset-fashion-mnist)",
    "digits": "scikit-learn's handwritten digits: 1,797 8×8 grayscale images, 10 classes",
    "digits:train": "digits minus every fifth sample of each class: 1,442 images",
    "digits:test": "every fifth sample of each class of digits: 355 images",
    "synthetic-rgb:train": "SYNTHETIC (not CIFAR-10) 3×32×32 RGB task, 20,000 images, 10 classes:"
                           " Fashion-MNIST garments tinted and composited on gradients, colour"
                           " noise and photo crops (generated offline, deterministic)",
    "synthetic-rgb:test": "SYNTHETIC (not CIFAR-10) 3×32×32 RGB task, 4,000 images from the"
                          " Fashion-MNIST test garments (generated offline, deterministic)",
})

#: Images per class of ``synthetic-rgb:train`` and ``synthetic-rgb:test``.
SYNTHETIC_RGB_PER_CLASS: Mapping[str, int] = MappingProxyType({"train": 2000, "test": 400})
#: The fixed seeds of the two synthetic splits (part of their definition: never change them).
_SYNTHETIC_RGB_SEEDS = {"train": 20_260_001, "test": 20_260_002}

#: Environment variable naming a folder with the Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "TROJANSCAN_FASHION_MNIST_DIR"
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

_FLOAT_TOLERANCE = 1e-6
_RESIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[x×]\s*(\d{1,6})\s*$", re.IGNORECASE)
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_FORMATS = ("an .npz file with x (and y)", "a folder of class sub-folders of images",
            "a folder of MNIST-style IDX files",
            "a CIFAR-10/100 folder or batch file (binary or python layout)",
            "a built-in (" + ", ".join(BUILTINS) + ")")




@dataclass(frozen=True)
class _Limits:
    """What a loader keeps: at most ``max_samples`` rows (seeded), ``budget`` bytes."""

    max_samples: int | None
    seed: int
    budget: int


# --------------------------------------------------------------------------- arrays

def check_image_header(shape: tuple[int, ...], dtype: np.dtype, *, name: str) -> None:
    """Refuse, from the header alone, images whose shape or dtype
    :func:`images_to_tensor` would not accept (the same messages, before any reading)."""
    ndim = len(shape)
    if ndim == 4:
        if shape[1] not in (1, 3) and shape[3] not in (1, 3):
            raise DataError(
                f"{name}: cannot find the channel axis in shape {tuple(shape)}: expected "
                "N×C×H×W or N×H×W×C with C = 1 (grayscale) or 3 (RGB)"
            )
    elif ndim != 3:
        raise DataError(
            f"{name}: expected images of shape N×C×H×W, N×H×W or N×H×W×C, got {ndim} "
            f"dimension(s) {tuple(shape)}"
        )
    if not (dtype == np.uint8 or dtype.kind == "f"):
        raise DataError(
            f"{name}: unsupported dtype {dtype}; expected uint8 (0–255) or float in [0, 1]"
        )


def images_to_tensor(x: np.ndarray, *, name: str) -> torch.Tensor:
    """Images in any accepted layout/dtype as a float32 ``N×C×H×W`` tensor in [0, 1].

    Accepts ``N×C×H×W``, ``N×H×W`` and ``N×H×W×C`` (``C`` in {1, 3}; recognised when
    dimension 1 is not 1 or 3); ``uint8`` (scaled by 1/255) or float in [0, 1]. Converts to
    float32 once. ``name`` (file and array) appears in error messages.
    """
    check_image_header(x.shape, x.dtype, name=name)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.shape[0] == 0 or 0 in x.shape[2:]:
        raise DataError(f"{name}: the data is empty (shape {x.shape})")
    if x.dtype == np.uint8:
        out = np.ascontiguousarray(x, dtype=np.float32)
        out /= 255.0
    else:
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise DataError(f"{name}: contains {bad} NaN or infinite value(s); expected "
                            "finite values in [0, 1]")
        if lo < -_FLOAT_TOLERANCE or hi > 1 + _FLOAT_TOLERANCE:
            hint = ("; it looks like 0–255 pixel values: divide by 255 or store uint8"
                    if lo >= 0 and hi <= 255 else
                    "; store raw pixels (uint8, or float in [0, 1]) — the model applies any"
                    " normalisation itself")
            raise DataError(
                f"{name}: float values must lie in [0, 1], found range [{lo:g}, {hi:g}]{hint}"
            )
        out = np.ascontiguousarray(x, dtype=np.float32)
        if not out.flags.writeable:
            out = out.copy()
        if lo < 0 or hi > 1:
            np.clip(out, 0.0, 1.0, out=out)
    return torch.from_numpy(out)


def check_label_header(shape: tuple[int, ...], dtype: np.dtype, n: int, *, name: str) -> None:
    """Refuse, from the header alone, labels :func:`labels_to_tensor` would not accept."""
    if len(shape) == 2 and shape[1] == 1:
        shape = shape[:1]
    if len(shape) != 1:
        hint = " (one-hot? store y.argmax(1))" if len(shape) == 2 else ""
        raise DataError(f"{name}: expected a vector of N class indices, got shape "
                        f"{tuple(shape)}{hint}")
    if shape[0] != n:
        raise DataError(f"{name}: has {shape[0]} labels but there are {n} images; "
                        "expected one label per image")
    if dtype.kind not in "iuf":
        raise DataError(f"{name}: unsupported label dtype {dtype}; expected integer class "
                        "indices")


def _label_out_of_range(value: float | int, index: int, *, name: str) -> DataError:
    shown = f"{value:.15g}" if isinstance(value, float) else str(value)
    return DataError(f"{name}: label {shown} at index {index} is out of range: class indices "
                     f"must be integers from 0 to {MAX_CLASS_INDEX}")


def labels_to_tensor(y: np.ndarray, n: int, *, name: str) -> torch.Tensor:
    """Class indices (any integer dtype, or whole-number floats) as an int64 vector of ``n``.

    Labels must be whole numbers from 0 to :data:`~trojanscan.io.limits.MAX_CLASS_INDEX`;
    the message names the first one that is not, and where it is.
    """
    check_label_header(y.shape, y.dtype, n, name=name)
    if y.ndim == 2:
        y = y[:, 0]
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{name}: contains NaN or infinite labels; expected class indices")
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise DataError(f"{name}: labels must be whole numbers (class indices), got "
                            f"{float(y[frac[0]]):g} at index {int(frac[0])}")
        if (neg := np.flatnonzero(y < 0)).size:
            raise DataError(f"{name}: labels must be >= 0, got {float(y[neg[0]]):g} at index "
                            f"{int(neg[0])}")
        if (big := np.flatnonzero(y > MAX_CLASS_INDEX)).size:
            raise _label_out_of_range(float(y[big[0]]), int(big[0]), name=name)
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if y.dtype.kind == "i" and (neg := np.flatnonzero(y < 0)).size:
        raise DataError(f"{name}: labels must be >= 0, got {int(y[neg[0]])} at index "
                        f"{int(neg[0])}")
    if (big := np.flatnonzero(y > MAX_CLASS_INDEX)).size:
        raise _label_out_of_range(int(y[big[0]]), int(big[0]), name=name)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _combined_sha256(digests: dict[str, str]) -> str:
    """Hash several files (name -> hex digest) as :func:`~trojanscan.utils.sha256_tree`
    hashes a folder holding just them; a single file keeps its own digest."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode())
        h.update(bytes.fromhex(digests[name]))
    return h.hexdigest()


# --------------------------------------------------------------------------- npz

def _npz_members(z: NpzReader, path: Path, need_labels: bool
                 ) -> tuple[NpyMember, NpyMember | None, NpyMember | None]:
    keys = set(z.keys)
    if "x" not in keys:
        found = ", ".join(repr(k) for k in sorted(keys)) or "none"
        raise DataError(f"{path}: has no array 'x' (found: {found}); expected images in 'x' "
                        "and labels in 'y'")
    if need_labels and "y" not in keys:
        found = ", ".join(repr(k) for k in sorted(keys))
        raise DataError(f"{path}: has no array 'y' but labels are needed (found: {found}); "
                        "expected class indices in 'y'")
    hx = z.header("x")
    check_image_header(hx.shape, hx.dtype, name=f"{path}: x")
    hy = z.header("y") if "y" in keys else None
    if hy is not None:
        check_label_header(hy.shape, hy.dtype, hx.shape[0], name=f"{path}: y")
    hn = z.header("class_names") if "class_names" in keys else None
    if hn is not None and (len(hn.shape) != 1 or hn.dtype.kind != "U"):
        raise DataError(f"{path}: class_names must be a vector of strings, got "
                        f"{hn.dtype} {hn.shape}")
    return hx, hy, hn


def _member_bytes(m: NpyMember, keep: np.ndarray | None, out_itemsize: int) -> int:
    n = m.shape[0]
    rows = n if keep is None else len(keep)
    items = int(np.prod(m.shape[1:], dtype=object))
    stored = n if m.fortran_order else rows
    return stored * items * m.dtype.itemsize + rows * items * out_itemsize


def _load_npz(path: Path, source: str, need_labels: bool, lim: _Limits) -> ImageDataset:
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if head == _NPY_MAGIC:
        raise DataError(f"{path}: is a single .npy array, not an .npz archive; "
                        "expected numpy.savez(path, x=images, y=labels)")
    with NpzReader(path) as z:
        hx, hy, hn = _npz_members(z, path, need_labels)
        n = hx.shape[0]
        keep = select_rows(n, lim.max_samples, lim.seed)
        rows = n if keep is None else len(keep)
        need = (_member_bytes(hx, keep, 4) + (0 if keep is None else 8 * n)
                + (0 if hy is None else _member_bytes(hy, keep, 8))
                + (0 if hn is None else hn.payload_bytes))
        shape = "×".join(map(str, hx.shape[1:]))
        check_budget(need, lim.budget, name=str(path),
                     what=f"{rows:,} of its {n:,} samples ({shape}, {hx.dtype})")
        x_np = z.read(hx, keep)
        y_np = None if hy is None else z.read(hy, keep)
        names_np = None if hn is None else z.read(hn, None)
    x = images_to_tensor(x_np, name=f"{path}: x")
    del x_np
    y = None if y_np is None else labels_to_tensor(y_np, x.shape[0], name=f"{path}: y")
    class_names = None
    if names_np is not None:
        class_names = tuple(str(s) for s in names_np)
        if y is not None and int(y.max()) >= len(class_names):
            raise DataError(f"{path}: label {int(y.max())} has no entry in class_names "
                            f"({len(class_names)} names)")
    return ImageDataset(x, y, source=source, format="npz", sha256=sha256_file(path),
                        class_names=class_names)


# --------------------------------------------------------------------------- IDX

def _load_idx_pair(pair: idx_io.IdxPair, source: str, need_labels: bool, lim: _Limits, *,
                   fmt: str = "idx", class_names: tuple[str, ...] | None = None
                   ) -> ImageDataset:
    with ExitStack() as stack:
        xs = stack.enter_context(idx_io.IdxStream(pair.images))
        hx = xs.header
        if len(hx.shape) not in (3, 4):
            raise DataError(f"{pair.images}: IDX images file has shape {hx.shape}; expected "
                            "3 dimensions N×H×W (or 4 with a channel axis)")
        check_image_header(hx.shape, hx.dtype.newbyteorder("="), name=str(pair.images))
        if pair.labels is None and need_labels:
            raise DataError(f"{pair.images}: no labels file beside it (expected "
                            f"{pair.split + '-' if pair.split else ''}labels-idx1-ubyte[.gz] "
                            f"in {pair.images.parent}) but labels are needed")
        n = hx.shape[0]
        ys = None
        if pair.labels is not None:
            ys = stack.enter_context(idx_io.IdxStream(pair.labels))
            if len(ys.header.shape) != 1:
                raise DataError(f"{pair.labels}: IDX labels file has shape {ys.header.shape}; "
                                "expected 1 dimension (one label per image)")
            check_label_header(ys.header.shape, ys.header.dtype, n,
                               name=f"{pair.labels} (for {pair.images.name})")
        keep = select_rows(n, lim.max_samples, lim.seed)
        rows = n if keep is None else len(keep)
        items = int(np.prod(hx.shape[1:], dtype=object))
        need = rows * items * (hx.dtype.itemsize + 4) + (0 if keep is None else 8 * n)
        if ys is not None:
            need += rows * (ys.header.dtype.itemsize + 8)
        shape = "×".join(map(str, hx.shape[1:]))
        check_budget(need, lim.budget, name=str(pair.images),
                     what=f"{rows:,} of its {n:,} samples ({shape}, {hx.dtype.name})")
        x_np = xs.read(keep)
        y_np = None if ys is None else ys.read(keep)
    x = images_to_tensor(x_np, name=str(pair.images))
    del x_np
    y = None
    if y_np is not None:
        y = labels_to_tensor(y_np, x.shape[0], name=f"{pair.labels} (for {pair.images.name})")
    digests = {p.name: _sha256(p) for p in (pair.images, pair.labels) if p is not None}
    return ImageDataset(x, y, source=source, format=fmt, sha256=_combined_sha256(digests),
                        class_names=class_names)


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def _idx_pairs(folder: Path) -> dict[str, idx_io.IdxPair]:
    try:
        return idx_io.find_idx_pairs(folder)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc


def _load_idx_file(path: Path, source: str, need_labels: bool, lim: _Limits) -> ImageDataset:
    split = idx_io.split_name(path.name) or ""
    pair = _idx_pairs(path.parent).get(split)
    labels = pair.labels if pair is not None else None
    return _load_idx_pair(idx_io.IdxPair(split, path, labels), source, need_labels, lim)


# --------------------------------------------------------------------------- folders

def _load_cifar(split: cifar.CifarSplit, source: str, lim: _Limits) -> ImageDataset:
    x8, y8, names = cifar.read_cifar(split, max_samples=lim.max_samples, seed=lim.seed,
                                     budget=lim.budget)
    where = str(split.files[0]) if len(split.files) == 1 else str(split.files[0].parent)
    x = images_to_tensor(x8, name=where)
    del x8
    y = labels_to_tensor(y8, x.shape[0], name=where)
    digests = {p.name: _sha256(p) for p in split.files}
    return ImageDataset(x, y, source=source, format=split.format,
                        sha256=_combined_sha256(digests), class_names=names)


def _load_folder(folder: Path, source: str, need_labels: bool, lim: _Limits, *,
                 size: tuple[int, int] | None = None) -> ImageDataset:
    splits = cifar.find_cifar_splits(folder)
    if splits:
        return _load_cifar(cifar.select_split(splits, None, folder=str(folder)), source, lim)
    pairs = _idx_pairs(folder)
    if pairs:
        pair = idx_io.select_pair(pairs, None, folder=str(folder))
        return _load_idx_pair(pair, source, need_labels, lim)
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    if not entries:
        raise DataError(f"{folder}: the folder is empty; expected class sub-folders of images "
                        "or MNIST-style IDX files")
    if any(idx_io.is_idx_labels_name(p.name) for p in entries):
        raise DataError(f"{folder}: holds IDX labels files but no *images-idx3-ubyte[.gz] file")
    data = read_image_folder(folder, max_samples=lim.max_samples, seed=lim.seed,
                             max_bytes=lim.budget, size=size)
    if data.y is None and need_labels:
        raise DataError(f"{folder}: holds images but no class sub-folders, and labels are "
                        "needed; expected one sub-folder per class (e.g. 0/, 1/, …)")
    return ImageDataset(torch.from_numpy(data.x),
                        None if data.y is None else torch.from_numpy(data.y),
                        source=source, format="image-folder" if size is None else
                        f"image-folder (resized to {size[0]}×{size[1]})",
                        sha256=sha256_tree(folder),
                        class_names=data.class_names)


def _load_file(path: Path, source: str, need_labels: bool, lim: _Limits) -> ImageDataset:
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if not regular:  # a pipe with no writer would block forever; a device never ends
        raise DataError(f"{path}: not a regular file (a pipe, socket or device); save the "
                        "data to a file first")
    if idx_io.is_idx_images_name(path.name):
        return _load_idx_file(path, source, need_labels, lim)
    batch = cifar.describe_file(path)
    if batch is not None:
        return _load_cifar(batch, source, lim)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    suffix = path.suffix.lower()
    if suffix == ".npz" or head in _ZIP_MAGIC:
        return _load_npz(path, source, need_labels, lim)
    if idx_io.is_idx_labels_name(path.name):
        hint = "give the images file (*images-idx3-ubyte[.gz]) or the folder instead"
    elif suffix == ".npy":
        hint = "save images and labels together: numpy.savez(path, x=images, y=labels)"
    elif suffix in IMAGE_EXTENSIONS:
        hint = "give a folder of class sub-folders of images, not one image"
    else:
        hint = "expected " + "; ".join(_FORMATS)
    raise UnknownFormatError(f"{path}: unknown data format; {hint}")


def _load_image_folder_resized(folder: Path, source: str, need_labels: bool, lim: _Limits,
                               size: tuple[int, int]) -> ImageDataset:
    w, h = size
    if not (1 <= w <= MAX_RESIZE and 1 <= h <= MAX_RESIZE):
        raise DataError(f"{source}: cannot resize to {w}×{h}; width and height must be from 1 "
                        f"to {MAX_RESIZE}")
    return _load_folder(folder, source, need_labels, lim, size=size)


# --------------------------------------------------------------------------- built-ins

def _fashion_mnist(split: str, source: str, lim: _Limits) -> ImageDataset:
    env = os.environ.get(FASHION_MNIST_ENV, "").strip()
    folder = Path(env).expanduser() if env else FASHION_MNIST_DIR
    where = f"{FASHION_MNIST_ENV}={env}" if env else str(FASHION_MNIST_DIR)
    how = (f"install it with `apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV}"
           " to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    if not folder.is_dir():
        raise DataError(f"{source}: Fashion-MNIST not found ({where} is not a folder); {how}")
    pair = _idx_pairs(folder).get(split)
    if pair is None or pair.labels is None:
        raise DataError(f"{source}: Fashion-MNIST files for split {split!r} not found in "
                        f"{where}; {how}")
    return _load_idx_pair(pair, source, True, lim, fmt="builtin",
                          class_names=FASHION_MNIST_CLASSES)


def digits_test_mask(y: np.ndarray) -> np.ndarray:
    """The fixed ``digits:test`` selection: within each class, every fifth sample (4, 9, …)."""
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        mask[np.flatnonzero(y == c)[4::5]] = True
    return mask


def _digits(split: str | None, source: str, lim: _Limits) -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float32)
    target = np.asarray(d.target, dtype=np.int64)
    if split is not None:
        keep = digits_test_mask(target)
        if split == "train":
            keep = ~keep
        images, target = images[keep], target[keep]
    x = np.ascontiguousarray(images[:, None] / np.float32(16.0), dtype=np.float32)
    y = np.ascontiguousarray(target)
    h = hashlib.sha256(x.tobytes())
    h.update(y.tobytes())
    rows = select_rows(len(y), lim.max_samples, lim.seed)
    if rows is not None:
        x, y = x[rows], y[rows]
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), source=source,
                        format="builtin", sha256=h.hexdigest(),
                        class_names=tuple(str(i) for i in range(10)))


def _synthetic_glyphs(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """Glyphs (``N×28×28`` uint8), labels, class names and a format note for ``split``:
    Fashion-MNIST's own split when installed, else scikit-learn's digits split, upsampled."""
    env = os.environ.get(FASHION_MNIST_ENV, "").strip()
    folder = Path(env).expanduser() if env else FASHION_MNIST_DIR
    pair = _idx_pairs(folder).get("train" if split == "train" else "t10k") \
        if folder.is_dir() else None
    if pair is not None and pair.labels is not None:
        glyphs = idx_io.read_idx(pair.images)
        labels = idx_io.read_idx(pair.labels).astype(np.int64)
        if glyphs.dtype == np.uint8 and glyphs.shape[1:] == (28, 28) \
                and len(labels) == len(glyphs):
            return glyphs, labels, FASHION_MNIST_CLASSES, "builtin"
    from sklearn.datasets import load_digits

    d = load_digits()
    target = np.asarray(d.target, dtype=np.int64)
    keep = digits_test_mask(target)
    if split == "train":
        keep = ~keep
    small = np.rint(np.asarray(d.images)[keep] * (255.0 / 16.0)).astype(np.uint8)
    note = ("builtin (digit glyphs: Fashion-MNIST not found, scikit-learn digits upsampled "
            "to 28×28 instead)")
    return (synthetic_rgb.upsample_glyphs(small), target[keep],
            tuple(str(i) for i in range(10)), note)


def _synthetic_rgb(split: str, source: str, lim: _Limits) -> ImageDataset:
    from sklearn.datasets import load_sample_images

    per_class = SYNTHETIC_RGB_PER_CLASS[split]
    n = 10 * per_class
    rows = n if lim.max_samples is None else min(n, lim.max_samples)
    size = synthetic_rgb.IMAGE_SIZE
    check_budget(n * 3 * size * size * 5, lim.budget, name=source,
                 what=f"{rows:,} of its {n:,} samples (3×{size}×{size}, generated)")
    glyphs, labels, names, fmt = _synthetic_glyphs(split)
    pick = synthetic_rgb.balanced_glyph_indices(labels, per_class, 10)
    order = np.random.default_rng(_SYNTHETIC_RGB_SEEDS[split]).permutation(n)
    pick = pick[order]
    y = np.ascontiguousarray(labels[pick], dtype=np.int64)
    photos = list(load_sample_images().images)
    x8 = synthetic_rgb.render(np.ascontiguousarray(glyphs[pick]), y, photos,
                              seed=_SYNTHETIC_RGB_SEEDS[split])
    h = hashlib.sha256(x8.tobytes())
    h.update(y.tobytes())
    keep = select_rows(n, lim.max_samples, lim.seed)
    if keep is not None:
        x8, y = x8[keep], y[keep]
    return ImageDataset(images_to_tensor(x8, name=source), torch.from_numpy(y), source=source,
                        format=fmt, sha256=h.hexdigest(), class_names=names)


def _load_builtin(name: str, source: str, lim: _Limits) -> ImageDataset:
    family, _, split = name.partition(":")
    if family == "fashion-mnist":
        return _fashion_mnist("train" if split == "train" else "t10k", source, lim)
    if family == "synthetic-rgb":
        return _synthetic_rgb(split, source, lim)
    return _digits(split or None, source, lim)


# --------------------------------------------------------------------------- public

def load_dataset(spec: str | os.PathLike[str], *, need_labels: bool = True,
                 min_classes: int = 1, max_samples: int | None = None, seed: int = 0,
                 max_bytes: int | None = None) -> ImageDataset:
    """Load a data set from a file, a folder or a built-in name (see the module docstring).

    ``need_labels``: labels are required (otherwise they are still read when present).
    ``min_classes``: with ``need_labels``, the labels must cover at least this many distinct
    classes (use 2 where several are needed). The result's ``source`` is ``spec`` as given.

    ``max_samples``: keep at most this many samples, chosen by
    :func:`~trojanscan.io.limits.select_rows` with ``seed`` (the selection ``--max-samples``
    makes); only those rows are decoded and checked. ``max_bytes``: the data budget (see
    :mod:`trojanscan.io.limits`; default ``TROJANSCAN_MAX_DATA_BYTES`` or 4 GiB) — a data
    set whose decoded arrays would exceed it is refused from its header, before reading.
    """
    if isinstance(min_classes, bool) or not isinstance(min_classes, int) or min_classes < 1:
        raise bad_param("min_classes", "an integer >= 1", min_classes)
    check_max_samples(max_samples)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise bad_param("seed", "an integer", seed)
    lim = _Limits(max_samples, int(seed), resolve_budget(max_bytes))
    source = os.fspath(spec)
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"no data given (got {spec!r}); expected " + "; ".join(_FORMATS))
    with printable_errors():
        ds = _load(source, need_labels, lim)
    if need_labels:
        ds.labels()
        if min_classes > 1:
            ds.require_classes(min_classes)
    return ds


def _load(source: str, need_labels: bool, lim: _Limits) -> ImageDataset:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, source, need_labels, lim)
    if path.exists():
        return _load_file(path, source, need_labels, lim)
    key = source.strip().lower()
    if key in BUILTINS:
        return _load_builtin(key, source, lim)
    base, sep, selector = source.rpartition(":")
    if sep and base and selector and Path(base).expanduser().is_dir():
        splits = cifar.find_cifar_splits(Path(base).expanduser())
        if splits:
            return _load_cifar(cifar.select_split(splits, selector, folder=base), source, lim)
        pairs = _idx_pairs(Path(base).expanduser())
        if not pairs and (m := _RESIZE_RE.match(selector)) is not None:
            return _load_image_folder_resized(Path(base).expanduser(), source, need_labels, lim,
                                              (int(m.group(1)), int(m.group(2))))
        if not pairs:
            raise DataError(f"{source}: ':{selector}' is neither a size WxH to resize an image "
                            "folder to (e.g. :32x32) nor a split: "
                            f"{base} holds no IDX or CIFAR files")
        pair = idx_io.select_pair(pairs, selector, folder=base)
        return _load_idx_pair(pair, source, need_labels, lim)
    families = {b.partition(":")[0] for b in BUILTINS}
    if key.partition(":")[0] in families:
        raise UnknownFormatError(f"unknown built-in data set {source!r}; expected one of "
                                 + ", ".join(BUILTINS))
    raise DataError(f"{source}: no such file or folder, and not a built-in data set "
                    f"(built-ins: {', '.join(BUILTINS)})")


def save_npz(path: str | os.PathLike[str], ds: ImageDataset, *, compress: bool = False) -> Path:
    """Write ``ds`` atomically as an ``.npz`` that :func:`load_dataset` reads back identically.

    ``x`` is stored as ``uint8`` when that is lossless (every value is k/255), else float32;
    ``y`` (int64) and ``class_names`` when present. The file is written to ``path`` exactly
    (no suffix is added). Returns the path.
    """
    x = ds.x.detach().cpu().numpy()
    u8 = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    back = u8.astype(np.float32)
    back /= 255.0
    arrays: dict[str, np.ndarray] = {"x": u8 if np.array_equal(back, x) else x}
    del back
    if ds.y is not None:
        arrays["y"] = ds.y.detach().cpu().numpy().astype(np.int64)
    if ds.class_names is not None:
        arrays["class_names"] = np.asarray(ds.class_names, dtype=str)
    target = Path(path)
    writer: Callable[..., None] = np.savez_compressed if compress else np.savez
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        writer(f, **arrays)
    return target
