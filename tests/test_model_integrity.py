"""Model integrity and classifier checks: corrupt ZIP members and one-output models are
refused, by the loader, by every command (one line, exit 2) and by the detectors."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests._cli import CliResult, run_cli
from trojanscan import archs
from trojanscan.classifier import MIN_CLASSES, check_logits
from trojanscan.dataset import ImageDataset
from trojanscan.detectors.strip import Strip
from trojanscan.exceptions import (
    IncompatibleError,
    ModelError,
    NotAClassifierError,
)
from trojanscan.guard import Guard
from trojanscan.io import models as model_io
from trojanscan.io.models import check_compatible, detect_format, load_model

pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")
Cap = pytest.CaptureFixture[str]
SHAPE = (1, 8, 8)


def assert_one_line(r: CliResult, *needles: str) -> str:
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2 and len(lines) == 1, (r.code, r.err)
    assert "internal error" not in r.err and "Traceback" not in r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _member_data_offset(path: Path, member: str) -> int:
    """Where the stored bytes of ``member`` start in the ZIP file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                   info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def flip_member_byte(src: Path, dst: Path, member_suffix: str, at: int = 5) -> str:
    """Copy ``src`` to ``dst`` with one byte of a member's data inverted (CRC now wrong)."""
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith(member_suffix))
    raw = bytearray(src.read_bytes())
    raw[_member_data_offset(src, name) + at] ^= 0xFF
    dst.write_bytes(bytes(raw))
    return name


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("integrity")
    torch.manual_seed(0)
    net = archs.build("mlp", SHAPE, 10).eval()
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()
    out = {"ts": d / "m.pt", "sd": d / "sd.pt", "one": d / "one.pt",
           "one_sd": d / "one_sd.pt"}
    torch.jit.save(torch.jit.script(net), str(out["ts"]))
    torch.save(net.state_dict(), out["sd"])
    torch.jit.save(torch.jit.script(one), str(out["one"]))
    return out


# ----------------------------------------------------------------------------- CRC


