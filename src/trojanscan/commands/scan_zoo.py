"""``trojanscan scan-zoo``: scan every model of a folder or manifest, on Ray, resumably.

Each model is scanned as ``trojanscan scan`` would (same detectors, settings and seed,
hence the same report) and its report written atomically to ``OUT/models/<name>/``
together with ``zoo-row.json`` (its resume key and zoo row). The resume key hashes the
model file's bytes, its ``--arch``, the clean data's hash and every scan setting, so a
rerun keeps a report only when all of them match; a changed model file (or setting) is
scanned again, and models that failed are tried again. ``OUT/zoo.json``, ``zoo.csv`` and
``zoo.html`` are rewritten at the end (:mod:`trojanscan.fleet.summary`).

Exit code: 2 when every model failed (or on bad input, before any work), 1 when any
model was flagged, else 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..exceptions import ParameterError, bad_param
from ..fleet.sources import ZooEntry, discover, read_labels, source_root
from ..fleet.summary import summarise, write_outputs, zoo_document
from ..fleet.worker import Job, Outcome, Shared
from ..io.outputs import Input, Output, check_outputs, sidecar_of
from ..utils import atomic_write_text, sha256_file

#: what OUT receives
ZOO_FILES = ("zoo.json", "zoo.csv", "zoo.html", "models/")
ROW_FILE = "zoo-row.json"


def settings_hash(shared: Shared) -> str:
    """Hash of everything besides the model that shapes a model's report."""
    from .._version import __version__

    def plain(v: Any) -> Any:
        if hasattr(v, "tolist"):
            return plain(v.tolist())
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in sorted(v.items())}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)

    doc = {"version": __version__, "clean": shared.clean.sha256, "data": shared.data,
           "detectors": shared.detectors, "seed": shared.seed, "device": shared.device,
           "trust_pickle": shared.trust_pickle, "max_samples": shared.max_samples,
           "params": plain(shared.detector_params), "nc_reference": shared.nc_reference}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def resume_key(settings: str, model_sha: str, arch: str | None) -> str:
    return hashlib.sha256(f"{settings}\n{model_sha}\n{arch or ''}".encode()).hexdigest()


def _stored_row(folder: Path, key: str) -> dict[str, Any] | None:
    """The zoo row kept in ``folder`` when its key matches and its report is there."""
    try:
        doc = json.loads((folder / ROW_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(doc, dict) or doc.get("key") != key
            or not isinstance(doc.get("row"), dict) or not (folder / "report.json").is_file()):
        return None
    return doc["row"]


def write_model_folder(models: Path, name: str, files: dict[str, bytes],
                       stored: dict[str, Any]) -> None:
    """Write a model's report folder whole: into a hidden folder, then renamed in place
    (a reader or a rerun sees the old folder or the new one, never half of one)."""
    target = models / name
    tmp = models / f".{name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for rel, data in files.items():
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tmp / ROW_FILE, json.dumps(stored, indent=2, allow_nan=False) + "\n")
    old = models / f".{name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _check_numbers(workers: int | None, timeout: float | None) -> None:
    if workers is not None and (isinstance(workers, bool) or workers < 0):
        raise bad_param("--workers", "an integer >= 0 (0: scan in this process, no Ray)",
                        workers)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise bad_param("--model-timeout", "seconds > 0", timeout)


def _shared(*, data: str, detectors: str | None, seed: int, device: str, trust_pickle: bool,
            max_samples: int | None, param: list[str] | None,
            nc_reference: list[Path] | None, threads: int | None) -> Shared:
    """Parse the settings and load what every model's scan shares, once."""
    from .. import detectors as registry
    from ..detectors.neural_cleanse import load_reference
    from ..io.data import load_dataset
    from ..scan import parse_detectors
    from ._common import nc_references, parse_detector_params, subsample

    parse_detectors(detectors, "model")
    refs = nc_references(nc_reference)
    det_params = parse_detector_params(param)
    if refs:
        nc = det_params.setdefault("neural_cleanse", {})
        if "reference" in nc:
            raise ParameterError("give Neural Cleanse's references with --nc-reference or "
                                 "--param neural_cleanse.reference=..., not both")
        mode = nc.get("mode", registry.parameters("neural_cleanse")["mode"])
        nc["reference"] = load_reference(refs, mode)  # read once, shipped as an array
    clean = load_dataset(data, need_labels=True, min_classes=2, max_samples=max_samples,
                         seed=seed)
    clean = subsample(clean, max_samples, seed)
    return Shared(data=data, clean=clean, detectors=detectors, seed=seed, device=device,
                  trust_pickle=trust_pickle, max_samples=max_samples,
                  detector_params=det_params, nc_reference=refs, threads=threads)


