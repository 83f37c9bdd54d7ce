"""The zoo's architectures: six families, each drawn with its own widths, activation,
pooling and dropout. Written here (not taken from ``trojanscan.archs``) so that the
detectors meet shapes they were not tuned on. Every model maps ``N×1×28×28`` in [0, 1] to
10 logits; where a spec asks for it, input normalisation lives inside the model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

ARCH_FAMILIES = ("mlp", "lenet5", "small_cnn", "wide_bn_cnn", "resnet", "dwsep")
ACTIVATIONS = ("relu", "gelu", "silu")
POOLINGS = ("max", "avg", "strided")
NUM_CLASSES = 10


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[name]()


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _down(pool: str, channels: int) -> nn.Module:
    """Halve the resolution: max pool, average pool or a strided 3×3 convolution."""
    if pool == "max":
        return nn.MaxPool2d(2)
    if pool == "avg":
        return nn.AvgPool2d(2)
    return nn.Conv2d(channels, channels, 3, stride=2, padding=1)


class Residual(nn.Module):
    """A basic block: two 3×3 convolutions plus a (projected when needed) skip."""

    def __init__(self, cin: int, cout: int, stride: int, act: str, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not bn)
        self.bn1: nn.Module = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not bn)
        self.bn2: nn.Module = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = _act(act)
        self.skip: nn.Module = (nn.Identity() if stride == 1 and cin == cout
                                else nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.act(h + self.skip(x))


def _dwsep(cin: int, cout: int, stride: int, act: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False),
        nn.BatchNorm2d(cin), _act(act),
        nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), _act(act))


def build(spec: dict[str, Any]) -> nn.Module:
    """The ``nn.Module`` a spec from :func:`draw_arch` describes (weights from torch's RNG)."""
    fam, act, pool = spec["family"], spec["act"], spec.get("pool", "max")
    drop = float(spec.get("dropout", 0.0))
    w = int(spec.get("width", 16))
    layers: list[nn.Module] = []
    if spec.get("normalize"):
        layers.append(Normalize(0.286, 0.353))
    if fam == "mlp":
        layers.append(nn.Flatten())
        cin = 28 * 28
        for h in spec["hidden"]:
            layers += [nn.Linear(cin, h), _act(act), nn.Dropout(drop)]
            cin = h
        layers.append(nn.Linear(cin, NUM_CLASSES))
    elif fam == "lenet5":
        c1, c2 = 6 * w // 6, 16 * w // 6
        layers += [nn.Conv2d(1, c1, 5, padding=2), _act(act), _down(pool, c1),
                   nn.Conv2d(c1, c2, 5), _act(act), _down(pool, c2), nn.Flatten(),
                   nn.LazyLinear(120), _act(act), nn.Dropout(drop), nn.Linear(120, 84),
                   _act(act), nn.Linear(84, NUM_CLASSES)]
    elif fam == "small_cnn":
        layers += [nn.Conv2d(1, w, 3, padding=1), _act(act), _down(pool, w),
                   nn.Conv2d(w, 2 * w, 3, padding=1), _act(act), _down(pool, 2 * w),
                   nn.Flatten(), nn.Dropout(drop), nn.LazyLinear(spec["fc"]), _act(act),
                   nn.Linear(spec["fc"], NUM_CLASSES)]
    elif fam == "wide_bn_cnn":
        layers += [nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), _act(act),
                   _down(pool, w),
                   nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                   _act(act), _down(pool, 2 * w),
                   nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                   _act(act), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop),
                   nn.Linear(2 * w, NUM_CLASSES)]
    elif fam == "resnet":
        bn = bool(spec.get("bn", True))
        layers += [nn.Conv2d(1, w, 3, padding=1), _act(act), _down(pool, w)]
        cin = w
        for i in range(int(spec["blocks"])):
            cout = w * (2 if i > 0 else 1)
            layers.append(Residual(cin, cout, 2 if i == 1 else 1, act, bn))
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop),
                   nn.Linear(cin, NUM_CLASSES)]
    elif fam == "dwsep":
        layers += [nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), _act(act)]
        cin = w
        for i, stride in enumerate(spec["strides"]):
            cout = w * 2 ** min(i, 2)
            layers.append(_dwsep(cin, cout, stride, act))
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(drop),
                   nn.Linear(cin, NUM_CLASSES)]
    else:
        raise ValueError(f"unknown architecture family {fam!r}")
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))  # materialise lazy layers
    return model


def draw_arch(rng: np.random.Generator, family: str) -> dict[str, Any]:
    """Random settings of one architecture family."""
    spec: dict[str, Any] = {
        "family": family,
        "act": str(rng.choice(ACTIVATIONS)),
        "pool": str(rng.choice(POOLINGS)),
        "dropout": float(rng.choice([0.0, 0.0, 0.1, 0.25])),
        "normalize": bool(rng.random() < 0.5),
    }
    if family == "mlp":
        depth = int(rng.integers(1, 4))
        spec["hidden"] = [int(rng.choice([128, 256, 512])) for _ in range(depth)]
        spec.pop("pool")
    elif family == "lenet5":
        spec["width"] = int(rng.choice([6, 9]))
    elif family == "small_cnn":
        spec["width"] = int(rng.choice([8, 12, 16]))
        spec["fc"] = int(rng.choice([64, 128]))
    elif family == "wide_bn_cnn":
        spec["width"] = int(rng.choice([12, 16, 24]))
    elif family == "resnet":
        spec["width"] = int(rng.choice([8, 12]))
        spec["blocks"] = int(rng.integers(2, 4))
        spec["bn"] = bool(rng.random() < 0.7)
    elif family == "dwsep":
        spec["width"] = int(rng.choice([12, 16]))
        options = ([2, 1, 2], [2, 2, 1], [2, 1, 2, 1])
        spec["strides"] = list(options[int(rng.integers(len(options)))])
        spec.pop("pool")
    else:
        raise ValueError(f"unknown architecture family {family!r}")
    return spec


def forward_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one 1×28×28 forward pass (convolutions and linears)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += int(out[0].numel()) * k
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, 28, 28))
    finally:
        for h in handles:
            h.remove()
    return total
