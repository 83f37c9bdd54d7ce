"""Benchmark STRIP and SCALE-UP on Fashion-MNIST backdoored models (placeholder: training)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from trojanscan import archs
from trojanscan.attacks import parse_attack
from trojanscan.io.data import load_dataset
from trojanscan.zoo import make_model, save_model

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "runtime"

#: name -> (attack spec, poison rate)
MODELS: dict[str, tuple[str, float]] = {
    "clean": ("none", 0.0),
    "badnets": ("badnets:size=3,target=0", 0.1),
    "blend": ("blend:alpha=0.2,target=0", 0.1),
    "sig": ("sig:target=0", 0.05),
    "wanet": ("wanet:target=0", 0.1),
    "source": ("source:source=1,target=0", 0.1),
}


def cached_model(name: str, train, test, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    spec, rate = MODELS[name]
    path = CACHE / f"fmnist-{name}-s{seed}.pt"
    side = path.with_suffix(".json")
    if not side.exists():
        atk = parse_attack(spec)
        t0 = time.perf_counter()
        trained = make_model(train, test, attack=atk, poison_rate=rate if atk else 0.1,
                             arch="small_cnn", seed=seed, description=f"training {name}")
        save_model(trained, path)
        print(f"trained {name}: acc {trained.clean_accuracy:.4f} asr {trained.asr} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    meta = json.loads(side.read_text())
    model = archs.build("small_cnn", tuple(meta["input_shape"]), meta["num_classes"])
    model.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
    return model.eval(), meta


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args()
    train = load_dataset("fashion-mnist:train")
    test = load_dataset("fashion-mnist:test")
    for name in MODELS:
        cached_model(name, train, test)
    if args.train_only:
        return


if __name__ == "__main__":
    main()
