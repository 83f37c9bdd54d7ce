"""Benchmark MM-BD (Wang et al., IEEE S&P 2024) on the wild Fashion-MNIST zoo, no data.

Each model of the zoo (``benchmarks/.cache/wild/seed0``) is loaded as TorchScript and
scanned by the ``mmbd`` detector with the input shape only (1×28×28), no clean data.
One JSON line per model is appended to ``--records`` as it finishes (a killed run
resumes); then the summary: AUROC of the score (−log10 of the paper's p-value) over
backdoored vs clean models, TPR/FPR of the verdict at α for the faithful (paper) and the
calibrated p-value, and how often the tested class is a true target.

    OMP_NUM_THREADS=1 python benchmarks/bench_mmbd.py --split dev
    OMP_NUM_THREADS=1 python benchmarks/bench_mmbd.py --split all --dev-pairs 10 \
        --heldout-pairs 10
    python benchmarks/bench_mmbd.py --summary-only --split all --dev-pairs 10 \
        --heldout-pairs 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.wild.metrics import auroc  # noqa: E402
from benchmarks.wild.zoo import load_sidecars  # noqa: E402

DEFAULT_CACHE = ROOT / "benchmarks/.cache/wild/seed0"
DEFAULT_RECORDS = ROOT / "benchmarks/.cache/mmbd/records.jsonl"
DEFAULT_RESULTS = ROOT / "benchmarks/results/mmbd.json"
SHAPE = (1, 28, 28)


def _first_pairs(models: list[dict[str, Any]], n: int | None, skip: int = 0
                 ) -> list[dict[str, Any]]:
    if n is None and not skip:
        return models
    pairs = sorted({s["pair"] for s in models})[skip:n]
    return [s for s in models if s["pair"] in pairs]


def select(sidecars: list[dict[str, Any]], split: str, heldout_pairs: int | None,
           dev_pairs: int | None = None, heldout_skip: int = 0) -> list[dict[str, Any]]:
    """Dev models and/or held-out ones, each limited to its first N pairs (by pair
    index; the first ``heldout_skip`` held-out pairs left out, for a second worker);
    development models come first."""
    dev = _first_pairs([s for s in sidecars if s["split"] == "dev"], dev_pairs)
    held = _first_pairs([s for s in sidecars if s["split"] == "heldout"], heldout_pairs,
                        heldout_skip)
    chosen = {"dev": dev, "heldout": held, "all": dev + held}[split]
    return sorted(chosen, key=lambda s: (s["split"] != "dev", s["pair"], s["name"]))


def scan_one(sidecar: dict[str, Any], cache: Path, params: dict[str, Any]) -> dict[str, Any]:
    from trojanscan.detectors.mmbd import MMBD
    from trojanscan.io.models import load_model

    loaded = load_model(cache / "models" / Path(sidecar["model_file"]).name,
                        input_shape=SHAPE, device="cpu")
    t0 = time.perf_counter()
    r = MMBD(input_shape=SHAPE, **params).fit(loaded.module)
    ev = r.evidence
    return {"name": sidecar["name"], "pair": sidecar["pair"], "split": sidecar["split"],
            "backdoored": bool(sidecar["backdoored"]), "targets": sidecar.get("targets") or [],
            "families": sidecar.get("families"), "params": params,
            "max_margins": ev["max_margins"], "tested_class": ev["tested_class"],
            "faithful_p": ev["faithful_p_value"], "calibrated_p": ev["calibrated_p_value"],
            "neg_log10_p": ev["neg_log10_p_value"], "verdict": r.verdict,
            "suspected_targets": list(r.suspected_targets),
            "seconds": time.perf_counter() - t0}


def read_records(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["name"]] = rec
    return out


def rates(recs: list[dict[str, Any]], key: str, alpha: float) -> dict[str, Any]:
    bd = [r for r in recs if r["backdoored"]]
    cl = [r for r in recs if not r["backdoored"]]
    tp = sum(r[key] < alpha for r in bd)
    fp = sum(r[key] < alpha for r in cl)
    named = sum(r[key] < alpha and r["tested_class"] in r["targets"] for r in bd)
    return {"tpr": tp / len(bd) if bd else None, "fpr": fp / len(cl) if cl else None,
            "detected": tp, "false_alarms": fp, "target_named_when_detected":
            (named / tp if tp else None), "n_backdoored": len(bd), "n_clean": len(cl)}


def summarise(recs: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
    bd = [r for r in recs if r["backdoored"]]
    cl = [r for r in recs if not r["backdoored"]]

    def score(r: dict[str, Any]) -> float:
        v = r["neg_log10_p"]
        return math.inf if v is None else float(v)

    top_is_target = [r["tested_class"] in r["targets"] for r in bd]
    return {
        "n_models": len(recs),
        "auroc_neg_log10_p": auroc([score(r) for r in bd], [score(r) for r in cl]),
        "auroc_calibrated_p": auroc([-r["calibrated_p"] for r in bd],
                                    [-r["calibrated_p"] for r in cl]),
        "faithful": rates(recs, "faithful_p", alpha),
        "calibrated": rates(recs, "calibrated_p", alpha),
        "top_class_is_target": (sum(top_is_target) / len(bd)) if bd else None,
        "median_seconds": sorted(r["seconds"] for r in recs)[len(recs) // 2] if recs else None,
    }


def by_trigger(recs: list[dict[str, Any]], alpha: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in recs:
        if r["backdoored"]:
            t = (r.get("families") or {}).get("trigger", "?")
            row = out.setdefault(t, {"n": 0, "faithful_detected": 0, "top_is_target": 0})
            row["n"] += 1
            row["faithful_detected"] += int(r["faithful_p"] < alpha)
            row["top_is_target"] += int(r["tested_class"] in r["targets"])
    return out


def table(name: str, s: dict[str, Any]) -> str:
    f, c = s["faithful"], s["calibrated"]

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    return (f"{name:<10} n={s['n_models']:<4} AUROC(-log p)={fmt(s['auroc_neg_log10_p'])} "
            f"AUROC(cal p)={fmt(s['auroc_calibrated_p'])} | faithful TPR={fmt(f['tpr'])} "
            f"FPR={fmt(f['fpr'])} | calibrated TPR={fmt(c['tpr'])} FPR={fmt(c['fpr'])} | "
            f"top=target {fmt(s['top_class_is_target'])} | {fmt(s['median_seconds'])} s/model")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--records", type=Path, default=DEFAULT_RECORDS)
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--split", choices=("dev", "heldout", "all"), default="dev")
    ap.add_argument("--heldout-pairs", type=int, default=None,
                    help="score only the first N held-out pairs")
    ap.add_argument("--heldout-skip", type=int, default=0,
                    help="leave out the first N held-out pairs (another worker scores them)")
    ap.add_argument("--dev-pairs", type=int, default=None,
                    help="score only the first N development pairs")
    ap.add_argument("--limit", type=int, default=None, help="at most N models (cost probe)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    chosen = select(load_sidecars(args.cache), args.split, args.heldout_pairs,
                    args.dev_pairs, args.heldout_skip)
    if args.limit is not None:
        chosen = chosen[:args.limit]
    args.records.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(args.records)
    params = {"mode": "faithful", "seed": 0}
    if not args.summary_only:
        for i, sc in enumerate(chosen):
            if sc["name"] in done:
                continue
            rec = scan_one(sc, args.cache, params)
            with args.records.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            done[sc["name"]] = rec
            print(f"[{i + 1}/{len(chosen)}] {rec['name']} bd={rec['backdoored']} "
                  f"p={rec['faithful_p']:.3g} cal={rec['calibrated_p']:.3g} "
                  f"top={rec['tested_class']} targets={rec['targets']} "
                  f"{rec['seconds']:.1f}s", flush=True)
    recs = [done[s["name"]] for s in chosen if s["name"] in done]
    splits = {sp: [r for r in recs if r["split"] == sp] for sp in ("dev", "heldout")}
    summary = {sp: summarise(rs, args.alpha) for sp, rs in splits.items() if rs}
    summary["all"] = summarise(recs, args.alpha)
    out = {"benchmark": "mmbd-wild", "zoo": str(args.cache.relative_to(ROOT))
           if args.cache.is_relative_to(ROOT) else str(args.cache),
           "alpha": args.alpha, "params": params, "input_shape": list(SHAPE),
           "data_used": False, "split": args.split, "heldout_pairs": args.heldout_pairs,
           "dev_pairs": args.dev_pairs,
           "summary": summary,
           "by_trigger": {sp: by_trigger(rs, args.alpha) for sp, rs in splits.items() if rs},
           "command": "OMP_NUM_THREADS=1 python benchmarks/bench_mmbd.py " +
                      " ".join(argv if argv is not None else sys.argv[1:])}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.results)
    for name, s in summary.items():
        print(table(name, s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
