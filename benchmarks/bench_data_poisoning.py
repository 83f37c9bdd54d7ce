"""Benchmark: which training samples are poisoned? (Spectral Signatures, Activation
Clustering, SPECTRE, SCAn) on Fashion-MNIST.

Six ``small_cnn`` models are trained on the full 60k training set (cached under
``benchmarks/.cache/data_poisoning``): clean, BadNets at ε = 10%, 5%, 1% (3×3 white
patch, target 0), Blend at 10% (random-noise pattern, α = 0.2) and SIG clean-label at 5%
(half of class 0). For each, the penultimate features are extracted once and every
method scores them; the poison rate bound given to the methods is the true ε (0.1 for
the clean model). Reported per method: recall and precision of the flagged set, AUROC of
the per-sample scores, samples flagged in classes holding no poison, seconds. Then the
BadNets-10% set is cleaned (samples flagged by the combined scan: the union of the
default detectors, as ``scan-data`` combines them) and ``small_cnn`` is
retrained: clean accuracy and ASR against the clean-trained model. Timing: features +
scoring of the 60k samples versus one plain inference pass, in the same run.

    python benchmarks/bench_data_poisoning.py            # everything (~15 min on 2 cores)
    python benchmarks/bench_data_poisoning.py --prepare  # only train/cache the models
    python benchmarks/bench_data_poisoning.py --no-verify --cases badnets-5,clean

Writes ``benchmarks/results/data_poisoning.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trojanscan.attacks import parse_attack
from trojanscan.dataset import ImageDataset
from trojanscan.io.data import load_dataset
from trojanscan.zoo import TrainedModel, save_model

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("BENCH_CACHE") or HERE / ".cache" / "data_poisoning")
RESULTS = HERE / "results" / "data_poisoning.json"


@dataclass(frozen=True)
class Case:
    name: str
    attack: str  # spec, "none" for the clean model
    rate: float


CASES = (
    Case("clean", "none", 0.0),
    Case("badnets-10", "badnets:target=0", 0.10),
    Case("badnets-5", "badnets:target=0", 0.05),
    Case("badnets-1", "badnets:target=0", 0.01),
    Case("blend-10", "blend:target=0", 0.10),
    Case("sig-5", "sig:target=0", 0.05),
)

#: (row name, detector, settings)
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("SS adaptive", "spectral_signatures", {}),
    ("SS paper (1.5εn/class)", "spectral_signatures", {"mode": "paper"}),
    ("SPECTRE adaptive", "spectre", {}),
    ("SPECTRE paper (1.5εn/class)", "spectre", {"mode": "paper"}),
    ("AC (PCA, + reclassification)", "activation_clustering", {"arch": "small_cnn"}),
    ("AC (ICA as the paper, + reclassification)", "activation_clustering",
     {"arch": "small_cnn", "reduction": "ica"}),
    ("SCAn adaptive (across-class)", "scan", {}),
    ("SCAn paper (shared S_e, e^2)", "scan", {"mode": "paper"}),
)


# ----------------------------------------------------------------------------- models


def model_path(case: Case, seed: int) -> Path:
    return CACHE / f"{case.name}-s{seed}.pt"


def train_case(attack: Any, rate: float, train: ImageDataset, test: ImageDataset,
               seed: int) -> TrainedModel:
    """``zoo.make_model`` with training on BENCH_DEVICE and evaluation on the CPU."""
    from trojanscan.attacks import attack_success_rate
    from trojanscan.training import TrainConfig, evaluate, train_model
    from trojanscan.zoo import default_epochs

    poisoned = None if attack is None else attack.poison(train, rate, seed=seed)
    data = train if poisoned is None else poisoned.dataset
    cfg = TrainConfig(epochs=default_epochs(len(train)))
    t0 = time.perf_counter()
    model = train_model("small_cnn", data, config=cfg, seed=seed,
                        device=os.environ.get("BENCH_DEVICE", "cpu"), num_classes=10)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, test, device="cpu")
    asr = None if attack is None else float(attack_success_rate(model, attack, test,
                                                                device="cpu"))
    return TrainedModel(model, "small_cnn", train.input_shape, 10, attack, poisoned, acc, asr,
                        {}, seconds, seed, cfg, rate if attack is not None else 0.0)


def prepare(case: Case, train: ImageDataset, test: ImageDataset, seed: int) -> Path:
    """Train (or reuse) the model of ``case``; returns the TorchScript path."""
    path = model_path(case, seed)
    if path.exists() and path.with_suffix(".json").exists():
        return path
    attack = parse_attack(case.attack)
    t0 = time.perf_counter()
    trained = train_case(attack, case.rate, train, test, seed)
    save_model(trained, path)
    print(f"trained {case.name}: acc {trained.clean_accuracy:.4f} asr {trained.asr} "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def poisoned_set(case: Case, train: ImageDataset, seed: int) -> tuple[ImageDataset,
                                                                      np.ndarray, Any]:
    """The training set the case's model saw, its poison mask and the attack."""
    attack = parse_attack(case.attack)
    if attack is None:
        return train, np.zeros(len(train), dtype=bool), None
    pd = attack.poison(train, case.rate, seed=seed)
    meta = json.loads(model_path(case, seed).with_suffix(".json").read_text())
    if not np.array_equal(np.flatnonzero(pd.poison_mask), meta["poison_indices"]):
        raise SystemExit(f"{case.name}: regenerated poison differs from the cached model's")
    return pd.dataset, np.asarray(pd.poison_mask), attack


