"""Reference architectures for red-teaming, benchmarks and tests.

Each factory takes ``input_shape`` (C, H, W) and ``num_classes`` and returns a plain
``nn.Module`` mapping float32 ``N×C×H×W`` in [0, 1] to logits ``N×K``. The last layer
is always an ``nn.Linear`` whose input is the penultimate representation (what the
data-level detectors read). Defaults fit Fashion-MNIST (1×28×28 → 10), so each
factory also works as ``--arch trojanscan.archs:small_cnn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .exceptions import bad_param

Shape = tuple[int, int, int]


def _flat_dim(body: nn.Module, input_shape: Shape) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class Classifier(nn.Module):
    """``features`` (convolutional body) → flatten → ``head`` (MLP ending in Linear)."""

    def __init__(self, features: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def small_cnn(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Two 3×3 conv layers (16, 32) with max-pooling, a 128-unit hidden layer."""
    c = input_shape[0]
    body = nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    d = _flat_dim(body, input_shape)
    return Classifier(body, nn.Sequential(nn.Linear(d, 128), nn.ReLU(),
                                          nn.Linear(128, num_classes)))


def bn_cnn(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Wider CNN with BatchNorm: 2×(32) then 2×(64) 3×3 convs, 256-unit hidden layer."""
    c = input_shape[0]

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    body = nn.Sequential(*block(c, 32), *block(32, 32), nn.MaxPool2d(2),
                         *block(32, 64), *block(64, 64), nn.MaxPool2d(2))
    d = _flat_dim(body, input_shape)
    return Classifier(body, nn.Sequential(nn.Dropout(0.25), nn.Linear(d, 256), nn.ReLU(),
                                          nn.Linear(256, num_classes)))


def lenet(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """LeNet-5 style: 5×5 convs (6, 16) with max-pooling, then 120 → 84 → K."""
    c, h, _ = input_shape
    pad = 2 if h <= 28 else 0
    body = nn.Sequential(nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5, padding=pad if h < 16 else 0), nn.ReLU(),
                         nn.MaxPool2d(2))
    d = _flat_dim(body, input_shape)
    return Classifier(body, nn.Sequential(nn.Linear(d, 120), nn.ReLU(), nn.Linear(120, 84),
                                          nn.ReLU(), nn.Linear(84, num_classes)))


def mlp(input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Fully connected: flatten → 256 → 128 → K."""
    d = input_shape[0] * input_shape[1] * input_shape[2]
    return Classifier(nn.Identity(), nn.Sequential(nn.Linear(d, 256), nn.ReLU(),
                                                   nn.Linear(256, 128), nn.ReLU(),
                                                   nn.Linear(128, num_classes)))


def cifar_cnn(input_shape: Shape = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """Small CNN for 3×32×32: 3 conv blocks (32, 64, 128) with BatchNorm, 256 hidden."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    for i, o in ((c, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                   nn.MaxPool2d(2)]
    body = nn.Sequential(*layers)
    d = _flat_dim(body, input_shape)
    return Classifier(body, nn.Sequential(nn.Linear(d, 256), nn.ReLU(),
                                          nn.Linear(256, num_classes)))


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al., 2016): BN-ReLU-conv twice, identity shortcut
    (a 1×1 convolution where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


def _preact_resnet18(input_shape: Shape, num_classes: int, width: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        for block in range(2):
            layers.append(PreActBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1)]
    return Classifier(nn.Sequential(*layers), nn.Sequential(nn.Linear(cin, num_classes)))


def preact_resnet18(input_shape: Shape = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """PreAct-ResNet18 as BackdoorBench trains it on CIFAR-10: stages of 64, 128, 256, 512
    channels, two pre-activation blocks each, global average pooling, one linear layer
    (11.2 M parameters at 3×32×32 → 10)."""
    return _preact_resnet18(input_shape, num_classes, 64)


def preact_resnet18_narrow(input_shape: Shape = (3, 32, 32),
                           num_classes: int = 10) -> nn.Module:
    """PreAct-ResNet18 at a quarter of the width (16, 32, 64, 128 channels; 0.7 M
    parameters): the same residual topology, trainable and scannable on a CPU."""
    return _preact_resnet18(input_shape, num_classes, 16)


def vgg_small(input_shape: Shape = (3, 32, 32), num_classes: int = 10) -> nn.Module:
    """VGG-style: three stages of two 3×3 conv-BN-ReLU layers (32, 64, 128) with
    max-pooling, global average pooling, a 256-unit hidden layer."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    for i, o in ((c, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                   nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                   nn.MaxPool2d(2)]
    layers.append(nn.AdaptiveAvgPool2d(1))
    return Classifier(nn.Sequential(*layers), nn.Sequential(nn.Linear(128, 256), nn.ReLU(),
                                                            nn.Linear(256, num_classes)))


ARCHS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "small_cnn": small_cnn,
    "bn_cnn": bn_cnn,
    "lenet": lenet,
    "mlp": mlp,
    "cifar_cnn": cifar_cnn,
    "preact_resnet18": preact_resnet18,
    "preact_resnet18_narrow": preact_resnet18_narrow,
    "vgg_small": vgg_small,
}


def build(name: str, input_shape: Shape = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Instantiate the reference architecture ``name``."""
    if name not in ARCHS:
        raise bad_param("arch", list(ARCHS), name)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise bad_param("input_shape", "(C, H, W) with positive sizes", input_shape)
    if num_classes < 2:
        raise bad_param("num_classes", "an integer >= 2", num_classes)
    try:
        return ARCHS[name](tuple(int(s) for s in input_shape), int(num_classes))  # type: ignore[arg-type]
    except RuntimeError as exc:
        raise bad_param("input_shape", f"a shape {name} can process ({exc})",
                        input_shape) from exc
