"""Exploratory probe: IBD-PSC (Hou et al., ICML 2024) as its reference code runs it, on the
wild zoo's backdoored models that have BatchNorm layers. Not a shipped detector.

Faithful settings: the deepest BatchNorm layers' weight and bias scaled by 1.5; the first
depth at which more than 60% of clean inputs change class, then 5 depths from there; the
score (PSC) is the mean probability of the original class over the 5 scaled models,
flagged at PSC >= 0.9 (the paper's T) or above its 99th percentile on 1,000 clean
defender images (FRR 1%). One JSON line per model:

    OMP_NUM_THREADS=1 python -m benchmarks.wild.ibd_psc_probe --split dev --models 12
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from trojanscan.api import load_dataset, load_model

from . import zoo as wz

SCALE, XI, N, T = 1.5, 0.6, 5, 0.9


def bn_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for _, m in model.named_modules()
            if getattr(m, "original_name", type(m).__name__) in ("BatchNorm2d", "BatchNorm1d")]


def scaled_logits(model: torch.nn.Module, bns: list[torch.nn.Module], k: int,
                  x: torch.Tensor) -> torch.Tensor:
    """Logits with the deepest ``k`` BatchNorm layers amplified (restored afterwards)."""
    saved = [(b.weight.detach().clone(), b.bias.detach().clone()) for b in bns[-k:]]
    with torch.no_grad():
        for b in bns[-k:]:
            b.weight.mul_(SCALE)
            b.bias.mul_(SCALE)
        try:
            return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
        finally:
            for b, (w, bias) in zip(bns[-k:], saved):
                b.weight.copy_(w)
                b.bias.copy_(bias)


def psc(model: torch.nn.Module, bns: list[torch.nn.Module], start: int,
        x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(1)
    depths = [min(len(bns), k) for k in range(start + 1, start + 1 + N)]
    s = torch.zeros(len(x))
    for k in depths:
        s += scaled_logits(model, bns, k, x).softmax(1)[torch.arange(len(x)), pred]
    return (s / len(depths)).numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="benchmarks/.cache/wild/seed0")
    ap.add_argument("--clean", default="benchmarks/.cache/wild/defender_clean.npz")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--models", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    man = json.loads(Path(f"{args.zoo}/manifest.json").read_text())["models"]
    pairs = collections.Counter(m["pair"] for m in man)
    clean = load_dataset(args.clean)
    xc, yc = clean.x[:1000], clean.labels()[:1000]
    done = 0
    for m in sorted(man, key=lambda m: m["name"]):
        if not m["backdoored"] or m["split"] != args.split or pairs[m["pair"]] != 2:
            continue
        model = load_model(f"{args.zoo}/models/{m['model_file']}").module
        bns = bn_layers(model)
        if len(bns) < 2:
            continue
        t0 = time.perf_counter()
        start = next((k for k in range(1, len(bns))
                      if (scaled_logits(model, bns, k, xc).argmax(1) != yc).float().mean()
                      > XI), len(bns) - 1)
        side = json.loads(Path(f"{args.zoo}/models/{m['name']}.json").read_text())
        x_np, trig = wz.filter_inputs(side, 500)
        x = torch.from_numpy(x_np).float() / 255.0  # uint8 images, as the CLI reads them
        trig = np.asarray(trig)
        thr = float(np.quantile(psc(model, bns, start, xc), 0.99))
        s = psc(model, bns, start, x)
        print(json.dumps({
            "name": m["name"], "arch": m["families"]["arch"], "trigger": m["families"]["trigger"],
            "bn_layers": len(bns), "start": start, "auroc": round(float(roc_auc_score(trig, s)), 3),
            "far_T": round(float((s[trig] < T).mean()), 3),
            "frr_T": round(float((s[~trig] >= T).mean()), 3),
            "threshold_frr1": thr, "far_frr1": round(float((s[trig] <= thr).mean()), 3),
            "frr_frr1": round(float((s[~trig] > thr).mean()), 3),
            "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        done += 1
        if done >= args.models:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