# ----------------------------------------------------------------------------- measuring


def inference_seconds(model: torch.nn.Module, ds: ImageDataset, batch_size: int = 256) -> float:
    """One plain forward pass over ``ds`` (logits only), the reference for timing."""
    from trojanscan.detectors.base import borrow_model

    t0 = time.perf_counter()
    with borrow_model(model), torch.no_grad():
        for start in range(0, len(ds), batch_size):
            model(ds.x[start:start + batch_size]).argmax(1)
    return time.perf_counter() - t0


def auroc(mask: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if mask.all() or not mask.any():
        return None
    return float(roc_auc_score(mask, scores))


def metrics(flagged: np.ndarray, scores: np.ndarray, mask: np.ndarray,
            labels: np.ndarray) -> dict[str, Any]:
    poisoned_classes = np.unique(labels[mask])
    clean_cls = ~np.isin(labels, poisoned_classes)
    tp = int((flagged & mask).sum())
    return {
        "flagged": int(flagged.sum()),
        "recall": None if not mask.any() else tp / int(mask.sum()),
        "precision": None if not flagged.any() else tp / int(flagged.sum()),
        "auroc": auroc(mask, scores),
        "flagged_in_clean_classes": int((flagged & clean_cls).sum()),
        "share_of_clean_classes_flagged": float((flagged & clean_cls).sum()
                                                / max(int(clean_cls.sum()), 1)),
    }


def run_case(case: Case, train: ImageDataset, seed: int, methods: tuple[str, ...]
             ) -> dict[str, Any]:
    from trojanscan import detectors as registry
    from trojanscan.data_scan import DEFAULT_DATA_DETECTORS, combine, extract
    from trojanscan.io.models import load_model

    ds, mask, _ = poisoned_set(case, train, seed)
    model = load_model(model_path(case, seed), device="cpu").module
    labels = ds.labels().numpy()
    eps = case.rate or 0.1
    infer = inference_seconds(model, ds)
    tracemalloc.start()
    feats = extract(model, ds)
    _, feat_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out: dict[str, Any] = {"case": case.name, "attack": case.attack, "rate": case.rate,
                           "epsilon_given": eps, "num_poison": int(mask.sum()),
                           "inference_seconds": infer, "feature_seconds": feats.seconds,
                           "feature_peak_mb": feat_peak / 2**20,
                           "feature_mb": feats.features.nbytes / 2**20, "methods": {}}
    results = {}
    for row, name, settings in METHODS:
        if row not in methods:
            continue
        det = registry.create(name, poison_rate_bound=eps, seed=seed, **settings)
        t0 = time.perf_counter()
        res = det.fit_features(feats, model=model, train=ds)
        scoring = time.perf_counter() - t0
        peak = 0
        if name != "activation_clustering":  # a second, traced run for the memory peak
            tracemalloc.start()
            det.fit_features(feats, model=model, train=ds)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        m = metrics(res.flagged, res.scores, mask, labels)
        m.update(scoring_seconds=scoring, total_seconds=scoring + feats.seconds,
                 total_over_inference=(scoring + feats.seconds) / infer,
                 scoring_peak_mb=peak / 2**20,
                 classes_with_outliers=res.evidence.get("classes_with_outliers"),
                 verdict=res.verdict)
        if name == "activation_clustering":
            m["reclassification"] = {c: e.get("reclassification") for c, e in
                                     res.per_class.items() if e.get("reclassification")}
            m["suspect_before_reclassification"] = res.evidence.get(
                "num_suspect_before_reclassification")
        out["methods"][row] = m
        if settings.get("mode") != "paper" and name in DEFAULT_DATA_DETECTORS \
                and name not in results:
            results[name] = res
        print(f"  {case.name:10s} {row:30s} flagged {m['flagged']:5d} recall "
              f"{_f(m['recall'])} precision {_f(m['precision'])} AUROC {_f(m['auroc'])} "
              f"clean-class flags {m['flagged_in_clean_classes']:4d} "
              f"{scoring:6.2f} s", flush=True)
    if results:
        scores, flagged = combine(results, "union")
        out["combined"] = metrics(flagged, scores, mask, labels)
        out["combined"]["detectors"] = sorted(results)
        out["combined"]["verdict"] = "poisoned" if flagged.any() else "clean"
        out["combined_flagged"] = np.flatnonzero(flagged).tolist()
    return out


def verify(case: Case, train: ImageDataset, test: ImageDataset, flagged: list[int],
           clean_accuracy: float, seed: int) -> dict[str, Any]:
    """Retrain small_cnn on the case's data minus ``flagged``: accuracy and ASR."""
    from trojanscan.attacks import attack_success_rate
    from trojanscan.training import TrainConfig, evaluate, train_model
    from trojanscan.zoo import default_epochs

    ds, mask, attack = poisoned_set(case, train, seed)
    keep = np.ones(len(ds), dtype=bool)
    keep[np.asarray(flagged, dtype=np.int64)] = False
    cleaned = ds.subset(torch.from_numpy(np.flatnonzero(keep)))
    t0 = time.perf_counter()
    model = train_model("small_cnn", cleaned, seed=seed, num_classes=10,
                        device=os.environ.get("BENCH_DEVICE", "cpu"),
                        config=TrainConfig(epochs=default_epochs(len(cleaned))))
    meta = json.loads(model_path(case, seed).with_suffix(".json").read_text())
    return {"case": case.name, "removed": int((~keep).sum()),
            "poison_left": int((mask & keep).sum()),
            "clean_accuracy_clean_model": clean_accuracy,
            "clean_accuracy_before": meta["clean_accuracy"], "asr_before": meta["asr"],
            "clean_accuracy_after": evaluate(model, test, device="cpu"),
            "asr_after": float(attack_success_rate(model, attack, test, device="cpu")),
            "device": os.environ.get("BENCH_DEVICE", "cpu"),
            "seconds": time.perf_counter() - t0}


def _f(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| case | method | flagged | recall | precision | AUROC | flags in clean classes "
             "| scoring s | (features+scoring)/inference |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for row, m in r["methods"].items():
            lines.append(f"| {r['case']} | {row} | {m['flagged']} | {_f(m['recall'])} | "
                         f"{_f(m['precision'])} | {_f(m['auroc'])} | "
                         f"{m['flagged_in_clean_classes']} "
                         f"({100 * m['share_of_clean_classes_flagged']:.2f}%) | "
                         f"{m['scoring_seconds']:.2f} | {m['total_over_inference']:.2f} |")
        if "combined" in r:
            m = r["combined"]
            lines.append(f"| {r['case']} | combined (union) | {m['flagged']} | "
                         f"{_f(m['recall'])} | {_f(m['precision'])} | {_f(m['auroc'])} | "
                         f"{m['flagged_in_clean_classes']} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="only train/cache the models")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--methods", default=";".join(m[0] for m in METHODS),
                    help="semicolon-separated row names")
    ap.add_argument("--no-verify", action="store_true", help="skip the retraining check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON output path")
    ap.add_argument("--verify-from", type=Path, default=None,
                    help="only retrain BadNets-10%% without the combined flags of this JSON")
    args = ap.parse_args(argv)
    train = load_dataset("fashion-mnist:train")
    test = load_dataset("fashion-mnist:test")
    wanted = [c for c in CASES if c.name in args.cases.split(",")]
    for case in wanted:
        prepare(case, train, test, args.seed)
    if args.prepare:
        return 0
    torch.manual_seed(args.seed)
    if args.verify_from is not None:  # retrain only, from flags of an earlier run
        earlier = json.loads(args.verify_from.read_text())
        flags = next(c["combined_flagged"] for c in earlier["cases"]
                     if c["case"] == "badnets-10")
        report = dict(earlier)
        report["verify"] = run_verify(train, test, flags, args.seed)
        print(f"verify {report['verify']}")
        args.results.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    methods = tuple(m.strip() for m in args.methods.split(";"))
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for case in wanted:  # the JSON is rewritten after every case
        r = run_case(case, train, args.seed, methods)
        if case.name != "badnets-10":
            r.pop("combined_flagged", None)
        results.append(r)
        report["cases"] = results
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        args.results.write_text(json.dumps(report, indent=2) + "\n")
    by_name = {r["case"]: r for r in results}
    if not args.no_verify and "badnets-10" in by_name:
        report["verify"] = run_verify(train, test, by_name["badnets-10"]["combined_flagged"],
                                      args.seed)
        print(f"verify {report['verify']}")
        args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"peak RSS {report['peak_rss_mb']:.0f} MB; wrote {args.results}")
    return 0


def run_verify(train: ImageDataset, test: ImageDataset, flagged: list[int],
               seed: int) -> dict[str, Any]:
    clean_meta = json.loads(model_path(CASES[0], seed).with_suffix(".json").read_text())
    case = next(c for c in CASES if c.name == "badnets-10")
    return verify(case, train, test, flagged, clean_meta["clean_accuracy"], seed)


if __name__ == "__main__":
    sys.exit(main())
