"""Benchmark: Neural Cleanse faithful vs fast mode, and unlearning, on Fashion-MNIST.

Models (trained once, cached in ``benchmarks/.cache/neural_cleanse/``): ten backdoored
``small_cnn`` (BadNets 3–5 px patches at different places and targets, one checkerboard
patch, three Blend; two were added in session 3 to check unlearning settings chosen on
the first six, two more in session 4 after the refresh setting was chosen) and five
clean ones, 10% poison, 5 epochs on the 60,000 training images.
For each model and mode, Neural Cleanse runs on 1,000 clean test images (CPU, the
thread count given). Mitigation: for each backdoored model the fast mode's flagged
labels are unlearned on 6,000 clean training images (10%, the paper's share) and clean
accuracy / ASR (reversed and true trigger) are measured on the 10,000 test images.

Usage::

    python benchmarks/bench_neural_cleanse.py                 # everything, 1 job, 2 threads
    python benchmarks/bench_neural_cleanse.py --train-only    # just train/cache models
    python benchmarks/bench_neural_cleanse.py --modes fast --seeds 0,1,2
    python benchmarks/bench_neural_cleanse.py --from-log /dev/null --mitigate-only \
        --stamp-fraction 0.5 --dilate 0.5 --distill 0.5 --unlearn-epochs 3 --refresh 2 \
        --log out.jsonl                                       # unlearning only
    python benchmarks/bench_neural_cleanse.py --jobs 8 --threads 2   # 8 parallel jobs pinned
                                                                     # to 2 cores each

Prints a table; writes ``benchmarks/results/neural_cleanse.json`` (``--results``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "neural_cleanse"
RESULTS = ROOT / "results" / "neural_cleanse.json"

#: (name, attack spec or "none", training seed)
MODELS: list[tuple[str, str, int]] = [
    ("badnets3-br-t0", "badnets:size=3,location=bottom-right,target=0", 0),
    ("badnets4-tl-t3", "badnets:size=4,location=top-left,target=3", 1),
    ("badnets5-tr-t7", "badnets:size=5,location=top-right,target=7", 2),
    ("badnets4-bl-t9-checker", "badnets:size=4,location=bottom-left,pattern=checkerboard,"
                               "target=9", 3),
    ("badnets3-center-t5", "badnets:size=3,location=center,target=5", 4),
    ("blend-t2", "blend:alpha=0.2,target=2", 5),
    # added after the unlearning settings were chosen on the six above, to check them
    ("badnets4-center-t1", "badnets:size=4,location=center,target=1", 6),
    ("blend-t4", "blend:alpha=0.2,target=4", 7),
    # added in session 4, after the refresh setting was chosen, to check it
    ("blend-t6-noise5", "blend:alpha=0.2,target=6,trigger_seed=5", 8),
    ("badnets5-bl-t8", "badnets:size=5,location=bottom-left,target=8", 9),
    ("clean-s0", "none", 10),
    ("clean-s1", "none", 11),
    ("clean-s2", "none", 12),
    ("clean-s3", "none", 13),
    ("clean-s4", "none", 14),
]
SPECS = {name: spec for name, spec, _ in MODELS}


def model_path(name: str) -> Path:
    return CACHE / f"{name}.pt"


def _make(train: Any, test: Any, spec: str, seed: int, device: str, name: str) -> Any:
    """``zoo.make_model``, but measured on the CPU (make_model(device="cuda") evaluates
    CUDA inputs on the CPU model that ``train_model`` returns)."""
    from trojanscan.attacks import attack_success_rate, parse_attack
    from trojanscan.training import TrainConfig, evaluate, train_model
    from trojanscan.zoo import TrainedModel, default_epochs

    attack = parse_attack(spec)
    poisoned = None if attack is None else attack.poison(train, 0.1, seed=seed)
    data = train if poisoned is None else poisoned.dataset
    cfg = TrainConfig(epochs=default_epochs(len(train)))
    t0 = time.perf_counter()
    model = train_model("small_cnn", data, config=cfg, seed=seed, device=device,
                        num_classes=10, description=f"training {name}")
    seconds = time.perf_counter() - t0
    acc = evaluate(model, test, device="cpu")
    asr = None if attack is None else float(attack_success_rate(model, attack, test,
                                                                device="cpu"))
    return TrainedModel(model, "small_cnn", train.input_shape, 10, attack, poisoned, acc, asr,
                        {}, seconds, seed, cfg, 0.0 if attack is None else 0.1)


def ensure_models(names: list[str], device: str) -> None:
    """Train (or keep cached) the named models."""
    from trojanscan.io.data import load_dataset
    from trojanscan.zoo import save_model

    train = test = None
    for name, spec, seed in MODELS:
        if name not in names:
            continue
        path = model_path(name)
        if path.exists() and path.with_suffix(".json").exists():
            continue
        if train is None:
            train = load_dataset("fashion-mnist:train")
            test = load_dataset("fashion-mnist:test")
        trained = _make(train, test, spec, seed, device, name)
        save_model(trained, path)
        print(f"trained {name}: clean acc {trained.clean_accuracy:.4f}, ASR {trained.asr} "
              f"({trained.seconds:.0f} s on {device})", flush=True)


def load(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    meta = json.loads(model_path(name).with_suffix(".json").read_text())
    return torch.jit.load(str(model_path(name)), map_location="cpu").eval(), meta


# -- worker ------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _init(threads: int, pin: bool, max_steps: int | None = None) -> None:
    _STATE["max_steps"] = max_steps
    ident = mp.current_process()._identity
    if pin and ident and hasattr(os, "sched_setaffinity"):
        ncpu = os.cpu_count() or 1
        first = ((ident[0] - 1) * threads) % ncpu
        os.sched_setaffinity(0, {(first + i) % ncpu for i in range(threads)})
    torch.set_num_threads(threads)
    os.environ["TROJANSCAN_NO_PROGRESS"] = "1"


def _cpu() -> float:
    """CPU time (user + system) of this process: with one thread, about the wall time the
    run would take on an idle core (the shared machine's wall times are noisy)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _clean() -> Any:
    if "clean" not in _STATE:
        from trojanscan.io.data import load_dataset

        _STATE["clean"] = load_dataset("fashion-mnist:test")
    return _STATE["clean"]


def detect(task: tuple[str, str, int, str]) -> dict[str, Any]:
    """One Neural Cleanse run: (model name, mode, seed, device)."""
    from trojanscan.detectors.neural_cleanse import NeuralCleanse

    name, mode, seed, device = task
    model, meta = load(name)
    model = model.to(device)
    clean = _clean()
    c0 = _cpu()
    t0 = time.perf_counter()
    res = NeuralCleanse(mode=mode, seed=seed, device=device, images=False,
                        max_steps=_STATE.get("max_steps")).fit(model, clean)
    seconds = time.perf_counter() - t0
    cpu = _cpu() - c0
    ev = res.evidence
    attack = meta.get("attack") or {}
    return {
        "model": name, "mode": mode, "seed": seed, "device": device,
        "attack": SPECS[name], "true_target": attack.get("target"),
        "backdoored": bool(meta.get("backdoored")),
        "model_clean_accuracy": meta.get("clean_accuracy"), "model_asr": meta.get("asr"),
        "verdict": res.verdict, "flagged": list(res.suspected_targets),
        "index_flagged": ev["index_flagged_labels"],
        "p_value_flagged": ev["p_value_flagged_labels"],
        "anomaly_index": ev["anomaly_index"], "min_label": ev["min_label"],
        "p_value": res.p_value, "score": res.score,
        "l1_norms": ev["l1_norms"], "p_values": ev["p_values"], "asr": ev["asr"],
        "steps": ev["steps"], "total_steps": ev["total_steps"],
        "stop_reasons": ev["stop_reasons"], "reached": ev["reached_threshold"],
        "seconds": seconds, "cpu_seconds": cpu, "threads": torch.get_num_threads(),
        "warnings": list(res.warnings),
    }


def _finetune(seed: int) -> Any:
    """The defender's clean data for unlearning: 6,000 training images (10%, the paper's)."""
    from trojanscan.io.data import load_dataset

    train = load_dataset("fashion-mnist:train")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 99))
    return train.subset(perm[:6000].sort().values)


