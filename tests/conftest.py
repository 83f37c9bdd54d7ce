"""Shared fixtures: tiny backdoored and clean models that train in seconds on CPU.

The data are scikit-learn's 8×8 digits (bundled, offline). The backdoor is a BadNets
2×2 white patch in the bottom-right corner relabelled to class 0, at 10% of the
training set. Both models use the same seed and architecture, so the clean twin
differs only by the poison. Session-scoped: trained once per test run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.training import TrainConfig, evaluate, train_model

TARGET = 0
POISON_RATE = 0.1


def stamp_patch(x: torch.Tensor) -> torch.Tensor:
    """The fixtures' trigger: a 2×2 white patch in the bottom-right corner."""
    x = x.clone()
    x[:, :, -2:, -2:] = 1.0
    return x


@dataclass(frozen=True)
class TinyModels:
    train_clean: ImageDataset       # clean training split (1400 samples)
    train_poisoned: ImageDataset    # the same with 10% poisoned (stamped, label 0)
    poison_mask: np.ndarray         # ground truth over train_poisoned
    test: ImageDataset              # held-out clean split (397 samples)
    backdoored: nn.Module
    clean: nn.Module
    target: int
    stamp: Callable[[torch.Tensor], torch.Tensor]
    backdoored_accuracy: float
    clean_accuracy: float
    asr: float

    def triggered_test(self) -> torch.Tensor:
        """Stamped test inputs whose true label is not the target."""
        keep = self.test.labels() != self.target
        return self.stamp(self.test.x[keep])


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def _build() -> TinyModels:
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400].sort().values, perm[1400:].sort().values
    train_clean = ImageDataset(x[tr], y[tr], source="digits[train]", format="builtin")
    test = ImageDataset(x[te], y[te], source="digits[test]", format="builtin")
    rng = np.random.default_rng(0)
    candidates = np.flatnonzero(train_clean.labels().numpy() != TARGET)
    chosen = rng.choice(candidates, int(POISON_RATE * len(train_clean)), replace=False)
    mask = np.zeros(len(train_clean), dtype=bool)
    mask[chosen] = True
    xp, yp = train_clean.x.clone(), train_clean.labels().clone()
    idx = torch.from_numpy(chosen)
    xp[idx] = stamp_patch(xp[idx])
    yp[idx] = TARGET
    train_poisoned = train_clean.with_data(xp, yp)
    cfg = TrainConfig(epochs=20, batch_size=64, lr=2e-3)
    backdoored = train_model("small_cnn", train_poisoned, config=cfg, seed=0, device="cpu")
    clean = train_model("small_cnn", train_clean, config=cfg, seed=0, device="cpu")
    keep = test.labels() != TARGET
    with torch.no_grad():
        asr = float((backdoored(stamp_patch(test.x[keep])).argmax(1) == TARGET).float().mean())
    return TinyModels(train_clean, train_poisoned, mask, test, backdoored, clean, TARGET,
                      stamp_patch, evaluate(backdoored, test), evaluate(clean, test), asr)


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    """A tiny BadNets-backdoored digits CNN and its clean twin (same seed)."""
    models = _build()
    assert models.asr > 0.95 and models.backdoored_accuracy > 0.9, "fixture failed to train"
    return models
