"""Handling a user's model: is it an image classifier, where does it live, and how to
borrow it without leaving traces.

Every method here reads class probabilities or logits: STRIP's entropy over the
classes, SCALE-UP's consistency of the predicted class, Neural Cleanse's target
labels, MNTD's responses. A model with a single output (a regressor, a binary scorer
with one logit) gives STRIP an entropy of exactly 0 for every input, so nothing can
ever be flagged — a guard that guards nothing. Such models are refused up front, by
one check (:func:`check_classifier`) that every command and every detector's ``fit``
shares. A command checks once and runs its detectors under :func:`known_classifier`,
so the detectors reuse the answer instead of probing the model again.

Detectors *borrow* the user's model (:func:`borrow_model`): training flags,
``requires_grad`` and hooks are restored even when the method raises. Copies a method
owns are frozen with :func:`freeze`.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .exceptions import IncompatibleError, ModelError, NotAClassifierError

__all__ = ["MIN_CLASSES", "borrow_model", "check_classifier", "check_logits", "count_hooks",
           "freeze", "known_classifier", "model_device"]

#: fewest logits a classifier must output
MIN_CLASSES = 2


def check_logits(out: Any, n: int, *, what: str = "the inputs", finite: bool = True) -> int:
    """Number of classes ``K`` of a model output ``out`` for ``n`` inputs.

    ``out`` must be a tensor ``n×K`` with ``K ≥ MIN_CLASSES`` and, when ``finite``, no
    NaN or infinity. ``what`` names the inputs in the message. Raises
    :class:`NotAClassifierError` (a ``ModelError`` and an ``IncompatibleError``).
    """
    if not isinstance(out, torch.Tensor):
        raise NotAClassifierError(f"the model must return N×K logits, got a "
                                  f"{type(out).__name__} on {what}")
    if out.dim() != 2 or out.shape[0] != n:
        raise NotAClassifierError(f"the model must return N×K logits, got shape "
                                  f"{tuple(out.shape)} for N={n} of {what}")
    k = int(out.shape[1])
    if k < MIN_CLASSES:
        raise NotAClassifierError(
            f"the model outputs {k} logit{'s' if k != 1 else ''} per input on {what}: "
            f"expected a classifier with N×K logits, K >= {MIN_CLASSES} (a one-output model "
            "gives every detector a constant score, so nothing could be flagged)")
    if finite and not bool(torch.isfinite(out).all()):
        raise NotAClassifierError(f"the model outputs NaN or infinite logits on {what}")
    return k


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Device of the model's first parameter or buffer (``default``, else CPU, when it
    has neither)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return default if default is not None else torch.device("cpu")


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter's ``requires_grad`` off; returns it.

    For copies a method owns; a user's model is borrowed with :func:`borrow_model`."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- one classifier check per command --------------------------------------------------

_Known = tuple["weakref.ref[nn.Module]", tuple[int, ...], int]
_KNOWN: contextvars.ContextVar[tuple[_Known, ...]] = contextvars.ContextVar(
    "trojanscan_known_classifiers", default=())


def _known_k(model: nn.Module, shape: tuple[int, ...]) -> int | None:
    for ref, s, k in _KNOWN.get():
        if ref() is model and s == shape:
            return k
    return None


@contextlib.contextmanager
def known_classifier(model: nn.Module, input_shape: tuple[int, ...], k: int
                     ) -> Iterator[None]:
    """Within the block, :func:`check_classifier` answers ``k`` for ``model`` on inputs
    of ``input_shape`` (C×H×W) without running it: the caller has checked it already."""
    token = _KNOWN.set((*_KNOWN.get(), (weakref.ref(model), tuple(input_shape), int(k))))
    try:
        yield
    finally:
        _KNOWN.reset(token)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_classifier(model: nn.Module, x: torch.Tensor, *, what: str = "the data",
                     num_labels: int | None = None) -> int:
    """Number of classes ``K`` of ``model``, probed on the batch ``x`` (a few inputs).

    The model runs borrowed, under ``no_grad``, on ``x`` moved to its device. Raises
    :class:`ModelError` when ``model`` is no ``nn.Module``, :class:`IncompatibleError`
    when it fails on ``x``'s shape or has fewer outputs than ``num_labels`` (the labels'
    classes), and :class:`NotAClassifierError` when it does not return ``N×K`` finite
    logits with ``K ≥ 2`` (:func:`check_logits`). Inside :func:`known_classifier` for
    the same model and input shape, answers without running the model.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    shape = tuple(int(s) for s in x.shape[1:])
    k = _known_k(model, shape)
    if k is None:
        x = x.to(model_device(model))
        with borrow_model(model), torch.no_grad():
            try:
                out = model(x)
            except Exception as exc:  # the model's own error, e.g. a shape mismatch
                raise IncompatibleError(
                    f"the model cannot process the {what}: input shape {shape} (C×H×W) "
                    f"failed with: {_first_line(exc)}") from exc
        k = check_logits(out, int(x.shape[0]), what=f"the {what}")
    if num_labels is not None and num_labels > k:
        raise IncompatibleError(f"the {what} has labels up to {num_labels - 1} but the "
                                f"model has only {k} outputs")
    return k


# -- borrowing -------------------------------------------------------------------------


@contextlib.contextmanager
def borrow_model(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Use a user's model without leaving traces.

    Puts it in eval mode and freezes its parameters for the duration; restores the
    training flags of every submodule, each parameter's ``requires_grad`` and removes
    any hook added meanwhile — also when the body raises.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    params = list(model.parameters())
    grads = [p.requires_grad for p in params]
    hook_ids = [_hook_keys(m) for m in modules]
    try:
        if eval_mode:
            model.eval()
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for p, g in zip(params, grads):
            p.requires_grad_(g)
        for m, keys in zip(modules, hook_ids):
            _drop_new_hooks(m, keys)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _hook_keys(m: nn.Module) -> dict[str, set[Any]]:
    out: dict[str, set[Any]] = {}
    for attr in _HOOK_DICTS:
        d = m.__dict__.get(attr)
        if isinstance(d, dict):
            out[attr] = set(d.keys())
    return out


def _drop_new_hooks(m: nn.Module, before: dict[str, set[Any]]) -> None:
    for attr, keys in before.items():
        d = m.__dict__.get(attr)
        if isinstance(d, dict):
            for k in [k for k in d if k not in keys]:
                del d[k]


def count_hooks(model: nn.Module) -> int:
    """Number of forward/backward hooks registered on any submodule (for tests)."""
    total = 0
    for m in model.modules():
        for attr in _HOOK_DICTS[:4]:
            d = m.__dict__.get(attr)
            if isinstance(d, dict):
                total += len(d)
    return total
