"""Rank ties and target naming of ``scan``'s fused verdict on the wild zoo's DEV split.

Runs the default scan (Neural Cleanse + MNTD, seed 0) on a fixed selection of dev models
and records, per model, both fusions: *before* (MNTD's conformal p-value, targets from the
individually significant detectors) and *after* (MNTD's tail-modelled p-value, targets from
the per-label p-values combined across detectors). Only dev models are read; the
selection is fixed below (first models of each attack kind, and clean partners).

    OMP_NUM_THREADS=1 python -m benchmarks.scan_evidence_dev --out benchmarks/.cache/scan_evidence

One JSON line per model in ``OUT/results.jsonl`` (resumable), a summary in
``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchmarks.wild import zoo

#: backdoored dev models (each attack kind of the dev split, two-trigger twice) and
#: three clean partners
BACKDOORED = ("w001-f921a9683d-bd", "w004-71f9bb1a2f-bd", "w013-4ad2fda8eb-bd",
              "w037-d3b9281a3c-bd", "w062-18f420de3e-bd", "w035-251ca7ebfd-bd",
              "w079-05e98f35f6-bd", "w045-e349932bf7-bd", "w070-3a444a848f-bd",
              "w024-9fad9bc72b-bd")
CLEAN = ("w001-f921a9683d-clean", "w013-4ad2fda8eb-clean", "w037-d3b9281a3c-clean")


def before_fusion(res: dict[str, Any], alpha: float) -> tuple[float, list[int]]:
    """The fusion as it was: MNTD's conformal p, targets of significant detectors."""
    ps = {}
    for name, r in res.items():
        p = r.get("p_value_empirical", r["p_value"]) if name == "mntd" else r["p_value"]
        ps[name] = 1.0 if p is None else float(p)
    m = len(ps)
    p_fused = min(1.0, m * min(ps.values()))
    targets: list[int] = []
    if p_fused < alpha:
        for name in sorted(ps, key=lambda n: ps[n]):
            if m * ps[name] < alpha:
                targets += [t for t in res[name]["suspected_targets"] if t not in targets]
    return p_fused, targets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="benchmarks/.cache/wild/seed0")
    ap.add_argument("--out", default="benchmarks/.cache/scan_evidence")
    args = ap.parse_args()
    import torch

    from trojanscan import api

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    side = {s["name"]: s for s in zoo.load_sidecars(Path(args.cache))}
    clean_path = out / "clean.npz"
    if not clean_path.exists():
        zoo.write_defender_clean(clean_path)
    done_path = out / "results.jsonl"
    done = {json.loads(line)["name"] for line in done_path.open()} if done_path.exists() else set()
    for name in BACKDOORED + CLEAN:
        s = side[name]
        if s["split"] != "dev":
            raise SystemExit(f"{name} is not a dev model")
        if name in done:
            continue
        t0 = time.perf_counter()
        result = api.scan_model(Path(args.cache) / "models" / s["model_file"], str(clean_path),
                                seed=0, device="cpu")
        det = {n: r.to_dict() for n, r in result.results.items()}
        keep = {n: {k: d.get(k) for k in ("verdict", "p_value", "p_value_empirical",
                                          "p_value_source", "label_p_values",
                                          "suspected_targets", "raw_score", "l1_norms",
                                          "target_flow_z")} for n, d in det.items()}
        p_before, t_before = before_fusion(keep, result.alpha)
        row = {"name": name, "backdoored": s["backdoored"], "targets": s["targets"],
               "kind": (s.get("attack") or {}).get("kind"), "seconds": time.perf_counter() - t0,
               "before": {"p": p_before, "score": 1 - p_before, "targets": t_before},
               "after": {"p": result.p_value, "score": result.score,
                         "targets": list(result.suspected_targets),
                         "target_p_values": None if result.fused.target_p_values is None
                         else list(result.fused.target_p_values)},
               "detectors": keep}
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(name, f"{row['seconds']:.0f}s", row["before"], row["after"]["p"],
              row["after"]["targets"], flush=True)
    summarise(out)


def refuse(row: dict[str, Any], alpha: float) -> dict[str, Any]:
    """The *after* fusion recomputed from the stored evidence with the current code (the
    p-values are pure functions of MNTD's raw output and flow z-scores and of Neural
    Cleanse's per-label p-values), so a change of the tail fit needs no new scan."""
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.maths.fusion import Evidence, fuse, holm
    from trojanscan.mntd.calibration import standardised_sums, tail_p_value
    from trojanscan.mntd.pretrained import find_builtin

    bundle = find_builtin((1, 28, 28), 10)
    assert bundle is not None
    parts, weights = bundle.recipe.entries(bundle.ensembles)
    null = standardised_sums([bundle.calibration[v]["reference_raw"] for v in parts],
                             [bundle.calibration[v]["benign_raw"] for v in parts], weights)
    ev = []
    for name, d in row["detectors"].items():
        p, label_p = d["p_value"], d["label_p_values"]
        if name == "mntd":
            p = tail_p_value(float(d["raw_score"]), null)[0]
            z = d["target_flow_z"]
            label_p = (None if z is None else MNTD._label_p_values(
                np.asarray(z, dtype=np.float64), bundle.calibration["search_flow"], True))
        ev.append(Evidence(name, d["verdict"] == "backdoored", p,
                           tuple(d["suspected_targets"]), label_p))
    f = fuse(ev, alpha=alpha)
    tp = f.target_p_values
    return {"p": f.p_value, "score": f.score, "targets": list(f.suspected_targets),
            "target_p_values": None if tp is None else list(tp),
            "named_by_holm": bool(tp is not None and holm(tp, alpha=alpha))}


def summarise(out: Path, alpha: float = 0.05) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out / "results.jsonl").open()]
    for r in rows:
        r["after"] = refuse(r, alpha)
    summary: dict[str, Any] = {"models": len(rows)}
    for when in ("before", "after"):
        bd = [r for r in rows if r["backdoored"]]
        flagged = [r for r in bd if r[when]["p"] < alpha]
        single = [r for r in flagged if len(r["targets"]) == 1]
        multi = [r for r in flagged if len(r["targets"]) > 1]
        summary[when] = {
            "backdoored": len(bd),
            "distinct_fused_scores_backdoored": len({r[when]["score"] for r in bd}),
            "distinct_fused_p_backdoored": len({r[when]["p"] for r in bd}),
            "detected": len(flagged),
            "clean_flagged": sum(r[when]["p"] < alpha for r in rows if not r["backdoored"]),
            "single_target_detected": len(single),
            "single_target_named": sum(r["targets"][0] in r[when]["targets"] for r in single),
            "multi_target_detected": len(multi),
            "multi_target_all_named": sum(set(r["targets"]) <= set(r[when]["targets"])
                                          for r in multi),
            "wrong_labels_named": int(np.sum([len(set(r[when]["targets"]) - set(r["targets"]))
                                              for r in flagged])),
        }
    summary["after"]["detected_named_by_holm"] = sum(
        r["after"]["named_by_holm"] for r in rows if r["backdoored"] and r["after"]["p"] < alpha)
    summary["per_model"] = [
        {"name": r["name"], "kind": r["kind"], "targets": r["targets"],
         "before": {"p": r["before"]["p"], "targets": r["before"]["targets"]},
         "after": {"p": r["after"]["p"], "targets": r["after"]["targets"],
                   "named_by_holm": r["after"]["named_by_holm"]},
         "nc_p": r["detectors"]["neural_cleanse"]["p_value"],
         "mntd_p_empirical": r["detectors"]["mntd"]["p_value_empirical"],
         "seconds": r["seconds"]} for r in rows]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
