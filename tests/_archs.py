"""Tiny architectures for the model-loading and feature tests (importable as ``_archs``).

``--arch _archs:tiny_net`` works because pytest puts ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


class TinyNet(nn.Module):
    """conv → BN → ReLU → max-pool → flatten → fc1 → ReLU → head (the last Linear)."""

    def __init__(self, input_shape: tuple[int, int, int] = (1, 8, 8),
                 num_classes: int = 4) -> None:
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(4 * (h // 2) * (w // 2), 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(self.features(x).flatten(1))))


def tiny_net() -> nn.Module:
    """The factory used as ``--arch _archs:tiny_net`` (no arguments)."""
    return TinyNet()


def tiny_net_shaped(input_shape: tuple[int, int, int] = (1, 8, 8),
                    num_classes: int = 4) -> nn.Module:
    """A factory taking ``input_shape``/``num_classes`` (filled in by the loader)."""
    return TinyNet(input_shape, num_classes)


def other_net() -> nn.Module:
    """Different layer names: loading TinyNet weights into it must fail clearly."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 4))


def wide_head() -> nn.Module:
    """TinyNet with 7 classes: a shape mismatch on ``head``."""
    return TinyNet(num_classes=7)


def returns_int() -> int:
    return 3


def raises() -> nn.Module:
    raise RuntimeError("factory exploded")


class NoLinear(nn.Module):
    """Ends with a 1×1 convolution and global pooling: no nn.Linear at all."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.body(x)).mean(dim=(2, 3))


class Explodes(nn.Module):
    """Raises in forward after its first layer ran (for hook clean-up tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.flatten(1))
        if bool((x > 2).any()):
            raise RuntimeError("bad input")
        return self.out(h)


class NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("nan")


class Flat3D(nn.Module):
    """Outputs N×K×1 instead of N×K."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)).unsqueeze(-1)
