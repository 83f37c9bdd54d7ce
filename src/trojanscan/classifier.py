"""Is a model's output that of an image classifier? One check shared by the loaders,
the data checks of every command and every detector's ``fit``.

Every method here reads class probabilities or logits: STRIP's entropy over the
classes, SCALE-UP's consistency of the predicted class, Neural Cleanse's target
labels, MNTD's responses. A model with a single output (a regressor, a binary scorer
with one logit) gives STRIP an entropy of exactly 0 for every input, so nothing can
ever be flagged — a guard that guards nothing. Such models are refused up front.
"""

from __future__ import annotations

from typing import Any

import torch

from .exceptions import NotAClassifierError

__all__ = ["MIN_CLASSES", "check_logits"]

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
