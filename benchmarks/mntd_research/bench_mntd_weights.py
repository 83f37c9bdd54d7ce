"""How the default MNTD sum's parts are weighed and standardised, side by side.

For each held-out model of the given sets (caches of ``bench_mntd.py targets``) the
shipped Fashion-MNIST bundle's ``stamp_one_class_search`` is fitted once through the
detector; its component raw scores (three stamp members, one-class, search) are then
summed offline in several ways and ranked (AUROC, clean against backdoored):

* the search weighed 1 (the detector's own sum), 1.5, 2 or 3, each part standardised
  against the held-out benign shadows as the detector does (stamp members 1/3 each);
* the same with each part standardised against the 64 clean reference models instead;
* the largest of the three parts' z-scores (against the reference models).

Per pair of sets and pooled. The comparison behind ``stamp_one_class_search_x2``
(``docs/benchmarks/mntd_prereg_s15.md``, question 2)::

    python benchmarks/mntd_research/bench_mntd_weights.py --sets 23,24,25,26,27,28,29,30 \\
        --results benchmarks/results/mntd_weights_2330.json
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path(__file__).resolve().parents[1] / ".cache"
SEARCH_WEIGHTS = (1.0, 1.5, 2.0, 3.0)


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    p, n = s[y][:, None], s[~y][None]
    return float(((p > n) + 0.5 * (p == n)).mean())


def sums(parts: dict[str, np.ndarray], null: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The compared combinations of the parts' z-scores against ``null`` (per part)."""
    z = {v: (x - null[v].mean()) / null[v].std() for v, x in parts.items()}
    stamps = np.mean([z[v] for v in z if v.startswith("stamp")], axis=0)
    out = {f"search x{w:g}": stamps + z["one_class"] + w * z["search"]
           for w in SEARCH_WEIGHTS}
    out["max"] = np.max([stamps, z["one_class"], z["search"]], axis=0)
    return out


def main(argv: list[str] | None = None) -> None:
    import bench_mntd as bm
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.mntd.pretrained import resolve
    from trojanscan.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="23,24,25,26,27,28,29,30",
                    help="held-out sets, in pairs (caches in benchmarks/.cache/mntd_seedS)")
    ap.add_argument("--per-attack", type=int, default=6)
    ap.add_argument("--archs", default="mlp,lenet,small_cnn")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sets = [int(s) for s in args.sets.split(",")]
    from _bundles import full_bundle, with_recipe

    bundle = resolve(full_bundle())
    assert bundle is not None
    det = MNTD(meta_classifier=with_recipe({"stamp": 1, "one_class": 1, "search": 1}))
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    rows: list[dict[str, Any]] = []
    for s in sets:
        plan = bm.plan_targets(args.per_attack, s, tuple(args.archs.split(",")))
        for p, model in bm.load_targets(CACHE / f"mntd_seed{s}", plan):
            r = det.fit(model, shape_only)
            rows.append({"set": s, "key": p["key"], "backdoored": p["kind"] != "clean",
                         "parts": r.evidence["component_raw_scores"]})
    names = list(rows[0]["parts"])
    nulls = {"benign shadows": {v: np.asarray(bundle.calibration[v]["benign_raw"])
                                for v in names},
             "reference models": {v: np.asarray(bundle.calibration[v]["reference_raw"])
                                  for v in names}}
    groups = [tuple(sets[i:i + 2]) for i in range(0, len(sets), 2)] + [tuple(sets)]
    table: dict[str, dict[str, float]] = {}
    for g in groups:
        sub = [r for r in rows if r["set"] in g]
        y = np.array([r["backdoored"] for r in sub])
        parts = {v: np.array([r["parts"][v] for r in sub]) for v in names}
        label = " + ".join(map(str, g)) if len(g) <= 2 else f"all {len(sub)}"
        table[label] = {f"{combo}, z against {against}": round(auroc(y, s), 4)
                        for against, null in nulls.items()
                        for combo, s in sums(parts, null).items()}
    cols = list(next(iter(table.values())))
    print("| sets | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for label, res in table.items():
        print(f"| {label} | " + " | ".join(f"{res[c]:.3f}" for c in cols) + " |")
    if args.results:
        atomic_write_text(Path(args.results), json.dumps(
            {"sets": sets, "auroc": table, "models": rows}, indent=1) + "\n")
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
