"""The library face of the commands: one function per question, with the CLI's
defaults and seed semantics.

Each function runs the same code as its command (loading and checking the inputs,
seeding, the detectors) and returns the result object the command reports, without
writing files. Models and data may be given as paths (read by the same loaders as
the CLI) or as objects (an ``nn.Module`` or :class:`~trojanscan.io.models.LoadedModel`,
an :class:`~trojanscan.dataset.ImageDataset`).

>>> import trojanscan
>>> result = trojanscan.scan_model("model.pt", "fashion-mnist:test")  # doctest: +SKIP
>>> result.verdict, result.suspected_targets                          # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .classifier import check_classifier, known_classifier, model_device
from .dataset import ImageDataset
from .exceptions import ModelError, bad_param
from .utils import seed_everything

if TYPE_CHECKING:
    from .data_scan import DataScan
    from .io.models import LoadedModel
    from .results import FilterResult
    from .scan import ScanResult

__all__ = ["filter_inputs", "load_dataset", "load_model", "scan_data", "scan_model"]


def load_model(path: str | os.PathLike[str], *, arch: str | None = None,
               trust_pickle: bool = False, device: str | torch.device | None = "auto",
               input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """A model file as the commands read it (TorchScript, ONNX, safetensors or
    ``state_dict`` with ``arch``; pickles only with ``trust_pickle``). The module is
    ``.module``; ``.num_classes`` and ``.input_shape`` where known."""
    from .io.models import load_model as _load

    return _load(path, arch=arch, trust_pickle=trust_pickle, device=device,
                 input_shape=input_shape)


def load_dataset(spec: str | os.PathLike[str], *, need_labels: bool = True,
                 max_samples: int | None = None, seed: int = 0) -> ImageDataset:
    """A data set as the commands read it: ``.npz``, an image folder, an IDX folder or a
    built-in (``fashion-mnist:test``, ``digits``); ``max_samples`` keeps a seeded
    selection (``--max-samples``)."""
    from .io.data import load_dataset as _load

    return _load(spec, need_labels=need_labels, max_samples=max_samples, seed=seed)


def _inputs(model: Any, data: Any, *, arch: str | None, trust_pickle: bool, device: Any,
            need_labels: bool, min_classes: int, max_samples: int | None, seed: int,
            what: str) -> tuple[nn.Module, ImageDataset, torch.device, int]:
    """The module, the data, the device to run on and ``K``, checked once as the
    commands check them."""
    from .commands._common import load_inputs, subsample

    if isinstance(data, ImageDataset):
        ds = subsample(data, max_samples, seed)
    elif isinstance(data, (str, os.PathLike)):
        ds = None
    else:
        raise bad_param(what, "a path, a built-in data set name or an ImageDataset",
                        type(data).__name__)
    if isinstance(model, (str, os.PathLike)) and ds is None:
        loaded, loaded_ds = load_inputs(Path(model), os.fspath(data), arch=arch,
                                        trust_pickle=trust_pickle, device=str(device),
                                        need_labels=need_labels, min_classes=min_classes,
                                        max_samples=max_samples, seed=seed)
        assert loaded_ds is not None and loaded.num_classes is not None
        return (loaded.module, subsample(loaded_ds, max_samples, seed), loaded.device,
                loaded.num_classes)
    if ds is None:
        ds = load_dataset(data, need_labels=need_labels, max_samples=max_samples, seed=seed)
    if isinstance(model, (str, os.PathLike)):
        from .io.models import check_compatible

        loaded = check_compatible(load_model(model, arch=arch, trust_pickle=trust_pickle,
                                             device=device, input_shape=ds.input_shape), ds)
        assert loaded.num_classes is not None
        return loaded.module, ds, loaded.device, loaded.num_classes
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise ModelError(f"expected a model path, an nn.Module or a loaded model, got "
                         f"{type(model).__name__}")
    if need_labels:
        ds.require_classes(min_classes)
    k = check_classifier(module, ds.x[:4], what=what,
                         num_labels=ds.num_classes if ds.y is not None else None)
    return module, ds, model_device(module), k


def scan_model(model: Any, data: Any = None, *,
               detectors: str | Sequence[str] | None = None,
               seed: int = 0, device: str | torch.device | None = "auto",
               max_samples: int | None = None, arch: str | None = None,
               trust_pickle: bool = False,
               detector_params: Mapping[str, Mapping[str, Any]] | None = None,
               input_shape: tuple[int, int, int] | None = None) -> ScanResult:
    """Is this model backdoored? ``trojanscan scan MODEL --data DATA`` as a call.

    Returns :class:`~trojanscan.scan.ScanResult` (``verdict``, ``score``,
    ``suspected_targets``, each detector's result). Defaults as the command's: the
    default detectors (Neural Cleanse and MNTD), seed 0, the model's own device.
    With ``data=None`` only the data-free detectors run (MM-BD, and MNTD where a bundle
    fits), on inputs of ``input_shape`` (C, H, W) — required unless the model is an ONNX
    file whose graph fixes it — as ``trojanscan scan MODEL --input-shape C,H,W`` does.
    """
    from .scan import scan_model as _scan

    seed_everything(seed)
    params = {n: dict(p) for n, p in (detector_params or {}).items()}
    if data is None:
        return _scan_data_free(model, detectors=detectors, seed=seed, device=device,
                               arch=arch, trust_pickle=trust_pickle, params=params,
                               input_shape=input_shape)
    module, ds, dev, k = _inputs(model, data, arch=arch, trust_pickle=trust_pickle,
                                 device=device, need_labels=True, min_classes=2,
                                 max_samples=max_samples, seed=seed, what="clean data")
    with known_classifier(module, ds.input_shape, k):
        return _scan(module, ds, detectors=detectors, seed=seed, device=dev,
                     detector_params=params)


def _scan_data_free(model: Any, *, detectors: str | Sequence[str] | None, seed: int,
                    device: str | torch.device | None, arch: str | None, trust_pickle: bool,
                    params: dict[str, dict[str, Any]],
                    input_shape: tuple[int, int, int] | None) -> ScanResult:
    from .classifier import model_device
    from .scan import scan_model as _scan

    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, device=device,
                            input_shape=input_shape)
        graph_shape = getattr(loaded.module, "input_shape", None) \
            if loaded.format == "onnx" else None
        if input_shape is None and isinstance(graph_shape, tuple) and len(graph_shape) == 3:
            input_shape = (int(graph_shape[0]), int(graph_shape[1]), int(graph_shape[2]))
        module, dev = loaded.module, loaded.device
    else:
        module = getattr(model, "module", model)
        if not isinstance(module, nn.Module):
            raise ModelError(f"expected a model path, an nn.Module or a loaded model, got "
                             f"{type(model).__name__}")
        dev = model_device(module)
    return _scan(module, None, detectors=detectors, seed=seed, device=dev,
                 detector_params=params, input_shape=input_shape)


def scan_data(model: Any, train: Any, *, detectors: str | Sequence[str] | None = None,
              poison_rate_bound: float | None = None, seed: int = 0,
              device: str | torch.device | None = "auto", arch: str | None = None,
              trust_pickle: bool = False) -> DataScan:
    """Which training samples are poisoned? ``trojanscan scan-data TRAIN --model MODEL``
    as a call (``model`` was trained on ``train``). ``arch`` names the network that
    Activation Clustering's reclassification retrains, as ``--arch`` does.

    Returns :class:`~trojanscan.data_scan.DataScan` (``verdict``, ``flagged``,
    ``scores``, each detector's result).
    """
    from .data_scan import scan_data as _scan
    from .maths.spectral import check_rate

    seed_everything(seed)
    eps = check_rate("poison_rate_bound", poison_rate_bound)
    weights_arch = arch
    if isinstance(model, (str, os.PathLike)):
        from .io.models import detect_format

        if detect_format(model) not in ("safetensors", "torch"):
            weights_arch = None  # the file carries its architecture
    module, ds, dev, k = _inputs(model, train, arch=weights_arch, trust_pickle=trust_pickle,
                                 device=device, need_labels=True, min_classes=2,
                                 max_samples=None, seed=seed, what="training data")
    with known_classifier(module, ds.input_shape, k):
        return _scan(module, ds, detectors=detectors, poison_rate_bound=eps, seed=seed,
                     device=dev, arch=arch)


def filter_inputs(model: Any, inputs: Any, calibrate: Any, *, frr: float = 0.01,
                  detector: str = "strip", seed: int = 0,
                  device: str | torch.device | None = "auto", arch: str | None = None,
                  trust_pickle: bool = False,
                  params: Mapping[str, Any] | None = None) -> FilterResult:
    """Which of these inputs carry a trigger? ``trojanscan filter MODEL INPUTS
    --calibrate CLEAN`` as a call: the runtime detector is calibrated on ``calibrate``
    at the target false-rejection rate ``frr``, then scores ``inputs`` (a path, an
    :class:`ImageDataset` or an ``N×C×H×W`` tensor in [0, 1]).

    Returns :class:`~trojanscan.results.FilterResult` (``verdict``, ``flagged``,
    ``scores``, ``predictions``, ``threshold``).
    """
    from . import detectors as registry
    from .guard import RUNTIME_DETECTORS

    seed_everything(seed)
    if detector not in RUNTIME_DETECTORS:
        raise bad_param("detector", RUNTIME_DETECTORS, detector)
    extra = dict(params or {})
    registry.create(detector, frr=frr, seed=seed, **extra)  # bad settings fail first
    module, clean, dev, k = _inputs(model, calibrate, arch=arch, trust_pickle=trust_pickle,
                                    device=device, need_labels=False, min_classes=1,
                                    max_samples=None, seed=seed, what="calibration data")
    if isinstance(inputs, torch.Tensor):
        x = inputs
    elif isinstance(inputs, ImageDataset):
        x = inputs.x
    else:
        x = load_dataset(inputs, need_labels=False).x
    if tuple(x.shape[1:]) != clean.input_shape:
        raise bad_param("inputs", f"inputs of the calibration data's shape "
                        f"{'×'.join(map(str, clean.input_shape))}",
                        "×".join(map(str, x.shape[1:])))
    det = registry.create(detector, frr=frr, seed=seed, device=str(dev), **extra)
    with known_classifier(module, clean.input_shape, k):
        det.fit(module, clean)
    result: FilterResult = det.filter(x)
    return result
