"""Cross-fitted development figures for adding clean wild-zoo models to MNTD's null.

Reads MNTD's raw outputs on the zoo (`benchmarks.wild.mntd_raws`) and Neural Cleanse's
p-values from default `scan` reports of development pairs, then scores two nulls on the
development pairs only: the shipped bundle's reference models, and those plus the clean
models of the *other* fold of development pairs (2 folds over pairs, seeded), i.e. what
`trojanscan mntd add-references` does, never with a model's own pair in its null. Fusion is
the product's (Bonferroni min-p of the two detectors at alpha 0.05). With ``--bundle`` it
also reads the pairs against that bundle's null as it stands (for pairs it does not hold).

    python -m benchmarks.wild.mntd_null_cv --raws R.json --reports DIR [DIR ...] [--out J]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from trojanscan.detectors.mntd import MNTD
from trojanscan.maths.fusion import Evidence, fuse
from trojanscan.mntd.calibration import auroc, fit_tail, tail_p_value
from trojanscan.mntd.pretrained import find_builtin, load_bundle
from trojanscan.mntd.reference import own_references

NAME = re.compile(r"(w\d{3}-[0-9a-f]{10}-(?:bd|clean))")


def shipped_null(path: str | None = None, *, own_only: bool = False) -> list[float]:
    """The bundle's null on its recipe's scale; ``own_only``: just the reference models of
    its own recipe (none that ``add-references`` added)."""
    bundle = find_builtin((1, 28, 28), 10) if path is None else load_bundle(path)
    assert bundle is not None
    if own_only:
        bundle = own_references(bundle)
    recipe = MNTD()._recipe(bundle)
    parts, weights = recipe.entries(bundle.ensembles)
    cals = {v: bundle.variant(v)[1] for v in parts}
    benign = [list(cals[v].get("benign_raw", [])) for v in parts]
    _, _, null, _ = MNTD._calibrated(bundle, recipe, parts, weights, dict.fromkeys(parts, 0.0),
                                     cals, benign)
    return [float(v) for v in null]


def nc_p_values(folders: list[str]) -> dict[str, float]:
    out = {}
    for folder in folders:
        for rep in Path(folder).rglob("report.json"):
            m = NAME.search(str(rep))
            if not m:
                continue
            r = json.loads(rep.read_text())
            nc = r.get("detectors", {}).get("neural_cleanse")
            if nc and nc.get("p_value") is not None:
                out[m.group(1)] = float(nc["p_value"])
    return out


def p_value(raw: float, null: list[float]) -> float:
    return float(tail_p_value(raw, null, fit_tail(null))[0])


def score(rows: list[dict], nulls: dict[str, list[float]], nc: dict[str, float]) -> dict:
    res = {}
    for mode in ("mntd", "fused"):
        y, s, flag = [], [], []
        for r in rows:
            pm = p_value(r["raw"], nulls[r["pair"]])
            if mode == "mntd":
                p = pm
            else:
                if r["name"] not in nc:
                    continue
                p = fuse([Evidence("nc", False, nc[r["name"]]), Evidence("mntd", False, pm)]
                         ).p_value
            y.append(int(r["backdoored"]))
            s.append(1 - p if mode == "fused" else r["raw"])
            flag.append(p < (0.05 if mode == "fused" else 0.025))
        ya, fa = np.asarray(y, bool), np.asarray(flag, bool)
        res[mode] = {"models": len(y), "tpr": f"{int(fa[ya].sum())}/{int(ya.sum())}",
                     "fpr": f"{int(fa[~ya].sum())}/{int((~ya).sum())}",
                     "auroc": round(float(auroc(y, s)), 3) if 0 < sum(y) < len(y) else None}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raws", required=True)
    ap.add_argument("--reports", nargs="+", required=True)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only-reported", action="store_true",
                    help="only the models that have a scan report in --reports")
    ap.add_argument("--bundle", default=None,
                    help="also score this bundle's null as it is (no cross-fitting): for "
                         "re-reading pairs whose models it does not hold")
    args = ap.parse_args(argv)
    nc = nc_p_values(args.reports)
    rows = [r for r in json.loads(Path(args.raws).read_text())["rows"]
            if r["split"] == args.split and (r["name"] in nc or not args.only_reported)]
    base = shipped_null(own_only=True)
    pairs = sorted({r["pair"] for r in rows})
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    fold = {pairs[int(i)]: k % 2 for k, i in enumerate(order)}
    clean = defaultdict(list)
    for r in rows:
        if not r["backdoored"]:
            clean[fold[r["pair"]]].append(r["raw"])
    variants = {"the bundle's own 64 references": {p: base for p in pairs}}
    if args.split == "dev":  # cross-fitted: a pair is never read against its own partner
        variants["+ other fold's clean dev models"] = {p: base + clean[1 - fold[p]]
                                                      for p in pairs}
    if args.bundle:
        given = shipped_null(args.bundle)
        variants[f"{Path(args.bundle).name} ({len(given)})"] = {p: given for p in pairs}
    out: dict = {"split": args.split, "pairs": len(pairs), "nc_reports": len(nc), "by": {}}
    archs = sorted({r["families"]["arch"] for r in rows})
    print(f"{len(pairs)} {args.split} pairs, NC p-values for {len(nc)} models")
    print("| null | group | MNTD TPR | MNTD FPR | fused models | fused TPR | fused FPR | "
          "fused AUROC |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, nulls in variants.items():
        for group in ["all", *archs]:
            sub = [r for r in rows if group == "all" or r["families"]["arch"] == group]
            res = score(sub, nulls, nc)
            out["by"][f"{name} / {group}"] = res
            m, f = res["mntd"], res["fused"]
            print(f"| {name} | {group} | {m['tpr']} | {m['fpr']} | {f['models']} | {f['tpr']} "
                  f"| {f['fpr']} | {f['auroc']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
