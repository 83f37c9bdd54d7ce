"""The zoo's training recipes and its own small training loop.

Six recipe families (optimiser × schedule); each model draws its learning rate, batch size,
weight decay, label smoothing, augmentation, training-subset size and epochs. A cost model
keeps the median model near 20 s on one CPU thread: the budget bounds epochs × subset ×
estimated per-sample cost, so long epoch counts only come with small subsets."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RECIPE_FAMILIES = ("sgd_const", "sgd_step", "sgd_cosine", "adam_const", "adam_step",
                   "adamw_cosine")
BATCHES = (32, 64, 128, 256, 512)
#: per-family µs per million multiply-accumulates of one forward+backward sample (1 thread)
_US_PER_MMAC = {"mlp": 110, "lenet5": 260, "small_cnn": 300, "wide_bn_cnn": 230,
                "resnet": 250, "dwsep": 700}
_US_PER_STEP = 700.0  # per-optimiser-step overhead
MIN_STEPS = 500
MIN_PASSES = 60_000


def sample_cost_s(arch_family: str, macs: int, act: str, batch: int, augment: str) -> float:
    """Estimated seconds per training sample on one thread (a planning estimate)."""
    us = 8.0 + _US_PER_MMAC[arch_family] * macs / 1e6
    if act != "relu":
        us *= 1.2
    if augment != "none":
        us += 6.0
    return (us + _US_PER_STEP / batch) * 1e-6


def draw_recipe(rng: np.random.Generator, family: str, arch_family: str, macs: int,
                act: str, quick: bool = False) -> dict[str, Any]:
    """Random settings of one recipe family, within the training budget."""
    opt, sched = family.split("_")
    if opt == "sgd":
        lr = float(np.exp(rng.uniform(np.log(0.02), np.log(0.1))))
        wd = float(rng.choice([0.0, 1e-4, 5e-4]))
    elif opt == "adam":
        lr = float(np.exp(rng.uniform(np.log(1e-3), np.log(3e-3))))
        wd = float(rng.choice([0.0, 0.0, 1e-5, 1e-4]))
    else:
        lr = float(np.exp(rng.uniform(np.log(1e-3), np.log(4e-3))))
        wd = float(rng.choice([0.01, 0.05, 0.1]))
    augment = str(rng.choice(["none", "none", "shift", "shift_flip"]))
    if quick:
        budget = 0.0
        batch = 32
        subset = int(rng.choice([5000, 6000]))
        epochs = int(rng.integers(3, 5))
    else:
        # a budget of CPU seconds, but never fewer than MIN_PASSES sample passes (a model
        # trained less is not one anybody would ship) nor MIN_STEPS optimiser steps
        budget = float(np.exp(rng.uniform(np.log(10.0), np.log(32.0))))
        passes = max(MIN_PASSES, budget / sample_cost_s(arch_family, macs, act, 128, augment))
        batch = int(rng.choice([b for b in BATCHES if passes / b >= MIN_STEPS] or [32]))
        passes = max(MIN_PASSES, budget / sample_cost_s(arch_family, macs, act, batch, augment))
        sizes = [s for s in range(10_000, 60_001, 5_000) if passes / s >= 3] or [10_000]
        subset = int(rng.choice(sizes))
        hi = min(30.0, passes / subset)
        epochs = int(max(2, round(hi * rng.uniform(0.7, 1.0))))
    recipe: dict[str, Any] = {
        "family": family, "optimizer": opt, "schedule": sched, "lr": round(lr, 6),
        "momentum": 0.9 if opt == "sgd" else None,
        "nesterov": bool(opt == "sgd" and rng.random() < 0.5),
        "weight_decay": wd, "batch": batch, "augment": augment,
        "label_smoothing": float(rng.choice([0.0, 0.0, 0.05, 0.1])),
    }
    per_sample = sample_cost_s(arch_family, macs, act, batch, augment)
    recipe.update(subset=subset, epochs=epochs, budget_s=round(budget, 2),
                  est_seconds=round(per_sample * subset * epochs, 2))
    return recipe


def _optimizer(model: nn.Module, r: dict[str, Any]) -> torch.optim.Optimizer:
    params = model.parameters()
    if r["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"],
                               nesterov=r["nesterov"], weight_decay=r["weight_decay"])
    if r["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=r["lr"], weight_decay=r["weight_decay"])
    return torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total`` (constant, step or cosine)."""
    frac = step / max(1, total)
    if schedule == "const":
        return 1.0
    if schedule == "step":
        return 0.1 ** (int(frac >= 0.5) + int(frac >= 0.75))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    raise ValueError(f"unknown schedule {schedule!r}")


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px (zero fill) and, for ``shift_flip``, horizontal flips."""
    if mode == "none":
        return x
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dy = torch.randint(0, 5, (n,), generator=gen)
    dx = torch.randint(0, 5, (n,), generator=gen)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar[None])[:, :, None]
    cols = (dx[:, None] + ar[None])[:, None, :]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    if mode == "shift_flip":
        flip = torch.rand(n, generator=gen) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, recipe: dict[str, Any], seed: int,
          device: torch.device, max_steps: int | None = None) -> nn.Module:
    """Train ``model`` in place on uint8 images ``x`` (``N×28×28``) and labels ``y``."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    model.to(device).train()
    opt = _optimizer(model, recipe)
    bs = recipe["batch"]
    steps_per_epoch = math.ceil(len(xt) / bs)
    total = steps_per_epoch * recipe["epochs"]
    if max_steps is not None:
        total = min(total, max_steps)
    step = 0
    while step < total:
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), bs):
            if step >= total:
                break
            idx = order[i:i + bs]
            xb = xt[idx].float().div_(255.0)[:, None]
            xb = augment_batch(xb, recipe["augment"], gen).to(device)
            yb = yt[idx].to(device)
            for g in opt.param_groups:
                g["lr"] = recipe["lr"] * lr_factor(recipe["schedule"], step, total)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=recipe["label_smoothing"])
            loss.backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: torch.device,
            batch: int = 1000) -> np.ndarray:
    """Predicted classes of uint8 images ``N×28×28``."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).float().div_(255.0)
        out.append(model(xb[:, None].to(device)).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)
