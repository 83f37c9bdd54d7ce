"""Scan one model of a zoo from its bytes: what each Ray task (or the serial backend) runs.

The model arrives as bytes (through Ray's object store, so workers need no shared file
system); it is written to a private temporary folder under its own file name, loaded and
scanned exactly as ``trojanscan scan`` does — :func:`trojanscan.utils.seed_everything`
with the seed, :func:`trojanscan.io.models.load_model` and ``check_compatible`` against
the clean data, :func:`trojanscan.scan.scan_model` with the same detectors and settings,
and :func:`trojanscan.reports.scan.write_scan_report` — so the report is the one
``scan`` writes (timings and creation time aside). The report's files come back as
bytes; the caller writes them. Any failure is returned as the model's error, never
raised: one bad model must not stop a zoo.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dataset import ImageDataset
from ..exceptions import TrojanscanError


@dataclass(frozen=True)
class Job:
    """One model to scan: its report folder ``name``, its file name (kept: ``.onnx`` is
    recognised by it), the path SOURCE gave it, its ``arch`` and its resume key."""

    name: str
    file_name: str
    shown: str
    arch: str | None
    key: str


@dataclass(frozen=True)
class Shared:
    """What every model's scan shares, computed once per zoo and shipped once."""

    data: str                           # --data as the user gave it (for the report)
    clean: ImageDataset
    detectors: str | None
    seed: int
    device: str
    trust_pickle: bool
    max_samples: int | None
    detector_params: dict[str, dict[str, Any]]   # references already loaded (arrays)
    nc_reference: list[str] | None               # their paths, for the report
    threads: int | None = 1


@dataclass
class Outcome:
    """A model's result: the report's files (relative path → bytes) and its zoo row,
    or an error message."""

    name: str
    row: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def _message(exc: BaseException, tmp: Path, shown: str) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.replace(str(tmp), shown)
    if isinstance(exc, TrojanscanError):
        return text
    return f"internal error: {type(exc).__name__}: {text}"


def row_of(result: Any) -> dict[str, Any]:
    """The zoo row's scan fields from a :class:`~trojanscan.scan.ScanResult`."""
    dets: dict[str, Any] = {}
    for name, d in result.detectors_dict().items():
        dets[name] = {"verdict": d.get("verdict"), "score": d.get("score")}
    return {"verdict": result.verdict, "score": float(result.score),
            "p_value": float(result.p_value),
            "suspected_targets": [int(t) for t in result.suspected_targets],
            "detectors": dets}


def scan_one(job: Job, blob: bytes, shared: Shared, tmp_root: str | None = None) -> Outcome:
    """Scan the model ``blob`` as ``trojanscan scan`` would; never raises."""
    import tempfile

    from ..mntd.executor import quiet_progress, torch_threads

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trojanscan-zoo-", dir=tmp_root) as tmp_dir, \
            torch_threads(shared.threads), quiet_progress():
        tmp = Path(tmp_dir)
        model_path = tmp / "model" / job.file_name
        model_path.parent.mkdir()
        model_path.write_bytes(blob)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                files, row = _scan(job, model_path, tmp / "report", shared, t0)
        except Exception as exc:  # one model's failure is its row, not the zoo's
            return Outcome(job.name, error=_message(exc, model_path, job.shown),
                           seconds=time.perf_counter() - t0)
    notes = sorted({" ".join(str(w.message).split()) for w in caught})
    row["warnings"] = notes
    return Outcome(job.name, row=row, files=files, seconds=time.perf_counter() - t0)


def _scan(job: Job, model_path: Path, out: Path, shared: Shared,
          t0: float) -> tuple[dict[str, bytes], dict[str, Any]]:
    from ..io.models import check_compatible, load_model
    from ..reports.scan import write_scan_report
    from ..scan import scan_model
    from ..utils import seed_everything

    seed_everything(shared.seed)
    clean = shared.clean
    loaded = load_model(model_path, arch=job.arch, trust_pickle=shared.trust_pickle,
                        device=shared.device, input_shape=clean.input_shape)
    loaded = check_compatible(loaded, clean)
    det_params = {n: dict(p) for n, p in shared.detector_params.items()}
    result = scan_model(loaded.module, clean, detectors=shared.detectors, seed=shared.seed,
                        device=loaded.device, detector_params=det_params)
    params = {"detectors": shared.detectors, "max_samples": shared.max_samples,
              "device": str(loaded.device), "arch": job.arch,
              "nc_reference": shared.nc_reference, "references": "none",
              "detector_params": {n: q for n, p in shared.detector_params.items()
                                  if (q := {k: v for k, v in p.items() if k != "reference"})}}
    write_scan_report(result, out=out, model_path=Path(job.shown), loaded=loaded,
                      data=shared.data, clean_sha=clean.sha256, clean_format=clean.format,
                      seed=shared.seed, params=params, seconds=time.perf_counter() - t0,
                      class_names=clean.class_names)
    files = {p.relative_to(out).as_posix(): p.read_bytes()
             for p in sorted(out.rglob("*")) if p.is_file()}
    row = row_of(result)
    row["format"] = loaded.format
    return files, row
