"""The full Fashion-MNIST bundle these studies read, and copies of it with other recipes.

The shipped bundle holds only what its recipe reads. These studies also read entries and
calibration it no longer ships (the paper's ``qt`` and ``no_qt``, the ``qt_data``
members, the search's ``benign_costs`` and ``benign_flows``): they read the bundle as it
was made, restored from git into ``benchmarks/.cache/mntd_full/``::

    mkdir -p benchmarks/.cache/mntd_full
    for ext in json safetensors; do git show \\
        ba4420f:src/trojanscan/data/mntd_fmnist.$ext > benchmarks/.cache/mntd_full/mntd_fmnist.$ext
    done
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

FULL = Path(__file__).resolve().parents[1] / ".cache" / "mntd_full" / "mntd_fmnist.json"


def full_bundle() -> str:
    """Path of the full bundle (exits with how to restore it when missing)."""
    if not FULL.is_file():
        sys.exit(f"missing {FULL}: restore it as benchmarks/mntd_research/_bundles.py says")
    return str(FULL)


def with_recipe(parts: dict[str, float], calibration: str = "reference") -> str:
    """A temporary copy of the full bundle whose recipe is ``parts`` (name -> weight)."""
    from trojanscan.mntd.pretrained import load_bundle, save_bundle
    from trojanscan.mntd.recipe import Recipe

    bundle = load_bundle(full_bundle())
    recipe = Recipe(tuple((n, float(w)) for n, w in parts.items()), calibration)
    folder = Path(tempfile.mkdtemp(prefix="mntd-recipe-"))
    return str(save_bundle(folder / "mntd_fmnist", replace(bundle, recipe=recipe))[1])
