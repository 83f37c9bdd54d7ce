"""The loaders bound memory: headers are checked against a data budget before reading,
only the selected rows are decoded, and forged headers are refused in one line."""

from __future__ import annotations

import gzip
import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._cli import run_cli
from trojanscan.commands._common import load_inputs, subsample
from trojanscan.dataset import MAX_CLASS_INDEX, ImageDataset
from trojanscan.exceptions import DataError, ParameterError
from trojanscan.io import idx as idx_io
from trojanscan.io.data import load_dataset
from trojanscan.io.limits import (
    DEFAULT_MAX_DATA_BYTES,
    MAX_DATA_ENV,
    resolve_budget,
    select_rows,
)

MB = 1 << 20


def _zeros_npz(path: Path, n: int, *, labels: bool = True) -> Path:
    """A small compressed .npz that expands to n × 784 bytes of images."""
    arrays = {"x": np.zeros((n, 1, 28, 28), np.uint8)}
    if labels:
        arrays["y"] = (np.arange(n) % 10).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def _gzip_idx(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    head = struct.pack(">HBB3I", 0, 8, 3, n, 28, 28)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb", compresslevel=9) as f:
        f.write(head)
        chunk = bytes(784 * 1000)
        for _ in range(n // 1000):
            f.write(chunk)
        f.write(bytes(784 * (n % 1000)))
    return folder


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by ``fn`` as tracemalloc sees them (NumPy and Python)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _one_line_error(fn: Callable[[], object], exc: type[Exception] = DataError) -> str:
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _forge_member_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size the zip declares for ``member`` (both headers)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46:pos + 46 + name_len]) == member.encode():
            struct.pack_into("<I", data, pos + 24, size)
        pos = data.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- npz bombs


def test_npz_bomb_refused_or_bounded(tmp_path: Path) -> None:
    """A ~40 KB .npz expanding to 39 MB: 20 samples are read within a few MB (the rows are
    streamed, uint8 until selected); reading it all is refused by a 16 MB budget."""
    f = _zeros_npz(tmp_path / "big.npz", 50_000)
    assert f.stat().st_size < 200_000
    ds: list[ImageDataset] = []
    peak = _peak_bytes(lambda: ds.append(load_dataset(f, max_samples=20, seed=3)))
    assert len(ds[0]) == 20 and ds[0].x.dtype == torch.float32
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MB for 20 samples of a 39 MB array"
    msg = _one_line_error(lambda: load_dataset(f, max_bytes=16 * MB))
    assert str(f) in msg and "data budget" in msg and MAX_DATA_ENV in msg
    assert "50,000" in msg


def test_npz_header_1e9_samples_one_line(tmp_path: Path) -> None:
    """A 200-byte archive whose x.npy header claims 10^9 images: refused before allocating
    (it used to end in MemoryError)."""
    f = tmp_path / "claim.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_header((10**9, 1, 28, 28)) + bytes(1000))
    msg = _one_line_error(lambda: load_dataset(f, need_labels=False))
    assert "'x'" in msg and "1000000000" in msg and "declares" in msg
    msg = _one_line_error(lambda: load_dataset(f, need_labels=False, max_samples=5))
    assert "declares" in msg


def test_npz_member_ratio_forged_refused(tmp_path: Path) -> None:
    """The zip directory agrees with the header (784 MB) but 1 KB of deflate cannot hold it."""
    f = tmp_path / "forged.npz"
    header = _npy_header((10**6, 1, 28, 28))
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header + bytes(1000))
    _forge_member_size(f, "x.npy", len(header) + 784 * 10**6)
    msg = _one_line_error(lambda: load_dataset(f, need_labels=False, max_samples=3))
    assert "1032:1" in msg and "'x'" in msg


def test_npz_member_size_disagrees_with_header(tmp_path: Path) -> None:
    f = tmp_path / "d.npz"
    np.savez(f, x=np.zeros((4, 1, 4, 4), np.uint8))
    _forge_member_size(f, "x.npy", 10_000)
    msg = _one_line_error(lambda: load_dataset(f, need_labels=False))
    assert "declares 10000 bytes" in msg and "header describes" in msg


def test_npz_labels_header_checked_before_reading(tmp_path: Path) -> None:
    """y claims 10^9 labels for 3 images: the count is compared from the headers."""
    f = tmp_path / "d.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros((3, 1, 4, 4), np.uint8))
        z.writestr("x.npy", buf.getvalue())
        z.writestr("y.npy", _npy_header((10**9,), "<i8") + bytes(8))
    msg = _one_line_error(lambda: load_dataset(f))
    assert "y" in msg and ("1000000000 labels" in msg or "declares" in msg)


