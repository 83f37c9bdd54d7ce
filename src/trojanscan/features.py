"""Intermediate representations ("features") of a model, for any model format.

Data-level detectors (Spectral Signatures, Activation Clustering, SPECTRE) read the
*penultimate* representation — the input of the final linear layer — and some
detectors optimise through it. One interface covers the three kinds of models
trojanscan loads:

* plain ``nn.Module``: forward hooks (the last ``nn.Linear`` actually executed, or any
  ``named_modules()`` name), removed in ``finally`` even when the forward raises;
* TorchScript (traced or scripted; hooks are not supported there): the inlined
  forward graph is copied and made to return ``(logits, features)`` — the input of
  the last ``aten::linear``/``addmm``/``matmul`` or the output of the last node of a
  named submodule — compiled once per (model, layer) and cached;
* :class:`~trojanscan.io.onnx_torch.OnnxModule`: the interpreter's captured values
  (the input of the last ``Gemm``/``MatMul``, or a value/node/module-scope name).

:class:`FeatureModel` gives ``(logits, features)`` on one batch with gradients;
:func:`logits_and_features` and :func:`extract_features` run whole tensors in
batches under ``torch.no_grad()`` and return float32 CPU tensors, one flattened row
per sample. Training flags are restored after every call.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .classifier import model_device
from .exceptions import ModelError, TrojanscanError, bad_param
from .io.onnx_torch import OnnxModule
from .utils import batches

__all__ = [
    "PENULTIMATE",
    "FeatureModel",
    "extract_features",
    "forward_with_features",
    "layer_names",
    "logits_and_features",
]

PENULTIMATE = "penultimate"
_LINEAR_KINDS = ("aten::linear", "aten::addmm", "aten::matmul")
_MAX_LISTED = 30

_Impl = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_SCRIPT_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = (
    weakref.WeakKeyDictionary())
_COUNTER = itertools.count()


def _unwrap(model: Any) -> nn.Module:
    """Accept an ``nn.Module`` or anything with a ``.module`` (e.g. ``LoadedModel``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    raise bad_param("model", "a torch.nn.Module or a LoadedModel", type(model).__name__)


def _is_script(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def layer_names(model: Any) -> list[str]:
    """Names accepted as ``layer`` (besides ``"penultimate"``)."""
    m = _unwrap(model)
    if isinstance(m, OnnxModule):
        return m.layer_names()
    return [name for name, _ in m.named_modules() if name]


def _unknown_layer(model: nn.Module, layer: str) -> TrojanscanError:
    names = layer_names(model)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f", … ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return bad_param("layer", f"{PENULTIMATE!r} or a layer name of the model "
                              f"({shown or 'none'}{more})", layer)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modules = list(model.modules())
    flags = [m.training for m in modules]
    try:
        model.eval()
        yield
    finally:
        for m, t in zip(modules, flags, strict=True):
            if m.training != t:
                m.training = t


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise ModelError(f"the model must return a logits tensor, got a {type(out).__name__}")


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise ModelError(f"{what} is a {type(value).__name__}, not a tensor")


# ----------------------------------------------------------------------------- plain modules


def _hook_impl(model: nn.Module, layer: str) -> _Impl:
    if layer == PENULTIMATE:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

        def penultimate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen: list[torch.Tensor] = []

            def grab(_m: nn.Module, args: tuple[Any, ...]) -> None:
                seen[:] = [args[0]]  # keep only the latest linear layer's input

            handles = [m.register_forward_pre_hook(grab) for m in linears]
            try:
                out = _logits(model(x))
            finally:
                for h in handles:
                    h.remove()
            if not seen:
                raise ModelError(
                    "cannot find the penultimate layer: the model executes no nn.Linear; "
                    f"pass a layer name instead ({', '.join(layer_names(model)[:_MAX_LISTED])})")
            return out, _tensor(seen[-1], "the input of the last linear layer")

        return penultimate

    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise _unknown_layer(model, layer)
    target = modules[layer]

    def named(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[Any] = []

        def grab(_m: nn.Module, _args: Any, output: Any) -> None:
            seen.append(output)

        handle = target.register_forward_hook(grab)
        try:
            out = _logits(model(x))
        finally:
            handle.remove()
        if not seen:
            raise ModelError(f"layer {layer!r} is not called in the model's forward")
        return out, _tensor(seen[-1], f"the output of layer {layer!r}")

    return named


# ----------------------------------------------------------------------------- TorchScript


def _hierarchy_path(hierarchy: str) -> str:
    """``features(Sequential).3(Conv2d).SELF(Conv2d)`` → ``features.3``."""
    parts: list[str] = []
    for seg in re.split(r"\.(?![^()]*\))", hierarchy):
        name = seg.split("(", 1)[0]
        if not name or name in ("SELF", "UNKNOWN_INSTANCE"):
            break
        parts.append(name)
    return ".".join(parts)


def _is_tensor_value(v: Any) -> bool:
    return isinstance(v.type(), torch._C.TensorType)


def _compile_script(model: nn.Module, layer: str) -> Any:
    forward: Any = model.forward
    graph = forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    nodes = list(graph.nodes())
    if layer == PENULTIMATE:
        found = [n for n in nodes if n.kind() in _LINEAR_KINDS]
        if not found:
            raise ModelError(
                "cannot find the penultimate layer of this TorchScript model (no linear, "
                "addmm or matmul in its forward graph); pass a layer name "
                f"({', '.join(layer_names(model)[:_MAX_LISTED])})")
        node = found[-1]
        value = node.inputsAt(1 if node.kind() == "aten::addmm" else 0)
    else:
        prefix = layer + "."
        value = None
        for n in nodes:
            if n.kind() in ("prim::GetAttr", "prim::Constant"):
                continue  # parameters and constants, not the module's computation
            path = _hierarchy_path(n.getModuleHierarchy())
            if path == layer or path.startswith(prefix):
                tensors = [o for o in n.outputs() if _is_tensor_value(o)]
                if tensors:
                    value = tensors[0]
        if value is None:
            raise ModelError(f"layer {layer!r} computes nothing in the TorchScript model's "
                             "forward graph (is it called?)")
    outs = list(graph.outputs())
    if len(outs) != 1 or not _is_tensor_value(outs[0]):
        raise ModelError("the TorchScript model must return one logits tensor")
    out = outs[0]
    tup = graph.create("prim::TupleConstruct", [out, value], 1)
    tup.output().setType(torch._C.TupleType([out.type(), value.type()]))
    graph.appendNode(tup)
    graph.eraseOutput(0)
    graph.registerOutput(tup.output())
    return torch._C._create_function_from_graph(f"trojanscan_features_{next(_COUNTER)}", graph)


def _script_impl(model: nn.Module, layer: str) -> _Impl:
    if layer != PENULTIMATE and (not layer or layer not in dict(model.named_modules())):
        raise _unknown_layer(model, layer)
    cache = _SCRIPT_CACHE.setdefault(model, {})
    fn = cache.get(layer)
    if fn is None:
        try:
            fn = _compile_script(model, layer)
        except TrojanscanError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot extract features from this TorchScript model "
                             f"({type(exc).__name__}: {exc})") from exc
        cache[layer] = fn
    compiled = fn

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = compiled(model._c, x)
        return logits, feats

    return run


# ----------------------------------------------------------------------------- ONNX


def _onnx_impl(model: OnnxModule, layer: str) -> _Impl:
    if layer == PENULTIMATE:
        value = model.penultimate_value()
        if value is None:
            raise ModelError("cannot find the penultimate layer of this ONNX model (no Gemm "
                             "or MatMul); pass a layer name "
                             f"({', '.join(model.layer_names()[:_MAX_LISTED])})")
    else:
        value = model.resolve_layer(layer) if layer else None
        if value is None:
            raise _unknown_layer(model, layer)
    name = value

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, captured = model.run(x, capture=(name,))
        return _logits(out), captured[name]

    return run


# ----------------------------------------------------------------------------- public


class FeatureModel:
    """``(logits, features)`` of a model on one batch, differentiable.

    ``layer`` is ``"penultimate"`` (the input of the final linear layer) or a layer
    name (see :func:`layer_names`); it is validated here. Calling runs the model in
    eval mode on the batch as given (same device as the model) with autograd
    enabled unless the caller disabled it; features are flattened to ``N×D`` unless
    ``flatten=False``. No hooks outlive a call and training flags are restored.
    """

    def __init__(self, model: Any, layer: str = PENULTIMATE, *, flatten: bool = True) -> None:
        if not isinstance(layer, str):
            raise bad_param("layer", f"{PENULTIMATE!r} or a layer name", layer)
        self.model = _unwrap(model)
        self.layer = layer
        self.flatten = flatten
        if isinstance(self.model, OnnxModule):
            self._impl = _onnx_impl(self.model, layer)
        elif _is_script(self.model):
            self._impl = _script_impl(self.model, layer)
        else:
            self._impl = _hook_impl(self.model, layer)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _eval_mode(self.model):
            logits, feats = self._impl(x)
        if self.flatten:
            feats = feats.reshape(feats.shape[0], -1) if feats.dim() else feats.reshape(1, 1)
        return logits, feats

    def __repr__(self) -> str:
        return f"FeatureModel({type(self.model).__name__}, layer={self.layer!r})"


def forward_with_features(model: Any, x: torch.Tensor, *, layer: str = PENULTIMATE
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, N×D features)`` on one batch with gradients (see :class:`FeatureModel`)."""
    return FeatureModel(model, layer)(x)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device here."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def logits_and_features(model: Any, x: Any, *, layer: str = PENULTIMATE,
                        batch_size: int = 256, device: str | torch.device | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``N×K`` and features ``N×D`` (float32, CPU) in a single pass.

    ``x`` is an ``N×C×H×W`` tensor (or an ``ImageDataset``). Batches of
    ``batch_size`` go to ``device`` (default: where the model's parameters are; a
    model elsewhere is moved there) under ``torch.no_grad()``.
    """
    fm = FeatureModel(model, layer)
    data = getattr(x, "x", x)
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] == 0:
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise bad_param("x", "a non-empty tensor N×C×H×W", got)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise bad_param("batch_size", "a positive integer", batch_size)
    here = model_device(fm.model)
    dev = here if device is None else torch.device(device)
    if _same_device(here, dev):
        dev = here  # inputs go exactly where the model is
    else:
        fm.model.to(dev)
    logits: list[torch.Tensor] = []
    feats: list[torch.Tensor] = []
    with torch.no_grad():
        for sl in batches(int(data.shape[0]), batch_size):
            lo, fe = fm(data[sl].to(dev))
            logits.append(lo.detach().float().cpu())
            feats.append(fe.detach().float().cpu())
    return torch.cat(logits), torch.cat(feats)


def extract_features(model: Any, x: Any, *, layer: str = PENULTIMATE, batch_size: int = 256,
                     device: str | torch.device | None = None) -> torch.Tensor:
    """Features ``N×D`` (float32, CPU, one flattened row per sample) of ``x``."""
    return logits_and_features(model, x, layer=layer, batch_size=batch_size,
                               device=device)[1]
