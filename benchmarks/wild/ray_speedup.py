"""Ray speed-up of the zoo build: the same pairs built on 1 worker, then on 2, in one run.

``python -m benchmarks.wild.ray_speedup [--pairs 6] [--quick]`` — fresh caches under a
temporary folder, so both builds train every model; writes
``benchmarks/results/wild/ray_speedup.json`` with wall and CPU seconds, the ratio and the
machine's load average before and after each build (the 2-core machine is shared)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from . import build, zoo

RESULTS = Path(__file__).resolve().parent.parent / "results" / "wild"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="full-size models, not --quick ones")
    ap.add_argument("--out", type=Path, default=RESULTS / "ray_speedup.json")
    args = ap.parse_args(argv)
    specs = zoo.draw_zoo(args.seed, args.pairs, quick=not args.full)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="wild-speedup-") as tmp:
        for workers in (1, 2):
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            summary = build.build(specs, Path(tmp) / f"w{workers}", backend="ray",
                                  workers=workers)
            wall = time.perf_counter() - t0
            runs[str(workers)] = {"wall_s": round(wall, 2), "cpu_s": summary["cpu_s_this_run"],
                                  "trained": summary["trained"],
                                  "failed_pairs": len(summary["failed_pairs"]),
                                  "loadavg_before": load0, "loadavg_after": os.getloadavg()}
            print(f"{workers} worker(s): {wall:.1f} s wall, {summary['trained']} models",
                  flush=True)
        same = all(a == b for a, b in zip(zoo.load_sidecars(Path(tmp) / "w1"),
                                          zoo.load_sidecars(Path(tmp) / "w2")))
    ratio = runs["1"]["wall_s"] / runs["2"]["wall_s"]
    result = {"command": "python -m benchmarks.wild.ray_speedup " + " ".join(argv or sys.argv[1:]),
              "pairs": args.pairs, "quick": not args.full, "runs": runs,
              "speedup_2_over_1": round(ratio, 3), "identical_sidecars": same,
              "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    zoo.write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
