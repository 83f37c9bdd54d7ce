"""Read scan reports made with ``--references auto``: what each detector's p-value was and
what MNTD's would be with the self-references as its architecture null (applied), and
the fused verdict under each; and the verdict of Neural Cleanse's evidence alone (as
``--detectors neural_cleanse`` fuses it).

``python -m benchmarks.wild.scan_refs_readout RESULTS.json [--variant refs]``

Uses only the reports (MNTD's raw output, its component outputs, and the self-references'
MNTD raw outputs recorded under ``self_references.detector_outputs``) and the shipped
Fashion-MNIST bundle's reference outputs; runs no detector."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from trojanscan.detectors.mntd import MNTD
from trojanscan.maths.fusion import Evidence, fuse
from trojanscan.mntd.calibration import fit_tail, tail_p_value
from trojanscan.mntd.pretrained import find_builtin

from .run import ROOT


def mntd_null() -> tuple[list[float], Any]:
    """The shipped 1×28×28 bundle's null (its reference models' outputs on the recipe's
    scale), as :class:`MNTD` reads it."""
    bundle = find_builtin((1, 28, 28), 10)
    assert bundle is not None
    det = MNTD()
    recipe = det._recipe(bundle)
    parts, weights = recipe.entries(bundle.ensembles)
    cals = {v: bundle.variant(v)[1] for v in parts}
    benign_of = [list(cals[v].get("benign_raw", [])) for v in parts]
    raws = {v: 0.0 for v in parts}
    _, _, null, threshold = det._calibrated(bundle, recipe, parts, weights, raws, cals,
                                            benign_of)
    return null, threshold


def readout(report: dict[str, Any], null: list[float], tail: Any) -> dict[str, Any]:
    dets = report["detectors"]
    nc, mn = dets.get("neural_cleanse", {}), dets.get("mntd", {})
    raw = float(mn["raw_score"])
    sr = report.get("params", {}).get("self_references") or {}
    arch = ((sr.get("detector_outputs") or {}).get("mntd") or {}).get("values") or []
    shift = max(0.0, float(np.median(arch)) - float(np.median(null))) if len(arch) >= 2 \
        else 0.0
    p_shift = tail_p_value(raw - shift, null, tail)[0]
    out = {"nc_p": nc.get("p_value"), "mntd_p": mn.get("p_value"), "mntd_raw": raw,
           "null_max": float(np.max(null)), "self_ref_mntd_raw": arch, "shift": shift,
           "mntd_p_shifted": p_shift, "fused_p": report.get("p_value")}
    ev = [Evidence("neural_cleanse", nc.get("verdict") == "backdoored", nc.get("p_value"),
                   tuple(nc.get("suspected_targets", [])),
                   None if nc.get("label_p_values") is None else tuple(nc["label_p_values"])),
          Evidence("mntd", mn.get("verdict") == "backdoored", p_shift, (),
                   None if mn.get("label_p_values") is None else tuple(mn["label_p_values"]))]
    f = fuse(ev)
    out.update(fused_p_shifted=f.p_value, flagged_shifted=f.backdoored,
               targets_shifted=list(f.suspected_targets))
    nc_only = fuse(ev[:1])  # what ``--detectors neural_cleanse`` fuses: NC's evidence alone
    out.update(nc_only_p=nc_only.p_value, nc_only_flagged=nc_only.backdoored,
               nc_only_targets=list(nc_only.suspected_targets),
               seconds=report.get("seconds"), mntd_seconds=mn.get("seconds"),
               self_ref_seconds=sr.get("seconds"), self_ref_from_cache=sr.get("from_cache"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help="the run's work folder (default .cache/wild-runs/RESULTS-NAME)")
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    null, _ = mntd_null()
    tail = fit_tail(null)
    for r in res["rows"]:
        if args.variant and r["variant"] != args.variant:
            continue
        work = args.work or ROOT / ".cache" / "wild-runs" / args.results.stem
        path = work / f"scan.{r['variant']}" / r["model"] / "report.json"
        if not path.exists():
            continue
        o = readout(json.loads(path.read_text()), null, tail)
        print(json.dumps({"model": r["model"], "variant": r["variant"], "arch": r["arch"],
                          "bd": r["backdoored"], "targets": r["targets"],
                          "named": r.get("suspected_targets"), **o}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
