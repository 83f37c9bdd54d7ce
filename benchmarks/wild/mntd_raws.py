"""MNTD's raw outputs (summed and per component) on every model of a wild zoo, one JSON.

MNTD alone is cheap (well under a second per model), so its calibration can be studied on
the whole zoo without rerunning Neural Cleanse: `python -m benchmarks.wild.mntd_raws --zoo
benchmarks/.cache/wild/seed0 --out benchmarks/results/wild/mntd_raws.json [--bundle B]`.
`--list-clean --split dev` prints the clean development models instead (what the shipped
Fashion-MNIST bundle's added references are).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trojanscan.api import load_model
from trojanscan.detectors.mntd import MNTD


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--out", help="the JSON to write (not with --list-clean)")
    ap.add_argument("--bundle", default=None, help="meta-classifier (default: the shipped one)")
    ap.add_argument("--split", choices=("dev", "heldout", "all"), default="all")
    ap.add_argument("--list-clean", action="store_true",
                    help="only print the clean models' files of complete pairs of --split "
                         "(the shipped bundle's added references: --split dev)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    zoo = Path(args.zoo)
    models = json.loads((zoo / "manifest.json").read_text())["models"]
    pairs: dict[str, int] = {}
    for m in models:
        pairs[m["pair"]] = pairs.get(m["pair"], 0) + 1
    if args.list_clean:
        for m in sorted(models, key=lambda m: m["name"]):
            if pairs[m["pair"]] == 2 and not m["backdoored"] and args.split in ("all",
                                                                                 m["split"]):
                print(zoo / "models" / m["model_file"])
        return 0
    if not args.out:
        ap.error("--out is required")
    rows = []
    t0 = time.perf_counter()
    for m in sorted(models, key=lambda m: m["name"]):
        if pairs[m["pair"]] != 2 or (args.split != "all" and m["split"] != args.split):
            continue
        model = load_model(zoo / "models" / m["model_file"])
        det = MNTD(meta_classifier=args.bundle, input_shape=(1, 28, 28), seed=0)
        res = det.fit(model.module, None)
        ev = res.evidence
        rows.append({"name": m["name"], "pair": m["pair"], "split": m["split"],
                     "backdoored": m["backdoored"], "targets": m["targets"],
                     "families": m["families"], "raw": ev["raw_score"],
                     "p_value": res.p_value, "components": ev["component_raw_scores"],
                     "target_flow_z": ev["target_flow_z"],
                     "label_p_values": list(res.label_p_values or [])})
    out = {"zoo": str(zoo), "bundle": args.bundle, "seconds": time.perf_counter() - t0,
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{len(rows)} models in {out['seconds']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
