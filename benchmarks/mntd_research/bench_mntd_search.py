"""Settings of the MNTD trigger-search probe side by side: ranking and cost.

For each setting (anchors per class, Adam steps, lr) the probe (trojanscan.mntd.search) is
built on the defender's share of Fashion-MNIST, read against the 64 reference models of
the shipped bundle's cache and run on held-out target sets (bench_mntd.py targets). It
prints AUROC alone, AUROC in the sum with a stored variant's raw scores (standardised the
detector's way, on the 32 held-out benign shadows) and the median seconds per model on
one CPU thread, with the ratio to the cheapest setting (this machine is noisy: read the
ratios). The comparison behind the shipped settings (docs/benchmarks/mntd_prereg_s14.md,
made there with a prototype of this script)::

    python benchmarks/mntd_research/bench_mntd_search.py \\
        --settings 10:100:0.1,5:60:0.1,5:40:0.2 --sets 19,20 \\
        --scores benchmarks/results/mntd_sets1920.json \\
        --results benchmarks/results/mntd_search_settings.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / ".cache"
SHADOWS = CACHE / "mntd_shadows" / "paper" / "fashion-mnist"
ATTACKS = ("badnets", "blend", "wanet", "sig", "all2all", "source")


def auroc(pos: list[float], neg: list[float]) -> float:
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None]
    return float(((p > n) + 0.5 * (p == n)).mean())


def main(argv: list[str] | None = None) -> None:
    from trojanscan.io.data import load_dataset
    from trojanscan.mntd.pipeline import defender_share
    from trojanscan.mntd.search import SearchConfig, SearchProbe, model_costs
    from trojanscan.mntd.shadows import load_shadow
    from trojanscan.mntd.stamps import pick_anchors
    from trojanscan.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="10:100:0.1,5:60:0.1,5:40:0.2",
                    help="anchors:steps:lr, comma-separated")
    ap.add_argument("--sets", default="19,20", help="held-out target sets (their caches "
                    "in benchmarks/.cache/mntd_seedS)")
    ap.add_argument("--scores", default=None, help="a bench_mntd.py score JSON of the same "
                    "sets whose --mix variant's raw scores the probe is added to")
    ap.add_argument("--mix", default="stamp_qt_data_one_class")
    ap.add_argument("--num-val", type=int, default=32, help="held-out benign shadows "
                    "(the last of the 256)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    share = defender_share(load_dataset("fashion-mnist:train"), 0.02, seed=0)
    refs = [load_shadow(p)[0].eval()
            for p in sorted((SHADOWS / "references").glob("*.safetensors"))]
    benign = [load_shadow(SHADOWS / "shadows" / f"benign-{i:04d}.safetensors")[0].eval()
              for i in range(256 - args.num_val, 256)]
    targets = []
    for s in args.sets.split(","):
        for js in sorted((CACHE / f"mntd_seed{s}" / "targets").glob("t*.json")):
            meta = json.loads(js.read_text())
            targets.append(({"set": int(s), "key": js.stem, "kind": js.stem.split("-")[1],
                             "arch": meta["arch"], "asr": meta.get("asr")},
                            torch.jit.load(str(js.with_suffix(".pt"))).eval()))
    base: list[float] | None = None
    if args.scores:
        stored = {(m["set"], m["key"]): m for m in
                  json.loads(Path(args.scores).read_text())["score"]["models"]}
        base = [stored[(p["set"], p["key"])][f"fashion-mnist:{args.mix}"] for p, _ in targets]
    y = [p["kind"] != "clean" for p, _ in targets]
    eff = [p["kind"] == "clean" or (p["asr"] or 0) >= 0.5 for p, _ in targets]
    rows = []
    for spec in args.settings.split(","):
        n, steps, lr = spec.split(":")
        cfg = SearchConfig(anchors_per_class=int(n), steps=int(steps), lr=float(lr))
        anchors, labels = pick_anchors(share.x, share.labels(), cfg.anchors_per_class,
                                       torch.Generator().manual_seed(0))
        probe = SearchProbe(anchors, labels, 10, cfg)
        probe.fit_reference(model_costs(probe, refs))
        bz = probe.head(model_costs(probe, benign)).numpy()
        raws, secs = [], []
        for _, model in targets:
            t0 = time.perf_counter()
            raws.append(float(probe.head(probe.respond(model)[None])[0]))
            secs.append(time.perf_counter() - t0)
        row = {"anchors_per_class": cfg.anchors_per_class, "steps": cfg.steps, "lr": cfg.lr,
               "median_seconds": round(float(np.median(secs)), 4), "raw": raws}
        for name, s in [("alone", raws)] + ([("sum", [b + (r - bz.mean()) / bz.std()
                                                      for b, r in zip(base, raws)])]
                                            if base is not None else []):
            neg = [v for v, t in zip(s, y) if not t]
            row[f"auroc_{name}"] = round(auroc([v for v, t in zip(s, y) if t], neg), 4)
            row[f"auroc_{name}_effective"] = round(auroc(
                [v for v, t, e in zip(s, y, eff) if t and e], neg), 4)
            row[f"per_attack_{name}"] = {k: round(auroc(
                [v for v, (p, _) in zip(s, targets) if p["kind"] == k], neg), 4) for k in ATTACKS}
        rows.append(row)
        print(f"{spec}: {json.dumps({k: v for k, v in row.items() if k != 'raw'})}",
              file=sys.stderr, flush=True)
    cheapest = min(r["median_seconds"] for r in rows)
    print("| anchors, steps, lr | AUROC alone (all / effective) | in the sum (all / effective) "
          "| median s per model | × cheapest |\n|---|---|---|---|---|")
    for r in rows:
        summ = (f"{r['auroc_sum']:.3f} / {r['auroc_sum_effective']:.3f}" if "auroc_sum" in r
                else "–")
        print(f"| {r['anchors_per_class']}, {r['steps']}, {r['lr']} | {r['auroc_alone']:.3f} / "
              f"{r['auroc_alone_effective']:.3f} | {summ} | {r['median_seconds']:.3f} | "
              f"{r['median_seconds'] / cheapest:.1f} |")
    if args.results:
        atomic_write_text(Path(args.results), json.dumps(
            {"sets": args.sets, "mix": args.mix if base is not None else None,
             "models": [p for p, _ in targets], "settings": rows}, indent=1) + "\n")
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
