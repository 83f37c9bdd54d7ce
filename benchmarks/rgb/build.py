"""Build the RGB benchmark models with ``trojanscan train`` (resumable).

    python -m benchmarks.rgb.build [--cache benchmarks/.cache/rgb] [--subset 6000] [--epochs 5]

Writes ``CACHE/data/{train,test,defender}.npz`` (deterministic subsets of the built-in
``synthetic-rgb`` task), and per model ``CACHE/models/NAME.pt`` + ``NAME.json`` (the
trainer's sidecar) + ``NAME.train.npz`` (its training set with ``poison_mask``) + a line
in ``CACHE/models.json``. Models already built are skipped. Each backdoored model has a
clean partner of the same architecture and recipe trained with another seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

#: (name, arch, attack spec, poison rate, seed). Patches are coloured (a random 0/1 draw
#: per channel and pixel), placed in corners, at edges and in the middle of the object.
MODELS: list[tuple[str, str, str, float, int]] = [
    ("bd_resnet_patch_mid", "preact_resnet18_narrow",
     "badnets:pattern=random,size=4,location=(11,17),target=3,trigger_seed=1", 0.1, 1),
    ("bd_resnet_blend", "preact_resnet18_narrow",
     "blend:alpha=0.15,pattern=random,target=7,trigger_seed=2", 0.1, 2),
    ("bd_resnet_warp", "preact_resnet18_narrow", "wanet:s=2.0,target=5,trigger_seed=3",
     0.1, 3),
    ("bd_vgg_patch_corner", "vgg_small",
     "badnets:pattern=random,size=3,location=bottom-left,target=1,trigger_seed=4", 0.1, 4),
    ("bd_vgg_blend", "vgg_small", "blend:alpha=0.2,pattern=random,target=0,trigger_seed=5",
     0.1, 5),
    ("bd_vgg_warp", "vgg_small", "wanet:s=2.0,target=8,trigger_seed=6", 0.1, 6),
    ("bd_resnet_patch_edge", "preact_resnet18_narrow",
     "badnets:pattern=random,size=3,location=(2,14),target=6,trigger_seed=7", 0.05, 7),
    ("bd_vgg_patch_mid", "vgg_small",
     "badnets:pattern=random,size=4,location=(16,9),target=2,trigger_seed=8", 0.05, 8),
]
CLEAN: list[tuple[str, str, str, float, int]] = [
    (f"clean_{'resnet' if a.startswith('preact') else 'vgg'}_{i}", a, "none", 0.0, 100 + i)
    for i, (_, a, _, _, _) in enumerate(MODELS)
]


def write_data(cache: Path, train_size: int, test_size: int, defender_size: int) -> None:
    from trojanscan.io.data import load_dataset

    d = cache / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, source, n in (("train", "synthetic-rgb:train", train_size),
                            ("test", "synthetic-rgb:test", test_size)):
        path = d / f"{name}.npz"
        if path.exists():
            continue
        ds = load_dataset(source)
        keep = np.sort(rng.choice(len(ds.x), size=min(n, len(ds.x)), replace=False))
        x = (ds.x[keep].numpy() * 255).round().astype(np.uint8)
        assert ds.y is not None
        y = ds.y[keep].numpy().astype(np.int64)
        np.savez(path, x=x, y=y)
        if name == "test":  # the defender's clean data: the first part of the test subset
            np.savez(d / "defender.npz", x=x[:defender_size], y=y[:defender_size])
            np.savez(d / "eval.npz", x=x[defender_size:], y=y[defender_size:])


def train(cache: Path, spec: tuple[str, str, str, float, int], epochs: int,
          train_npz: Path, threads: int) -> dict:
    name, arch, attack, rate, seed = spec
    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    out = models / f"{name}.pt"
    cmd = [sys.executable, "-m", "trojanscan", "train", "--dataset",
           str(train_npz), "--test-data", str(cache / "data" / "eval.npz"),
           "--arch", arch, "--attack", attack, "--poison-rate", str(rate or 0.1),
           "--epochs", str(epochs), "--seed", str(seed), "--out", str(out), "--save-data",
           str(models / f"{name}.train.npz"), "--quiet"]
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train failed: {proc.stderr.strip()[-800:]}")
    side = json.loads((models / f"{name}.json").read_text())
    return {"name": name, "arch": arch, "attack": attack, "poison_rate": rate if attack != "none"
            else 0.0, "seed": seed, "backdoored": attack != "none",
            "clean_accuracy": side.get("clean_accuracy"), "asr": side.get("asr"),
            "train_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(int(proc.stderr.strip().splitlines()[-1]) / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/rgb"))
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=3000)
    ap.add_argument("--defender-size", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--subset", type=int, default=6000,
                    help="models train on the first SUBSET images of train.npz")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated model names")
    args = ap.parse_args(argv)
    write_data(args.cache, args.train_size, args.test_size, args.defender_size)
    index_path = args.cache / "models.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    order = [m for pair in zip(MODELS, CLEAN) for m in pair]
    only = set(args.only.split(",")) if args.only else None
    sub = args.cache / "data" / f"train{args.subset}.npz"
    if not sub.exists():
        z = np.load(args.cache / "data" / "train.npz")
        np.savez(sub, x=z["x"][:args.subset], y=z["y"][:args.subset])
    todo = [s for s in order if s[0] not in index and not (only and s[0] not in only)]

    def one(spec: tuple[str, str, str, float, int]) -> dict:
        return train(args.cache, spec, args.epochs, sub, args.threads)

    with ThreadPoolExecutor(args.workers) as pool:
        for row in pool.map(one, todo):
            index[row["name"]] = row
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(index, indent=1))
            tmp.replace(index_path)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
