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
from trojanscan.maths.fusion import Evidence, fuse, holm
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
    out.update(target_rule(report))
    return out


def target_rule(report: dict[str, Any], alpha: float = 0.05) -> dict[str, Any]:
    """The *target-required* rule read off a report: backdoored only when the fused p is
    below ``alpha`` and Holm's step over the fused per-label p-values (``target_p_values``)
    names at least one label at family-wise ``alpha``, i.e. a specific label is shown to
    be a target; those labels are its targets. Its p-value, ``max(fused p, min(1, K ·
    min_k q_k))``, is below ``alpha`` exactly when it calls the model backdoored (the
    first Holm step is Bonferroni); score = 1 − that p."""
    q = report.get("target_p_values")
    p = float(report.get("p_value", 1.0))
    if not q:  # no per-label evidence: the default rule
        return {"tr_p": p, "tr_flagged": p < alpha, "tr_targets":
                list(report.get("suspected_targets", []))}
    named = holm(q, alpha=alpha) if p < alpha else []
    p_rule = max(p, min(1.0, len(q) * min(float(v) for v in q)))
    return {"tr_p": p_rule, "tr_flagged": bool(named), "tr_targets": sorted(named),
            "min_q": min(float(v) for v in q)}


def summary_table(rows: list[dict[str, Any]], rules: dict[str, tuple[str, str, str]]
                  ) -> str:
    """Markdown: per rule (p key, flagged key, targets key) and group (overall, arch):
    AUROC of 1 − p, TPR, FPR, target named among detected single-target backdoors."""
    from .metrics import auroc

    lines = ["| rule | group | backdoored / clean | AUROC | TPR | FPR (clean) | "
             "single-target detected: target named |", "| --- | --- | --- | --- | --- | "
             "--- | --- |"]
    for rule, (pk, fk, tk) in rules.items():
        groups: dict[str, list[dict[str, Any]]] = {"all": rows}
        for r in rows:
            groups.setdefault(f"arch: {r['arch']}", []).append(r)
        for g in ["all", *sorted(k for k in groups if k != "all")]:
            rs = groups[g]
            bd = [r for r in rs if r["bd"]]
            cl = [r for r in rs if not r["bd"]]
            au = auroc([1 - r[pk] for r in bd], [1 - r[pk] for r in cl])
            det1 = [r for r in bd if r[fk] and len(r["targets"]) == 1]
            named = sum(bool(set(r[tk]) & set(r["targets"])) for r in det1)
            lines.append(f"| {rule} | {g} | {len(bd)} / {len(cl)} | "
                         f"{'–' if au is None else f'{au:.2f}'} | "
                         f"{sum(r[fk] for r in bd)}/{len(bd)} | "
                         f"{sum(r[fk] for r in cl)}/{len(cl)} | {named}/{len(det1)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--work", type=Path, default=None,
                    help="the run's work folder (default .cache/wild-runs/RESULTS-NAME)")
    ap.add_argument("--table", action="store_true", help="markdown tables per variant and "
                    "rule instead of one JSON line per model")
    args = ap.parse_args(argv)
    res = json.loads(args.results.read_text())
    null, _ = mntd_null()
    tail = fit_tail(null)
    out: list[dict[str, Any]] = []
    for r in res["rows"]:
        if args.variant and r["variant"] != args.variant:
            continue
        work = args.work or ROOT / ".cache" / "wild-runs" / args.results.stem
        path = work / f"scan.{r['variant']}" / r["model"] / "report.json"
        if not path.exists():
            continue
        o = readout(json.loads(path.read_text()), null, tail)
        row = {"model": r["model"], "variant": r["variant"], "arch": r["arch"],
               "bd": r["backdoored"], "targets": r["targets"],
               "named": r.get("suspected_targets"), "flagged": r.get("flagged"), **o}
        out.append(row)
        if not args.table:
            print(json.dumps(row, default=float))
    if args.table:
        for v in sorted({r["variant"] for r in out}):
            rs = [r for r in out if r["variant"] == v]
            print(f"**{args.results.stem}, variant {v}**\n")
            print(summary_table(rs, {
                "shipped (fused p < 0.05)": ("fused_p", "flagged", "named"),
                "target-required (Holm names a label)": ("tr_p", "tr_flagged", "tr_targets"),
                "NC alone": ("nc_only_p", "nc_only_flagged", "nc_only_targets")}))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
