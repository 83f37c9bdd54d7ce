"""Benchmark: does a Neural Cleanse setting keep its verdicts on Fashion-MNIST?

Runs Neural Cleanse (default fast mode unless ``--param`` says otherwise) on a fixed set
of *development*-split wild-zoo models (three backdoored with patch triggers, their three
clean partners; never held-out models) with the defender's clean images, one thread,
and appends one JSON line per model to ``--out``: verdict, flagged labels, true targets,
seconds, steps, sample passes, pruned labels.

To compare two versions of the code, run it once per version (``PYTHONPATH`` pointing at
the other ``src``) with different ``--tag``s and the same ``--out``.

Usage::

    python -m benchmarks.bench_nc_regression --tag new
    PYTHONPATH=/path/to/old/src python -m benchmarks.bench_nc_regression --tag old
    python -m benchmarks.bench_nc_regression --tag arms-all --param arms='"all"'
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "wild" / "seed0"
OUT = ROOT / "results" / "nc_regression_fmnist.jsonl"
#: development-split pairs with patch triggers (Neural Cleanse's home ground)
MODELS = ["w062-18f420de3e-bd", "w062-18f420de3e-clean", "w013-4ad2fda8eb-bd",
          "w013-4ad2fda8eb-clean", "w056-e5af4293d9-bd", "w056-e5af4293d9-clean"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--param", action="append", default=[], help="KEY=JSON, repeatable")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.wild.zoo import load_sidecars, write_defender_clean

    from trojanscan.detectors.neural_cleanse import NeuralCleanse
    from trojanscan.io.data import load_dataset
    from trojanscan.io.models import load_model

    params: dict[str, Any] = {k: json.loads(v) for k, v in
                              (p.split("=", 1) for p in args.param)}
    sidecars = {s["name"]: s for s in load_sidecars(CACHE)}
    clean_path = CACHE.parent / "defender_clean.npz"
    if not clean_path.exists():
        write_defender_clean(clean_path)
    data = load_dataset(str(clean_path))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        sc = sidecars[name]
        if sc["split"] != "dev":
            raise SystemExit(f"{name} is not a development model")
        model = load_model(str(CACHE / "models" / f"{name}.pt")).module
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = NeuralCleanse(seed=0, images=False, **params).fit(model, data)
        sec = time.perf_counter() - t0
        ev = r.evidence
        row = {"tag": args.tag, "model": name, "backdoored": sc["backdoored"],
               "targets": sc["targets"], "params": params, "verdict": r.verdict,
               "flagged": list(r.suspected_targets), "min_label": ev["min_label"],
               "anomaly_index": ev["anomaly_index"], "seconds": round(sec, 2),
               "total_steps": ev["total_steps"], "sample_passes": ev.get("sample_passes"),
               "pruned": ev.get("pruned_labels"), "l1_norms": ev["l1_norms"],
               "pass_batch": ev.get("pass_batch"), "threads": args.threads}
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{args.tag:10s} {name:24s} {r.verdict:10s} {row['flagged']} "
              f"idx {ev['anomaly_index']:.2f} steps {ev['total_steps']} {sec:.1f}s", flush=True)


if __name__ == "__main__":
    main()
