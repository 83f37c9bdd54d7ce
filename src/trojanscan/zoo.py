"""Make clean and backdoored models (red-teaming, benchmarks, demo) and save them.

``make_model`` poisons a training set with an attack from :mod:`trojanscan.attacks`,
trains a reference architecture deterministically and measures clean accuracy and
attack success rate; ``save_model`` writes TorchScript, safetensors and a sidecar
JSON with the ground truth (which samples were poisoned, the attack's settings).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .dataset import ImageDataset
from .exceptions import bad_param
from .training import TrainConfig, evaluate, train_model
from .utils import atomic_path, atomic_write_text, pick_device, sha256_file


@dataclass(frozen=True)
class TrainedModel:
    """A trained model with its ground truth and measured quality."""

    model: nn.Module
    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    attack: Any | None  # trojanscan.attacks.Attack
    poisoned: Any | None  # trojanscan.attacks.PoisonedData
    clean_accuracy: float
    asr: float | None
    asr_detail: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0
    config: TrainConfig = field(default_factory=TrainConfig)
    poison_rate: float = 0.0

    def sidecar(self) -> dict[str, Any]:
        mask = None if self.poisoned is None else np.asarray(self.poisoned.poison_mask)
        return {
            "tool": {"name": "trojanscan", "version": __version__},
            "arch": self.arch,
            "arch_factory": f"trojanscan.archs:{self.arch}",
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "attack": None if self.attack is None else self.attack.to_dict(),
            "backdoored": self.attack is not None,
            "poison_rate": self.poison_rate,
            "num_poisoned": 0 if mask is None else int(mask.sum()),
            "poison_indices": [] if mask is None else np.flatnonzero(mask).tolist(),
            "clean_accuracy": self.clean_accuracy,
            "asr": self.asr,
            "asr_detail": self.asr_detail,
            "train_seconds": round(self.seconds, 3),
            "seed": self.seed,
            "train_config": self.config.__dict__,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }


def default_epochs(n: int) -> int:
    """Epochs that reach the documented accuracy: fewer for large data sets."""
    if n >= 20000:
        return 5
    if n >= 5000:
        return 12
    return 30


def make_model(
    train: ImageDataset,
    test: ImageDataset,
    *,
    attack: Any | None = None,
    poison_rate: float = 0.1,
    arch: str = "small_cnn",
    seed: int = 0,
    config: TrainConfig | None = None,
    device: str | torch.device | None = None,
    description: str | None = None,
) -> TrainedModel:
    """Poison ``train`` with ``attack`` (None = clean), train ``arch``, measure on ``test``."""
    from .attacks import attack_success_rates

    train.require_classes(2)
    device = pick_device(device)
    k = max(train.num_classes, test.num_classes)
    poisoned = None
    data = train
    if attack is not None:
        if not 0.0 < poison_rate < 1.0:
            raise bad_param("poison_rate", "a float in (0, 1)", poison_rate)
        poisoned = attack.poison(train, poison_rate, seed=seed)
        data = poisoned.dataset
    cfg = config or TrainConfig(epochs=default_epochs(len(train)))
    t0 = time.perf_counter()
    model = train_model(arch, data, config=cfg, seed=seed, device=device, num_classes=k,
                        description=description or f"training {arch}")
    seconds = time.perf_counter() - t0
    model = model.to(device)
    acc = evaluate(model, test, device=device)
    asr: float | None = None
    detail: dict[str, float] = {}
    if attack is not None:
        detail = {str(k2): float(v) for k2, v in
                  attack_success_rates(model, attack, test, device=device).items()}
        asr = detail["mean"]
    model = model.cpu()
    return TrainedModel(model, arch, train.input_shape, k, attack, poisoned, acc, asr, detail,
                        seconds, seed, cfg, poison_rate if attack is not None else 0.0)


def to_torchscript(model: nn.Module, input_shape: tuple[int, int, int]) -> torch.jit.ScriptModule:
    """Script ``model`` (falls back to tracing) in eval mode on the CPU."""
    model = model.eval().cpu()
    try:
        return torch.jit.script(model)
    except Exception:  # scripting can fail on dynamic Python; tracing works for our archs
        with torch.no_grad():
            return torch.jit.trace(model, torch.zeros(1, *input_shape))


def save_model(trained: TrainedModel, out: str | Path) -> dict[str, Path]:
    """Write ``out`` (TorchScript), ``out.safetensors`` and ``out.json``; atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    paths = {"torchscript": out, "safetensors": out.with_suffix(".safetensors"),
             "sidecar": out.with_suffix(".json")}
    if len(set(paths.values())) < 3:
        raise bad_param("out", "a file name with an extension other than .json/.safetensors",
                        str(out))
    scripted = to_torchscript(trained.model, trained.input_shape)
    with atomic_path(paths["torchscript"]) as tmp:
        torch.jit.save(scripted, str(tmp))
    state = {k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()}
    with atomic_path(paths["safetensors"]) as tmp:
        save_file(state, str(tmp))
    meta = trained.sidecar()
    meta["files"] = {k: {"path": v.name, "sha256": sha256_file(v)}
                     for k, v in paths.items() if k != "sidecar"}
    atomic_write_text(paths["sidecar"], json.dumps(meta, indent=2) + "\n")
    return paths


def save_poisoned_data(trained: TrainedModel, train: ImageDataset, path: str | Path) -> Path:
    """Write the (poisoned) training set as ``.npz`` (``x`` uint8, ``y``, ``poison_mask``)."""
    data = trained.poisoned.dataset if trained.poisoned is not None else train
    mask = (np.asarray(trained.poisoned.poison_mask) if trained.poisoned is not None
            else np.zeros(len(train), dtype=bool))
    x = np.round(data.x.numpy() * 255).clip(0, 255).astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, x=x, y=data.labels().numpy(), poison_mask=mask)
    return path
