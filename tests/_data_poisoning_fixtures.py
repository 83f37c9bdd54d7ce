"""Fixtures for the data-poisoning tests: a "model" whose penultimate features are its
inputs, and small image sets with a planted poison cluster.

The model is ``Flatten → Linear(identity) → Linear(K)``: the input of its last linear
layer is the flattened image itself, so the geometry of the planted data *is* the
geometry the detectors see, with no training. This tests the whole pipeline (feature
extraction, orchestration, report, export) with a known answer; the trained-model
checks use the ``tiny`` fixture of conftest.py and the Fashion-MNIST benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trojanscan.dataset import ImageDataset

SIDE = 4  # images are 1×4×4 (16 features)
CLASSES = 4
PER_CLASS = 150


class PassThrough(nn.Module):
    """Penultimate features = the flattened input (identity first layer)."""

    def __init__(self, dim: int = SIDE * SIDE, num_classes: int = CLASSES) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(dim))
            self.body.bias.zero_()
            centres = class_centres()
            self.head.weight.copy_(torch.from_numpy(centres).float())
            self.head.bias.copy_(torch.from_numpy(-0.5 * (centres**2).sum(1)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(x)))


def class_centres() -> np.ndarray:
    """Class means in [0, 1]^16: each class lights up its own 4 pixels."""
    c = np.full((CLASSES, SIDE * SIDE), 0.3)
    for k in range(CLASSES):
        c[k, 4 * k:4 * k + 4] = 0.7
    return c


@dataclass(frozen=True)
class Planted:
    data: ImageDataset
    mask: np.ndarray


def planted_images(*, poison: int = 30, seed: int = 0, target: int = 0,
                   shift: float = 0.35) -> Planted:
    """``CLASSES × PER_CLASS`` images; ``poison`` extra samples labelled ``target`` carry
    a "trigger" (pixels 12–15 pushed up by ``shift``) on top of another class's look."""
    rng = np.random.default_rng(seed)
    centres = class_centres()
    xs, ys = [], []
    for k in range(CLASSES):
        xs.append(centres[k] + 0.04 * rng.normal(size=(PER_CLASS, SIDE * SIDE)))
        ys.append(np.full(PER_CLASS, k))
    mask = np.zeros(CLASSES * PER_CLASS + poison, dtype=bool)
    if poison:
        src = rng.integers(1, CLASSES, poison)
        px = centres[src] + 0.04 * rng.normal(size=(poison, SIDE * SIDE))
        px[:, 12:16] = 0.3 + shift  # the trigger: a bright corner row
        xs.append(px)
        ys.append(np.full(poison, target))
        mask[-poison:] = True
    x = np.clip(np.concatenate(xs), 0, 1).astype(np.float32).reshape(-1, 1, SIDE, SIDE)
    y = np.concatenate(ys).astype(np.int64)
    perm = rng.permutation(len(y))
    ds = ImageDataset(torch.from_numpy(x[perm]), torch.from_numpy(y[perm]),
                      source="planted", format="memory")
    return Planted(ds, mask[perm])
