"""The declared families and the development / held-out split.

Development models draw only from the development families; held-out models draw from all
of them, with each held-out family favoured so that every one is well represented. A
detector's decision rule may be changed only on development models (see README.md)."""

from __future__ import annotations

import numpy as np

from .nets import ARCH_FAMILIES
from .recipes import RECIPE_FAMILIES
from .triggers import TRIGGER_KINDS

HELDOUT_ARCHS = ("dwsep",)
HELDOUT_RECIPES = ("adamw_cosine",)
HELDOUT_TRIGGERS = ("patch_centre", "warp")
SPLITS = ("dev", "heldout")


def dev_families(axis: str) -> tuple[str, ...]:
    all_, held = _axis(axis)
    return tuple(f for f in all_ if f not in held)


def _axis(axis: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if axis == "arch":
        return ARCH_FAMILIES, HELDOUT_ARCHS
    if axis == "recipe":
        return RECIPE_FAMILIES, HELDOUT_RECIPES
    if axis == "trigger":
        return TRIGGER_KINDS, HELDOUT_TRIGGERS
    raise ValueError(f"unknown axis {axis!r}")


def draw_family(rng: np.random.Generator, axis: str, split: str,
                heldout_weight: float = 0.35) -> str:
    """One family of ``axis`` for a model of ``split``."""
    all_, held = _axis(axis)
    dev = [f for f in all_ if f not in held]
    if split == "dev":
        return str(rng.choice(dev))
    if split != "heldout":
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if rng.random() < heldout_weight:
        return str(rng.choice(list(held)))
    return str(rng.choice(dev))


def is_heldout_family(axis: str, family: str) -> bool:
    return family in _axis(axis)[1]
