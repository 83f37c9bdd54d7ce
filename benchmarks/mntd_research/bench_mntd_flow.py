"""The search's flow readout (``search_flow``) in the default sum, side by side.

For each held-out model of the given sets (caches of ``bench_mntd.py targets``) the
shipped Fashion-MNIST bundle's trigger search is run once (``SearchProbe.run``: the
per-class costs and the ``K×K`` flows) and the stamp members' and one-class raw outputs
are read through the detector (``stamp_one_class``). The readouts are then summed offline
(each part standardised against the 32 held-out benign shadows, as the detector does):

* the session-15 default, ``stamps + one_class + 2 × search``;
* plus ``w × search_flow`` for spread floors 0.005-0.1 and weights 1-3 (the shipped
  readout: floor 0.01, weight 2, ``stamp_one_class_search_flow``);
* the flow readout alone.

Per group of sets and pooled, with per-attack AUROC. The comparison behind
``stamp_one_class_search_flow`` (``docs/benchmarks/mntd_prereg_s16.md``, development)::

    python benchmarks/mntd_research/bench_mntd_flow.py --sets 23,24,25,26,27,28,29,30,31,32,33,34 \\
        --groups 23-26,27-30,31-34 --results benchmarks/results/mntd_flow_2334.json
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CACHE = ROOT / "benchmarks" / ".cache"
SHADOWS = CACHE / "mntd_shadows" / "paper" / "fashion-mnist"
ATTACKS = ("badnets", "blend", "wanet", "sig", "all2all", "source")
FLOORS = (0.005, 0.01, 0.02, 0.05, 0.1)
WEIGHTS = (1.0, 2.0, 3.0)


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    p, n = s[y][:, None], s[~y][None]
    return float(((p > n) + 0.5 * (p == n)).mean())


def flow_raw(flows: np.ndarray, ref: np.ndarray, floor: float) -> np.ndarray:
    """The largest off-diagonal z of ``B×K×K`` flows against reference flows ``R×K×K``."""
    k = flows.shape[-1]
    z = (flows - ref.mean(0)) / (ref.std(0, ddof=1) + floor)
    return np.where(np.eye(k, dtype=bool), -np.inf, z).max(axis=(1, 2))


def main(argv: list[str] | None = None) -> None:
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.mntd.pretrained import resolve
    from trojanscan.mntd.search import FLOW_SPREAD_FLOOR
    from trojanscan.mntd.shadows import load_shadow
    from trojanscan.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="23,24,25,26,27,28,29,30,31,32,33,34")
    ap.add_argument("--groups", default="23-26,27-30,31-34",
                    help="ranges of sets reported apart (FIRST-LAST, comma-separated)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from _bundles import full_bundle, with_recipe

    bundle = resolve(full_bundle())
    assert bundle is not None
    search, search_cal = bundle.variant("search")
    k = bundle.num_classes

    def outcome(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            full = search.run(model).cpu().numpy()
        return full[:k], full[k:].reshape(k, k)

    refs = [load_shadow(p)[0].eval()
            for p in sorted((SHADOWS / "references").glob("*.safetensors"))]
    ref_flows = np.stack([outcome(m)[1] for m in refs])
    benign_flows = np.asarray(bundle.calibration["search_flow"]["benign_flows"],
                              dtype=np.float64).reshape(-1, k, k)
    # the shipped readout (floor 0.01) recomputed here must match the bundle's
    shipped = np.asarray(bundle.calibration["search_flow"]["benign_raw"])
    if not np.allclose(flow_raw(benign_flows, ref_flows, FLOW_SPREAD_FLOOR), shipped,
                       atol=1e-2):
        raise SystemExit("the recomputed flow readout does not match the bundle's")
    det = MNTD(meta_classifier=with_recipe({"stamp": 1, "one_class": 1}))
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for s in (int(v) for v in args.sets.split(",")):
        for js in sorted((CACHE / f"mntd_seed{s}" / "targets").glob("t*.json")):
            meta = json.loads(js.read_text())
            model = torch.jit.load(str(js.with_suffix(".pt"))).eval()
            costs, flows = outcome(model)
            parts = det.fit(model, shape_only).evidence["component_raw_scores"]
            rows.append({"set": s, "key": js.stem, "kind": js.stem.split("-")[1],
                         "arch": meta["arch"], "asr": meta.get("asr"),
                         "search": float(search.head(torch.tensor(costs)[None])[0]),
                         "flows": flows.round(6).tolist(), "parts": parts})
        print(f"set {s}: {len(rows)} models, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    y = np.array([r["kind"] != "clean" for r in rows])
    kind = np.array([r["kind"] for r in rows])
    sets = np.array([r["set"] for r in rows])
    flows_t = np.asarray([r["flows"] for r in rows])

    def z(name: str, values: np.ndarray) -> np.ndarray:
        null = np.asarray(bundle.calibration[name]["benign_raw"])
        return (values - null.mean()) / null.std()

    stamps = np.mean([z(n, np.array([r["parts"][n] for r in rows]))
                      for n in bundle.ensembles["stamp"]], axis=0)
    base = stamps + z("one_class", np.array([r["parts"]["one_class"] for r in rows]))
    base = base + 2 * z("search", np.array([r["search"] for r in rows]))
    sums = {"stamp_one_class_search_x2 (session 15)": base}
    for floor in FLOORS:
        fz = flow_raw(flows_t, ref_flows, floor)
        fb = flow_raw(benign_flows, ref_flows, floor)
        fz = (fz - fb.mean()) / fb.std()
        sums[f"search_flow alone, floor {floor:g}"] = fz
        for w in WEIGHTS:
            sums[f"x2 + {w:g} x search_flow, floor {floor:g}"] = base + w * fz
    groups = [tuple(int(v) for v in g.split("-")) for g in args.groups.split(",")]
    table: dict[str, Any] = {}
    for name, sc in sums.items():
        cl = kind == "clean"
        table[name] = {
            "all": round(auroc(y, sc), 4),
            "groups": {f"{a}-{b}": round(auroc(y[(sets >= a) & (sets <= b)],
                                               sc[(sets >= a) & (sets <= b)]), 4)
                       for a, b in groups},
            "per_attack": {a: round(auroc(np.r_[np.ones((kind == a).sum(), bool),
                                                np.zeros(cl.sum(), bool)],
                                          np.r_[sc[kind == a], sc[cl]]), 4)
                           for a in ATTACKS if (kind == a).any()},
        }
    print(f"| sum ({len(rows)} models) | all | "
          + " | ".join(f"{a}-{b}" for a, b in groups) + " | " + " | ".join(ATTACKS)
          + " |\n|---|---|" + "---|" * (len(groups) + len(ATTACKS)))
    for name, t in table.items():
        print(f"| {name} | {t['all']:.3f} | "
              + " | ".join(f"{v:.3f}" for v in t["groups"].values()) + " | "
              + " | ".join(f"{t['per_attack'].get(a, float('nan')):.3f}" for a in ATTACKS)
              + " |")
    if args.results:
        atomic_write_text(Path(args.results), json.dumps(
            {"sets": args.sets, "search_threshold": search_cal.get("threshold"),
             "table": table, "models": [{k2: v for k2, v in r.items() if k2 != "flows"}
                                        for r in rows]}, indent=1) + "\n")
        print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()