def finetune_norms(task: tuple[str, int, str]) -> dict[str, Any]:
    """Fast-mode norms of a clean model on the unlearning data: the references of
    :func:`mitigate_one` (references must come from the same data as the scan)."""
    from trojanscan.detectors.neural_cleanse import NeuralCleanse

    name, seed, device = task
    model, _ = load(name)
    res = NeuralCleanse(seed=seed, device=device, images=False,
                        max_steps=_STATE.get("max_steps")).fit(model.to(device), _finetune(seed))
    return {"reference_model": name, "seed": seed, "l1_norms": res.evidence["l1_norms"]}


def mitigate_one(task: tuple[str, int, str, list[list[float]] | None]) -> dict[str, Any]:
    """Fast-mode detection (reference decision when clean models' norms are given) and
    unlearning of the flagged labels of one backdoored model."""
    from trojanscan.attacks import parse_attack
    from trojanscan.detectors.neural_cleanse import NeuralCleanse
    from trojanscan.mitigation import Trigger, mitigate, triggers_from_result

    name, seed, device, refs = task
    model, meta = load(name)
    model = model.to(device)
    test = _clean()
    finetune = _finetune(seed)
    # the detection does not depend on the unlearning settings: cached per model, seed,
    # step budget and references, so that several settings cost one detection
    key = json.dumps([model_path(name).stat().st_mtime, seed, _STATE.get("max_steps"), refs])
    cached = CACHE / f"unlearning-detection-{name}-seed{seed}.pt"  # seeds do not evict
    hit = torch.load(cached, weights_only=True) if cached.exists() else None
    if hit is not None and hit["key"] == key:
        flagged, decision, det_s = hit["flagged"], hit["decision"], hit["seconds"]
        triggers = [Trigger(int(lab), m, p) for lab, m, p in zip(flagged, hit["masks"],
                                                                 hit["patterns"], strict=True)]
    else:
        t0 = time.perf_counter()
        res = NeuralCleanse(seed=seed, device=device, reference=refs,
                            max_steps=_STATE.get("max_steps")).fit(model, finetune)
        det_s = time.perf_counter() - t0
        flagged, decision = list(res.suspected_targets), res.evidence["decision"]
        triggers = triggers_from_result(res)
        torch.save({"key": key, "flagged": flagged, "decision": decision, "seconds": det_s,
                    "masks": [t.mask for t in triggers],
                    "patterns": [t.pattern for t in triggers]}, cached)
    out: dict[str, Any] = {"model": name, "seed": seed, "flagged": flagged,
                           "decision": decision,
                           "true_target": (meta.get("attack") or {}).get("target"),
                           "detect_seconds": det_s}
    if not flagged:
        out["mitigated"] = False
        return out
    atk = parse_attack(SPECS[name])
    extra = {"true_trigger": (atk.apply, int(atk.target))} if atk is not None else None
    from trojanscan.mitigation import UnlearnConfig

    cfg = UnlearnConfig(**_STATE.get("unlearn", {}))
    mit = mitigate(model, finetune, test, triggers, seed=seed, device=device, extra=extra,
                   config=cfg)
    out.update({"mitigated": True, **mit.to_dict()})
    return out


