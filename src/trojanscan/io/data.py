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
folder of class sub-folders of images (PNG, JPEG, …)
    class index = position of the sub-folder name in sorted order; see
    :mod:`trojanscan.io.images`. A folder of images without sub-folders loads without labels.
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

An existing file or folder always wins over a built-in of the same name (write ``./digits``
or not — a folder called ``digits`` in the working directory is loaded as a folder).

Every problem is a :class:`~trojanscan.exceptions.DataError` (or its subclass
:class:`~trojanscan.exceptions.UnknownFormatError`) naming the file, what is wrong and what
was expected. Input files are only ever read.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, UnknownFormatError, bad_param
from ..utils import atomic_path, sha256_file, sha256_tree
from . import idx as idx_io
from .images import IMAGE_EXTENSIONS, read_image_folder

__all__ = [
    "BUILTINS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "digits_test_mask",
    "images_to_tensor",
    "labels_to_tensor",
    "load_dataset",
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
})

#: Environment variable naming a folder with the Fashion-MNIST IDX files.
FASHION_MNIST_ENV = "TROJANSCAN_FASHION_MNIST_DIR"
#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")

_FLOAT_TOLERANCE = 1e-6
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_FORMATS = ("an .npz file with x (and y)", "a folder of class sub-folders of images",
            "a folder of MNIST-style IDX files", "a built-in (" + ", ".join(BUILTINS) + ")")


# --------------------------------------------------------------------------- arrays

def images_to_tensor(x: np.ndarray, *, name: str) -> torch.Tensor:
    """Images in any accepted layout/dtype as a float32 ``N×C×H×W`` tensor in [0, 1].

    Accepts ``N×C×H×W``, ``N×H×W`` and ``N×H×W×C`` (``C`` in {1, 3}; recognised when
    dimension 1 is not 1 or 3); ``uint8`` (scaled by 1/255) or float in [0, 1]. Converts to
    float32 once. ``name`` (file and array) appears in error messages.
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise DataError(
                    f"{name}: cannot find the channel axis in shape {x.shape}: expected "
                    "N×C×H×W or N×H×W×C with C = 1 (grayscale) or 3 (RGB)"
                )
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{name}: expected images of shape N×C×H×W, N×H×W or N×H×W×C, got {x.ndim} "
            f"dimension(s) {x.shape}"
        )
    if x.shape[0] == 0 or 0 in x.shape[2:]:
        raise DataError(f"{name}: the data is empty (shape {x.shape})")
    if x.dtype == np.uint8:
        out = np.ascontiguousarray(x, dtype=np.float32)
        out /= 255.0
    elif x.dtype.kind == "f":
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
    else:
        raise DataError(
            f"{name}: unsupported dtype {x.dtype}; expected uint8 (0–255) or float in [0, 1]"
        )
    return torch.from_numpy(out)


def labels_to_tensor(y: np.ndarray, n: int, *, name: str) -> torch.Tensor:
    """Class indices (any integer dtype, or whole-number floats) as an int64 vector of ``n``."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot? store y.argmax(1))" if y.ndim == 2 else ""
        raise DataError(f"{name}: expected a vector of N class indices, got shape {y.shape}{hint}")
    if y.shape[0] != n:
        raise DataError(f"{name}: has {y.shape[0]} labels but there are {n} images; "
                        "expected one label per image")
    if y.dtype.kind in "iu":
        if y.dtype == np.uint64 and y.size and int(y.max()) > np.iinfo(np.int64).max:
            raise DataError(f"{name}: label {int(y.max())} is too large")
        y64 = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{name}: contains NaN or infinite labels; expected class indices")
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise DataError(f"{name}: labels must be whole numbers (class indices), got "
                            f"{float(y[frac[0]]):g} at index {int(frac[0])}")
        y64 = y.astype(np.int64)
    else:
        raise DataError(f"{name}: unsupported label dtype {y.dtype}; expected integer class "
                        "indices")
    if y64.size and (neg := np.flatnonzero(y64 < 0)).size:
        raise DataError(f"{name}: labels must be >= 0, got {int(y64[neg[0]])} at index "
                        f"{int(neg[0])}")
    return torch.from_numpy(np.ascontiguousarray(y64))


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

