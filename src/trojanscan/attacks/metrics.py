"""Clean accuracy and attack success rate (ASR) of a model under an attack.

ASR = share of *eligible* test inputs (true label != target for all-to-one attacks,
every input for all-to-all, a source class for source-specific ones) whose prediction
on the triggered input equals ``attack.target_labels(y)``. For a :class:`Multi` attack
:func:`attack_success_rates` gives one rate per trigger (``trigger_0``, ...) and their
``mean``; :func:`attack_success_rate` returns that mean.

The model is borrowed (:func:`trojanscan.classifier.borrow_model`): evaluated in eval
mode under ``no_grad``, its flags restored afterwards. Inputs go to ``device`` (default:
the device of the model's first parameter or buffer, else CPU); the model is not moved.
"""

from __future__ import annotations

import torch
from torch import nn

from ..classifier import borrow_model, model_device
from ..dataset import ImageDataset
from ..exceptions import DataError, ModelError, bad_param
from ..utils import batches
from .base import Attack, check_int
from .multi import Multi

__all__ = ["attack_success_rate", "attack_success_rates", "checked_logits",
           "clean_accuracy", "model_device"]


def checked_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as N×K logits; a model failure or another output is a ModelError."""
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelError(f"the model failed on a batch of shape {tuple(x.shape)}: {exc}") from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError(f"the model must return N×K logits, got "
                         f"{tuple(getattr(out, 'shape', ()))}")
    return out


def _setup(batch_size: int, device: str | torch.device | None,
           model: nn.Module) -> tuple[int, torch.device]:
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return batch_size, model_device(model) if device is None else torch.device(device)


@torch.no_grad()
def clean_accuracy(model: nn.Module, ds: ImageDataset, *, batch_size: int = 256,
                   device: str | torch.device | None = None) -> float:
    """Share of ``ds`` the model classifies correctly."""
    batch_size, dev = _setup(batch_size, device, model)
    y = ds.labels()
    correct = 0
    with borrow_model(model):
        for sl in batches(len(ds), batch_size):
            pred = checked_logits(model, ds.x[sl].to(dev)).argmax(1).cpu()
            correct += int((pred == y[sl]).sum())
    return correct / len(ds)


@torch.no_grad()
def _single_asr(model: nn.Module, attack: Attack, ds: ImageDataset, batch_size: int,
                dev: torch.device) -> float:
    y = ds.labels()
    mask = attack.eligible(y)
    if not bool(mask.any()):
        raise DataError(f"{ds.source}: no test input is eligible for the {attack.name} attack "
                        f"success rate (targets {list(attack.targets)}); add inputs of other "
                        "classes")
    x, y = ds.x[mask], y[mask]
    hits = 0
    for sl in batches(len(y), batch_size):
        logits = checked_logits(model, attack.apply(x[sl].to(dev)))
        k = int(logits.shape[1])
        for t in attack.targets:
            if t >= k:
                raise bad_param(f"{attack.name}.target", f"a class index < {k} (the model's "
                                "number of classes)", t)
        want = attack.target_labels(y[sl], num_classes=k)
        hits += int((logits.argmax(1).cpu() == want).sum())
    return hits / len(y)


def attack_success_rates(model: nn.Module, attack: Attack, test_ds: ImageDataset, *,
                         batch_size: int = 256,
                         device: str | torch.device | None = None) -> dict[str, float]:
    """ASR per trigger (``trigger_0``, ``trigger_1``, ...) and their ``mean``."""
    if not isinstance(attack, Attack):
        raise bad_param("attack", "an Attack (see trojanscan.attacks.parse_attack)", attack)
    batch_size, dev = _setup(batch_size, device, model)
    subs = attack.attacks if isinstance(attack, Multi) else (attack,)
    out: dict[str, float] = {}
    with borrow_model(model):
        for i, sub in enumerate(subs):
            out[f"trigger_{i}"] = _single_asr(model, sub, test_ds, batch_size, dev)
    out["mean"] = sum(out.values()) / len(subs)
    return out


def attack_success_rate(model: nn.Module, attack: Attack, test_ds: ImageDataset, *,
                        batch_size: int = 256,
                        device: str | torch.device | None = None) -> float:
    """Attack success rate in [0, 1] (the mean over triggers for multi-trigger attacks)."""
    return attack_success_rates(model, attack, test_ds, batch_size=batch_size,
                                device=device)["mean"]
