"""Benchmark: fast (default) vs faithful Neural Cleanse on RGB residual networks.

Side by side in one run, each configuration in its own process (so its peak RSS is its
own): (a) a narrow PreAct-ResNet18 and (b) the full-width PreAct-ResNet18, both
3×32×32 → 10, on the defender's clean images of the RGB benchmark task.

* narrow, fast: a complete default run (verdict, flagged labels, pruned labels);
* narrow, faithful; full width, fast; full width, faithful: *bounded* runs — the
  faithful reference costs hours on a CPU — of ``--bounded-steps`` steps (fast: all 10
  labels jointly, as fast mode runs them; faithful: ``--bounded-labels`` labels one after
  the other), giving the cost per stamped input (optimisation only); the complete run's
  cost is extrapolated from the number of stamped inputs a complete run needs: for
  fast mode the narrow net's complete run (same task and architecture family), for
  faithful mode the label-steps faithful mode used on the Fashion-MNIST benchmark
  (mean 73.7 per label, ``results/neural_cleanse.json``) × 31 mini-batches × 32.
  ``--complete`` runs everything to the end instead.

Recorded per configuration: seconds, stamped inputs through forward+backward
(``sample_passes``), peak RSS (and CUDA peak memory on a GPU), the pass size chosen from
measured activation memory, labels pruned, verdict and flagged labels.

Models: ``--narrow`` (default: the RGB benchmark's ``bd_resnet_patch_mid`` when built,
else ``.cache/nc_rgb/bd_narrow_patch_t3.pt``, a narrow net trained here in 2 epochs on
the task with a 4×4 patch → 3), ``--full`` (default: a full-width model of the RGB
benchmark when built, else a seeded untrained one — cost does not depend on weights).

Usage::

    python -m benchmarks.bench_nc_rgb                      # ~10 CPU-minutes
    python -m benchmarks.bench_nc_rgb --device cuda --complete

Prints a table; writes ``benchmarks/results/nc_rgb.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RGB = ROOT / ".cache" / "rgb"
OWN = ROOT / ".cache" / "nc_rgb"
OUT = ROOT / "results" / "nc_rgb.json"
#: faithful mode on the Fashion-MNIST benchmark: mean label-steps per label
FAITHFUL_STEPS_PER_LABEL = 737.3 / 10


def _default_narrow() -> Path | None:
    for p in (RGB / "models" / "bd_resnet_patch_mid.pt", OWN / "bd_narrow_patch_t3.pt"):
        if p.exists():
            return p
    return None


def _default_full() -> Path | None:
    sidecars = sorted((RGB / "models").glob("*.json")) if (RGB / "models").exists() else []
    for sc in sidecars:
        try:
            doc = json.loads(sc.read_text())
        except (OSError, ValueError):
            continue
        if str(doc.get("arch", "")) == "preact_resnet18" and sc.with_suffix(".pt").exists():
            return sc.with_suffix(".pt")
    return None


def _load(spec: str) -> torch.nn.Module:
    from trojanscan.io.models import load_model

    if spec.startswith("untrained:"):
        from trojanscan import archs

        torch.manual_seed(0)
        return archs.build(spec.split(":", 1)[1], (3, 32, 32), 10).eval()
    return load_model(spec).module


def _child(cfg: dict[str, Any], q: Any) -> None:
    torch.set_num_threads(cfg["threads"])
    from trojanscan.detectors._nc_reverse import label_generator, reverse_engineer
    from trojanscan.detectors.neural_cleanse import NeuralCleanse, _plan_passes, _subset
    from trojanscan.io.data import load_dataset
    from trojanscan.utils import pick_device

    dev = pick_device(cfg["device"])
    net = _load(cfg["model"]).to(dev)
    for p in net.parameters():
        p.requires_grad_(False)
    data = load_dataset(cfg["data"])
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    det = NeuralCleanse(mode=cfg["mode"], seed=0, images=False, device=cfg["device"])
    t0 = time.perf_counter()
    row: dict[str, Any] = {k: cfg[k] for k in ("net", "mode", "model", "bounded", "threads")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not cfg["bounded"]:
            r = det.fit(net, data)
            ev = r.evidence
            row.update(verdict=r.verdict, flagged=list(r.suspected_targets),
                       pruned=ev["pruned_labels"], total_steps=ev["total_steps"],
                       sample_passes=ev["sample_passes"], pass_batch=ev["pass_batch"],
                       per_sample_bytes=ev["per_sample_bytes"],
                       l1_norms=[round(v, 2) for v in ev["l1_norms"]])
        else:  # the engine on a few labels for a few steps, exactly as fit() runs it
            p = {**det.resolved_params(), "max_steps": cfg["steps"]}
            x = _subset(data, p["n_samples"], 0).x.to(dev)
            plan = _plan_passes(net, x, 10, p, dev)
            lab_cfg = det._config(p, 10, plan["pass_batch"])
            labels = list(range(cfg["labels"] if cfg["mode"] == "faithful" else 10))
            t1 = time.perf_counter()
            if cfg["mode"] == "faithful":
                res = {}
                for lab in labels:
                    res.update(reverse_engineer(net, x, [lab], 10, lab_cfg, seed=0,
                                                batch_gen=label_generator(0, lab, 1)))
            else:
                res = reverse_engineer(net, x, labels, 10, lab_cfg, seed=0,
                                       batch_gen=label_generator(0, 10, 2))
            row["engine_seconds"] = round(time.perf_counter() - t1, 2)
            steps = sum(t.steps for t in res.values())
            row.update(verdict=None, flagged=None, pruned=[], total_steps=steps,
                       sample_passes=steps * p["mini_batches"] * p["batch_size"],
                       pass_batch=plan["pass_batch"], per_sample_bytes=plan["per_sample_bytes"],
                       labels_run=len(labels))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row["cuda_peak_mb"] = (round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
                           if dev.type == "cuda" else None)
    row["device"] = str(dev)
    q.put(row)


def _run(cfg: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, q))
    proc.start()
    row = q.get()
    proc.join()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--narrow", type=str, default=None)
    ap.add_argument("--full", type=str, default=None)
    ap.add_argument("--data", type=str, default=str(RGB / "data" / "defender.npz"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bounded-steps", type=int, default=2)
    ap.add_argument("--bounded-labels", type=int, default=1)
    ap.add_argument("--complete", action="store_true", help="no bounded runs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    narrow = args.narrow or _default_narrow()
    if narrow is None:
        raise SystemExit("no narrow model: build the RGB benchmark or pass --narrow")
    full = args.full or _default_full() or "untrained:preact_resnet18"
    base = {"data": args.data, "threads": args.threads, "device": args.device,
            "steps": args.bounded_steps, "labels": args.bounded_labels}
    plan = [("narrow", str(narrow), "fast", False),
            ("narrow", str(narrow), "faithful", not args.complete),
            ("full", str(full), "fast", not args.complete),
            ("full", str(full), "faithful", not args.complete)]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for net, model, mode, bounded in plan:
        row = _run({**base, "net": net, "model": model, "mode": mode, "bounded": bounded})
        rows.append(row)
        print(f"{net:6s} {mode:8s} {'bounded' if bounded else 'complete':8s} "
              f"{row['seconds']:8.1f}s passes {row['sample_passes']:>8d} "
              f"RSS {row['peak_rss_mb']:7.1f} MB pass_batch {row['pass_batch']}", flush=True)
    # extrapolate bounded runs to complete ones (stamped inputs × measured cost each)
    fast_complete = rows[0]["sample_passes"]
    for row in rows:
        per = row.get("engine_seconds", row["seconds"]) / max(1, row["sample_passes"])
        row["seconds_per_1k_passes"] = round(1000 * per, 3)
        if not row["bounded"]:
            row["complete_passes"] = row["sample_passes"]
            row["complete_seconds_est"] = row["seconds"]
        else:
            need = (fast_complete if row["mode"] == "fast"
                    else round(10 * FAITHFUL_STEPS_PER_LABEL * 31 * 32))
            row["complete_passes"] = need
            row["complete_seconds_est"] = round(per * need, 1)
    ratios = {}
    for net in ("narrow", "full"):
        fast = next(r for r in rows if r["net"] == net and r["mode"] == "fast")
        faith = next(r for r in rows if r["net"] == net and r["mode"] == "faithful")
        ratios[net] = {"seconds_fast_over_faithful": round(
            fast["complete_seconds_est"] / faith["complete_seconds_est"], 4),
            "passes_fast_over_faithful": round(
            fast["complete_passes"] / faith["complete_passes"], 4)}
    print()
    print(f"{'net':6s} {'mode':8s} {'run':8s} {'sec':>8s} {'passes':>9s} {'s/1k':>7s} "
          f"{'RSS MB':>8s} {'CUDA MB':>8s} {'pass':>5s} {'pruned':>8s} {'verdict':>10s} "
          f"{'flag':>6s} {'complete s (est)':>17s}")
    for r in rows:
        print(f"{r['net']:6s} {r['mode']:8s} {'bounded' if r['bounded'] else 'complete':8s} "
              f"{r['seconds']:8.1f} {r['sample_passes']:9d} {r['seconds_per_1k_passes']:7.2f} "
              f"{r['peak_rss_mb']:8.1f} {r['cuda_peak_mb']!s:>8s} {r['pass_batch']:5d} "
              f"{r['pruned']!s:>8s} {r['verdict']!s:>10s} {r['flagged']!s:>6s} "
              f"{r['complete_seconds_est']:17.1f}")
    for net, rt in ratios.items():
        print(f"{net}: fast/faithful seconds {rt['seconds_fast_over_faithful']:.3f}, "
              f"stamped inputs {rt['passes_fast_over_faithful']:.3f}")
    doc = {"benchmark": "neural_cleanse_rgb", "command": "python -m benchmarks.bench_nc_rgb "
           + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                      if v not in (None, False) and k != "out"),
           "machine": {"platform": platform.platform(), "cpu_count": mp.cpu_count(),
                       "torch": torch.__version__},
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "faithful_steps_per_label_assumed": FAITHFUL_STEPS_PER_LABEL,
           "runs": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