# --------------------------------------------------------------------------- IDX bombs


def test_idx_header_1e9_samples_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """IDX headers claiming 10^9 images, plain and gzip: one line, exit 2, nothing
    allocated; through the CLI too."""
    head = struct.pack(">HBB3I", 0, 8, 3, 10**9, 28, 28)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train-images-idx3-ubyte").write_bytes(head + bytes(1000))
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    (zipped / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + bytes(1000)))
    for folder in (plain, zipped):
        for k in (None, 7):
            peak = _peak_bytes(lambda folder=folder, k=k: _one_line_error(
                lambda: load_dataset(folder, need_labels=False, max_samples=k)))
            assert peak < 4 * MB
    msg = _one_line_error(lambda: load_dataset(zipped, need_labels=False))
    assert "1032:1" in msg and "784000000000" in msg
    model = tmp_path / "model.pt"
    model.write_bytes(b"not read: the data fails first")
    res = run_cli(capsys, "scan", str(model), "--data", str(zipped), "--out",
                  str(tmp_path / "out"), "--max-samples", "10")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0] and "IDX" in lines[0]


def test_idx_gzip_bomb_streams_selected_rows(tmp_path: Path) -> None:
    """A gzip IDX of 39 MB of images: 10 samples within a few MB; all of it refused by a
    small budget, from the header."""
    folder = _gzip_idx(tmp_path / "bomb", 50_000)
    ds: list[ImageDataset] = []
    peak = _peak_bytes(lambda: ds.append(load_dataset(folder, need_labels=False,
                                                      max_samples=10, seed=1)))
    assert len(ds[0]) == 10
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MB"
    msg = _one_line_error(lambda: load_dataset(folder, need_labels=False, max_bytes=8 * MB))
    assert "data budget" in msg and "50,000" in msg


def test_idx_trailing_gzip_bytes_bounded(tmp_path: Path) -> None:
    """Bytes after the declared payload are reported, not decompressed into memory."""
    x = np.zeros((4, 5, 5), np.uint8)
    raw = idx_io.encode_idx(x) + bytes(30 * MB)
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    holder: list[str] = []
    peak = _peak_bytes(lambda: holder.append(_one_line_error(
        lambda: load_dataset(folder, need_labels=False))))
    assert "trailing bytes" in holder[0]
    assert peak < 8 * MB


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint64, np.float32])
def test_label_1e12_message(tmp_path: Path, dtype: type) -> None:
    """A label of 10^12 is named as an out-of-range class index with its position (it used
    to load, and training then failed blaming the input shape)."""
    y = (np.arange(6) % 2).astype(dtype)
    y[3] = dtype(1e12)
    f = tmp_path / "d.npz"
    np.savez(f, x=np.zeros((6, 1, 4, 4), np.uint8), y=y)
    msg = _one_line_error(lambda: load_dataset(f))
    shown = "999999995904" if dtype is np.float32 else "1000000000000"  # float32 rounds
    assert f"label {shown} at index 3 is out of range" in msg
    assert str(MAX_CLASS_INDEX) in msg


def test_label_1e20_float_not_reported_as_negative(tmp_path: Path) -> None:
    """A float label beyond int64 was cast to a negative number and blamed as '< 0'."""
    f = tmp_path / "d.npz"
    np.savez(f, x=np.zeros((3, 1, 4, 4), np.uint8), y=np.array([0.0, 1e20, 1.0]))
    msg = _one_line_error(lambda: load_dataset(f))
    assert "out of range" in msg and "index 1" in msg and "-9223" not in msg


def test_dataset_refuses_huge_labels_in_memory() -> None:
    with pytest.raises(DataError, match="out of range"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, MAX_CLASS_INDEX + 1]))
    ImageDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, MAX_CLASS_INDEX]))


# --------------------------------------------------------------------------- selection


def _write_specs(tmp: Path) -> dict[str, str]:
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(57, 1, 6, 5), dtype=np.uint8)
    y = (np.arange(57) % 4).astype(np.int64)
    npz = tmp / "d.npz"
    np.savez(npz, x=x, y=y)
    fortran = tmp / "f.npz"
    np.savez(fortran, x=np.asfortranarray(x[:, 0].astype(np.float32) / 255), y=y)
    idx_dir = tmp / "idx"
    idx_dir.mkdir()
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(idx_io.encode_idx(x[:, 0],
                                                                           compress=True))
    (idx_dir / "train-labels-idx1-ubyte").write_bytes(idx_io.encode_idx(y.astype(np.uint8)))
    folder = tmp / "imgs"
    for i in range(23):
        d = folder / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0]).save(d / f"{i:03d}.png")
    return {"npz": str(npz), "fortran": str(fortran), "idx": str(idx_dir),
            "folder": str(folder), "digits": "digits:test"}


