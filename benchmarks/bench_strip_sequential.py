"""Forward passes per input: default ``filter`` (sequential STRIP) against fixed-N STRIP.

For each wild-zoo model chosen (``--split``, ``--models``), both detectors are calibrated
on the defender's clean images (``zoo.write_defender_clean``'s range) at FRR 1% and
decide on the model's filter inputs (``zoo.filter_inputs``: triggered then clean, disjoint
from the calibration images). Per model and detector: FAR, FRR, mean model evaluations
per input (the plain prediction included; also over the clean and the triggered inputs
apart) and seconds per input, timed in this one run;
then the ratio fixed-N ÷ sequential. With ``--art`` (IBM's adversarial-robustness-toolbox
installed) also ART's STRIP on the same model, calibration and inputs: as it ships (20
overlays, false-acceptance rate 1%, on the model's softmax), and with its entropy taken per
overlaid image (ART sums it over the 20 images per class instead); the ratio ART ÷
default is per-input time. Prints a table and writes
``benchmarks/results/strip_sequential.json``.

    python -m benchmarks.bench_strip_sequential --split dev --n-inputs 250 [--art]
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
from benchmarks.wild import zoo

from trojanscan.dataset import ImageDataset
from trojanscan.detectors.strip import Strip
from trojanscan.utils import atomic_write_text

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "strip_sequential.json"
DETECTORS = {
    "sequential (default filter)": lambda: Strip(seed=0, device="cpu"),
    "fixed N=100 (paper)": lambda: Strip.paper(seed=0, device="cpu"),
}


ART_SHIPPED = "ART STRIP (as shipped)"
ART_FIXED = "ART STRIP (entropy per image)"


def art_rows(model: torch.nn.Module, side: dict[str, Any], clean: ImageDataset,
             xt: torch.Tensor, trig: np.ndarray) -> list[dict[str, Any]]:
    """ART's STRIP on ``xt``: flagged = ART abstained (an all-zero prediction)."""
    import importlib

    from art.defences.transformer.poisoning import STRIP as ArtStrip
    from art.estimators.classification import PyTorchClassifier
    from scipy.stats import entropy

    art_strip = importlib.import_module("art.estimators.poison_mitigation.strip.strip")
    shipped_entropy = art_strip.entropy
    rows = []
    for label in (ART_SHIPPED, ART_FIXED):
        np.random.seed(0)  # ART draws its overlays from numpy's global generator
        art_strip.entropy = (shipped_entropy if label == ART_SHIPPED else
                             lambda p, base=None, axis=0: entropy(p, base=base, axis=1))
        try:
            clf = PyTorchClassifier(model=torch.nn.Sequential(model, torch.nn.Softmax(dim=1)),
                                    loss=torch.nn.CrossEntropyLoss(),
                                    input_shape=tuple(xt.shape[1:]), nb_classes=10,
                                    clip_values=(0.0, 1.0), device_type="cpu")
            defended = ArtStrip(clf)(num_samples=20, false_acceptance_rate=0.01)
            defended.mitigate(clean.x.numpy()[:1000])
            x = xt.numpy()
            t0 = time.perf_counter()
            pred = defended.predict(x)
            secs = time.perf_counter() - t0
        finally:
            art_strip.entropy = shipped_entropy
        flagged = ~pred.any(axis=1)
        rows.append({
            "model": side["name"], "trigger": side["families"]["pair_trigger"],
            "detector": label, "far": float((~flagged[trig]).mean()),
            "frr": float(flagged[~trig].mean()), "frr_holdout": None,
            "mean_forwards_per_input": 21.0, "seconds_per_input": secs / len(x)})
        print(f"{side['name']} {rows[-1]['trigger']:14s} {label:28s} FAR {rows[-1]['far']:.3f} "
              f"FRR {rows[-1]['frr']:.3f} passes/input   21.0 "
              f"{1000 * secs / len(x):.2f} ms/input", flush=True)
    return rows


