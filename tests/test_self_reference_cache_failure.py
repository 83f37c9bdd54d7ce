"""Self-references that could not be trained are cached as such: a second model of the same
architecture does not train them again (it falls back, saying why, from the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import _digits
from trojanscan.dataset import ImageDataset
from trojanscan.self_reference import prepare_self_references
from trojanscan.training import TrainConfig, train_model


def _digits_mlps() -> tuple[torch.nn.Module, torch.nn.Module, ImageDataset]:
    x, y = _digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1000].sort().values, perm[1400:].sort().values
    train = ImageDataset(x[tr], y[tr], source="digits[train]", format="builtin")
    test = ImageDataset(x[te], y[te], source="digits[test]", format="builtin")
    cfg = TrainConfig(epochs=8, batch_size=64, lr=2e-3)
    return (train_model("mlp", train, config=cfg, seed=3, device="cpu"),
            train_model("mlp", train, config=cfg, seed=4, device="cpu"), test)


def test_failed_self_references_are_cached_and_reused(tmp_path: Path) -> None:
    a, b, test = _digits_mlps()
    # one sample pass each: far below the accuracy floor, so every copy is dropped
    first = prepare_self_references(a, test, ["neural_cleanse"], n=2, seed=0, budget=1,
                                    cache_dir=tmp_path)
    assert first.summary["active"] is False and first.summary["from_cache"] is False
    assert all("below the floor" in r for r in first.summary["dropped"].values())
    folder = tmp_path / first.summary["cache_key"]
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]
    assert json.loads((folder / "meta.json").read_text())["count"] == 0
    second = prepare_self_references(b, test, ["neural_cleanse"], n=2, seed=0, budget=1,
                                     cache_dir=tmp_path)
    assert second.summary["from_cache"] is True and second.summary["active"] is False
    assert second.summary["dropped"] == first.summary["dropped"]
    assert "not used" in second.summary["note"]
    assert "reference" not in second.detector_params.get("neural_cleanse", {})
