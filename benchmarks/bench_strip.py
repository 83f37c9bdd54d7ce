"""Benchmark the runtime detector (STRIP, its variants) on Fashion-MNIST backdoored models.

Two parts, both printed as tables and written to ``benchmarks/results/runtime.json``:

detection
    For each model (BadNets, Blend, SIG, WaNet, source-specific and a clean model; small_cnn,
    seed 0, cached in ``benchmarks/.cache/runtime``) the detector is calibrated on the first
    2,000 Fashion-MNIST test images at FRR 1% (its own fit/holdout split measures the FRR on
    held-out clean inputs) and evaluated on test images 4,000+: the FRR on ``--n-eval``
    further clean images and the FAR (triggered inputs accepted) on ``--n-eval`` stamped
    images whose true class the attack targets (``attack.eligible``), over all of them and
    over those the trigger actually flips ("effective").
throughput
    Plain inference (model(x).argmax over batches of ``--batch`` images) against
    ``Strip.paper().filter(x)`` (fixed N) on the same model, interleaved
    ``--repeats`` times in one run (medians), on ``--device`` (CPU here); reports each in
    inputs/s and STRIP's ratio to the limit plain ÷ N.

Usage::

    python benchmarks/bench_strip.py                      # everything on the default device
    python benchmarks/bench_strip.py --device cuda --skip-throughput
    python benchmarks/bench_strip.py --device cpu --skip-detection   # throughput on CPU
    python benchmarks/bench_strip.py --train-only [--device cuda]    # just fill the cache
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from trojanscan import archs
from trojanscan.attacks import parse_attack
from trojanscan.detectors.strip import Strip
from trojanscan.io.data import load_dataset
from trojanscan.maths import runtime as rt
from trojanscan.utils import atomic_write_text, pick_device
from trojanscan.zoo import make_model, save_model

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "runtime"
RESULTS = HERE / "results" / "runtime.json"

#: name -> (attack spec, poison rate); source-specific at 5% = half of class 1
MODELS: dict[str, tuple[str, float]] = {
    "badnets": ("badnets:size=3,target=0", 0.1),
    "badnets4": ("badnets:size=4,target=0", 0.1),
    "blend": ("blend:alpha=0.2,target=0", 0.1),
    "sig": ("sig:target=0", 0.05),
    "wanet": ("wanet:target=0", 0.1),
    "source": ("source:source=1,target=0", 0.05),
    "clean": ("none", 0.0),
}

#: detector configurations of the detection table: label -> factory(device)
CONFIGS: dict[str, Any] = {
    "STRIP (paper: N=100, sum_clip, normal fit)": lambda d: Strip.paper(device=d),
    "STRIP (default: any of 4 kinds, confidence, sequential)": lambda d: Strip(device=d),
    "STRIP, empirical threshold": lambda d: Strip.paper(threshold_method="empirical", device=d),
    "STRIP, max blend": lambda d: Strip.paper(blend="max", device=d),
    "STRIP, max blend, empirical threshold": lambda d: Strip.paper(blend="max",
                                                             threshold_method="empirical",
                                                             device=d),
    "STRIP, median": lambda d: Strip.paper(statistic="median", device=d),
    "STRIP, median, empirical threshold": lambda d: Strip.paper(statistic="median",
                                                          threshold_method="empirical",
                                                          device=d),
    "STRIP, max blend, median, empirical threshold": lambda d: Strip.paper(
        blend="max", statistic="median", threshold_method="empirical", device=d),
    "STRIP, unclipped sum (reference code)": lambda d: Strip.paper(blend="sum", device=d),
    "STRIP, average blend": lambda d: Strip.paper(blend="average", device=d),
    "STRIP, N=10 (cheap)": lambda d: Strip.paper(n_overlays=10, device=d),
    "STRIP, consistency": lambda d: Strip.paper(statistic="consistency", device=d),
    "STRIP, consistency, empirical threshold": lambda d: Strip.paper(
        statistic="consistency", threshold_method="empirical", device=d),
    "STRIP, max blend, consistency": lambda d: Strip.paper(blend="max", statistic="consistency",
                                                     device=d),
    "STRIP, max blend, consistency, empirical threshold": lambda d: Strip.paper(
        blend="max", statistic="consistency", threshold_method="empirical", device=d),
    "STRIP, max blend, consistency, empirical threshold, FRR target 0.7%": lambda d: Strip.paper(
        blend="max", statistic="consistency", threshold_method="empirical", frr=0.007,
        device=d),
    "STRIP, max blend, empirical threshold, FRR target 0.7%": lambda d: Strip.paper(
        blend="max", threshold_method="empirical", frr=0.007, device=d),
    # every calibration image used (no 2,000 cap), 10% overlay pool, 10% holdout: with
    # --calib-size 4000 the threshold is fitted on 3,200 images instead of 1,200
    "STRIP, max blend, empirical threshold, all calibration images": lambda d: Strip.paper(
        blend="max", threshold_method="empirical", max_samples=None, pool_fraction=0.1,
        holdout_fraction=0.1, device=d),
    "STRIP, max blend, consistency, empirical threshold, all calibration images":
        lambda d: Strip.paper(blend="max", statistic="consistency", threshold_method="empirical",
                        max_samples=None, pool_fraction=0.1, holdout_fraction=0.1,
                        device=d),
    # session 4: the mean of the 10% highest overlay entropies, and the conservative rule
    "STRIP, max blend, tail, empirical threshold": lambda d: Strip.paper(
        blend="max", statistic="tail", threshold_method="empirical", device=d),
    "STRIP, max blend, tail, conservative threshold": lambda d: Strip.paper(
        blend="max", statistic="tail", threshold_method="conservative", device=d),
    "STRIP, max blend, tail, conservative threshold, all calibration images": lambda d: Strip.paper(
        blend="max", statistic="tail", threshold_method="conservative", max_samples=None,
        pool_fraction=0.1, holdout_fraction=0.1, device=d),
    "STRIP, tail, conservative threshold, all calibration images": lambda d: Strip.paper(
        statistic="tail", threshold_method="conservative", max_samples=None,
        pool_fraction=0.1, holdout_fraction=0.1, device=d),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cached_model(name: str, train: Any, test: Any, seed: int = 0, device: str | None = None
                 ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model ``name`` from the cache, trained (and cached) first if missing."""
    spec, rate = MODELS[name]
    path = CACHE / f"fmnist-{name}-s{seed}.pt"
    side = path.with_suffix(".json")
    if not side.exists():
        if train is None:
            train = load_dataset("fashion-mnist:train")
        if device not in (None, "cpu"):
            # zoo.make_model evaluates on `device` but train_model returns a CPU model;
            # keep the trained model on the device until save_model moves it back
            import trojanscan.zoo as zoo
            from trojanscan.training import train_model

            zoo.train_model = lambda *a, **k: train_model(*a, **k).to(device)
        atk = parse_attack(spec)
        t0 = time.perf_counter()
        trained = make_model(train, test, attack=atk, poison_rate=rate if atk else 0.1,
                             arch="small_cnn", seed=seed, device=device,
                             description=f"training {name}")
        save_model(trained, path)
        log(f"trained {name}: acc {trained.clean_accuracy:.4f} asr {trained.asr} "
            f"({time.perf_counter() - t0:.0f} s)")
    meta = json.loads(side.read_text())
    model = archs.build("small_cnn", tuple(meta["input_shape"]), meta["num_classes"])
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return model.eval(), meta


