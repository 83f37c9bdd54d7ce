"""Attack library + trainer on Fashion-MNIST: clean accuracy, ASR and training time.

Trains the small CNN (5 epochs, seed 0) clean and under BadNets 10%, Blend 10%, WaNet 10%
and SIG (clean-label, 5%), then prints a table and writes
``benchmarks/results/train.json``. Also checks that the same seed gives bit-identical
weights (a second BadNets run) unless ``--no-repeat``.

    python benchmarks/bench_train.py [--attacks badnets,blend,wanet,sig,clean] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from trojanscan.attacks import parse_attack
from trojanscan.io.data import load_dataset
from trojanscan.training import TrainConfig
from trojanscan.zoo import make_model

SPECS = {
    "clean": ("none", 0.0),
    "badnets": ("badnets:size=4,location=bottom-right,target=0", 0.10),
    "blend": ("blend:alpha=0.2,target=0", 0.10),
    "wanet": ("wanet:target=0", 0.10),
    "sig": ("sig:target=8", 0.05),
}
OUT = Path(__file__).resolve().parent / "results" / "train.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", default="clean,badnets,blend,wanet,sig")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--no-repeat", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    train, test = load_dataset("fashion-mnist:train"), load_dataset("fashion-mnist:test")
    cfg = TrainConfig(epochs=args.epochs)
    rows = []
    weights: dict[str, dict[str, torch.Tensor]] = {}
    names = args.attacks.split(",") + ([] if args.no_repeat else ["badnets#repeat"])
    for name in names:
        spec, rate = SPECS[name.split("#")[0]]
        attack = parse_attack(spec)
        t0 = time.perf_counter()
        tm = make_model(train, test, attack=attack, poison_rate=rate or 0.1, arch=args.arch,
                        seed=0, config=cfg, device="cpu")
        row = {"attack": name, "spec": spec, "poison_rate": rate,
               "clean_accuracy": round(tm.clean_accuracy, 4),
               "asr": None if tm.asr is None else round(tm.asr, 4),
               "train_seconds": round(tm.seconds, 1),
               "total_seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        weights[name] = {k: v.clone() for k, v in tm.model.state_dict().items()}
        print(f"{name:16s} acc {row['clean_accuracy']:.4f}  asr {row['asr']}  "
              f"train {row['train_seconds']:6.1f} s", flush=True)
    identical = None
    if "badnets#repeat" in weights and "badnets" in weights:
        a, b = weights["badnets"], weights["badnets#repeat"]
        identical = all(torch.equal(a[k], b[k]) for k in a)
        print(f"same seed, bit-identical weights: {identical}")
    doc = {"rows": rows, "bit_identical_same_seed": identical, "epochs": args.epochs,
           "arch": args.arch, "machine": {"cpus": os.cpu_count(),
                                          "torch": torch.__version__,
                                          "threads": torch.get_num_threads(),
                                          "python": platform.python_version()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
