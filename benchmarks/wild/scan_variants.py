"""Score ``trojanscan scan`` on wild-zoo pairs, once per variant, one ``scan`` process per model.

``python -m benchmarks.wild.scan_variants --zoo CACHE --name NAME [--split dev|heldout]
[--skip-pairs N] [--pairs N] [--only-pairs ID,ID] [--variant NAME:ARGS ...]``

``benchmarks.wild.run`` scores the scan level through ``scan-zoo``, which has no
``--references`` option; this runs ``python -m trojanscan scan MODEL --data clean.npz
ARGS --seed 0 --quiet`` per model (``OMP_NUM_THREADS=1``, one at a time), pair by pair and
variant by variant (the ``default`` variant, no ARGS, always), and scores each report as
``benchmarks.wild.run`` does. Results are rewritten after every model, so a run cut short
keeps what it finished: ``benchmarks/results/wild/NAME.json`` and ``NAME.md``. Per row it
also records the report's ``self_references`` entry (built or from the cache, seconds),
so the one-time cost of self-references can be told from the per-model cost."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from . import families, run, zoo


def _self_ref_facts(report: Path) -> dict[str, Any]:
    if not report.exists():
        return {}
    sr = json.loads(report.read_text()).get("params", {}).get("self_references")
    if not sr:
        return {}
    return {"self_references": {k: sr.get(k) for k in (
        "active", "from_cache", "seconds", "training_seconds", "used", "accuracies",
        "suspect_accuracy", "dropped", "applied_to")}}


def _label_p(report: Path) -> dict[str, Any]:
    """Each detector's per-label p-values and p-value, for reading why a model was flagged."""
    if not report.exists():
        return {}
    rep = json.loads(report.read_text())
    out: dict[str, Any] = {"fused_p": rep.get("p_value")}
    for n, d in rep.get("detectors", {}).items():
        out[n] = {"p_value": d.get("p_value"), "label_p_values": d.get("label_p_values")}
    return {"evidence": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--split", choices=("heldout", "dev", "all"), default="dev")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--skip-pairs", type=int, default=0)
    ap.add_argument("--only-pairs", default=None)
    ap.add_argument("--variant", action="append", default=[], help="NAME:ARGS (repeatable)")
    ap.add_argument("--variants-only", action="store_true",
                    help="run only the named --variant settings, not the default")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=run.RESULTS)
    args = ap.parse_args(argv)
    variants: list[tuple[str, list[str]]] = [] if args.variants_only else [("default", [])]
    for v in args.variant:
        name, _, rest = v.partition(":")
        if not name or name == "default":
            print(f"error: bad --variant {v!r}: expected NAME:ARGS", file=sys.stderr)
            return 2
        variants.append((name, shlex.split(rest)))
    work = args.work or run.ROOT / ".cache" / "wild-runs" / args.name
    work.mkdir(parents=True, exist_ok=True)
    clean_npz = work / "clean.npz"
    if not clean_npz.exists():
        zoo.write_defender_clean(clean_npz)
    chosen = run.select(zoo.load_sidecars(args.zoo), args.split, args.pairs,
                        skip=args.skip_pairs, only=args.only_pairs)
    cmd = "python -m benchmarks.wild.scan_variants " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    held = {"arch": families.HELDOUT_ARCHS, "recipe": families.HELDOUT_RECIPES,
            "trigger": families.HELDOUT_TRIGGERS}
    total = len(chosen) * len(variants) * 2
    print(f"{len(chosen)} pairs, {len(variants)} variants, {total} scans", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for bd, clean in chosen:
        for name, extra in variants:
            for side in (bd, clean):
                job = run.Job("scan", name, extra, side, args.zoo, work, clean_npz,
                              args.timeout)
                report = job.dir / "report.json"
                facts: dict[str, Any] = {"reused": report.exists()}
                if not report.exists():
                    facts.update(run.run_cli(["scan", str(job.model), "--data",
                                              str(clean_npz), *extra], job.dir, args.timeout))
                row = job.score(facts)
                row.update(_self_ref_facts(report), **_label_p(report))
                rows.append(row)
                print(f"[{len(rows)}/{total}] {job.key}: "
                      f"{row.get('verdict', row.get('error', '?'))} score={row.get('score')} "
                      f"targets={row.get('suspected_targets')} truth={side['targets']} "
                      f"({row.get('cli_wall_s') or 'reused'} s)", flush=True)
                summary = run.summarise(rows)
                result = {"command": cmd, "zoo": str(args.zoo), "split": args.split,
                          "code": run.code_state(), "pairs": len(chosen),
                          "variants": {n: e for n, e in variants},
                          "wall_s": round(time.perf_counter() - t0, 1),
                          "errors": [r for r in rows if "error" in r], "summary": summary,
                          "rows": sorted(rows, key=lambda r: (r["variant"], r["model"]))}
                args.results.mkdir(parents=True, exist_ok=True)
                zoo.write_json(args.results / f"{args.name}.json", result)
                md = (f"Command: `{cmd}` — {len(chosen)} pairs, {len(rows)}/{total} scans "
                      f"done; families marked * are held-out only.\n\n"
                      + run.markdown(summary, held))
                (args.results / f"{args.name}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