# -- driver ------------------------------------------------------------------------

def _run_pool(fn: Any, tasks: list[Any], jobs: int, threads: int, pin: bool,
              log: Path | None, max_steps: int | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if jobs <= 1:
        _init(threads, False, max_steps)
        results = map(fn, tasks)
        for r in results:
            out.append(r)
            _log(log, r)
        return out
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs, initializer=_init, initargs=(threads, pin, max_steps)) as pool:
        for r in pool.imap_unordered(fn, tasks):
            out.append(r)
            _log(log, r)
    return out


def _log(log: Path | None, r: dict[str, Any]) -> None:
    brief = {k: r.get(k) for k in ("model", "mode", "seed", "verdict", "flagged",
                                   "anomaly_index", "p_value", "seconds", "mitigated",
                                   "asr_after", "clean_accuracy_drop")}
    print(json.dumps(brief), flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(json.dumps(r) + "\n")


def _fmt(v: Any) -> str:
    return "-" if not v else ",".join(map(str, v))


def add_reference_decisions(rows: list[dict[str, Any]], alpha: float = 0.05) -> None:
    """Reference-calibrated decision per run: the clean models of the same mode and seed
    (leaving out the model itself) serve as references (in place)."""
    from trojanscan.maths.outliers import reference_p_values

    for r in rows:
        refs = [c["l1_norms"] for c in rows if not c["backdoored"] and c["mode"] == r["mode"]
                and c["seed"] == r["seed"] and c["model"] != r["model"]]
        if len(refs) < 2:
            r.update(ref_flagged=None, ref_min_p=None, ref_n=len(refs))
            continue
        p = reference_p_values(np.array(r["l1_norms"]), np.array(refs))
        flagged = [k for k in range(len(p)) if p[k] < alpha and r["reached"][k]]
        r.update(ref_flagged=sorted(flagged, key=lambda k: r["l1_norms"][k]),
                 ref_min_p=float(p.min()), ref_n=len(refs))


def table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    by = {(r["model"], r["mode"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    head = ["model", "attack", "target"]
    for m in modes:
        head += [f"{m} index", f"{m} flagged (index>2)", f"{m} flagged (reference)",
                 f"{m} s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, spec, _ in MODELS:
        for seed in seeds:
            if not any((name, m, seed) in by for m in modes):
                continue
            any_r = next(by[(name, m, seed)] for m in modes if (name, m, seed) in by)
            row = [name if len(seeds) == 1 else f"{name} (seed {seed})", f"`{spec}`",
                   str(any_r["true_target"]) if any_r["true_target"] is not None else "-"]
            for m in modes:
                r = by.get((name, m, seed))
                if r is None:
                    row += ["", "", "", ""]
                    continue
                ref = ("n/a" if r.get("ref_flagged") is None else
                       f"{_fmt(r['ref_flagged'])} (p {r['ref_min_p']:.2g})")
                secs = f"{r['seconds']:.0f}"
                if r.get("cpu_seconds") is not None:
                    secs += f" ({r['cpu_seconds']:.0f} cpu)"
                row += [f"{r['anomaly_index']:.2f} (label {r['min_label']})",
                        _fmt(r["index_flagged"]), ref, secs]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _rule_stats(rs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    bd = [r for r in rs if r["backdoored"] and r.get(key) is not None]
    cl = [r for r in rs if not r["backdoored"] and r.get(key) is not None]
    return {"backdoored_flagged_with_target": f"{sum(r['true_target'] in r[key] for r in bd)}"
                                              f"/{len(bd)}",
            "backdoored_exactly_target": f"{sum(r[key] == [r['true_target']] for r in bd)}"
                                         f"/{len(bd)}",
            "clean_flagged": f"{sum(bool(r[key]) for r in cl)}/{len(cl)}"}


def summarise(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in modes:
        rs = [r for r in rows if r["mode"] == m]
        out[m] = {
            "runs": len(rs),
            "rule_index_gt_2": _rule_stats(rs, "index_flagged"),
            "rule_mad_p_value": _rule_stats(rs, "p_value_flagged"),
            "rule_reference": _rule_stats(rs, "ref_flagged"),
            "mean_seconds": float(np.mean([r["seconds"] for r in rs])) if rs else None,
            "max_seconds": float(np.max([r["seconds"] for r in rs])) if rs else None,
            "mean_cpu_seconds": (float(np.mean([r["cpu_seconds"] for r in rs]))
                                 if rs and all("cpu_seconds" in r for r in rs) else None),
        }
    pairs: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["model"], r["seed"]), {})[r["mode"]] = r
    both = [p for p in pairs.values() if "fast" in p and "faithful" in p]
    if both:
        ratios = [p["faithful"]["seconds"] / p["fast"]["seconds"] for p in both]
        out["speedup_faithful_over_fast"] = {
            "pairs": len(both), "min": float(np.min(ratios)), "median": float(np.median(ratios)),
            "total": sum(p["faithful"]["seconds"] for p in both)
            / sum(p["fast"]["seconds"] for p in both)}
        cpu = [p for p in both if "cpu_seconds" in p["fast"] and "cpu_seconds" in p["faithful"]]
        if cpu:
            out["speedup_faithful_over_fast_cpu_time"] = {
                "pairs": len(cpu),
                "min": float(min(p["faithful"]["cpu_seconds"] / p["fast"]["cpu_seconds"]
                                 for p in cpu)),
                "total": sum(p["faithful"]["cpu_seconds"] for p in cpu)
                / sum(p["fast"]["cpu_seconds"] for p in cpu)}
        for key in ("index_flagged", "ref_flagged"):
            same = [p["fast"].get(key) == p["faithful"].get(key) for p in both]
            verdict = [bool(p["fast"].get(key)) == bool(p["faithful"].get(key)) for p in both]
            out[f"fast_vs_faithful_{key}"] = {"same_flagged_labels": f"{sum(same)}/{len(same)}",
                                              "same_verdict": f"{sum(verdict)}/{len(verdict)}"}
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:
        stab: dict[str, Any] = {}
        for m in modes:
            for key in ("index_flagged", "ref_flagged"):
                per_model: dict[str, set[str]] = {}
                for r in rows:
                    if r["mode"] == m:
                        per_model.setdefault(r["model"], set()).add(str(r.get(key)))
                stable = sum(len(v) == 1 for v in per_model.values())
                stab[f"{m}_{key}"] = f"{stable}/{len(per_model)} models give the same " \
                                     f"flagged labels for seeds {seeds}"
        out["seed_stability"] = stab
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(n for n, _, _ in MODELS))
    p.add_argument("--modes", default="fast,faithful")
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-pin", action="store_true", help="do not pin jobs to cores")
    p.add_argument("--device", default="cpu", help="device for detection (timings: cpu)")
    p.add_argument("--train-device", default="auto")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--mitigate-only", action="store_true",
                   help="with --from-log: unlearn the backdoored models, using the logged "
                        "fast-mode norms of the clean models as references")
    p.add_argument("--train-threads", type=int, default=None)
    p.add_argument("--stamp-fraction", type=float, default=None,
                   help="unlearning: share of stamped samples (default: UnlearnConfig's)")
    p.add_argument("--dilate", type=float, default=None,
                   help="unlearning: probability of a one-pixel dilated mask")
    p.add_argument("--unlearn-epochs", type=int, default=None,
                   help="unlearning: fine-tuning epochs (default: UnlearnConfig's)")
    p.add_argument("--distill", type=float, default=None,
                   help="unlearning: weight of self-distillation from the original model")
    p.add_argument("--refresh", type=int, default=None,
                   help="unlearning: times each reversed trigger is re-optimised mid-run")
    p.add_argument("--refresh-steps", type=int, default=None,
                   help="unlearning: projected-gradient steps per refresh")
    p.add_argument("--no-mitigation", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--max-steps", type=int, default=None,
                   help="override the modes' step budget (smoke tests only)")
    p.add_argument("--from-log", type=Path, nargs="*", default=None,
                   help="rebuild the table and summary from JSON-lines logs (no runs)")
    p.add_argument("--log", type=Path, default=None, help="append each run as JSON lines")
    a = p.parse_args(argv)
    _STATE["unlearn"] = {k: v for k, v in (("stamp_fraction", a.stamp_fraction),
                                           ("dilate", a.dilate),
                                           ("distill", a.distill),
                                           ("epochs", a.unlearn_epochs),
                                           ("refresh", a.refresh),
                                           ("refresh_steps", a.refresh_steps))
                         if v is not None}
    if _STATE["unlearn"] and a.jobs > 1:
        p.error("--stamp-fraction/--dilate/--distill/--refresh need --jobs 1 (settings live "
                "in this process)")
    if a.from_log:
        logged = [json.loads(line) for f in a.from_log for line in f.read_text().splitlines()
                  if line.strip()]
        rows = [r for r in logged if "mode" in r]
        mit_rows = [r for r in logged if "mitigated" in r and "mode" not in r]
        if not a.mitigate_only:
            return report(rows, mit_rows, a, wall=None)
        names = [n for n in a.models.split(",") if n and SPECS.get(n, "none") != "none"]
        done = {r["model"] for r in mit_rows}
        seed = int(a.seeds.split(",")[0])  # detection and unlearning seed
        refs = _reference_norms(seed, a)
        tasks = [(n, seed, a.device, refs) for n in names if n not in done]
        _run_pool(mitigate_one, tasks, a.jobs, a.threads, not a.no_pin, a.log, a.max_steps)
        return 0
    names = [n for n in a.models.split(",") if n]
    unknown = set(names) - set(SPECS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}")
    train_dev = "cuda" if a.train_device == "auto" and torch.cuda.is_available() else (
        "cpu" if a.train_device == "auto" else a.train_device)
    if a.train_threads:
        torch.set_num_threads(a.train_threads)
    ensure_models(names, train_dev)
    if a.train_only:
        return 0
    modes = [m for m in a.modes.split(",") if m]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    # per model the long faithful run first, so that parallel jobs start them early
    order = sorted(modes, key=lambda m: m != "faithful")
    tasks = [(n, m, s, a.device) for s in seeds for n in names for m in order]
    t0 = time.perf_counter()
    rows = _run_pool(detect, tasks, a.jobs, a.threads, not a.no_pin, a.log, a.max_steps)
    mit_rows: list[dict[str, Any]] = []
    if not a.no_mitigation:
        bd = [n for n in names if SPECS[n] != "none"]
        ref = _reference_norms(seeds[0], a)
        mit_rows = _run_pool(mitigate_one, [(n, seeds[0], a.device, ref) for n in bd], a.jobs,
                             a.threads, not a.no_pin, a.log, a.max_steps)
    return report(rows, mit_rows, a, wall=time.perf_counter() - t0)


def _reference_norms(seed: int, a: argparse.Namespace) -> list[list[float]] | None:
    """Fast-mode norms of the clean models on the unlearning data (None if < 2 models);
    cached next to the models (they depend only on the models, the seed and the steps)."""
    clean = [n for n, spec, _ in MODELS if spec == "none"]
    cache = CACHE / f"unlearning-references-seed{seed}-steps{a.max_steps}.json"
    stamp = {n: model_path(n).stat().st_mtime for n in clean if model_path(n).exists()}
    if cache.exists():
        doc = json.loads(cache.read_text())
        if doc.get("models") == stamp:
            return doc["l1_norms"]
    rows = _run_pool(finetune_norms, [(n, seed, a.device) for n in clean], a.jobs, a.threads,
                     not a.no_pin, a.log, a.max_steps)
    rows.sort(key=lambda r: r["reference_model"])
    refs = [r["l1_norms"] for r in rows]
    cache.write_text(json.dumps({"models": stamp, "l1_norms": refs}) + "\n")
    return refs if len(refs) >= 2 else None


def report(rows: list[dict[str, Any]], mit_rows: list[dict[str, Any]], a: argparse.Namespace,
           wall: float | None) -> int:
    add_reference_decisions(rows)
    show = [m for m in ("faithful", "fast") if any(r["mode"] == m for r in rows)]
    print()
    print(table(rows, show))
    summary = summarise(rows, show)
    print(json.dumps(summary, indent=2))
    if mit_rows:
        print("\n| model | unlearned labels | true target | clean acc before | after | "
              "ASR true trigger before | after | ASR reversed before | after | seconds |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(mit_rows, key=lambda r: r["model"]):
            if not r.get("mitigated"):
                print(f"| {r['model']} | - | {r['true_target']} | not flagged |||||||")
                continue
            rev = [k for k in r["asr_before"] if k.startswith("reversed_")]
            print(f"| {r['model']} | {_fmt(r['labels'])} | {r['true_target']} | "
                  f"{r['clean_accuracy_before']:.4f} | {r['clean_accuracy_after']:.4f} | "
                  f"{r['asr_before'].get('true_trigger', float('nan')):.4f} | "
                  f"{r['asr_after'].get('true_trigger', float('nan')):.4f} | "
                  f"{np.mean([r['asr_before'][k] for k in rev]):.4f} | "
                  f"{np.mean([r['asr_after'][k] for k in rev]):.4f} | {r['seconds']:.1f} |")
    doc = {
        "benchmark": "neural_cleanse",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "jobs": a.jobs, "threads_per_job": a.threads,
                    "device": a.device},
        "wall_seconds": wall,
        "summary": summary,
        "runs": rows,
        "mitigation": mit_rows,
    }
    a.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, a.results)
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
