"""Property tests: every data loader and the report writer, fed arbitrary input, either
succeed or raise one of trojanscan's own exceptions with a one-line message.

Data: ``.npz`` archives of random dtypes, shapes and labels; valid archives truncated or
with bytes flipped; IDX files with random headers, plain and gzip; image folders with odd
files. Reports: random nested values (NaN, infinities, unicode with lone surrogates, huge
integers, markup) must give strict JSON and HTML that escapes all of it.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import TrojanscanError
from trojanscan.io.data import load_dataset
from trojanscan.report import Report

FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MARK = "<x-evil a='1'>&\"</x-evil>"


@contextmanager
def _tmpdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ts-fuzz-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _outcome(fn: Callable[[], ImageDataset]) -> ImageDataset | None:
    """Run a loader: a valid data set, or our own exception with one non-empty line."""
    try:
        ds = fn()
    except TrojanscanError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        return None
    assert isinstance(ds, ImageDataset)
    assert ds.x.dtype.is_floating_point and ds.x.dim() == 4 and len(ds) >= 1
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    if ds.y is not None:
        assert len(ds.y) == len(ds) and int(ds.y.min()) >= 0
    return ds


# --------------------------------------------------------------------------- npz

DTYPES = ["uint8", "int8", "int16", "uint16", "int64", "uint64", "float16", "float32",
          "float64", ">f4", ">u2", "bool", "complex64", "<U3", "S2", "V4", "M8[s]"]
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@st.composite
def arrays(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, ...]] = shapes) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shp = draw(shape)
    raw = draw(st.binary(min_size=0, max_size=64))
    n = int(np.prod(shp, dtype=np.int64)) * dtype.itemsize
    buf = (raw * (n // max(1, len(raw)) + 1))[:n] if raw else bytes(n)
    arr = np.frombuffer(buf, dtype=np.uint8).view(dtype) if n else np.zeros(0, dtype)
    if dtype.kind == "f" and draw(st.booleans()):
        arr = np.clip(np.nan_to_num(arr.astype(np.float64)), 0, 1).astype(dtype)
    if dtype.kind == "U":
        arr = np.array([draw(st.text(max_size=3))] * (n // dtype.itemsize), dtype=dtype)
    return arr.reshape(shp)


labels = st.one_of(
    arrays(),
    st.lists(st.one_of(st.integers(-3, 12), st.just(10**12), st.just(2**63 - 1)),
             min_size=0, max_size=7).map(lambda v: np.array(v, dtype=np.int64)),
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=0,
             max_size=7).map(lambda v: np.array(v, dtype=np.float64)),
)


@FAST
@given(x=st.one_of(arrays(), arrays(st.tuples(st.integers(1, 6), st.sampled_from([1, 3]),
                                              st.integers(1, 4), st.integers(1, 4)))),
       y=st.one_of(st.none(), labels),
       names=st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=4)),
       compress=st.booleans(), need_labels=st.booleans(),
       max_samples=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 3))
def test_npz_any_arrays(x: np.ndarray, y: np.ndarray | None, names: list[str] | None,
                        compress: bool, need_labels: bool, max_samples: int | None,
                        seed: int) -> None:
    with _tmpdir() as d:
        f = d / "d.npz"
        arrays_: dict[str, np.ndarray] = {"x": x}
        if y is not None:
            arrays_["y"] = y
        if names is not None:
            arrays_["class_names"] = np.array(names, dtype=str) if names else np.zeros(0)
        (np.savez_compressed if compress else np.savez)(f, **arrays_)
        ds = _outcome(lambda: load_dataset(f, need_labels=need_labels,
                                           max_samples=max_samples, seed=seed))
        if ds is not None and max_samples is not None:
            assert len(ds) <= max_samples


def _valid_npz(compress: bool) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    writer = np.savez_compressed if compress else np.savez
    writer(buf, x=rng.integers(0, 256, (12, 1, 6, 6), dtype=np.uint8),
           y=np.arange(12) % 3, class_names=np.array(["a", "b", "c"]))
    return buf.getvalue()


VALID_NPZ = {False: _valid_npz(False), True: _valid_npz(True)}


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "set32"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "cut":
            del data[pos:]
        elif op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "set32" and pos + 4 <= len(data):
            value = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 10**9]))
            struct.pack_into("<I", data, pos, value)
    return bytes(data)


@FAST
@given(data=st.data(), compress=st.booleans(), max_samples=st.one_of(st.none(), st.just(4)))
def test_npz_truncated_or_corrupted(data: st.DataObject, compress: bool,
                                    max_samples: int | None) -> None:
    blob = data.draw(mutated(VALID_NPZ[compress]))
    with _tmpdir() as d:
        f = d / "d.npz"
        f.write_bytes(blob)
        _outcome(lambda: load_dataset(f, max_samples=max_samples))


@pytest.mark.filterwarnings("ignore:Duplicate name")
@FAST
@given(members=st.lists(st.tuples(st.sampled_from(["x.npy", "y.npy", "x", "class_names.npy",
                                                   "other"]),
                                  st.binary(max_size=200)), max_size=4),
       method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                               zipfile.ZIP_LZMA]))
def test_npz_members_with_random_bytes(members: list[tuple[str, bytes]], method: int) -> None:
    with _tmpdir() as d:
        f = d / "d.npz"
        with zipfile.ZipFile(f, "w", compression=method) as z:
            for name, payload in members:
                z.writestr(name, payload)
        _outcome(lambda: load_dataset(f, need_labels=False))


# --------------------------------------------------------------------------- IDX


@st.composite
def idx_files(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x07]))
    ndim = draw(st.integers(0, 9))
    dims = [draw(st.one_of(st.integers(0, 6), st.just(10**9), st.just(2**32 - 1)))
            for _ in range(ndim)]
    zero = draw(st.sampled_from([0, 0, 0, 1]))
    head = struct.pack(">HBB", zero, code, ndim) + struct.pack(f">{ndim}I", *dims)
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    exact = min(int(np.prod(dims, dtype=object)) * itemsize, 4096)
    n = draw(st.one_of(st.just(exact), st.integers(0, 300)))
    cut = draw(st.one_of(st.none(), st.integers(0, len(head))))
    body = head[:cut] if cut is not None else head + draw(st.binary(min_size=n, max_size=n))
    return body


@FAST
@given(images=idx_files(), labels=st.one_of(st.none(), idx_files()), gz=st.booleans(),
       gz_labels=st.booleans(), need_labels=st.booleans(),
       max_samples=st.one_of(st.none(), st.integers(1, 5)))
def test_idx_random_headers(images: bytes, labels: bytes | None, gz: bool, gz_labels: bool,
                            need_labels: bool, max_samples: int | None) -> None:
    with _tmpdir() as d:
        name = "train-images-idx3-ubyte" + (".gz" if gz else "")
        (d / name).write_bytes(gzip.compress(images, mtime=0) if gz else images)
        if labels is not None:
            lname = "train-labels-idx1-ubyte" + (".gz" if gz_labels else "")
            (d / lname).write_bytes(gzip.compress(labels, mtime=0) if gz_labels else labels)
        _outcome(lambda: load_dataset(d, need_labels=need_labels, max_samples=max_samples))
        _outcome(lambda: load_dataset(d / name, need_labels=need_labels))


@FAST
@given(data=st.data())
def test_idx_gzip_corrupted(data: st.DataObject) -> None:
    rng = np.random.default_rng(1)
    from trojanscan.io import idx as idx_io

    base = idx_io.encode_idx(rng.integers(0, 256, (9, 4, 4), dtype=np.uint8), compress=True)
    blob = data.draw(mutated(base))
    with _tmpdir() as d:
        (d / "t10k-images-idx3-ubyte.gz").write_bytes(blob)
        _outcome(lambda: load_dataset(d, need_labels=False, max_samples=3))


# --------------------------------------------------------------------------- image folders


@st.composite
def image_files(draw: st.DrawFn) -> tuple[str, bytes]:
    ext = draw(st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".tif", ".webp", ".txt",
                                ".PNG", ""]))
    stem = draw(st.sampled_from(["a", "b", ".hidden", "sub/c", "sub/.h/d", "Z"]))
    kind = draw(st.sampled_from(["image", "image", "garbage", "empty", "truncated"]))
    if kind == "garbage":
        return stem + ext, draw(st.binary(max_size=64))
    if kind == "empty":
        return stem + ext, b""
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16", "I", "F", "CMYK",
                                 "LA"]))
    w, h = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    fmt = draw(st.sampled_from(["PNG", "TIFF", "BMP", "GIF"]))
    try:
        img = Image.new(mode, (w, h), color=draw(st.integers(0, 255)) if mode in
                        ("L", "P", "1", "I", "F", "I;16") else None)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        Image.new("L", (w, h)).save(buf, format="PNG")
    blob = buf.getvalue()
    if kind == "truncated":
        blob = blob[:draw(st.integers(0, max(0, len(blob) - 1)))]
    return stem + ext, blob


@FAST
@given(files=st.lists(st.tuples(st.sampled_from(["", "cat/", "dog/", ".git/", "cat/deep/"]),
                                image_files()), max_size=6),
       empty_dirs=st.lists(st.sampled_from(["bird", ".cache", "cat"]), max_size=2),
       max_samples=st.one_of(st.none(), st.integers(1, 3)), need_labels=st.booleans())
def test_image_folders_with_odd_files(files: list[tuple[str, tuple[str, bytes]]],
                                      empty_dirs: list[str], max_samples: int | None,
                                      need_labels: bool) -> None:
    with _tmpdir() as root:
        d = root / "data"
        d.mkdir()
        for sub in empty_dirs:
            (d / sub).mkdir(exist_ok=True)
        for folder, (name, blob) in files:
            p = d / folder / name
            if p.name in ("", ".") or p.is_dir():
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.parent.is_dir():
                continue
            p.write_bytes(blob)
        _outcome(lambda: load_dataset(d, need_labels=need_labels, max_samples=max_samples))


# --------------------------------------------------------------------------- reports

leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(10**400), st.just(-(2**200)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(), st.just(MARK), st.just("\ud800 lone \udcff surrogates"),
    st.sampled_from([np.float32("nan"), np.float64("inf"), np.int64(-5), np.bool_(True),
                     np.float16(2.5), np.uint64(2**64 - 1)]),
    st.builds(lambda v: np.array(v), st.lists(st.floats(allow_nan=True), max_size=3)),
    st.builds(lambda s: Path(s), st.text(max_size=5)),
    st.builds(lambda b: b, st.binary(max_size=4)),
    st.frozensets(st.integers(0, 3), max_size=3),
)
values = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(), st.just(MARK)), inner,
                    max_size=4)), max_leaves=12)


def _strict_json(text: str) -> Any:
    def bad(const: str) -> None:
        raise AssertionError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=bad)


def _no_lone_surrogates(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_lone_surrogates(k)
            _no_lone_surrogates(v)
    elif isinstance(value, list):
        for v in value:
            _no_lone_surrogates(v)
    elif isinstance(value, float):
        assert math.isfinite(value)


@FAST
@given(params=st.dictionaries(st.text(max_size=8), values, max_size=4),
       top=st.dictionaries(st.sampled_from(["verdict", "score", "suspected_targets",
                                            "num_samples", "threshold", "frr", "extra",
                                            MARK]), values, max_size=4),
       detectors=st.dictionaries(st.text(max_size=6), st.one_of(
           values, st.fixed_dictionaries({}, optional={
               "verdict": values, "score": values, "seconds": values, "warnings": values,
               "reason": values, "suspected_targets": values, "num_flagged": values}))),
       path=st.text(max_size=10), command=st.text(max_size=8))
def test_report_writer_any_values(params: dict[str, Any], top: dict[str, Any],
                                  detectors: dict[str, Any], path: str, command: str) -> None:
    with _tmpdir() as d:
        rep = Report(command=command, out_dir=d / "out", seed=0, params=params)
        rep.add_input(role="data" + MARK, path=path + MARK, sha256=None, format=MARK)
        rep.set(**{k: v for k, v in top.items()})
        for name, det in detectors.items():
            rep.add_detector(name, det)
        json_path = rep.write(1.5)
        raw = json_path.read_bytes()
        doc = _strict_json(raw.decode("utf-8"))
        _no_lone_surrogates(doc)
        assert doc["schema_version"] == 1 and doc["command"] == command.encode(
            "utf-8", "backslashreplace").decode("utf-8")
        page = (d / "out" / "report.html").read_bytes().decode("utf-8")
        assert "<x-evil" not in page
        assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>")


def test_report_json_is_strict_for_numpy_nan_and_paths(tmp_path: Path) -> None:
    """A NumPy NaN/inf, a Path, a set and bytes in a report used to make json.dumps raise
    (ValueError / TypeError), ending as an internal error after the work was done."""
    rep = Report(command="scan", out_dir=tmp_path / "out",
                 params={"p": Path("/x"), "s": {3, 1}, "b": b"\x00\xff"})
    rep.set(verdict="clean", score=np.float32("nan"), threshold=np.float64("-inf"))
    doc = _strict_json(rep.write().read_text(encoding="utf-8"))
    assert doc["score"] is None and doc["threshold"] == -1e308
    assert doc["params"]["p"] == "/x" and doc["params"]["s"] == [1, 3]


def test_report_lone_surrogate_path_is_written(tmp_path: Path) -> None:
    """A file name with non-UTF-8 bytes (a lone surrogate in Python) used to make writing
    the report fail with UnicodeEncodeError."""
    rep = Report(command="scan", out_dir=tmp_path / "out")
    rep.add_input(role="data", path="/data/\udcff.npz", sha256=None, format="npz")
    rep.set(verdict="clean")
    rep.add_section("Inputs \udcff", "<p>ok</p>")
    doc = _strict_json(rep.write().read_text(encoding="utf-8"))
    assert doc["inputs"][0]["path"] == "/data/\\udcff.npz"
    assert "\\udcff.npz" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("det", [
    {"verdict": ["backdoored"], "score": 1},
    {"verdict": "clean", "score": 10**400, "seconds": 10**400},
    {"verdict": "clean", "warnings": [1, None, MARK]},
    {"verdict": {"a": 1}, "reason": ["x"], "suspected_targets": {"k": MARK}},
])
def test_report_html_odd_detector_entries(tmp_path: Path, det: dict[str, Any]) -> None:
    """Detector entries of unexpected types (a list verdict, a huge integer score,
    non-string warnings) used to crash the HTML table with TypeError/OverflowError."""
    rep = Report(command="scan", out_dir=tmp_path / "out")
    rep.set(verdict=det.get("verdict"))
    rep.add_detector("odd", det)
    rep.write()
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "<x-evil" not in page and "odd" in page


def test_member_names_with_control_characters_stay_on_one_line(tmp_path: Path) -> None:
    """Found by fuzzing: an archive member named with a line break or an escape sequence was
    echoed raw, splitting the one-line error (and reaching the terminal unescaped)."""
    f = tmp_path / "d.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("evil\n\x1b[31mname", b"")
    with pytest.raises(TrojanscanError) as info:
        load_dataset(f)
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "evil\\n\\x1b[31mname" in msg


def test_file_names_with_line_breaks_stay_on_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    (folder / "cls").mkdir(parents=True)
    (folder / "cls" / "bad\nname.png").write_bytes(b"not a png")
    with pytest.raises(TrojanscanError) as info:
        load_dataset(folder)
    assert "\n" not in str(info.value) and "bad\\nname.png" in str(info.value)


@pytest.mark.parametrize("header", [
    b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3",
    b"{'descr': '|u1', 'fortran_order': False, 'shape': " + b"(" * 3000,
])
def test_npy_header_that_does_not_tokenize(tmp_path: Path, header: bytes) -> None:
    """Found by fuzzing: an .npy header with an unclosed bracket made numpy's header parser
    raise tokenize.TokenError, which escaped as an internal error (np.load did the same)."""
    header = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    blob = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
    f = tmp_path / "d.npz"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("x.npy", blob)
    with pytest.raises(TrojanscanError) as info:
        load_dataset(f, need_labels=False)
    assert "'x'" in str(info.value) and "\n" not in str(info.value)
