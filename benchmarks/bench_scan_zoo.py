"""Benchmark ``trojanscan scan-zoo``: 1 vs 2 local Ray workers, kill-and-resume, and
per-model verdicts against ``trojanscan scan``.

The zoo (built by this script, deterministic): ``--models`` untrained ``small_cnn``
digits classifiers (1×8×8 → 10, seed = index; every third has class 0's last bias raised
by 20, which MNTD flags — its label is 1, the others 0), plus ``corrupt.pt`` (a broken
ZIP) and ``wrong_shape.pt`` (a 28×28 model): those two must come out as error rows while
the others finish. Every model is scanned with the same settings (stated in the JSON):
Neural Cleanse (fast mode, ``max_steps`` steps per label, no images) and MNTD (shipped
digits meta-classifier) on 200 clean ``digits`` images, seed 0. The models are untrained:
this measures throughput and bookkeeping, not detection quality.

Phases, in one run of this script:

1. ``--workers 1`` and ``--workers 2`` runs in the order ``--order`` (default 1,2,2,1;
   ``--no-resume``, fresh folders): wall seconds of each ``scan-zoo`` process, Ray
   start-up included; the ratio of the mean seconds per run;
2. kill-halfway: ``--workers 2`` into a fresh folder, SIGKILL of the process group once
   half the models' reports exist, then a rerun: how many were kept and how many scanned
   again (each kept report's ``zoo-row.json`` must be untouched);
3. ``trojanscan scan`` on ``--compare`` models: verdict and scores against their zoo rows.

``os.getloadavg()`` is recorded around each phase: on a shared machine the ratio of
phase 1 means little when other jobs compete for the cores.

Usage::

    python benchmarks/bench_scan_zoo.py                 # 40 models (+2 broken)
    python benchmarks/bench_scan_zoo.py --models 8 --max-steps 1   # a quick look

Writes ``benchmarks/results/scan_zoo.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def build_zoo(folder: Path, n: int) -> Path:
    import torch

    from trojanscan.archs import build

    folder.mkdir(parents=True, exist_ok=True)
    labels = ["path,label"]
    for i in range(n):
        path = folder / f"m{i:03d}.pt"
        biased = i % 3 == 2
        labels.append(f"{path.name},{int(biased)}")
        if path.exists():
            continue
        torch.manual_seed(i)
        m = build("small_cnn", (1, 8, 8), 10).eval()
        if biased:
            last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
            with torch.no_grad():
                last.bias[0] += 20.0
        torch.jit.save(torch.jit.script(m), str(path))
    (folder / "corrupt.pt").write_bytes(b"PK\x03\x04" + b"not a model" * 20)
    if not (folder / "wrong_shape.pt").exists():
        torch.manual_seed(10_000)
        m = build("small_cnn", (1, 28, 28), 10).eval()
        torch.jit.save(torch.jit.script(m), str(folder / "wrong_shape.pt"))
    (folder.parent / "labels.csv").write_text("\n".join(labels) + "\n")
    return folder.parent / "labels.csv"


def settings(max_steps: int) -> list[str]:
    return ["--data", "digits", "--max-samples", "200", "--detectors", "neural_cleanse,mntd",
            "--param", f"neural_cleanse.max_steps={max_steps}",
            "--param", "neural_cleanse.images=false", "--seed", "0"]


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def zoo_cmd(zoo: Path, out: Path, workers: int, labels: Path, args: list[str],
            *extra: str) -> list[str]:
    return [sys.executable, "-m", "trojanscan", "scan-zoo", str(zoo), "--out", str(out),
            "--workers", str(workers), "--labels", str(labels), "--quiet", *args, *extra]


def timed(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def summary(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "zoo.json").read_text())["summary"])


def finished(out: Path) -> list[Path]:
    models = out / "models"
    return sorted(models.glob("*/zoo-row.json")) if models.is_dir() else []


def kill_and_resume(zoo: Path, out: Path, labels: Path, args: list[str], n_ok: int,
                    workers: int) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    target = n_ok // 2
    t0 = time.perf_counter()
    proc = subprocess.Popen(zoo_cmd(zoo, out, workers, labels, args), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(finished(out)) < target and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # our own process group only
    proc.wait()
    killed_after = time.perf_counter() - t0
    time.sleep(1.0)
    kept = {p.parent.name: p.stat().st_mtime_ns for p in finished(out)}
    seconds, rc = timed(zoo_cmd(zoo, out, workers, labels, args))
    s = summary(out)
    untouched = all((out / "models" / name / "zoo-row.json").stat().st_mtime_ns == mtime
                    for name, mtime in kept.items())
    return {"killed_after_seconds": round(killed_after, 1), "reports_at_kill": len(kept),
            "resume_seconds": round(seconds, 1), "resume_exit_code": rc,
            "resumed": s["resumed"], "scanned_again": s["scanned"], "failed": s["failed"],
            "kept_reports_untouched": untouched,
            "rescanned_a_finished_model": s["resumed"] != len(kept)}


def compare_with_scan(zoo: Path, out: Path, names: list[str], args: list[str],
                      work: Path) -> list[dict[str, Any]]:
    rows = {r["name"]: r for r in json.loads((out / "zoo.json").read_text())["models"]}
    res = []
    for name in names:
        rep = work / "scan" / name
        cmd = [sys.executable, "-m", "trojanscan", "scan", str(zoo / name), "--out",
               str(rep), "--quiet", *args]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        doc = json.loads((rep / "report.json").read_text())
        row = rows[name]
        same = (doc["verdict"] == row["verdict"] and doc["score"] == row["score"]
                and doc["suspected_targets"] == row["suspected_targets"]
                and all(doc["detectors"][d]["score"] == row["detectors"][d]["score"]
                        for d in row["detectors"]))
        res.append({"model": name, "scan_verdict": doc["verdict"], "zoo_verdict": row["verdict"],
                    "scan_score": doc["score"], "zoo_score": row["score"], "identical": same})
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--max-steps", type=int, default=20, help="Neural Cleanse steps per label")
    ap.add_argument("--order", default="1,2,2,1",
                    help="worker counts of the timed runs, in order (alternating evens out "
                         "a load that drifts)")
    ap.add_argument("--compare", type=int, default=3, help="models also run through scan")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "scan_zoo")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                    "scan_zoo.json")
    a = ap.parse_args(argv)
    zoo = a.work / "zoo"
    labels = build_zoo(zoo, a.models)
    args = settings(a.max_steps)
    result: dict[str, Any] = {
        "models": a.models + 2, "broken_models": ["corrupt.pt", "wrong_shape.pt"],
        "settings": " ".join(args), "cpus": os.cpu_count(), "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/bench_scan_zoo.py", *(argv or sys.argv[1:])]),
        "load_start": load(), "speedup": {}}
    runs = []
    for i, workers in enumerate(int(w) for w in a.order.split(",")):
        out = a.work / f"w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        before = load()
        seconds, rc = timed(zoo_cmd(zoo, out, workers, labels, args, "--no-resume"))
        s = summary(out)
        model_secs = sorted(r["seconds"] for r in json.loads((out / "zoo.json").read_text())
                            ["models"] if r["error"] is None)
        runs.append({"run": i + 1, "workers": workers, "seconds": round(seconds, 1),
                     "median_model_seconds": model_secs[len(model_secs) // 2],
                     "exit_code": rc, "scanned": s["scanned"], "failed": s["failed"],
                     "flagged": s["flagged"], "auroc": s["auroc"],
                     "scan_seconds_sum": s["scan_seconds"], "load_before": before,
                     "load_after": load()})
    total = {k: sum(r["seconds"] for r in runs if r["workers"] == k) for k in (1, 2)}
    count = {k: sum(1 for r in runs if r["workers"] == k) for k in (1, 2)}
    result["speedup"] = {"runs": runs, "order": a.order,
                         "ratio": round((total[1] / count[1]) / (total[2] / count[2]), 3)}
    result["kill_resume"] = kill_and_resume(zoo, a.work / "killed", labels, args,
                                            a.models, 2)
    result["kill_resume"]["load_after"] = load()
    picks = sorted({"m000.pt", "m002.pt", f"m{a.models - 1:03d}.pt"})[:a.compare]
    result["scan_vs_zoo"] = compare_with_scan(zoo, a.work / "w2", picks, args, a.work)
    result["load_end"] = load()
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    sp, kr = result["speedup"], result["kill_resume"]
    print(f"zoo: {a.models} models + 2 broken; settings: {result['settings']}")
    print("| run | workers | seconds | scanned | failed | flagged | load before → after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in sp["runs"]:
        print(f"| {r['run']} | {r['workers']} | {r['seconds']} | {r['scanned']} | "
              f"{r['failed']} | {r['flagged']} | {r['load_before'][0]} → "
              f"{r['load_after'][0]} |")
    print(f"speed-up 2 vs 1 workers (mean seconds per run): {sp['ratio']}x")
    print(f"kill-halfway: killed after {kr['killed_after_seconds']} s with "
          f"{kr['reports_at_kill']} reports; rerun {kr['resume_seconds']} s: "
          f"{kr['resumed']} kept, {kr['scanned_again']} scanned, {kr['failed']} failed; "
          f"kept reports untouched: {kr['kept_reports_untouched']}")
    for c in result["scan_vs_zoo"]:
        print(f"scan vs zoo {c['model']}: {c['scan_verdict']}/{c['zoo_verdict']} "
              f"identical={c['identical']}")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
