"""The in-house MNTD benchmark's verdicts re-read against the shipped null and against the
bundle's own reference models alone (the raw outputs, hence AUROC, do not depend on it).

    python -m benchmarks.wild.mntd_inhouse_null [--results benchmarks/results/mntd_sets3538.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trojanscan.mntd.calibration import auroc, fit_tail, tail_p_value, threshold_at_fpr

from .mntd_null_cv import shipped_null

KEY = "fashion-mnist:stamp_one_class_search_flow"  # the default recipe's raw output


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results/mntd_sets3538.json")
    args = ap.parse_args(argv)
    models = [m for m in json.loads(Path(args.results).read_text())["score"]["models"]
              if KEY in m]
    y = np.array([m["kind"] != "clean" for m in models])
    raw = np.array([float(m[KEY]) for m in models])
    print(f"{len(models)} in-house models ({int(y.sum())} backdoored), AUROC "
          f"{auroc(y, raw):.3f}")
    print("| null | threshold (5%) | TPR / FPR at it | TPR / FPR at p < 0.05 |\n"
          "| --- | --- | --- | --- |")
    for name, null in (("the bundle's own 64 references", shipped_null(own_only=True)),
                       ("shipped: 64 + 36 added", shipped_null())):
        thr = threshold_at_fpr(null, 0.05)
        tail = fit_tail(null)
        p = np.array([tail_p_value(float(r), null, tail)[0] for r in raw])
        print(f"| {name} | {thr:.1f} | {(raw[y] > thr).mean():.2f} / {(raw[~y] > thr).mean():.2f}"
              f" | {(p[y] < 0.05).mean():.2f} / {(p[~y] < 0.05).mean():.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