@pytest.mark.parametrize("kind", ["npz", "fortran", "idx", "folder", "digits"])
def test_subsample_before_convert_same_selection(tmp_path: Path, kind: str) -> None:
    """Loading with max_samples/seed gives exactly the samples subsample() picks from the
    whole data set, in the same order (so --max-samples verdicts do not change)."""
    spec = _write_specs(tmp_path)[kind]
    full = load_dataset(spec)
    for k, seed in ((5, 0), (11, 7), (len(full) - 1, 3), (len(full), 0), (10_000, 2)):
        want = subsample(full, k, seed)
        got = load_dataset(spec, max_samples=k, seed=seed)
        assert torch.equal(got.x, want.x) and got.y is not None and want.y is not None
        assert torch.equal(got.y, want.y)
        assert got.sha256 == full.sha256 and got.format == full.format


def test_select_rows_is_the_historic_permutation() -> None:
    for n, k, seed in ((100, 7, 0), (1000, 200, 42), (5, 5, 1)):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        want = perm[:k].sort().values.numpy() if n > k else None
        got = select_rows(n, k, seed)
        assert (got is None and want is None) or np.array_equal(got, want)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_max_samples_below_one_refused(bad: object) -> None:
    """The loader itself refuses max_samples < 1 (-1 once meant 'all but one')."""
    msg = _one_line_error(lambda: load_dataset("digits", max_samples=bad),  # type: ignore[arg-type]
                          ParameterError)
    assert "max_samples" in msg and ">= 1" in msg
    with pytest.raises(ParameterError, match="max_samples"):
        subsample(load_dataset("digits:test"), bad, 0)  # type: ignore[arg-type]


def test_load_inputs_passes_the_selection_to_the_loader(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake(spec: str, **kw: object) -> ImageDataset:
        seen.update(kw)
        raise DataError("stop")

    monkeypatch.setattr("trojanscan.io.data.load_dataset", fake)
    model = tmp_path / "m.pt"
    model.write_bytes(b"")
    with pytest.raises(DataError, match="stop"):
        load_inputs(model, "digits", arch=None, trust_pickle=False, device="cpu",
                    max_samples=9, seed=4)
    assert seen["max_samples"] == 9 and seen["seed"] == 4


# --------------------------------------------------------------------------- budget


def test_budget_default_env_and_keyword(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                        ) -> None:
    monkeypatch.delenv(MAX_DATA_ENV, raising=False)
    assert resolve_budget() == DEFAULT_MAX_DATA_BYTES == 4 << 30
    monkeypatch.setenv(MAX_DATA_ENV, "512M")
    assert resolve_budget() == 512 * MB
    monkeypatch.setenv(MAX_DATA_ENV, "1000")
    assert resolve_budget() == 1000
    assert resolve_budget(5000) == 5000
    f = tmp_path / "d.npz"
    np.savez(f, x=np.zeros((10, 1, 8, 8), np.uint8), y=np.zeros(10, np.int64))
    assert "data budget of 1000 B" in _one_line_error(lambda: load_dataset(f))
    assert len(load_dataset(f, max_bytes=10_000)) == 10
    for bad in ("lots", "-5", "0", "1.5Q"):
        monkeypatch.setenv(MAX_DATA_ENV, bad)
        msg = _one_line_error(lambda: load_dataset(f), ParameterError)
        assert MAX_DATA_ENV in msg
    with pytest.raises(ParameterError, match="max_bytes"):
        load_dataset(f, max_bytes=0)


def test_image_folder_budget_and_declared_size(tmp_path: Path) -> None:
    """Image folders: count × decoded size against the budget; a later image's declared
    size is compared before it is decoded."""
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a" / f"{i}.png")
    msg = _one_line_error(lambda: load_dataset(folder, max_bytes=4 * 8 * 8 * 4 - 1))
    assert "4 of its 4 images" in msg and "data budget" in msg
    assert len(load_dataset(folder, max_bytes=4 * 8 * 8 * 4)) == 4
    Image.fromarray(np.zeros((3000, 3000), np.uint8)).save(folder / "a" / "9.png")
    msg = _one_line_error(lambda: load_dataset(folder))
    assert "9.png" in msg and "3000×3000" in msg and "same size" in msg
    msg = _one_line_error(lambda: load_dataset(folder, max_bytes=1 * MB))
    assert "3000×3000" in msg
