"""MNTD scoring on the CPU and on a GPU side by side: time per model and agreement.

The shipped Fashion-MNIST bundle scores the same held-out target models (a cache of
``bench_mntd.py targets``) with each variant on each device in one run. Prints the
median milliseconds per model (after one warm-up fit per device and variant), the
CPU / device ratio, and how far the devices' raw scores and verdicts agree. Devices that
are not present are left out, so on a CPU-only machine it times the CPU alone::

    python benchmarks/bench_mntd_device.py --cache benchmarks/.cache/mntd_seed25 --seed 25 \\
        --devices cpu,cuda --results benchmarks/results/mntd_device.json

The CPU runs on ``--threads`` torch threads (1: the issue's per-model budget is read on
one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_VARIANTS = "qt,one_class,stamp_one_class,search,stamp_one_class_search"


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> None:
    import bench_mntd as bm
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a bench_mntd.py targets cache")
    ap.add_argument("--seed", type=int, required=True, help="the cache's set")
    ap.add_argument("--per-attack", type=int, default=6)
    ap.add_argument("--archs", default="mlp,lenet,small_cnn")
    ap.add_argument("--meta", default="fashion-mnist")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = bm.plan_targets(args.per_attack, args.seed, tuple(args.archs.split(",")))
    folder = Path(args.cache) / "targets"
    plan = [p for p in plan if (folder / f"{p['key']}.json").exists()]
    if not plan:
        sys.exit(f"no target models under {folder}")
    targets = bm.load_targets(Path(args.cache), plan)
    devices = [d for d in args.devices.split(",")
               if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    out: dict[str, Any] = {"models": len(targets), "machine": bm.machine(),
                           "threads": args.threads, "devices": devices, "variants": {}}
    for variant in args.variants.split(","):
        per: dict[str, dict[str, Any]] = {}
        for dev in devices:
            det = MNTD(meta_classifier=args.meta, variant=variant, device=dev)
            det.fit(targets[0][1], shape_only)  # warm-up (CUDA context, kernels)
            raws, secs, flags = [], [], []
            for _, model in targets:
                r = det.fit(model, shape_only)
                raws.append(float(r.evidence["raw_score"]))
                secs.append(r.seconds)
                flags.append(r.verdict == "backdoored")
            per[dev] = {"raw": raws, "ms_median": round(1000 * float(np.median(secs)), 2),
                        "ms_max": round(1000 * float(np.max(secs)), 2), "flags": flags}
        row: dict[str, Any] = {d: {"ms_median": v["ms_median"], "ms_max": v["ms_max"]}
                               for d, v in per.items()}
        for dev in devices[1:]:
            a, b = per[devices[0]], per[dev]
            row[f"{devices[0]}_over_{dev}"] = round(a["ms_median"] / b["ms_median"], 2)
            row[f"max_abs_raw_diff_{dev}"] = round(float(np.max(np.abs(
                np.subtract(a["raw"], b["raw"])))), 5)
            row[f"spearman_{dev}"] = round(spearman(a["raw"], b["raw"]), 5)
            row[f"verdict_agreement_{dev}"] = round(float(np.mean(
                np.equal(a["flags"], b["flags"]))), 4)
        out["variants"][variant] = row
    print(f"\nMNTD scoring, {len(targets)} models of set {args.seed}, CPU on "
          f"{args.threads} thread(s); {out['machine']['cuda'] or 'no GPU'}")
    cols = [f"{d} ms" for d in devices] + [f"{devices[0]}/{d}" for d in devices[1:]] + [
        f"{d}: max |Δraw|, rank corr, same verdict" for d in devices[1:]]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for variant, row in out["variants"].items():
        cells = [f"{row[d]['ms_median']:.1f}" for d in devices]
        cells += [f"{row[f'{devices[0]}_over_{d}']:.1f}×" for d in devices[1:]]
        cells += [f"{row[f'max_abs_raw_diff_{d}']:.4f}, {row[f'spearman_{d}']:.4f}, "
                  f"{row[f'verdict_agreement_{d}']:.3f}" for d in devices[1:]]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    if args.results:
        atomic_write_text(Path(args.results), json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
