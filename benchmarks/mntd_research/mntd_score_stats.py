"""Offline figures from a ``bench_mntd.py score`` result: bootstrap intervals and
per-attack × architecture AUROC, read from the stored raw scores (nothing is re-scored).

For one variant: AUROC with a stratified bootstrap 95% interval (backdoored and clean
models resampled separately, seeded) on all models of each given group of sets, and on
the backdoors that took (ASR ≥ 0.5) per attack and architecture against all clean models.
The session-15 figures (``docs/benchmarks/mntd_prereg_s15.md``)::

    python benchmarks/mntd_research/mntd_score_stats.py benchmarks/results/mntd_sets3134.json \\
        --variant stamp_one_class_search_x2 --groups 31,32:33,34:31,32,33,34
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    p, n = s[y][:, None], s[~y][None]
    return float(((p > n) + 0.5 * (p == n)).mean())


def bootstrap(y: np.ndarray, s: np.ndarray, n: int = 2000, seed: int = 0,
              ) -> tuple[float, float]:
    """Stratified bootstrap 95% interval of the AUROC."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    b = [auroc(y[i], s[i]) for i in (np.r_[rng.choice(pos, len(pos)),
                                             rng.choice(neg, len(neg))] for _ in range(n))]
    lo, hi = np.percentile(b, [2.5, 97.5])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a bench_mntd.py score JSON")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--meta", default="fashion-mnist")
    ap.add_argument("--groups", default=None,
                    help="groups of sets, colon-separated (default: all sets together)")
    ap.add_argument("--took", type=float, default=0.5, help="ASR a backdoor 'took' at")
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.results).read_text())["score"]["models"]
    key = f"{args.meta}:{args.variant}"
    groups = ([[int(s) for s in g.split(",")] for g in args.groups.split(":")]
              if args.groups else [sorted({r["set"] for r in rows})])
    print(f"{args.variant}: AUROC on all models, stratified bootstrap 95% interval")
    for g in groups:
        sub = [r for r in rows if r["set"] in g and r["key"].startswith("t")]
        y = np.array([r["kind"] != "clean" for r in sub])
        s = np.array([r[key] for r in sub])
        lo, hi = bootstrap(y, s)
        print(f"  sets {','.join(map(str, g))} ({len(sub)} models): {auroc(y, s):.3f} "
              f"[{lo:.3f}, {hi:.3f}]")
    sub = [r for r in rows if r["set"] in groups[-1] and r["key"].startswith("t")]
    y = np.array([r["kind"] != "clean" for r in sub])
    s = np.array([r[key] for r in sub])
    kinds = list(dict.fromkeys(r["kind"] for r in sub if r["kind"] != "clean"))
    archs = list(dict.fromkeys(r["arch"] for r in sub))
    print(f"backdoors that took (ASR >= {args.took}) against all clean models, sets "
          f"{','.join(map(str, groups[-1]))}: AUROC (backdoors)")
    print("| attack | " + " | ".join(archs) + " |")
    print("|---|" + "---|" * len(archs))
    for kind in kinds:
        cells = []
        for arch in archs:
            idx = [i for i, r in enumerate(sub) if r["kind"] == "clean" or (
                r["kind"] == kind and r["arch"] == arch and r["asr"] >= args.took)]
            n = sum(y[i] for i in idx)
            cells.append(f"{auroc(y[idx], s[idx]):.3f} ({n})" if n else "—")
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
