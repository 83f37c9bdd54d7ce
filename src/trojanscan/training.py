"""A deterministic trainer for the reference architectures (CPU bit-identical per seed).

Same seed, same data, same torch build and thread count → bit-identical weights on
CPU: shuffling uses a dedicated ``torch.Generator``, initialisation is seeded, and
``torch.use_deterministic_algorithms`` is switched on for the duration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import archs
from .classifier import borrow_model, model_device
from .dataset import ImageDataset
from .exceptions import bad_param
from .progress import progress
from .utils import batches, pick_device, seed_everything


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_model` (defaults reach ~90% on Fashion-MNIST)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: bool = True  # cosine decay to 0 over the run

    def validate(self) -> None:
        if self.epochs < 1:
            raise bad_param("epochs", "an integer >= 1", self.epochs)
        if self.batch_size < 1:
            raise bad_param("batch_size", "an integer >= 1", self.batch_size)
        if not self.lr > 0:
            raise bad_param("lr", "a float > 0", self.lr)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train_model(
    model: nn.Module | str,
    train: ImageDataset,
    *,
    config: TrainConfig | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_classes: int | None = None,
    description: str = "training",
) -> nn.Module:
    """Train ``model`` (an ``nn.Module`` or a reference architecture name) on ``train``.

    Adam with cross-entropy; returns the trained model in eval mode on the CPU.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    y_all = train.labels()
    train.require_classes(2)
    k = num_classes or train.num_classes
    gen = seed_everything(seed)
    if isinstance(model, str):
        model = archs.build(model, train.input_shape, k)
    dev = pick_device(device)
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
             if cfg.lr_decay else None)
    model.train()
    with _deterministic(), progress(description, steps) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            for sl in batches(n, cfg.batch_size):
                idx = perm[sl]
                xb = train.x[idx].to(dev, non_blocking=True)
                yb = y_all[idx].to(dev, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                bar.advance()
    return model.eval().cpu()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Predicted class per input (batched, model borrowed)."""
    dev = pick_device(device) if device is not None else model_device(model)
    out = []
    with borrow_model(model):
        for sl in batches(len(x), batch_size):
            out.append(model(x[sl].to(dev)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def evaluate(model: nn.Module, ds: ImageDataset, *, batch_size: int = 512,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``ds``."""
    pred = predict(model, ds.x, batch_size=batch_size, device=device)
    return float((pred == ds.labels()).float().mean())