def triggered_inputs(name: str, ds: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stamped eligible inputs of ``ds`` (first ``n``) and the labels the attack wants."""
    spec = MODELS[name][0]
    atk = parse_attack(spec if spec != "none" else MODELS["badnets"][0])
    keep = atk.eligible(ds.labels())
    y = ds.labels()[keep][:n]
    return atk.apply(ds.x[keep][:n]), atk.target_labels(y)


def detection(models: list[str], configs: list[str], device: str, n_eval: int,
              calib_size: int = 2000, seeds: tuple[int, ...] = (0,)) -> list[dict[str, Any]]:
    test = load_dataset("fashion-mnist:test")
    if not 0 < calib_size <= 4000:
        raise SystemExit("--calib-size must be in 1..4000 (evaluation starts at image 4,000)")
    calib = test.subset(np.arange(0, calib_size))
    ev = test.subset(np.arange(4000, len(test)))
    clean_x = ev.x[:n_eval]
    rows = []
    for name in models:
        model, meta = cached_model(name, None, test, device=device)
        trig, want = triggered_inputs(name, ev, n_eval)
        with torch.no_grad():
            dev = pick_device(device)
            flips = (model.to(dev)(trig.to(dev)).argmax(1).cpu() == want).numpy()
            model.cpu()
        for label, seed in [(c, sd) for c in configs for sd in seeds]:
            det = CONFIGS[label](device)
            det.seed = seed  # the calibration split, the overlay pool and the draws
            t0 = time.perf_counter()
            det.fit(model, calib)
            fit_s = time.perf_counter() - t0
            sc = det.score(clean_x)
            st = det.score(trig)
            row = {
                "model": name, "detector": label, "seed": seed,
                "clean_accuracy": meta["clean_accuracy"],
                "asr": meta["asr"], "threshold": det.threshold_,
                "frr_holdout": det.frr_measured_, "n_holdout": det.n_holdout_,
                "frr_eval": float(np.mean(rt.flag(sc, det.threshold_))),
                "n_clean_eval": len(sc),
                "far": float(np.mean(~rt.flag(st, det.threshold_))),
                "far_effective": float(np.mean(~rt.flag(st[flips], det.threshold_)))
                if flips.any() else None,
                "n_triggered": len(st), "n_effective": int(flips.sum()),
                "n_calibration": len(calib), "n_fit": det.n_fit_,
                "fit_seconds": round(fit_s, 2),
            }
            rows.append(row)
            eff = row["far_effective"]
            log(f"{name:8s} {label:45s} seed {seed} FRR hold {row['frr_holdout']:.4f} eval "
                f"{row['frr_eval']:.4f}  FAR {row['far']:.4f} (eff "
                f"{float('nan') if eff is None else eff:.4f})")
    return rows


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(device: str, n_strip: int, n_plain: int, batch: int, repeats: int
               ) -> dict[str, Any]:
    test = load_dataset("fashion-mnist:test")
    model, _ = cached_model("badnets", None, test, device=device)
    dev = pick_device(device)
    model = model.to(dev).eval()
    calib = test.subset(np.arange(0, 1000))
    strip = Strip.paper(device=str(dev)).fit(model, calib)
    x_plain = test.x[:n_plain]
    x_det = test.x[2000:2000 + n_strip]

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(x_plain), batch):
                model(x_plain[i:i + batch].to(dev)).argmax(1).cpu()

    plain()  # warm-up
    strip.filter(x_det[:20])
    t_plain, t_strip = [], []
    for r in range(repeats):
        t_plain.append(len(x_plain) / _time(plain))
        t_strip.append(len(x_det) / _time(lambda: strip.filter(x_det)))
        log(f"repeat {r + 1}: plain {t_plain[-1]:.0f}/s  strip {t_strip[-1]:.1f}/s")
    p, s = (statistics.median(v) for v in (t_plain, t_strip))
    n = strip.n_overlays
    return {
        "device": str(dev), "torch_threads": torch.get_num_threads(),
        "plain_inputs_per_s": p, "strip_inputs_per_s": s,
        "n_overlays": n, "strip_limit_inputs_per_s": p / n, "strip_ratio_to_limit": s / (p / n),
        "runs": {"plain": t_plain, "strip": t_strip},
        "n_strip_inputs": len(x_det), "n_plain_inputs": len(x_plain), "batch": batch,
        "strip_batch_size": strip.batch_size,
    }


def print_detection(rows: list[dict[str, Any]]) -> None:
    print("| model | detector | seed | FRR holdout | FRR eval | FAR | FAR (effective) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        eff = "n/a" if r["far_effective"] is None else f"{r['far_effective']:.4f}"
        print(f"| {r['model']} | {r['detector']} | {r.get('seed', 0)} "
              f"| {r['frr_holdout']:.4f} ({r['n_holdout']}) "
              f"| {r['frr_eval']:.4f} ({r['n_clean_eval']}) | {r['far']:.4f} "
              f"({r['n_triggered']}) | {eff} ({r['n_effective']}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda (default: auto)")
    ap.add_argument("--train-only", action="store_true", help="only train/cache the models")
    ap.add_argument("--skip-detection", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default="all", help="comma-separated indices into CONFIGS")
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--seeds", default="0", help="detector seeds (calibration split, "
                    "overlay pool, overlay draws), comma-separated")
    ap.add_argument("--calib-size", type=int, default=2000,
                    help="clean test images 0..N-1 given to fit (at most 4000)")
    ap.add_argument("--n-strip", type=int, default=200, help="inputs per STRIP timing")
    ap.add_argument("--n-plain", type=int, default=10000, help="inputs per plain timing")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = str(pick_device(args.device))
    models = [m for m in args.models.split(",") if m]
    if args.train_only:
        train = load_dataset("fashion-mnist:train")
        test = load_dataset("fashion-mnist:test")
        for name in models:
            cached_model(name, train, test, device=device)
        return
    labels = list(CONFIGS)
    configs = labels if args.configs == "all" else [labels[int(i)]
                                                     for i in args.configs.split(",")]
    result: dict[str, Any] = {}
    if args.out.exists():
        result = json.loads(args.out.read_text())
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "machine": platform.machine(), "processor": platform.processor(),
                             "cpu_threads": torch.get_num_threads()}
    if not args.skip_detection:
        seeds = tuple(int(x) for x in args.seeds.split(","))
        rows = detection(models, configs, device, args.n_eval, args.calib_size, seeds)
        print_detection(rows)
        result["detection"] = {"device": device, "rows": rows, "n_eval": args.n_eval,
                               "calib_size": args.calib_size, "command": " ".join(sys.argv)}
    if not args.skip_throughput:
        tp = throughput(device, args.n_strip, args.n_plain, args.batch, args.repeats)
        print(f"\nthroughput on {tp['device']} ({tp['torch_threads']} threads): plain "
              f"{tp['plain_inputs_per_s']:.0f} inputs/s; STRIP {tp['strip_inputs_per_s']:.1f} "
              f"inputs/s = {tp['strip_ratio_to_limit']:.3f} × (plain ÷ {tp['n_overlays']})")
        result.setdefault("throughput", {})[tp["device"].split(":")[0]] = tp
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