def run_model(side: dict[str, Any], cache: Path, clean: ImageDataset, n: int,
              art: bool = False) -> list[dict[str, Any]]:
    model = torch.jit.load(str(cache / "models" / f"{side['name']}.pt"), map_location="cpu")
    model.eval()
    x, trig = zoo.filter_inputs(side, n)
    xt = torch.from_numpy(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x)
    rows = []
    for label, make in DETECTORS.items():
        det = make().fit(model, clean)
        t0 = time.perf_counter()
        d = det.decide(xt)
        secs = time.perf_counter() - t0
        rows.append({
            "model": side["name"], "trigger": side["families"]["pair_trigger"],
            "detector": label, "far": float((~d.flagged[trig]).mean()),
            "frr": float(d.flagged[~trig].mean()), "frr_holdout": det.frr_measured_,
            "mean_forwards_per_input": d.mean_forwards,
            "mean_forwards_clean": float(np.asarray(d.forwards, dtype=float)[~trig].mean()),
            "mean_forwards_triggered": float(np.asarray(d.forwards, dtype=float)[trig].mean()),
            "seconds_per_input": secs / len(xt),
        })
        print(f"{side['name']} {rows[-1]['trigger']:14s} {label:28s} FAR {rows[-1]['far']:.3f} "
              f"FRR {rows[-1]['frr']:.3f} passes/input {d.mean_forwards:6.1f} "
              f"{1000 * secs / len(xt):.2f} ms/input", flush=True)
    if art:
        rows += art_rows(model, side, clean, xt, trig)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=HERE / ".cache" / "wild" / "seed0")
    ap.add_argument("--split", default="dev", choices=["dev", "heldout"])
    ap.add_argument("--models", type=int, default=4, help="backdoored models to use")
    ap.add_argument("--n-inputs", type=int, default=250, help="triggered and clean each")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--art", action="store_true", help="also ART's STRIP (needs ART)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sides = [s for s in zoo.load_sidecars(args.zoo)
             if s["backdoored"] and s["split"] == args.split][:args.models]
    xc, _ = zoo._test_range(zoo.DEFENDER_CLEAN)
    clean = ImageDataset(torch.from_numpy(xc[:, None].astype(np.float32) / 255.0),
                         source="defender clean")
    rows = [r for s in sides for r in run_model(s, args.zoo, clean, args.n_inputs, args.art)]
    seq = [r for r in rows if r["detector"].startswith("sequential")]
    fix = [r for r in rows if r["detector"].startswith("fixed")]
    summary = {
        "mean_forwards_sequential": float(np.mean([r["mean_forwards_per_input"] for r in seq])),
        "mean_forwards_fixed": float(np.mean([r["mean_forwards_per_input"] for r in fix])),
        "seconds_per_input_sequential": float(np.mean([r["seconds_per_input"] for r in seq])),
        "seconds_per_input_fixed": float(np.mean([r["seconds_per_input"] for r in fix])),
        "mean_far_sequential": float(np.mean([r["far"] for r in seq])),
        "mean_far_fixed": float(np.mean([r["far"] for r in fix])),
    }
    summary["forwards_ratio_fixed_over_sequential"] = (
        summary["mean_forwards_fixed"] / summary["mean_forwards_sequential"])
    for part in ("clean", "triggered"):
        summary[f"mean_forwards_sequential_{part}"] = float(
            np.mean([r[f"mean_forwards_{part}"] for r in seq]))
        summary[f"forwards_ratio_fixed_over_sequential_{part}"] = (
            summary["mean_forwards_fixed"] / summary[f"mean_forwards_sequential_{part}"])
    summary["time_ratio_fixed_over_sequential"] = (
        summary["seconds_per_input_fixed"] / summary["seconds_per_input_sequential"])
    for label in (ART_SHIPPED, ART_FIXED):
        art = [r for r in rows if r["detector"] == label]
        if art:
            key = "art_shipped" if label == ART_SHIPPED else "art_entropy_per_image"
            summary[f"seconds_per_input_{key}"] = float(np.mean([r["seconds_per_input"]
                                                                for r in art]))
            summary[f"mean_far_{key}"] = float(np.mean([r["far"] for r in art]))
            summary[f"time_ratio_{key}_over_sequential"] = (
                summary[f"seconds_per_input_{key}"] / summary["seconds_per_input_sequential"])
    print("\n| model | trigger | detector | FAR | FRR | passes/input | ms/input |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['trigger']} | {r['detector']} | {r['far']:.3f} | "
              f"{r['frr']:.3f} | {r['mean_forwards_per_input']:.1f} | "
              f"{1000 * r['seconds_per_input']:.2f} |")
    print(f"\nfixed ÷ sequential: {summary['forwards_ratio_fixed_over_sequential']:.2f}× "
          f"forward passes, {summary['time_ratio_fixed_over_sequential']:.2f}× time per input; "
          f"on clean inputs {summary['forwards_ratio_fixed_over_sequential_clean']:.2f}× "
          f"({summary['mean_forwards_sequential_clean']:.1f} passes), on triggered ones "
          f"{summary['forwards_ratio_fixed_over_sequential_triggered']:.2f}×")
    for key in ("art_shipped", "art_entropy_per_image"):
        if f"time_ratio_{key}_over_sequential" in summary:
            print(f"{key} ÷ sequential: {summary[f'time_ratio_{key}_over_sequential']:.2f}× "
                  f"time per input (mean FAR {summary[f'mean_far_{key}']:.3f} against "
                  f"{summary['mean_far_sequential']:.3f})")
    atomic_write_text(args.out, json.dumps({"command": " ".join(sys.argv), "rows": rows,
                                            "summary": summary}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
