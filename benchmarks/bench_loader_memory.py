"""Peak memory of the data loaders on decompression bombs and forged headers, before and after
the bounded loaders.

Cases (files generated in a temporary folder):

* ``npz-bomb``: a ~190 KB ``.npz`` (``savez_compressed``) whose ``x`` is 250,000 × 1×28×28
  uint8 zeros — 196 MB decoded;
* ``idx-gzip-bomb``: a ~0.9 MB gzip IDX images file of 1,200,000 × 28×28 zeros — 941 MB
  decoded (3.8 GB as float32);
* ``npz-claims-1e9`` / ``idx-claims-1e9``: headers claiming 10^9 samples of 28×28 over a few
  bytes of payload.

Each is read with ``--max-samples 200`` semantics and in full, each in a fresh Python process
whose peak RSS (``ru_maxrss`` from ``os.wait4``) is recorded. *Before* is the code of the
commit preceding the bounded loaders (``--before REF``; a ``load_dataset`` without
``max_samples``, followed by the commands' ``subsample``), *after* is the working tree
(``load_dataset(..., max_samples=200)``). The default data budget (4 GiB) applies.

    python benchmarks/bench_loader_memory.py   # table; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "loader_memory.json"

CHILD = r"""
import json, sys, time
mode, spec, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
from trojanscan.exceptions import TrojanscanError
from trojanscan.io.data import load_dataset
import resource
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    if mode == "after" and k > 0:
        ds = load_dataset(spec, need_labels=False, max_samples=k, seed=0)
    else:
        ds = load_dataset(spec, need_labels=False)
        if k > 0:
            from trojanscan.commands._common import subsample
            ds = subsample(ds, k, 0)
    out = {"outcome": "loaded", "detail": "x " + "x".join(map(str, ds.x.shape))}
except TrojanscanError as exc:
    out = {"outcome": "refused", "detail": f"{type(exc).__name__}: {exc}"}
except BaseException as exc:
    out = {"outcome": "crashed", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
out["seconds"] = round(time.perf_counter() - t0, 2)
out["import_rss_mb"] = round(base / 1024, 1)
print(json.dumps(out))
"""


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def make_inputs(folder: Path) -> dict[str, Path]:
    """The four cases' files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    npz = folder / "big.npz"
    x = np.zeros((250_000, 1, 28, 28), np.uint8)
    np.savez_compressed(npz, x=x)
    del x
    files["npz-bomb"] = npz
    idx_dir = folder / "idx_bomb"
    idx_dir.mkdir()
    with gzip.open(idx_dir / "train-images-idx3-ubyte.gz", "wb", compresslevel=9) as f:
        f.write(struct.pack(">HBB3I", 0, 8, 3, 1_200_000, 28, 28))
        chunk = bytes(784 * 10_000)
        for _ in range(120):
            f.write(chunk)
    files["idx-gzip-bomb"] = idx_dir
    claim = folder / "claim.npz"
    with zipfile.ZipFile(claim, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", _npy_header((10**9, 1, 28, 28)) + bytes(1000))
    files["npz-claims-1e9"] = claim
    claim_idx = folder / "idx_claim"
    claim_idx.mkdir()
    (claim_idx / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        struct.pack(">HBB3I", 0, 8, 3, 10**9, 28, 28) + bytes(1000), mtime=0))
    files["idx-claims-1e9"] = claim_idx
    return files


def export_source(ref: str, dest: Path) -> Path:
    """``src/`` of git ``ref`` extracted under ``dest``."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def default_before_ref() -> str:
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H",
                            "--", "src/trojanscan/io/limits.py"], check=True,
                           capture_output=True, text=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def measure(src: Path, mode: str, spec: Path, k: int) -> dict[str, Any]:
    """Run one load in a fresh process; its outcome and peak RSS (``os.wait4``)."""
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("TROJANSCAN_MAX_DATA_BYTES", None)
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(spec), str(k)],
                                env=env, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {
        "outcome": "died", "detail": (stderr.strip().splitlines() or ["?"])[-1][:200]}
    out["exit_code"] = proc.returncode
    out["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=None, help="git ref of the old loaders")
    ap.add_argument("--max-samples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    before_ref = args.before or default_before_ref()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ts-bench-mem-") as tmp:
        tmp_path = Path(tmp)
        files = make_inputs(tmp_path / "data")
        sizes = {name: (p.stat().st_size if p.is_file() else
                        sum(f.stat().st_size for f in p.iterdir())) for name, p in files.items()}
        srcs = {"before": export_source(before_ref, tmp_path / "before"),
                "after": ROOT / "src"}
        for case, spec in files.items():
            for k in (args.max_samples, 0):
                for mode in ("before", "after"):
                    r = measure(srcs[mode], mode, spec, k)
                    r.update(case=case, file_bytes=sizes[case], code=mode,
                             read="all" if k == 0 else f"max_samples={k}")
                    rows.append(r)
                    print(f"{case:15s} {r['read']:16s} {mode:6s} peak RSS "
                          f"{r['peak_rss_mb']:8.1f} MB  {r['outcome']:8s} "
                          f"{r['detail'][:90]}", flush=True)
    doc = {"before_ref": before_ref,
           "before_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", before_ref],
                                           capture_output=True, text=True).stdout.strip(),
           "budget": "default (4 GiB)", "machine": platform.platform(),
           "python": platform.python_version(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
