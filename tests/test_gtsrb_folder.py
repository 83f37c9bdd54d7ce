"""GTSRB-style folders: class folders of PPM images of different sizes, with CSV files beside."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._cli import run_cli
from trojanscan.exceptions import DataError
from trojanscan.io.data import load_dataset


def _ppm(path: Path, w: int, h: int, colour: tuple[int, int, int]) -> np.ndarray:
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = colour
    arr[0, 0] = (255 - colour[0], 0, 0)  # not constant, so a lossless read is checked
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PPM")
    return arr


def _gtsrb(root: Path, sizes: list[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """Three classes (00000, 00001, 00002), one colour each, a GT-*.csv in every folder."""
    out = []
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for k, colour in enumerate(colours):
        folder = root / f"{k:05d}"
        for j, (w, h) in enumerate(sizes):
            arr = _ppm(folder / f"{j:05d}_{j:05d}.ppm", w, h, colour)
            out.append((k, arr))
        (folder / f"GT-{k:05d}.csv").write_text(
            "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
    return out


def test_ppm_folder_same_size_loads_exactly(tmp_path: Path) -> None:
    written = _gtsrb(tmp_path, [(6, 5), (6, 5)])
    ds = load_dataset(tmp_path, min_classes=3)
    assert ds.format == "image-folder" and ds.class_names == ("00000", "00001", "00002")
    assert ds.labels().tolist() == [k for k, _ in written]
    want = torch.stack([torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) / 255)
                        for _, a in written])
    assert torch.equal(ds.x, want)


def test_mixed_sizes_error_names_sizes_and_fix(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _gtsrb(tmp_path, [(31, 29), (45, 50), (31, 29), (120, 97)])
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path)
    msg = str(info.value)
    assert "3 different sizes from 31×29 to 120×97" in msg
    assert f"{tmp_path}:31x29" in msg and "same size" in msg
    res = run_cli(capsys, "train", "--dataset", str(tmp_path), "--out",
                  str(tmp_path.parent / "gtsrb_model.pt"), "--quiet")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1
    assert "different sizes" in res.err and "x29" in res.err


def test_resize_spec_makes_one_size(tmp_path: Path) -> None:
    written = _gtsrb(tmp_path, [(31, 29), (45, 50), (120, 97)])
    ds = load_dataset(f"{tmp_path}:32x32", min_classes=3)
    assert tuple(ds.x.shape) == (9, 3, 32, 32)
    assert ds.format == "image-folder (resized to 32×32)"
    assert ds.labels().tolist() == [k for k, _ in written]
    # away from the one odd corner pixel, a solid colour stays that colour
    centre = (ds.x[:, :, 8:, 8:] * 255).round().to(torch.int64)
    for i, (_, arr) in enumerate(written):
        want = torch.tensor(arr[-1, -1], dtype=torch.int64)[:, None, None]
        assert torch.equal(centre[i], want.expand_as(centre[i]))
    wide = load_dataset(f"{tmp_path}:40X20")
    assert tuple(ds.x.shape[1:]) == (3, 32, 32) and tuple(wide.x.shape[1:]) == (3, 20, 40)
    with pytest.raises(DataError, match="width and height must be from 1"):
        load_dataset(f"{tmp_path}:0x32")
    with pytest.raises(DataError, match="neither a size WxH"):
        load_dataset(f"{tmp_path}:train")