def run(*, source: Path, data: str, out: Path, ray_workers: int | None = None,
        address: str | None = None, labels: Path | None = None, detectors: str | None = None,
        param: list[str] | None = None, nc_reference: list[Path] | None = None,
        seed: int = 0, device: str = "auto", arch: str | None = None,
        trust_pickle: bool = False, max_samples: int | None = None,
        model_timeout: float | None = None, resume: bool = True, quiet: bool = False) -> int:
    t_start = time.perf_counter()
    from ..fleet.runner import default_workers, ray_module, run_jobs

    _check_numbers(ray_workers, model_timeout)
    entries = discover(source, arch=arch)
    if labels is not None:
        entries = read_labels(labels, entries, source_root(source))
    check_outputs([Output("--out", Path(out), folder=True, files=ZOO_FILES)],
                  [Input("SOURCE", source), Input("--data", data), Input("--labels", labels),
                   *(Input("--nc-reference", r) for r in nc_reference or []),
                   *(Input("SOURCE model", e.path) for e in entries),
                   *(Input("SOURCE model sidecar", sidecar_of(e.path)) for e in entries)])
    workers = default_workers() if ray_workers is None else ray_workers
    if workers >= 1 or address is not None:
        ray_module()  # the missing extra is a one-line error before any work
    # one torch thread per Ray task: parallelism is across models (measured: two threads
    # per task made tiny models 2.5x slower on a busy 2-core machine); in-process runs
    # keep torch's default, as scan does
    threads: int | None = None if workers == 0 and address is None else 1
    shared = _shared(data=data, detectors=detectors, seed=seed, device=device,
                     trust_pickle=trust_pickle, max_samples=max_samples, param=param,
                     nc_reference=nc_reference, threads=threads)
    settings = settings_hash(shared)
    models_dir = Path(out) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict[str, Any]] = {}
    jobs: list[Job] = []
    by_name: dict[str, ZooEntry] = {}
    for e in entries:
        base = {"name": e.name, "path": e.shown, "arch": e.arch, "label": e.label,
                "report": f"models/{e.name}/report.html"}
        try:
            sha = sha256_file(e.path)
        except OSError as exc:
            rows[e.name] = {**base, "sha256": None, "verdict": "error", "score": None,
                            "error": f"cannot read the model file: {exc.strerror}",
                            "report": None, "seconds": 0.0}
            continue
        key = resume_key(settings, sha, e.arch)
        kept = _stored_row(models_dir / e.name, key) if resume else None
        if kept is not None:
            rows[e.name] = {**kept, **base, "sha256": sha, "resumed": True}
            continue
        rows[e.name] = {**base, "sha256": sha}
        jobs.append(Job(e.name, e.path.name, e.shown, e.arch, key))
        by_name[e.name] = e

    def read(job: Job) -> bytes:
        return by_name[job.name].path.read_bytes()

    def on_outcome(job: Job, outcome: Outcome) -> None:
        row = rows[job.name]
        row.update(seconds=round(outcome.seconds, 3), resumed=False)
        if outcome.error is not None:
            row.update(verdict="error", score=None, error=outcome.error, report=None)
            return
        row.update(outcome.row, error=None)
        write_model_folder(models_dir, job.name, outcome.files,
                           {"key": job.key, "row": {k: v for k, v in row.items()
                                                    if k != "resumed"}})

    ran = run_jobs(jobs, read, shared, workers=workers, address=address,
                   timeout=model_timeout, on_outcome=on_outcome,
                   done=len(entries) - len(jobs)) if jobs else {
        "backend": "none (every report kept)", "workers": 0}
    ordered = [rows[e.name] for e in entries]
    for r in ordered:
        for k, v in (("error", None), ("resumed", False), ("verdict", "error"),
                     ("score", None), ("p_value", None), ("seconds", 0.0)):
            r.setdefault(k, v)
        r.setdefault("suspected_targets", [])
        r.setdefault("detectors", {})
    summary = summarise(ordered, extra={
        **ran, "seconds": round(time.perf_counter() - t_start, 3), "seed": seed,
        "detectors": detectors, "settings_sha256": settings,
        "threshold": "the shipped verdict (scan's fused decision)"})
    path = write_outputs(Path(out), zoo_document(ordered, summary))
    if not quiet:
        _print_summary(summary, ordered, path)
    if summary["failed"] == summary["models"]:
        print(f"error: every model failed ({summary['failed']} of {summary['models']}; "
              f"see {path})", file=sys.stderr)
        return 2
    return 1 if summary["flagged"] else 0


def _print_summary(s: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    print(f"scan-zoo: {s['models']} models: {s['flagged']} flagged, {s['clean']} clean, "
          f"{s['failed']} failed ({s['scanned']} scanned, {s['resumed']} kept from an "
          f"earlier run) in {s['seconds']:.1f} s on {s['backend']} "
          f"({s['workers']} workers)")
    for r in rows:
        if r.get("error"):
            print(f"  failed: {r['name']}: {r['error']}")
        elif r.get("verdict") == "backdoored":
            targets = ",".join(map(str, r.get("suspected_targets") or [])) or "-"
            print(f"  flagged: {r['name']} (score {r['score']:.3f}, targets {targets})")
    if s.get("labelled"):
        c = s["confusion"]
        auc = "n/a (one class only)" if s["auroc"] is None else f"{s['auroc']:.3f}"
        print(f"ground truth ({s['labelled']} labelled): AUROC {auc}; at the shipped "
              f"threshold TP {c['tp']} FP {c['fp']} TN {c['tn']} FN {c['fn']}")
    print(f"zoo: {path}, {path.with_suffix('.csv')}, {path.with_suffix('.html')}")
