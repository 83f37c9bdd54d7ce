"""Build the wild zoo: ``python -m benchmarks.wild.build [--pairs N] [--workers W] [--quick]``.

Pairs are built in parallel on Ray (a local cluster of ``--workers`` CPUs by default, or
``--address``), one torch thread per worker, or in this process with ``--backend serial``.
Finished models are skipped, so rerunning a killed build resumes it. Results go to the
cache folder (default ``benchmarks/.cache/wild/<name>``, outside git): ``models/`` (TorchScript
+ JSON sidecar), ``failures/`` (pairs whose backdoor never took), ``manifest.jsonl`` (one
line per pair as it finishes) and ``manifest.json`` (the whole zoo, written at the end)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import zoo

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "wild"


def _pair_task(spec: dict[str, Any], cache: str, threads: int,
               max_steps: int | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return zoo.build_pair(spec, Path(cache), max_steps=max_steps)


def _order(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out pairs first (they are scored first), then by index."""
    return sorted(specs, key=lambda s: (s["split"] != "heldout", s["index"]))


def run_serial(specs: Iterable[dict[str, Any]], cache: Path, threads: int = 1,
               max_steps: int | None = None) -> Iterable[dict[str, Any]]:
    for spec in specs:
        yield _pair_task(spec, str(cache), threads, max_steps)


def run_ray(specs: list[dict[str, Any]], cache: Path, workers: int, address: str | None,
            max_steps: int | None = None) -> Iterable[dict[str, Any]]:
    import ray

    started = False
    # Ray runs its workers at niceness 15 unless told otherwise: on a shared machine the
    # build would then get only the CPU nobody else wants
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        # one CPU per task: Ray also sets OMP_NUM_THREADS=1 in its workers
        task = ray.remote(num_cpus=1)(_pair_task)
        pending = [task.remote(s, str(cache), 1, max_steps) for s in specs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()


def build(specs: list[dict[str, Any]], cache: Path, *, backend: str = "ray", workers: int = 2,
          address: str | None = None, max_steps: int | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build every pair of ``specs`` into ``cache``; returns the build summary."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    specs = _order(specs)
    t0 = time.perf_counter()
    records = []
    runner = (run_serial(specs, cache, 1, max_steps) if backend == "serial"
              else run_ray(specs, cache, workers, address, max_steps))
    with open(cache / "manifest.jsonl", "a") as jl:
        for rec in runner:
            records.append(rec)
            jl.write(json.dumps(rec) + "\n")
            jl.flush()
            if log:
                log(f"[{len(records)}/{len(specs)}] {rec['pair']}: trained {rec['trained']} "
                    f"skipped {rec['skipped']}{' FAILED' if rec['failed'] else ''} "
                    f"({rec['wall_s']:.0f} s)")
    wall = time.perf_counter() - t0
    summary = {
        "pairs": len(specs), "backend": backend, "workers": workers,
        "wall_s": round(wall, 2),
        "cpu_s_this_run": round(sum(r["cpu_s"] for r in records), 2),
        "trained": sum(len(r["trained"]) for r in records),
        "skipped": sum(len(r["skipped"]) for r in records),
        "failed_pairs": sorted(r["pair"] for r in records if r["failed"]),
    }
    write_manifest(cache, specs, summary)
    return summary


def _brief(side: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "model_file", "pair", "partner", "split", "backdoored", "families",
            "heldout_axes", "targets", "sources", "clean_acc", "asr", "seed", "tries")
    out = {k: side[k] for k in keep}
    if side["attack"]:
        out["poison_rate"] = side["attack"]["poison_rate"]
        out["n_poison"] = side["attack"]["n_poison"]
    out["epochs"] = side["recipe"]["epochs"]
    out["subset"] = side["recipe"]["subset"]
    return out


def write_manifest(cache: Path, specs: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """``manifest.json``: every model (brief), every failure, counts and build CPU time."""
    sides = zoo.load_sidecars(cache)
    wanted = {zoo.pair_name(s) for s in specs}
    sides = [s for s in sides if s["pair"] in wanted]
    fails = [json.loads(p.read_text()) for p in sorted((cache / "failures").glob("*.json"))
             if p.stem in wanted]
    timings = [json.loads(p.read_text()) for p in sorted((cache / "timings").glob("*.json"))
               if p.stem in wanted]
    counts: dict[str, Any] = {
        "models": len(sides),
        "backdoored": sum(s["backdoored"] for s in sides),
        "clean": sum(not s["backdoored"] for s in sides),
        "by_split": dict(Counter(f"{s['split']}/{s['role']}" for s in sides)),
    }
    for axis in ("arch", "recipe", "pair_trigger"):
        counts[f"by_{axis}"] = dict(Counter(f"{s['split']}/{s['families'][axis]}"
                                            for s in sides if s["backdoored"]))
    manifest = {
        "schema": zoo.SCHEMA, "summary": summary, "counts": counts,
        "build_cpu_s_total": round(sum(t["cpu_s"] for t in timings), 2),
        "asr_failures": [{"pair": f["pair"], "kind": f["spec"]["attack"]["kind"],
                          "split": f["spec"]["split"], "tries": f["tries"]} for f in fails],
        "models": [_brief(s) for s in sides],
    }
    path = cache / "manifest.json"
    zoo.write_json(path, manifest)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=92, help="backdoored/clean pairs to draw")
    ap.add_argument("--seed", type=int, default=0, help="the zoo's master seed")
    ap.add_argument("--heldout-fraction", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="a small, fast zoo for CI-size runs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", choices=("ray", "serial"), default="ray")
    ap.add_argument("--address", default=None, help="a Ray cluster (default: start locally)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="output folder (default benchmarks/.cache/wild/<seed>[-quick])")
    ap.add_argument("--only", default=None, help="build only these pair indices (a,b,c)")
    ap.add_argument("--manifest-only", action="store_true",
                    help="write manifest.json from what the cache holds now; build nothing")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.workers < 1 or not 0 <= args.heldout_fraction <= 1:
        print("error: --pairs and --workers must be >= 1, --heldout-fraction in [0, 1]",
              file=sys.stderr)
        return 2
    cache = args.cache or DEFAULT_CACHE / f"seed{args.seed}{'-quick' if args.quick else ''}"
    specs = zoo.draw_zoo(args.seed, args.pairs, args.heldout_fraction, args.quick)
    if args.only:
        keep = {int(i) for i in args.only.split(",")}
        specs = [s for s in specs if s["index"] in keep]
    if args.manifest_only:
        print(f"manifest: {write_manifest(cache, specs, {'pairs': len(specs), 'partial': True})}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = build(specs, cache, backend=args.backend, workers=args.workers,
                    address=args.address, log=lambda m: print(m, flush=True))
    print(json.dumps(summary, indent=1))
    print(f"manifest: {cache / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
