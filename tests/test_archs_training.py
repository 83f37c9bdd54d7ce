"""Reference architectures and the deterministic trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trojanscan import archs
from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import ParameterError
from trojanscan.training import TrainConfig, evaluate, train_model


@pytest.mark.parametrize("name", sorted(archs.ARCHS))
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 32, 32)])
def test_arch_shapes_and_final_linear(name: str, shape: tuple[int, int, int]) -> None:
    model = archs.build(name, shape, 7).eval()
    assert model(torch.rand(3, *shape)).shape == (3, 7)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == 7


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ParameterError, match="arch"):
        archs.build("resnet9000")
    with pytest.raises(ParameterError, match="num_classes"):
        archs.build("mlp", (1, 8, 8), 1)


def _toy() -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.rand(200, 1, 8, 8, generator=g) * 0.5
    x[y == 1, :, :4] += 0.5  # class 1: bright top half
    return ImageDataset(x.clamp(0, 1), y)


def test_training_learns_and_is_bit_identical() -> None:
    ds = _toy()
    cfg = TrainConfig(epochs=3, batch_size=32, lr=1e-2)
    a = train_model("small_cnn", ds, config=cfg, seed=5, device="cpu")
    b = train_model("small_cnn", ds, config=cfg, seed=5, device="cpu")
    c = train_model("small_cnn", ds, config=cfg, seed=6, device="cpu")
    assert evaluate(a, ds) > 0.95
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_training_needs_two_classes() -> None:
    ds = ImageDataset(torch.rand(10, 1, 8, 8), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(Exception, match="at least 2 classes"):
        train_model("mlp", ds, config=TrainConfig(epochs=1), seed=0)


def test_train_config_validated() -> None:
    with pytest.raises(ParameterError, match="epochs"):
        train_model("mlp", _toy(), config=TrainConfig(epochs=0))
