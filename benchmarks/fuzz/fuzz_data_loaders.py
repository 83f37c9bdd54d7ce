"""Coverage-guided fuzzing of trojanscan's data loaders with atheris (libFuzzer).

Prerequisite (not a dependency of trojanscan): ``pip install atheris coverage``.

Each input's first byte picks a target, the rest is the file's content:

0 ``.npz`` archive · 1 IDX images file (plain, or gzip when it starts with the gzip magic)
with a valid labels file beside it · 2 IDX images + the same bytes as labels ·
3 an image file in a class sub-folder · 4 an ``.npz`` loaded with ``max_samples``.

The only acceptable outcomes are a valid :class:`~trojanscan.dataset.ImageDataset` or a
:class:`~trojanscan.exceptions.TrojanscanError` with a one-line message. Anything else is a
*finding*: it is recorded (type, place, message, the input) in ``FINDINGS/`` and the run
goes on. The data budget is set to 64 MiB so that a loader that honours it cannot exhaust
memory.

Run for a bounded time (one core)::

    python benchmarks/fuzz/fuzz_data_loaders.py --seconds 600 --out benchmarks/results/fuzz

then ``--replay`` measures line and branch coverage of ``trojanscan/io`` reached by the
corpus (with coverage.py) and writes ``summary.json`` beside it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness
import numpy as np

BUDGET = str(64 << 20)
WORK = Path(tempfile.mkdtemp(prefix="ts-fuzz-"))
FINDINGS = _harness.Findings()


# --------------------------------------------------------------------------- harness


def _write_case(data: bytes) -> tuple[Path, dict[str, Any]]:
    """Lay out the input as files under a fresh folder; return the spec and kwargs."""
    from trojanscan.io import idx as idx_io

    target = data[0] % 5 if data else 0
    body = data[1:]
    case = WORK / "case"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    kwargs: dict[str, Any] = {"need_labels": False}
    if target in (0, 4):
        f = case / "d.npz"
        f.write_bytes(body)
        if target == 4:
            kwargs["max_samples"] = 3
            kwargs["need_labels"] = True
        return f, kwargs
    if target in (1, 2):
        name = "train-images-idx3-ubyte" + (".gz" if body[:2] == b"\x1f\x8b" else "")
        (case / name).write_bytes(body)
        labels = body if target == 2 else idx_io.encode_idx(np.zeros(3, np.uint8))
        (case / "train-labels-idx1-ubyte").write_bytes(labels)
        kwargs["max_samples"] = 2 if target == 2 else None
        kwargs["need_labels"] = True
        return case, kwargs
    (case / "cls").mkdir()
    (case / "cls" / "a.png").write_bytes(body)
    (case / "other").mkdir()
    return case, kwargs


def test_one_input(data: bytes) -> None:
    from trojanscan.dataset import ImageDataset
    from trojanscan.io.data import load_dataset

    spec, kwargs = _write_case(data)
    loaded, ds = _harness.guarded(FINDINGS, data, lambda: load_dataset(spec, **kwargs))
    if not loaded:
        return
    ok = (isinstance(ds, ImageDataset) and ds.x.dim() == 4 and len(ds) >= 1
          and float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0)
    if not ok:
        FINDINGS.record("invalid-dataset", None, data, f"shape {tuple(ds.x.shape)}")


# --------------------------------------------------------------------------- seeds


def seed_corpus(folder: Path) -> None:
    """A few valid inputs of every target, so that mutation starts from real files."""
    from PIL import Image

    from trojanscan.io import idx as idx_io

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    seeds: list[bytes] = []
    for writer in (np.savez, np.savez_compressed):
        for arrays in ({"x": x, "y": np.arange(5) % 2},
                       {"x": x[:, 0].astype(np.float32) / 255, "y": np.arange(5.0) % 2,
                        "class_names": np.array(["a", "b"])},
                       {"x": np.asfortranarray(x[:, 0])}):
            buf = io.BytesIO()
            writer(buf, **arrays)
            seeds += [b"\x00" + buf.getvalue(), b"\x04" + buf.getvalue()]
    for arr in (x[:3, 0], x[:3, 0].astype(np.float32) / 255, x[:3].transpose(0, 2, 3, 1)):
        raw = idx_io.encode_idx(arr)
        seeds += [b"\x01" + raw, b"\x01" + gzip.compress(raw, mtime=0), b"\x02" + raw]
    for mode in ("L", "RGB", "RGBA", "P", "I;16"):
        for fmt in ("PNG", "BMP", "GIF", "TIFF"):
            try:
                buf = io.BytesIO()
                Image.new(mode, (4, 3)).save(buf, format=fmt)
            except (OSError, ValueError, KeyError):
                continue
            seeds.append(b"\x03" + buf.getvalue())
    for s in seeds:
        (folder / hashlib.sha1(s).hexdigest()).write_bytes(s)


# --------------------------------------------------------------------------- driver


def fuzz(out: Path, seconds: int) -> None:
    import atheris

    FINDINGS.folder = out / "findings"
    corpus = out / "corpus"
    with atheris.instrument_imports(include=["trojanscan.io", "trojanscan.dataset"]):
        import trojanscan.dataset
        import trojanscan.io.data
        import trojanscan.io.idx
        import trojanscan.io.images
        import trojanscan.io.limits
        import trojanscan.io.npz
        import trojanscan.io.stream  # noqa: F401
    seed_corpus(corpus)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=20",
            "-rss_limit_mb=3072", "-max_len=65536", "-print_final_stats=1", "-seed=1"]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


def replay(out: Path) -> dict[str, Any]:
    """Run the corpus once under coverage.py; line/branch coverage of trojanscan/io."""
    import trojanscan

    FINDINGS.folder = out / "findings-replay"
    src = Path(trojanscan.__file__).parent
    return _harness.replay(out / "corpus", test_one_input,
                           include=[src / "io" / "*.py", src / "dataset.py"],
                           omit=[src / "io" / "models.py", src / "io" / "onnx_torch.py",
                                 src / "io" / "outputs.py"])


def main() -> None:
    args = _harness.parse_args(__doc__ or "", 600, "benchmarks/results/fuzz")
    os.environ["TROJANSCAN_MAX_DATA_BYTES"] = BUDGET
    if args.child:
        sys.argv = sys.argv[:1]
        fuzz(args.out, args.seconds)
        return
    if not args.replay:
        t0 = time.time()
        log = args.out / "fuzz.log"
        log.write_text("")
        text = _harness.run_child(__file__, args.out, args.seconds, log)
        stats = {k: int(v) for k, v in re.findall(r"stat::(\w+):\s+(\d+)", text)}
        run = {"engine": "atheris (libFuzzer)", "seconds": round(time.time() - t0, 1),
               "executions": stats.get("number_of_executed_units"),
               "execs_per_sec": stats.get("average_exec_per_sec"),
               "peak_rss_mb": stats.get("peak_rss_mb"),
               **_harness.libfuzzer_progress(text)}
        (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        print(json.dumps(run, indent=2))
    _harness.write_summary(args.out, replay(args.out), "trojanscan/io loaders")


if __name__ == "__main__":
    main()
