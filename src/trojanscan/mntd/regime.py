"""How each MNTD shadow model is trained: the paper's one recipe, or one drawn at random.

Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021, train every
shadow model the same way (same data share, epochs, optimiser). Models under test are
trained in other ways — on more data, for longer or shorter, with other learning rates —
and a meta-classifier that has only seen one recipe reads those differences as
"trojaned" (17–33% of real clean Fashion-MNIST models flagged at a 5%
shadow-calibrated false-positive rate). ``regime="random"`` (beyond the paper) draws, per
shadow, from its own seed:

* ``subsample`` — the share of the defender's data it trains on, ``U(0.5, 1)``;
* ``epochs`` — log-uniform integer in ``[5, 40]``;
* ``batch_size`` — one of 32, 64, 128;
* ``lr`` — log-uniform in ``[3e-4, 3e-3]`` (Adam);
* ``weight_decay`` — 0 half the time, else 1e-4 or 5e-4;
* ``lr_decay`` — cosine decay to 0, or a constant rate, with equal chance.

Benign and jumbo shadows draw from the same distribution, so the recipe carries no cue
about the label. Pure functions; tested without any model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..exceptions import bad_param
from ..training import TrainConfig

REGIMES = ("fixed", "random")
SUBSAMPLE = (0.5, 1.0)
EPOCHS = (5, 40)
BATCH_SIZES = (32, 64, 128)
LR = (3e-4, 3e-3)
WEIGHT_DECAYS = (0.0, 0.0, 1e-4, 5e-4)


@dataclass(frozen=True)
class Regime:
    """One shadow's training recipe."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    lr_decay: bool = True
    subsample: float = 1.0

    def config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, lr_decay=self.lr_decay)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def sample_regime(rng: np.random.Generator) -> Regime:
    """Draw one recipe from the ``random`` regime (see the module docstring)."""
    epochs = round(_log_uniform(rng, *EPOCHS))
    batch = int(BATCH_SIZES[int(rng.integers(len(BATCH_SIZES)))])
    lr = _log_uniform(rng, *LR)
    wd = float(WEIGHT_DECAYS[int(rng.integers(len(WEIGHT_DECAYS)))])
    decay = bool(rng.integers(2))
    sub = float(rng.uniform(*SUBSAMPLE))
    return Regime(epochs, batch, round(lr, 7), wd, decay, round(sub, 4))


def check_regime(regime: str) -> None:
    if regime not in REGIMES:
        raise bad_param("regime", REGIMES, regime)
