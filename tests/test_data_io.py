"""Data loading: .npz, image folders, IDX files, built-ins, and every way they can be wrong."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import DataError, ParameterError, UnknownFormatError
from trojanscan.io import idx as idx_io
from trojanscan.io.data import (
    BUILTINS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    digits_test_mask,
    load_dataset,
    save_npz,
)
from trojanscan.utils import sha256_file, sha256_tree

RNG = np.random.default_rng(0)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _labels(n: int, k: int = 3) -> np.ndarray:
    return (np.arange(n) % k).astype(np.int64)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _write_idx(folder: Path, split: str, x: np.ndarray, y: np.ndarray | None, *,
               gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    (folder / f"{split}-images-idx3-ubyte{ext}").write_bytes(idx_io.encode_idx(x, compress=gz))
    if y is not None:
        (folder / f"{split}-labels-idx1-ubyte{ext}").write_bytes(
            idx_io.encode_idx(y, compress=gz))


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    img.save(path)


def _snapshot(path: Path) -> dict[str, tuple[str, int]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): (sha256_file(f), f.stat().st_mtime_ns) for f in files}


# --------------------------------------------------------------------------- npz


NCHW = _u8(6, 3, 5, 4)


@pytest.mark.parametrize(
    ("stored", "expected_nchw"),
    [
        pytest.param(NCHW, NCHW, id="NCHW-3"),
        pytest.param(NCHW[:, :1], NCHW[:, :1], id="NCHW-1"),
        pytest.param(NCHW[:, 0], NCHW[:, :1], id="NHW"),
        pytest.param(NCHW.transpose(0, 2, 3, 1), NCHW, id="NHWC-3"),
        pytest.param(NCHW[:, :1].transpose(0, 2, 3, 1), NCHW[:, :1], id="NHWC-1"),
    ],
)
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
def test_npz_layouts_and_dtypes(tmp_path: Path, stored: np.ndarray, expected_nchw: np.ndarray,
                                dtype: str) -> None:
    x = stored if dtype == "uint8" else (stored / 255.0).astype(dtype)
    f = _npz(tmp_path / "d.npz", x=x, y=_labels(6))
    ds = load_dataset(f)
    assert isinstance(ds, ImageDataset)
    assert ds.x.dtype == torch.float32 and ds.x.is_contiguous()
    assert tuple(ds.x.shape) == expected_nchw.shape
    np.testing.assert_allclose(ds.x.numpy(), expected_nchw / 255.0, rtol=0, atol=1e-6)
    assert ds.y is not None and ds.y.dtype == torch.int64
    assert ds.y.tolist() == _labels(6).tolist()
    assert (ds.source, ds.format, ds.sha256) == (str(f), "npz", sha256_file(f))


def test_npz_uint8_scaling_is_exact(tmp_path: Path) -> None:
    x = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    ds = load_dataset(_npz(tmp_path / "d.npz", x=x, y=_labels(4)))
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert torch.equal(ds.x, torch.from_numpy(x).float() / 255)


@pytest.mark.parametrize("ydtype", ["int8", "uint8", "int16", "uint16", "int32", "uint64",
                                    "float32", "float64"])
def test_npz_label_dtypes(tmp_path: Path, ydtype: str) -> None:
    y = _labels(5).astype(ydtype)
    ds = load_dataset(_npz(tmp_path / "d.npz", x=_u8(5, 1, 4, 4), y=y))
    assert ds.labels().dtype == torch.int64 and ds.labels().tolist() == [0, 1, 2, 0, 1]


def test_npz_column_labels_are_accepted(tmp_path: Path) -> None:
    ds = load_dataset(_npz(tmp_path / "d.npz", x=_u8(4, 1, 4, 4), y=_labels(4)[:, None]))
    assert ds.labels().tolist() == [0, 1, 2, 0]


def test_npz_without_labels_when_not_needed(tmp_path: Path) -> None:
    ds = load_dataset(_npz(tmp_path / "d.npz", x=_u8(3, 4, 4)), need_labels=False)
    assert ds.y is None and tuple(ds.x.shape) == (3, 1, 4, 4)
    # labels present are still read when not needed
    ds = load_dataset(_npz(tmp_path / "e.npz", x=_u8(3, 4, 4), y=_labels(3)), need_labels=False)
    assert ds.labels().tolist() == [0, 1, 2]


def test_npz_float_tolerance_is_clipped(tmp_path: Path) -> None:
    x = np.full((2, 1, 3, 3), 0.5, dtype=np.float32)
    x[0, 0, 0, 0] = 1 + 1e-7
    x[1, 0, 0, 0] = -1e-7
    ds = load_dataset(_npz(tmp_path / "d.npz", x=x, y=_labels(2)))
    assert float(ds.x.max()) == 1.0 and float(ds.x.min()) == 0.0


def test_npz_with_other_suffix_is_recognised_by_magic(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    with open(f, "wb") as fh:
        np.savez(fh, x=_u8(3, 1, 4, 4), y=_labels(3))
    assert load_dataset(f).format == "npz"


def test_save_npz_round_trip_uint8_is_lossless_and_atomic(tmp_path: Path) -> None:
    x = torch.from_numpy(_u8(7, 3, 4, 4)).float() / 255
    ds = ImageDataset(x, torch.arange(7) % 2, class_names=("cat", "dog"))
    out = tmp_path / "sub" / "clean.npz"
    assert save_npz(out, ds) == out
    with np.load(out, allow_pickle=False) as z:
        assert z["x"].dtype == np.uint8  # stored compactly since lossless
    back = load_dataset(out)
    assert torch.equal(back.x, ds.x) and torch.equal(back.labels(), ds.labels())
    assert back.class_names == ("cat", "dog")
    assert sorted(p.name for p in out.parent.iterdir()) == ["clean.npz"]  # no temp files left


def test_save_npz_round_trip_float_and_no_labels(tmp_path: Path) -> None:
    x = torch.rand(5, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    out = tmp_path / "noext"  # written exactly where asked, no suffix added
    save_npz(out, ImageDataset(x), compress=True)
    assert out.exists()
    back = load_dataset(out, need_labels=False)
    assert back.y is None and torch.equal(back.x, x)


def test_save_npz_failure_leaves_existing_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "keep.npz"
    out.write_bytes(b"old")

    def half_write(f, **arrays):  # type: ignore[no-untyped-def]
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_npz(out, ImageDataset(torch.zeros(2, 1, 2, 2)))
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.npz"]


# --------------------------------------------------------------------------- npz: bad input


def _err(spec: str | Path, exc: type[Exception] = DataError, **kw: object) -> str:
    with pytest.raises(exc) as info:
        load_dataset(spec, **kw)  # type: ignore[arg-type]
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    msg = _err(tmp_path / "nope.npz")
    assert "nope.npz" in msg and "no such file" in msg


def test_empty_spec() -> None:
    assert "no data given" in _err("")


@pytest.mark.parametrize(
    ("name", "content", "hint"),
    [
        ("data.txt", b"hello", "unknown data format"),
        ("data.npy", None, "numpy.savez"),
        ("one.png", None, "folder of class sub-folders"),
        ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00\x00\x00\x00", "images file"),
    ],
)
def test_unknown_formats(tmp_path: Path, name: str, content: bytes | None, hint: str) -> None:
    f = tmp_path / name
    if name.endswith(".npy"):
        np.save(f, _u8(2, 2))
    elif name.endswith(".png"):
        _png(f, _u8(4, 4))
    else:
        f.write_bytes(content or b"")
    msg = _err(f, UnknownFormatError)
    assert str(f) in msg and hint in msg


def test_missing_x(tmp_path: Path) -> None:
    f = _npz(tmp_path / "d.npz", images=_u8(2, 4, 4), y=_labels(2))
    msg = _err(f)
    assert str(f) in msg and "no array 'x'" in msg and "images" in msg


def test_missing_y_only_when_needed(tmp_path: Path) -> None:
    f = _npz(tmp_path / "d.npz", x=_u8(2, 4, 4))
    msg = _err(f)
    assert str(f) in msg and "'y'" in msg and "labels are needed" in msg
    assert load_dataset(f, need_labels=False).y is None


def test_mismatched_lengths(tmp_path: Path) -> None:
    f = _npz(tmp_path / "d.npz", x=_u8(4, 4, 4), y=_labels(3))
    msg = _err(f)
    assert str(f) in msg and "3 labels" in msg and "4 images" in msg


@pytest.mark.parametrize(
    ("value", "words"),
    [(1.5, "[0, 1]"), (-0.2, "[0, 1]"), (200.0, "divide by 255"), (np.nan, "NaN"),
     (np.inf, "infinite"), (-np.inf, "infinite")],
)
def test_bad_float_values(tmp_path: Path, value: float, words: str) -> None:
    x = np.full((3, 1, 4, 4), 0.5, dtype=np.float32)
    x[1, 0, 2, 2] = value
    f = _npz(tmp_path / "d.npz", x=x, y=_labels(3))
    msg = _err(f)
    assert str(f) in msg and words in msg


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (np.zeros((0, 1, 4, 4), np.uint8), "empty"),
        (np.zeros((0, 4, 4), np.float32), "empty"),
        (np.zeros((2, 1, 0, 4), np.uint8), "empty"),
        (np.zeros((4, 16), np.uint8), "2 dimension"),
        (np.zeros((2, 1, 1, 4, 4), np.uint8), "5 dimension"),
        (np.zeros(3, np.uint8), "1 dimension"),
        (np.zeros((2, 4, 5, 5), np.uint8), "C = 1 (grayscale) or 3"),
        (np.zeros((2, 5, 5, 4), np.uint8), "C = 1 (grayscale) or 3"),
        (np.zeros((2, 1, 4, 4), np.int64), "unsupported dtype int64"),
        (np.zeros((2, 1, 4, 4), bool), "unsupported dtype bool"),
    ],
)
def test_bad_x_arrays(tmp_path: Path, x: np.ndarray, words: str) -> None:
    f = _npz(tmp_path / "d.npz", x=x, y=_labels(len(x)))
    msg = _err(f)
    assert str(f) in msg and words in msg


@pytest.mark.parametrize(
    ("y", "words"),
    [
        (np.array([0, 1, -1]), "must be >= 0, got -1 at index 2"),
        (np.array([0.0, 1.5, 2.0]), "whole numbers (class indices), got 1.5 at index 1"),
        (np.array([0.0, np.nan, 2.0]), "NaN"),
        (np.eye(3, dtype=np.int64), "one-hot"),
        (np.array([True, False, True]), "label dtype bool"),
        (np.array(["a", "b", "c"]), "label dtype <U1"),
    ],
)
def test_bad_labels(tmp_path: Path, y: np.ndarray, words: str) -> None:
    f = _npz(tmp_path / "d.npz", x=_u8(3, 1, 4, 4), y=y)
    msg = _err(f)
    assert str(f) in msg and words in msg


def test_min_classes(tmp_path: Path) -> None:
    f = _npz(tmp_path / "d.npz", x=_u8(4, 1, 4, 4), y=np.zeros(4, np.int64))
    assert len(load_dataset(f)) == 4
    msg = _err(f, min_classes=2)
    assert str(f) in msg and "at least 2 classes, found 1" in msg
    assert load_dataset(f, need_labels=False, min_classes=2).y is not None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_min_classes_parameter_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ParameterError, match="min_classes"):
        load_dataset("digits", min_classes=bad)  # type: ignore[arg-type]


def test_object_arrays_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (Path.touch, (marker,))

    f = tmp_path / "evil.npz"
    np.savez(f, x=np.array([Evil()], dtype=object), y=_labels(1))
    msg = _err(f)
    assert str(f) in msg and "dtype=object" in msg and "'x'" in msg
    assert not marker.exists()


def test_npy_content_in_npz_name(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    with open(f, "wb") as fh:
        np.save(fh, _u8(2, 4, 4))
    msg = _err(f)
    assert str(f) in msg and "not an .npz archive" in msg


@pytest.mark.parametrize("cut", [10, 200, -30])
def test_corrupt_npz(tmp_path: Path, cut: int) -> None:
    good = _npz(tmp_path / "good.npz", x=_u8(20, 1, 8, 8), y=_labels(20)).read_bytes()
    f = tmp_path / "bad.npz"
    f.write_bytes(good[:cut])
    msg = _err(f)
    assert str(f) in msg


def test_npz_with_damaged_member(tmp_path: Path) -> None:
    f = tmp_path / "bad.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", b"\x93NUMPY garbage that is not a header")
        z.writestr("y.npy", b"")
    msg = _err(f)
    assert str(f) in msg and "'x'" in msg


def test_garbage_with_npz_suffix(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    f.write_bytes(os.urandom(64).replace(b"\x80", b"\x00"))
    assert str(f) in _err(f)


def test_class_names_must_cover_labels(tmp_path: Path) -> None:
    f = _npz(tmp_path / "d.npz", x=_u8(3, 1, 4, 4), y=_labels(3), class_names=np.array(["a"]))
    assert "class_names" in _err(f)


# --------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    c=st.sampled_from([1, 3]),
    h=st.integers(2, 7).filter(lambda v: v != 3),
    w=st.integers(1, 7),
    as_float=st.booleans(),
)
def test_nchw_and_nhwc_give_identical_tensors(tmp_path_factory: pytest.TempPathFactory,
                                              data: st.DataObject, n: int, c: int, h: int,
                                              w: int, as_float: bool) -> None:
    if as_float:
        elems = st.floats(0, 1, width=32, allow_nan=False, allow_subnormal=False)
        nchw = data.draw(hnp.arrays(np.float32, (n, c, h, w), elements=elems))
    else:
        nchw = data.draw(hnp.arrays(np.uint8, (n, c, h, w)))
    d = tmp_path_factory.mktemp("prop")
    a = load_dataset(_npz(d / "a.npz", x=nchw), need_labels=False)
    b = load_dataset(_npz(d / "b.npz", x=nchw.transpose(0, 2, 3, 1)), need_labels=False)
    assert a.x.shape == (n, c, h, w)
    assert torch.equal(a.x, b.x)


# --------------------------------------------------------------------------- image folders


def _image_folder(root: Path) -> tuple[Path, np.ndarray]:
    pixels = _u8(5, 6, 4)  # five 6×4 grayscale images (H=6, W=4)
    _png(root / "zebra" / "a.png", pixels[0])
    _png(root / "apple" / "b.png", pixels[1])
    _png(root / "apple" / "a.png", pixels[2])
    _png(root / "mango" / "deep" / "c.png", pixels[3])  # found recursively
    _png(root / "mango" / "d.png", pixels[4])
    (root / "apple" / "notes.txt").write_text("not an image")
    (root / "apple" / ".hidden.png").write_bytes(b"junk")
    (root / ".git").mkdir()
    return root, pixels


def test_image_folder(tmp_path: Path) -> None:
    root, pixels = _image_folder(tmp_path / "imgs")
    ds = load_dataset(root)
    assert ds.class_names == ("apple", "mango", "zebra")
    assert ds.format == "image-folder" and ds.sha256 == sha256_tree(root)
    assert tuple(ds.x.shape) == (5, 1, 6, 4)
    # apple/a, apple/b, mango/d, mango/deep/c, zebra/a (sorted paths within each class)
    order = [2, 1, 4, 3, 0]
    assert ds.labels().tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_allclose(ds.x[:, 0].numpy(), pixels[order] / 255.0, atol=1e-7)


def test_image_folder_rgb_rgba_jpeg(tmp_path: Path) -> None:
    rgb = _u8(2, 5, 7, 3)
    _png(tmp_path / "a" / "rgb.png", rgb[0])
    rgba = np.concatenate([rgb[1], np.full((5, 7, 1), 7, np.uint8)], axis=2)
    _png(tmp_path / "b" / "rgba.png", rgba)
    smooth = np.broadcast_to(np.linspace(40, 200, 7, dtype=np.uint8)[None, :, None], (5, 7, 3))
    Image.fromarray(np.ascontiguousarray(smooth)).save(tmp_path / "b" / "photo.JPG", quality=95)
    ds = load_dataset(tmp_path)
    assert tuple(ds.x.shape) == (3, 3, 5, 7)
    assert ds.labels().tolist() == [0, 1, 1]
    np.testing.assert_allclose(ds.x[0].numpy(), rgb[0].transpose(2, 0, 1) / 255, atol=1e-7)
    # files sorted: photo.JPG before rgba.png; RGBA drops alpha
    np.testing.assert_allclose(ds.x[2].numpy(), rgb[1].transpose(2, 0, 1) / 255, atol=1e-7)
    jpeg_error = (ds.x[1] - torch.from_numpy(smooth.transpose(2, 0, 1) / 255)).abs().max()
    assert float(jpeg_error) < 0.05  # JPEG is lossy, but close


def test_image_folder_16_bit_grayscale(tmp_path: Path) -> None:
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    _png(tmp_path / "c" / "x.png", arr)
    ds = load_dataset(tmp_path)
    np.testing.assert_allclose(ds.x[0, 0].numpy(), arr / 65535.0, rtol=1e-6)


def test_empty_class_folder_keeps_its_index(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    (tmp_path / "b").mkdir()
    _png(tmp_path / "c" / "1.png", _u8(4, 4))
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("a", "b", "c") and ds.labels().tolist() == [0, 2]


def test_flat_image_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / f"{i}.png", _u8(4, 4))
    ds = load_dataset(tmp_path, need_labels=False)
    assert ds.y is None and len(ds) == 3
    msg = _err(tmp_path)
    assert str(tmp_path) in msg and "sub-folder per class" in msg


def test_image_folder_mixed_sizes(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    _png(tmp_path / "b" / "2.png", _u8(5, 4))
    msg = _err(tmp_path)
    assert "2.png" in msg and "1.png" in msg and "same size" in msg


def test_image_folder_mixed_modes(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    _png(tmp_path / "b" / "2.png", _u8(4, 4, 3))
    msg = _err(tmp_path)
    assert "2.png" in msg and "grayscale" in msg and "RGB" in msg


def test_image_folder_unreadable_image(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    bad = tmp_path / "a" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    msg = _err(tmp_path)
    assert str(bad) in msg and "cannot read image" in msg


def test_image_folder_truncated_png(tmp_path: Path) -> None:
    good = tmp_path / "a" / "1.png"
    _png(good, _u8(32, 32))
    bad = tmp_path / "a" / "2.png"
    bad.write_bytes(good.read_bytes()[:-40])
    msg = _err(tmp_path)
    assert str(bad) in msg


def test_image_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("x")
    msg = _err(tmp_path)
    assert str(tmp_path) in msg and "no images" in msg and ".png" in msg


def test_empty_folder(tmp_path: Path) -> None:
    assert "empty" in _err(tmp_path)


def test_images_beside_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    _png(tmp_path / "loose.png", _u8(4, 4))
    assert "loose.png" in _err(tmp_path)


def test_split_selector_on_image_folder(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", _u8(4, 4))
    msg = _err(f"{tmp_path}:train")
    assert "':train'" in msg and "IDX" in msg


def test_image_folder_fewer_classes_than_needed(tmp_path: Path) -> None:
    _png(tmp_path / "only" / "1.png", _u8(4, 4))
    assert "at least 2 classes" in _err(tmp_path, min_classes=2)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path: Path, gz: bool) -> None:
    x, y = _u8(7, 5, 6), _labels(7, 4).astype(np.uint8)
    _write_idx(tmp_path, "train", x, y, gz=gz)
    ds = load_dataset(tmp_path)
    assert ds.format == "idx" and tuple(ds.x.shape) == (7, 1, 5, 6)
    np.testing.assert_allclose(ds.x[:, 0].numpy(), x / 255.0, atol=1e-7)
    assert ds.labels().tolist() == y.tolist()
    assert ds.sha256 == sha256_tree(tmp_path)  # the folder holds just the pair


def test_idx_several_splits(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", _u8(4, 3, 3), _labels(4).astype(np.uint8), gz=True)
    _write_idx(tmp_path, "t10k", _u8(2, 3, 3), _labels(2).astype(np.uint8), gz=False)
    msg = _err(tmp_path)
    assert "several splits" in msg and f"{tmp_path}:train" in msg and f"{tmp_path}:t10k" in msg
    assert len(load_dataset(f"{tmp_path}:train")) == 4
    assert len(load_dataset(f"{tmp_path}:t10k")) == 2
    ds = load_dataset(f"{tmp_path}:test")  # alias
    assert len(ds) == 2 and ds.source == f"{tmp_path}:test"
    msg = _err(f"{tmp_path}:val")
    assert "no IDX split 'val'" in msg and "'train'" in msg
    # a path to one images file loads it with its labels
    ds = load_dataset(tmp_path / "t10k-images-idx3-ubyte")
    assert len(ds) == 2 and ds.labels().tolist() == [0, 1]


def test_idx_prefers_uncompressed_copy(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", _u8(4, 3, 3), _labels(4).astype(np.uint8), gz=False)
    _write_idx(tmp_path, "train", _u8(9, 3, 3), _labels(9).astype(np.uint8), gz=True)
    assert len(load_dataset(tmp_path)) == 4


def test_idx_dotted_mirror_names(tmp_path: Path) -> None:
    (tmp_path / "train-images.idx3-ubyte").write_bytes(idx_io.encode_idx(_u8(3, 4, 4)))
    (tmp_path / "train-labels.idx1-ubyte").write_bytes(
        idx_io.encode_idx(np.array([0, 1, 1], np.uint8)))
    assert load_dataset(tmp_path).labels().tolist() == [0, 1, 1]


def test_idx_without_labels(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", _u8(3, 4, 4), None, gz=True)
    assert load_dataset(tmp_path, need_labels=False).y is None
    msg = _err(tmp_path)
    assert "train-images-idx3-ubyte.gz" in msg and "labels-idx1-ubyte" in msg


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path, "train", _u8(3, 4, 4), np.array([0, 1], np.uint8), gz=False)
    msg = _err(tmp_path)
    assert "train-labels-idx1-ubyte" in msg and "2 labels" in msg and "3 images" in msg


def test_idx_wrong_dimensions(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_io.encode_idx(_u8(12)))
    msg = _err(tmp_path, need_labels=False)
    assert "train-images-idx3-ubyte" in msg and "expected 3 dimensions" in msg
    _write_idx(tmp_path, "train", _u8(2, 4, 4), _u8(2, 2), gz=False)
    msg = _err(tmp_path)
    assert "train-labels-idx1-ubyte" in msg and "expected 1 dimension" in msg


def test_idx_labels_without_images(tmp_path: Path) -> None:
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_io.encode_idx(_u8(3)))
    assert "no *images-idx3-ubyte" in _err(tmp_path)


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b"\x01\x02" + b[2:], "bad magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "bad magic number"),
        (lambda b: b[:3] + b"\x00" + b[4:], "0 dimensions"),
        (lambda b: b[:2], "shorter than the 4-byte header"),
        (lambda b: gzip.compress(b)[:-9], "gzip"),
        (lambda b: b"\x1f\x8b" + b"garbage", "gzip"),
    ],
)
def test_idx_corrupt_files(tmp_path: Path, mutate, words: str) -> None:  # type: ignore[no-untyped-def]
    good = idx_io.encode_idx(_u8(4, 5, 5))
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(mutate(good))
    msg = _err(tmp_path, need_labels=False)
    assert str(f) in msg and words in msg


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_encode_parse_round_trip(dtype: str) -> None:
    arr = (np.arange(24) - 5).reshape(2, 3, 4).astype(dtype)
    for compress in (False, True):
        back = idx_io.parse_idx(idx_io.encode_idx(arr, compress=compress))
        assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
        assert np.array_equal(back, arr)


def test_idx_float_images(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    (tmp_path / "images-idx3-ubyte").write_bytes(idx_io.encode_idx(x))
    ds = load_dataset(tmp_path, need_labels=False)
    assert torch.equal(ds.x[:, 0], torch.from_numpy(x))


def test_idx_split_names() -> None:
    assert idx_io.split_name("train-images-idx3-ubyte.gz") == "train"
    assert idx_io.split_name("T10K-labels-idx1-ubyte") == "t10k"
    assert idx_io.split_name("images-idx3-ubyte") == ""
    assert idx_io.split_name("train.npz") is None


# --------------------------------------------------------------------------- built-ins


def test_builtins_listed() -> None:
    assert {"fashion-mnist:train", "fashion-mnist:test", "digits"} <= set(BUILTINS)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    ds = load_dataset("fashion-mnist:test", min_classes=10)
    assert tuple(ds.x.shape) == (10000, 1, 28, 28) and ds.num_classes == 10
    assert ds.format == "builtin" and ds.source == "fashion-mnist:test"
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert torch.bincount(ds.labels()).tolist() == [1000] * 10


def test_fashion_mnist_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path, "train", _u8(6, 28, 28), _labels(6, 10).astype(np.uint8), gz=True)
    _write_idx(tmp_path, "t10k", _u8(3, 28, 28), _labels(3, 10).astype(np.uint8), gz=False)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    train = load_dataset("fashion-mnist:train")
    test = load_dataset("FASHION-MNIST:test")
    assert (len(train), len(test)) == (6, 3)
    assert train.format == "builtin" and train.class_names == FASHION_MNIST_CLASSES
    assert test.source == "FASHION-MNIST:test"
    assert train.sha256 != test.sha256
    snap = _snapshot(tmp_path)
    load_dataset("fashion-mnist:train")
    assert _snapshot(tmp_path) == snap


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "absent"))
    msg = _err("fashion-mnist:train")
    assert "apt-get install dataset-fashion-mnist" in msg and FASHION_MNIST_ENV in msg
    _write_idx(tmp_path, "train", _u8(2, 28, 28), np.array([0, 1], np.uint8), gz=True)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    msg = _err("fashion-mnist:test")
    assert "'t10k'" in msg and "dataset-fashion-mnist" in msg and FASHION_MNIST_ENV in msg


def test_unknown_builtin() -> None:
    msg = _err("fashion-mnist", UnknownFormatError)
    assert "fashion-mnist:train" in msg
    assert "digits:test" in _err("digits:validation", UnknownFormatError)
    assert "no such file" in _err("cifar10")


def test_digits() -> None:
    ds = load_dataset("digits", min_classes=10)
    assert tuple(ds.x.shape) == (1797, 1, 8, 8) and ds.format == "builtin"
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert torch.equal(ds.x * 16, torch.round(ds.x * 16))  # 0..16 divided by 16
    assert ds.num_classes == 10 and ds.sha256 == load_dataset("digits").sha256
    train, test = load_dataset("digits:train"), load_dataset("digits:test")
    assert len(train) + len(test) == 1797 and (len(train), len(test)) == (1442, 355)
    mask = digits_test_mask(ds.labels().numpy())
    assert torch.equal(test.x, ds.x[torch.from_numpy(mask)])
    assert torch.equal(train.x, ds.x[torch.from_numpy(~mask)])
    # stratified: every class is about 20% test
    frac = torch.bincount(test.labels()) / torch.bincount(ds.labels())
    assert bool(((frac > 0.18) & (frac < 0.22)).all())
    assert len({ds.sha256, train.sha256, test.sha256}) == 3


def test_existing_path_wins_over_builtin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _png(tmp_path / "digits" / "a" / "1.png", _u8(3, 3))
    _png(tmp_path / "digits" / "b" / "1.png", _u8(3, 3))
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("digits")
    assert ds.format == "image-folder" and len(ds) == 2


# --------------------------------------------------------------------------- inputs untouched


def test_input_files_are_not_modified(tmp_path: Path) -> None:
    npz = _npz(tmp_path / "d.npz", x=_u8(3, 4, 4), y=_labels(3))
    idx_dir = tmp_path / "idx"
    _write_idx(idx_dir, "train", _u8(3, 4, 4), _labels(3).astype(np.uint8), gz=True)
    _write_idx(idx_dir, "t10k", _u8(3, 4, 4), _labels(3).astype(np.uint8), gz=False)
    img_dir, _ = _image_folder(tmp_path / "imgs")
    targets = {str(npz): npz, f"{idx_dir}:train": idx_dir, f"{idx_dir}:t10k": idx_dir,
               str(img_dir): img_dir}
    for spec, path in targets.items():
        before = _snapshot(path)
        listing = sorted(path.parent.iterdir())
        load_dataset(spec)
        assert _snapshot(path) == before, spec
        assert sorted(path.parent.iterdir()) == listing, spec  # nothing written beside it
