"""Forward passes per input: default ``filter`` (sequential STRIP) against fixed-N STRIP.

For each wild-zoo model chosen (``--split``, ``--models``), both detectors are calibrated
on the defender's clean images (``zoo.write_defender_clean``'s range) at FRR 1% and
decide on the model's filter inputs (``zoo.filter_inputs``: triggered then clean, disjoint
from the calibration images). Per model and detector: FAR, FRR, mean model evaluations
per input (the plain prediction included) and seconds per input, timed in this one run;
then the ratio fixed-N ÷ sequential. Prints a table and writes
``benchmarks/results/strip_sequential.json``.

    python -m benchmarks.bench_strip_sequential --split dev --n-inputs 250
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchmarks.wild import zoo

from trojanscan.dataset import ImageDataset
from trojanscan.detectors.strip import Strip
from trojanscan.utils import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "strip_sequential.json"
DETECTORS = {
    "sequential (default filter)": lambda: Strip(seed=0, device="cpu"),
    "fixed N=100 (paper)": lambda: Strip.paper(seed=0, device="cpu"),
}


def run_model(side: dict[str, Any], cache: Path, clean: ImageDataset, n: int
              ) -> list[dict[str, Any]]:
    model = torch.jit.load(str(cache / "models" / f"{side['name']}.pt"), map_location="cpu")
    model.eval()
    x, trig = zoo.filter_inputs(side, n)
    xt = torch.from_numpy(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x)
    rows = []
    for label, make in DETECTORS.items():
        det = make().fit(model, clean)
        t0 = time.perf_counter()
        d = det.decide(xt)
        secs = time.perf_counter() - t0
        rows.append({
            "model": side["name"], "trigger": side["families"]["pair_trigger"],
            "detector": label, "far": float((~d.flagged[trig]).mean()),
            "frr": float(d.flagged[~trig].mean()), "frr_holdout": det.frr_measured_,
            "mean_forwards_per_input": d.mean_forwards,
            "seconds_per_input": secs / len(xt),
        })
        print(f"{side['name']} {rows[-1]['trigger']:14s} {label:28s} FAR {rows[-1]['far']:.3f} "
              f"FRR {rows[-1]['frr']:.3f} passes/input {d.mean_forwards:6.1f} "
              f"{1000 * secs / len(xt):.2f} ms/input", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=HERE / ".cache" / "wild" / "seed0")
    ap.add_argument("--split", default="dev", choices=["dev", "heldout"])
    ap.add_argument("--models", type=int, default=4, help="backdoored models to use")
    ap.add_argument("--n-inputs", type=int, default=250, help="triggered and clean each")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sides = [s for s in zoo.load_sidecars(args.zoo)
             if s["backdoored"] and s["split"] == args.split][:args.models]
    xc, _ = zoo._test_range(zoo.DEFENDER_CLEAN)
    clean = ImageDataset(torch.from_numpy(xc[:, None].astype(np.float32) / 255.0),
                         source="defender clean")
    rows = [r for s in sides for r in run_model(s, args.zoo, clean, args.n_inputs)]
    seq = [r for r in rows if r["detector"].startswith("sequential")]
    fix = [r for r in rows if r["detector"].startswith("fixed")]
    summary = {
        "mean_forwards_sequential": float(np.mean([r["mean_forwards_per_input"] for r in seq])),
        "mean_forwards_fixed": float(np.mean([r["mean_forwards_per_input"] for r in fix])),
        "seconds_per_input_sequential": float(np.mean([r["seconds_per_input"] for r in seq])),
        "seconds_per_input_fixed": float(np.mean([r["seconds_per_input"] for r in fix])),
        "mean_far_sequential": float(np.mean([r["far"] for r in seq])),
        "mean_far_fixed": float(np.mean([r["far"] for r in fix])),
    }
    summary["forwards_ratio_fixed_over_sequential"] = (
        summary["mean_forwards_fixed"] / summary["mean_forwards_sequential"])
    summary["time_ratio_fixed_over_sequential"] = (
        summary["seconds_per_input_fixed"] / summary["seconds_per_input_sequential"])
    print("\n| model | trigger | detector | FAR | FRR | passes/input | ms/input |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['trigger']} | {r['detector']} | {r['far']:.3f} | "
              f"{r['frr']:.3f} | {r['mean_forwards_per_input']:.1f} | "
              f"{1000 * r['seconds_per_input']:.2f} |")
    print(f"\nfixed ÷ sequential: {summary['forwards_ratio_fixed_over_sequential']:.2f}× "
          f"forward passes, {summary['time_ratio_fixed_over_sequential']:.2f}× time per input")
    atomic_write_text(args.out, json.dumps({"command": " ".join(sys.argv), "rows": rows,
                                            "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
