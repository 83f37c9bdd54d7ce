"""Benchmark: the fused ``scan`` verdict against each model-level detector alone.

Model sets (trained and cached by the detector benchmarks):

* ``nc`` — the Neural Cleanse benchmark: 6 backdoored ``small_cnn`` (BadNets 3–5 px at
  different places and targets, Blend) and 5 clean ones, Fashion-MNIST, 60k images
  (``benchmarks/bench_neural_cleanse.py --train-only``).
* ``mntd`` — the MNTD held-out set: 24 clean and 24 backdoored ``mlp``/``lenet`` models
  (BadNets, Blend, WaNet, SIG, all-to-all, source-specific; 4 each), 5,000 images each
  (``benchmarks/bench_mntd.py``).

Each model is scanned once by Neural Cleanse (fast mode, seed 0, 1,000 clean
Fashion-MNIST test images) and MNTD (the shipped ``fashion-mnist`` meta-classifier,
query-tuned variant); results go to a JSON-lines log (reruns skip logged models). The
decisions are then taken per model:

* ``nc_index`` — Neural Cleanse with the paper's rule (what ``scan`` does by default);
* ``nc_reference`` — Neural Cleanse against clean reference models (``--nc-reference``):
  leave-one-out, the *other* clean models of the same set and architecture;
* ``mntd`` — MNTD at its shipped threshold;
* ``fused`` — :func:`trojanscan.maths.fusion.fuse` (Bonferroni min-p, α = 0.05) of
  ``nc_reference`` and ``mntd`` — the verdict of ``scan --nc-reference ...``;
* ``fused_index`` — the same with ``nc_index`` — the verdict of a plain ``scan``.

Prints per set and per attack: detection rate on backdoored models, false alarms on
clean ones, accuracy; writes ``benchmarks/results/fusion.json``.

Usage::

    python benchmarks/bench_fusion.py --jobs 2            # run what is missing, then report
    python benchmarks/bench_fusion.py --report-only       # from the log
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
CACHES = {"nc": ROOT / ".cache" / "neural_cleanse", "mntd": ROOT / ".cache" / "mntd" / "targets"}
LOG = ROOT / "results" / "fusion_runs.jsonl"
RESULTS = ROOT / "results" / "fusion.json"
ALPHA = 0.05
_STATE: dict[str, Any] = {}


def models(which: list[str]) -> list[tuple[str, Path]]:
    out = []
    for s in which:
        for pt in sorted(CACHES[s].glob("*.pt")):
            if pt.with_suffix(".json").is_file():
                out.append((s, pt))
    return out


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def scan_one(task: tuple[str, str]) -> dict[str, Any]:
    """Neural Cleanse (fast) and MNTD on one model; the raw evidence both decisions need."""
    import torch

    from trojanscan.detectors.mntd import MNTD
    from trojanscan.detectors.neural_cleanse import NeuralCleanse
    from trojanscan.io.data import load_dataset

    set_name, path = task
    if "clean" not in _STATE:
        _STATE["clean"] = load_dataset("fashion-mnist:test")
    clean = _STATE["clean"]
    meta = json.loads(Path(path).with_suffix(".json").read_text())
    model = torch.jit.load(path, map_location="cpu").eval()
    t0 = time.perf_counter()
    nc = NeuralCleanse(seed=0, images=False).fit(model, clean)
    t1 = time.perf_counter()
    mn = MNTD(seed=0).fit(model, clean)
    t2 = time.perf_counter()
    attack = meta.get("attack") or {}
    return {
        "set": set_name, "model": Path(path).stem, "arch": meta.get("arch"),
        "attack": attack.get("name", "clean") if meta.get("backdoored") else "clean",
        "backdoored": bool(meta.get("backdoored")), "target": attack.get("target"),
        "model_asr": meta.get("asr"), "clean_accuracy": meta.get("clean_accuracy"),
        "nc_norms": nc.evidence["l1_norms"], "nc_reached": nc.evidence["reached_threshold"],
        "nc_index_flagged": nc.evidence["index_flagged_labels"],
        "nc_index_p": nc.p_value, "nc_seconds": t1 - t0,
        "mntd_verdict": mn.verdict, "mntd_p": mn.p_value, "mntd_score": mn.score,
        "mntd_seconds": t2 - t1,
    }


def decide(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model: each detector's verdict and the fused ones (see the module docstring)."""
    from trojanscan.maths.fusion import Evidence, fuse
    from trojanscan.maths.outliers import reference_p_values

    out = []
    for r in rows:
        refs = [c["nc_norms"] for c in rows if not c["backdoored"] and c["set"] == r["set"]
                and c["arch"] == r["arch"] and c["model"] != r["model"]]
        p = reference_p_values(np.maximum(r["nc_norms"], 1e-12), np.array(refs))
        ref_flagged = [k for k in range(len(p)) if p[k] < ALPHA and r["nc_reached"][k]]
        nc_ref = Evidence("neural_cleanse", bool(ref_flagged), float(p.min()),
                          tuple(ref_flagged))
        nc_idx = Evidence("neural_cleanse", bool(r["nc_index_flagged"]), r["nc_index_p"],
                          tuple(r["nc_index_flagged"]))
        mntd = Evidence("mntd", r["mntd_verdict"] == "backdoored", r["mntd_p"])
        fused = fuse([nc_ref, mntd], alpha=ALPHA)
        fused_idx = fuse([nc_idx, mntd], alpha=ALPHA)
        out.append({**r, "num_references": len(refs), "verdicts": {
            "nc_index": nc_idx.backdoored, "nc_reference": nc_ref.backdoored,
            "mntd": mntd.backdoored, "fused": fused.backdoored,
            "fused_index": fused_idx.backdoored},
            "targets": {"nc_index": list(nc_idx.suspected_targets),
                        "nc_reference": ref_flagged,
                        "fused": list(fused.suspected_targets)},
            "fused_p": fused.p_value, "nc_reference_p": float(p.min())})
    return out


