"""Benchmark: poisoned-training-data detectors on Fashion-MNIST (prepare step only so far)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trojanscan.attacks import parse_attack
from trojanscan.dataset import ImageDataset
from trojanscan.io.data import load_dataset
from trojanscan.zoo import TrainedModel, save_model

CACHE = Path(os.environ.get("BENCH_CACHE") or
             Path(__file__).resolve().parent / ".cache" / "data_poisoning")


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


def model_path(case: Case, seed: int) -> Path:
    return CACHE / f"{case.name}-s{seed}.pt"


def train_case(attack: object, rate: float, train: ImageDataset, test: ImageDataset,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prepare", action="store_true", help="only train/cache the models")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    train = load_dataset("fashion-mnist:train")
    test = load_dataset("fashion-mnist:test")
    for case in CASES:
        prepare(case, train, test, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
