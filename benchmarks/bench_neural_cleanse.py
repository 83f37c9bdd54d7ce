"""Benchmark: Neural Cleanse, faithful vs fast mode, on Fashion-MNIST models.

Placeholder while models train (rewritten below once the detector exists).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from trojanscan.attacks import parse_attack
from trojanscan.io.data import load_dataset
from trojanscan.zoo import make_model, save_model

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "neural_cleanse"

#: (name, attack spec or "none", training seed)
MODELS: list[tuple[str, str, int]] = [
    ("badnets3-br-t0", "badnets:size=3,location=bottom-right,target=0", 0),
    ("badnets4-tl-t3", "badnets:size=4,location=top-left,target=3", 1),
    ("badnets5-tr-t7", "badnets:size=5,location=top-right,target=7", 2),
    ("badnets4-bl-t9-checker", "badnets:size=4,location=bottom-left,pattern=checkerboard,"
                               "target=9", 3),
    ("badnets3-center-t5", "badnets:size=3,location=center,target=5", 4),
    ("blend-t2", "blend:alpha=0.2,target=2", 5),
    ("clean-s0", "none", 10),
    ("clean-s1", "none", 11),
    ("clean-s2", "none", 12),
    ("clean-s3", "none", 13),
    ("clean-s4", "none", 14),
]


def model_path(name: str) -> Path:
    return CACHE / f"{name}.pt"


def ensure_models(names: list[str] | None = None) -> None:
    train = test = None
    for name, spec, seed in MODELS:
        if names and name not in names:
            continue
        path = model_path(name)
        if path.exists() and path.with_suffix(".json").exists():
            continue
        if train is None:
            train = load_dataset("fashion-mnist:train")
            test = load_dataset("fashion-mnist:test")
        t0 = time.perf_counter()
        trained = make_model(train, test, attack=parse_attack(spec), poison_rate=0.1,
                             arch="small_cnn", seed=seed, device="cpu")
        save_model(trained, path)
        print(f"{name}: acc {trained.clean_accuracy:.4f} asr {trained.asr} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--train-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    ensure_models()
    print(json.dumps({"done": True}))