RULES = ("nc_index", "nc_reference", "mntd", "fused_index", "fused")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(rs: list[dict[str, Any]]) -> dict[str, Any]:
        bd = [r for r in rs if r["backdoored"]]
        cl = [r for r in rs if not r["backdoored"]]
        out: dict[str, Any] = {"backdoored": len(bd), "clean": len(cl)}
        for rule in RULES:
            tp = sum(r["verdicts"][rule] for r in bd)
            fp = sum(r["verdicts"][rule] for r in cl)
            out[rule] = {"detected": tp, "false_alarms": fp,
                         "accuracy": (tp + len(cl) - fp) / max(1, len(rs))}
        return out

    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[f"{r['set']}: all"].append(r)
        if r["backdoored"]:
            groups[f"{r['set']}: {r['attack']}"].append(r)
    groups["all sets"] = rows
    return {g: stats(rs) for g, rs in groups.items()}


def table(summary: dict[str, Any]) -> str:
    head = "| models | " + " | ".join(RULES) + " |"
    lines = [head, "|" + "---|" * (len(RULES) + 1)]
    for g, s in summary.items():
        cells = []
        for rule in RULES:
            v = s[rule]
            cell = f"{v['detected']}/{s['backdoored']}"
            if s["clean"]:
                cell += f", FA {v['false_alarms']}/{s['clean']}, acc {v['accuracy']:.2f}"
            cells.append(cell)
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="nc,mntd")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log", type=Path, default=LOG)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    sets = [s for s in a.sets.split(",") if s]
    done = set()
    if a.log.is_file():
        done = {(r["set"], r["model"]) for r in map(json.loads, a.log.read_text().splitlines())}
    tasks = [(s, str(p)) for s, p in models(sets) if (s, p.stem) not in done]
    t0 = time.perf_counter()
    if tasks and not a.report_only:
        print(f"scanning {len(tasks)} models with {a.jobs} job(s)", flush=True)
        a.log.parent.mkdir(parents=True, exist_ok=True)
        with mp.get_context("spawn").Pool(a.jobs, initializer=_init,
                                          initargs=(a.threads,)) as pool:
            for r in pool.imap_unordered(scan_one, tasks):
                with open(a.log, "a") as f:
                    f.write(json.dumps(r) + "\n")
                print(json.dumps({k: r[k] for k in ("set", "model", "attack",
                                                    "nc_index_flagged", "mntd_verdict",
                                                    "nc_seconds")}), flush=True)
    rows = [r for r in map(json.loads, a.log.read_text().splitlines()) if r["set"] in sets]
    decided = decide(rows)
    summary = summarise(decided)
    print(table(summary))
    doc = {"benchmark": "fusion", "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
           "alpha": ALPHA, "wall_seconds": time.perf_counter() - t0, "summary": summary,
           "models": decided}
    from trojanscan.utils import atomic_write_text

    atomic_write_text(a.results, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