def test_torchscript_crc_mismatch_refused(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    member = flip_member_byte(files["ts"], bad, "data/0", at=100)
    # torch itself loads it silently with a different weight
    corrupted = torch.jit.load(str(bad)).state_dict()
    intact = torch.jit.load(str(files["ts"])).state_dict()
    assert corrupted.keys() == intact.keys()
    assert not all(torch.equal(corrupted[k], intact[k]) for k in intact)
    with pytest.raises(ModelError, match=rf"model file is corrupt: CRC mismatch in member "
                                         rf"{member}"):
        load_model(bad, device="cpu")
    with pytest.raises(ModelError, match="CRC mismatch"):
        detect_format(bad)
    before = bad.read_bytes()
    load_model(files["ts"], device="cpu")  # the intact file still loads
    assert bad.read_bytes() == before  # and the corrupt one is never touched


@pytest.mark.parametrize("command", ["scan", "scan-data", "filter", "mitigate", "guard"])
def test_torchscript_crc_mismatch_refused_by_every_command(
        capsys: Cap, files: dict[str, Path], tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.pt"
    member = flip_member_byte(files["ts"], bad, "data/2", at=7)
    out = str(tmp_path / "out")
    args = {
        "scan": ["scan", str(bad), "--data", "digits", "--out", out],
        "scan-data": ["scan-data", "digits", "--model", str(bad), "--out", out],
        "filter": ["filter", str(bad), "digits", "--calibrate", "digits", "--out", out],
        "mitigate": ["mitigate", str(bad), "--data", "digits", "--out",
                     str(tmp_path / "r.pt"), "--report", out],
        "guard": ["guard", str(bad), "--calibrate", "digits", "--port", "0"],
    }[command]
    assert_one_line(run_cli(capsys, *args), f"CRC mismatch in member {member}", "bad.pt")
    assert not (tmp_path / "r.pt").exists()


def test_state_dict_zip_crc_mismatch_refused(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "sd_bad.pt"
    member = flip_member_byte(files["sd"], bad, "data/0", at=3)
    with pytest.raises(ModelError, match=f"CRC mismatch in member {member}"):
        load_model(bad, arch="mlp", device="cpu")
    loaded = load_model(files["sd"], arch="mlp", input_shape=SHAPE, num_classes=10,
                        device="cpu")
    assert loaded.format == "state_dict" and loaded.num_classes == 10


def test_corrupt_pickle_member_crc_refused(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "pkl_bad.pt"
    member = flip_member_byte(files["ts"], bad, "data.pkl", at=20)
    with pytest.raises(ModelError, match=f"CRC mismatch in member {member}"):
        load_model(bad, device="cpu")


def test_zip_inflating_beyond_the_bound_refused(files: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A member declaring far more bytes than the file could hold is refused before it
    is inflated (a ZIP bomb); the bound scales with the file's size."""
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(files["ts"]) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("m/extra/zeros", b"\0" * (4 << 20), compress_type=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(model_io, "_ZIP_SLACK", 1 << 20)
    with pytest.raises(ModelError, match="uncompressed"):
        load_model(bomb, device="cpu")
    monkeypatch.setattr(model_io, "_ZIP_SLACK", 256 << 20)
    assert load_model(bomb, device="cpu").format == "torchscript"


def test_truncated_member_is_a_corrupt_model(files: dict[str, Path], tmp_path: Path) -> None:
    raw = files["ts"].read_bytes()
    with zipfile.ZipFile(files["ts"]) as z:
        first = z.infolist()[1]  # not the first: the file must still start like a ZIP
    bad = tmp_path / "hole.pt"
    start = _member_data_offset(files["ts"], first.filename)
    # the central directory still lists the member, but its local header is garbage
    bad.write_bytes(raw[:first.header_offset] + b"\0" * (start - first.header_offset)
                    + raw[start:])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(bad, device="cpu")


# ----------------------------------------------------------------------------- classifiers


def test_check_logits_accepts_classifiers_only() -> None:
    assert MIN_CLASSES == 2
    assert check_logits(torch.zeros(3, 2), 3) == 2
    assert check_logits(torch.zeros(3, 10), 3) == 10
    for bad, match in ((torch.zeros(3, 1), "1 logit per input"),
                       (torch.zeros(3, 0), "0 logits"),
                       (torch.zeros(3), "N×K"), (torch.zeros(2, 4), "N=3"),
                       ((torch.zeros(3, 4),), "tuple"),
                       (torch.tensor([[0.0, float("nan")]] * 3), "NaN")):
        with pytest.raises(NotAClassifierError, match=match) as info:
            check_logits(bad, 3)
        assert isinstance(info.value, ModelError) and isinstance(info.value, IncompatibleError)
    assert check_logits(torch.full((3, 2), float("inf")), 3, finite=False) == 2


def _digits() -> ImageDataset:
    torch.manual_seed(0)
    return ImageDataset(torch.rand(60, *SHAPE), torch.arange(60) % 2, source="tiny")


def test_one_output_model_refused_by_loader_and_check_compatible(files: dict[str, Path]
                                                                 ) -> None:
    with pytest.raises(NotAClassifierError, match="1 logit per input"):
        load_model(files["one"], input_shape=SHAPE, device="cpu")
    loaded = load_model(files["one"], device="cpu")  # shape unknown: nothing run yet
    ds = _digits()
    with pytest.raises(NotAClassifierError, match=r"K >= 2"):
        check_compatible(loaded, ImageDataset(ds.x, None, source="tiny"))


@pytest.mark.parametrize("detector", [Strip])
def test_one_output_model_refused_by_input_detectors(detector: type) -> None:
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()
    with pytest.raises(NotAClassifierError, match="1 logit per input"):
        detector(max_samples=None).fit(one, ImageDataset(_digits().x, None, source="tiny"))


def test_one_output_model_refused_guard_calibrate(capsys: Cap, files: dict[str, Path]
                                                  ) -> None:
    one = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()
    clean = ImageDataset(_digits().x, None, source="tiny")
    with pytest.raises(NotAClassifierError, match="1 logit"):
        Guard.calibrate(one, clean, detector="strip", frr=0.05)
    r = run_cli(capsys, "guard", str(files["one"]), "--calibrate", "digits", "--port", "0")
    assert_one_line(r, "1 logit per input", "K >= 2")


@pytest.mark.parametrize("command", ["filter", "scan", "scan-data", "mitigate"])
def test_one_output_model_refused_filter(capsys: Cap, files: dict[str, Path],
                                         tmp_path: Path, command: str) -> None:
    one, out = str(files["one"]), str(tmp_path / "out")
    args = {
        "filter": ["filter", one, "digits", "--calibrate", "digits", "--out", out],
        "scan": ["scan", one, "--data", "digits", "--out", out],
        "scan-data": ["scan-data", "digits", "--model", one, "--out", out],
        "mitigate": ["mitigate", one, "--data", "digits", "--out", str(tmp_path / "r.pt"),
                     "--report", out],
    }[command]
    assert_one_line(run_cli(capsys, *args), "1 logit per input", "K >= 2")
    assert not (tmp_path / "out" / "report.json").exists()