def _npz_array(z: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(z[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(f"{path}: array {key!r} holds Python objects (dtype=object), which "
                            "would need unpickling; expected a numeric array") from exc
        raise DataError(f"{path}: cannot read array {key!r} ({exc})") from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise DataError(f"{path}: corrupt .npz archive, cannot read {key!r} ({exc})") from exc


def _npz_arrays(z: np.lib.npyio.NpzFile, path: Path, need_labels: bool
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    keys = set(z.files)
    if "x" not in keys:
        raise DataError(f"{path}: has no array 'x' (found: {', '.join(sorted(keys)) or 'none'}"
                        "); expected images in 'x' and labels in 'y'")
    if need_labels and "y" not in keys:
        raise DataError(f"{path}: has no array 'y' but labels are needed (found: "
                        f"{', '.join(sorted(keys))}); expected class indices in 'y'")
    x_np = _npz_array(z, "x", path)
    y_np = _npz_array(z, "y", path) if "y" in keys else None
    names_np = _npz_array(z, "class_names", path) if "class_names" in keys else None
    return x_np, y_np, names_np


def _load_npz(path: Path, source: str, need_labels: bool) -> ImageDataset:
    try:
        # our own handle, so that it is closed even when numpy fails half-way
        with open(path, "rb") as fh:
            try:
                obj = np.load(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{path}: not a readable .npz archive ({exc}); expected a file "
                                "written by numpy.savez with arrays x (and y)") from exc
            if not isinstance(obj, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: is a single .npy array, not an .npz archive; "
                                "expected numpy.savez(path, x=images, y=labels)")
            with obj as z:
                x_np, y_np, names_np = _npz_arrays(z, path, need_labels)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    x = images_to_tensor(x_np, name=f"{path}: x")
    del x_np
    y = None if y_np is None else labels_to_tensor(y_np, x.shape[0], name=f"{path}: y")
    class_names = None
    if names_np is not None:
        if names_np.ndim != 1 or names_np.dtype.kind != "U":
            raise DataError(f"{path}: class_names must be a vector of strings, got "
                            f"{names_np.dtype} {names_np.shape}")
        class_names = tuple(str(s) for s in names_np)
        if y is not None and int(y.max()) >= len(class_names):
            raise DataError(f"{path}: label {int(y.max())} has no entry in class_names "
                            f"({len(class_names)} names)")
    return ImageDataset(x, y, source=source, format="npz", sha256=sha256_file(path),
                        class_names=class_names)


# --------------------------------------------------------------------------- IDX

def _read_idx_hashed(path: Path, digests: dict[str, str]) -> np.ndarray:
    """Read an IDX file once: record its SHA-256 in ``digests`` and decode it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc.strerror or exc})") from exc
    digests[path.name] = hashlib.sha256(data).hexdigest()
    return idx_io.parse_idx(data, name=str(path))


def _load_idx_pair(pair: idx_io.IdxPair, source: str, need_labels: bool, *, fmt: str = "idx",
                   class_names: tuple[str, ...] | None = None) -> ImageDataset:
    digests: dict[str, str] = {}
    x_np = _read_idx_hashed(pair.images, digests)
    if x_np.ndim not in (3, 4):
        raise DataError(f"{pair.images}: IDX images file has shape {x_np.shape}; expected "
                        "3 dimensions N×H×W (or 4 with a channel axis)")
    x = images_to_tensor(x_np, name=str(pair.images))
    del x_np
    y = None
    if pair.labels is not None:
        y_np = _read_idx_hashed(pair.labels, digests)
        if y_np.ndim != 1:
            raise DataError(f"{pair.labels}: IDX labels file has shape {y_np.shape}; "
                            "expected 1 dimension (one label per image)")
        y = labels_to_tensor(y_np, x.shape[0], name=f"{pair.labels} (for {pair.images.name})")
    elif need_labels:
        raise DataError(f"{pair.images}: no labels file beside it (expected "
                        f"{pair.split + '-' if pair.split else ''}labels-idx1-ubyte[.gz] in "
                        f"{pair.images.parent}) but labels are needed")
    return ImageDataset(x, y, source=source, format=fmt, sha256=_combined_sha256(digests),
                        class_names=class_names)


def _idx_pairs(folder: Path) -> dict[str, idx_io.IdxPair]:
    try:
        return idx_io.find_idx_pairs(folder)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc


def _load_idx_file(path: Path, source: str, need_labels: bool) -> ImageDataset:
    split = idx_io.split_name(path.name) or ""
    pair = _idx_pairs(path.parent).get(split)
    labels = pair.labels if pair is not None else None
    return _load_idx_pair(idx_io.IdxPair(split, path, labels), source, need_labels)


# --------------------------------------------------------------------------- folders

def _load_folder(folder: Path, source: str, need_labels: bool) -> ImageDataset:
    pairs = _idx_pairs(folder)
    if pairs:
        pair = idx_io.select_pair(pairs, None, folder=str(folder))
        return _load_idx_pair(pair, source, need_labels)
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder ({exc.strerror or exc})") from exc
    if not entries:
        raise DataError(f"{folder}: the folder is empty; expected class sub-folders of images "
                        "or MNIST-style IDX files")
    if any(idx_io.is_idx_labels_name(p.name) for p in entries):
        raise DataError(f"{folder}: holds IDX labels files but no *images-idx3-ubyte[.gz] file")
    data = read_image_folder(folder)
    if data.y is None and need_labels:
        raise DataError(f"{folder}: holds images but no class sub-folders, and labels are "
                        "needed; expected one sub-folder per class (e.g. 0/, 1/, …)")
    return ImageDataset(torch.from_numpy(data.x),
                        None if data.y is None else torch.from_numpy(data.y),
                        source=source, format="image-folder", sha256=sha256_tree(folder),
                        class_names=data.class_names)


def _load_file(path: Path, source: str, need_labels: bool) -> ImageDataset:
    if idx_io.is_idx_images_name(path.name):
        return _load_idx_file(path, source, need_labels)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    suffix = path.suffix.lower()
    if suffix == ".npz" or head in _ZIP_MAGIC:
        return _load_npz(path, source, need_labels)
    if idx_io.is_idx_labels_name(path.name):
        hint = "give the images file (*images-idx3-ubyte[.gz]) or the folder instead"
    elif suffix == ".npy":
        hint = "save images and labels together: numpy.savez(path, x=images, y=labels)"
    elif suffix in IMAGE_EXTENSIONS:
        hint = "give a folder of class sub-folders of images, not one image"
    else:
        hint = "expected " + "; ".join(_FORMATS)
    raise UnknownFormatError(f"{path}: unknown data format; {hint}")


# --------------------------------------------------------------------------- built-ins

def _fashion_mnist(split: str, source: str) -> ImageDataset:
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
    return _load_idx_pair(pair, source, True, fmt="builtin", class_names=FASHION_MNIST_CLASSES)


def digits_test_mask(y: np.ndarray) -> np.ndarray:
    """The fixed ``digits:test`` selection: within each class, every fifth sample (4, 9, …)."""
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        mask[np.flatnonzero(y == c)[4::5]] = True
    return mask


def _digits(split: str | None, source: str) -> ImageDataset:
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
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), source=source,
                        format="builtin", sha256=h.hexdigest(),
                        class_names=tuple(str(i) for i in range(10)))


def _load_builtin(name: str, source: str) -> ImageDataset:
    family, _, split = name.partition(":")
    if family == "fashion-mnist":
        return _fashion_mnist("train" if split == "train" else "t10k", source)
    return _digits(split or None, source)


# --------------------------------------------------------------------------- public

def load_dataset(spec: str | os.PathLike[str], *, need_labels: bool = True,
                 min_classes: int = 1) -> ImageDataset:
    """Load a data set from a file, a folder or a built-in name (see the module docstring).

    ``need_labels``: labels are required (otherwise they are still read when present).
    ``min_classes``: with ``need_labels``, the labels must cover at least this many distinct
    classes (use 2 where several are needed). The result's ``source`` is ``spec`` as given.
    """
    if isinstance(min_classes, bool) or not isinstance(min_classes, int) or min_classes < 1:
        raise bad_param("min_classes", "an integer >= 1", min_classes)
    source = os.fspath(spec)
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"no data given (got {spec!r}); expected " + "; ".join(_FORMATS))
    ds = _load(source, need_labels)
    if need_labels:
        ds.labels()
        if min_classes > 1:
            ds.require_classes(min_classes)
    return ds


def _load(source: str, need_labels: bool) -> ImageDataset:
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, source, need_labels)
    if path.exists():
        return _load_file(path, source, need_labels)
    key = source.strip().lower()
    if key in BUILTINS:
        return _load_builtin(key, source)
    base, sep, selector = source.rpartition(":")
    if sep and base and selector and Path(base).expanduser().is_dir():
        pairs = _idx_pairs(Path(base).expanduser())
        if not pairs:
            raise DataError(f"{source}: ':{selector}' selects a split of a folder of IDX files, "
                            f"but {base} holds no *images-idx3-ubyte[.gz] file")
        pair = idx_io.select_pair(pairs, selector, folder=base)
        return _load_idx_pair(pair, source, need_labels)
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
