"""Trigger reverse-engineering for Neural Cleanse (the optimisation loop).

Wang et al., "Neural Cleanse", IEEE S&P 2019. For each candidate target label ``t``
find a mask ``m`` (H×W, shared by the channels) and a pattern ``p`` (C×H×W), both in the
model's input space [0, 1] and parameterised through tanh
(``m = tanh(w)/(2−ε) + 1/2``), such that the stamped input ``(1−m)·x + m·p`` is classified
as ``t``: minimise ``CE(f(stamped), t) + λ·‖m‖₁`` with Adam (lr 0.1, betas 0.5/0.9) over
mini-batches of clean data, λ driven by :class:`~._nc_schedule.CostSchedule`.

One engine serves both modes: it optimises a *set* of labels jointly — their
mini-batches stacked into one forward/backward pass (labels × batch). Each label has
its own parameters, Adam state and schedule, and its loss only reaches its own
parameters, so running K labels jointly is the same maths as K separate runs, except
that they share the mini-batch draws. Faithful mode calls it once per label; fast mode
once for all labels, retiring labels as they stop (and, optionally, K-Arm-style, labels
whose norm is clearly too large to ever be an outlier).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..exceptions import ModelError
from ._nc_schedule import CostSchedule

#: tanh squashing: ``tanh(w) / (2 − EPS) + 0.5`` stays strictly inside (0, 1)
EPS = 1e-7


@dataclass(frozen=True)
class ReverseConfig:
    """Optimisation settings shared by all labels of one run."""

    max_steps: int
    mini_batches: int
    batch_size: int
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    attack_success: float = 0.99
    patience: int = 5
    multiplier_up: float = 2.0
    multiplier_down: float = 2.0 ** 1.5
    early_stop_patience: int = 25
    early_stop_threshold: float = 1.0
    #: K-Arm-style pruning: retire a label whose best norm exceeds this × the median of
    #: all labels' best norms (None: never)
    prune_ratio: float | None = None
    #: pruning starts after this many steps
    prune_after: int = 0

    def schedule(self) -> CostSchedule:
        return CostSchedule(init_cost=self.init_cost, threshold=self.attack_success,
                            patience=self.patience, multiplier_up=self.multiplier_up,
                            multiplier_down=self.multiplier_down, early_stop=True,
                            early_stop_threshold=self.early_stop_threshold,
                            early_stop_patience=self.early_stop_patience)


@dataclass
class LabelTrigger:
    """The reversed trigger of one label (CPU tensors)."""

    label: int
    mask: torch.Tensor       # H×W in [0, 1]
    pattern: torch.Tensor    # C×H×W in [0, 1]
    l1: float                # L1 norm of ``mask``
    step_asr: float          # mean ASR over the mini-batches of the step that gave ``mask``
    reached: bool            # some step reached the ASR threshold
    steps: int               # optimisation steps run
    final_cost: float        # λ when the label stopped
    moved: float             # max |mask − initial mask|: 0 means the optimiser did nothing
    stop_reason: str         # "early_stop", "max_steps" or "pruned"


def to_unit(w: torch.Tensor) -> torch.Tensor:
    """tanh parameterisation → values in (0, 1)."""
    return torch.tanh(w) / (2.0 - EPS) + 0.5


def from_unit(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_unit` (for the random initial mask and pattern)."""
    return torch.atanh((v - 0.5) * (2.0 - EPS))


def label_generator(seed: int, label: int, stream: int) -> torch.Generator:
    """A CPU generator for (seed, label, stream): same seed → same draws in every mode."""
    return torch.Generator().manual_seed((seed * 1_000_003 + label * 7_919 + stream) % 2**63)


class BatchStream:
    """Endless mini-batches of row indices: reshuffled permutations of ``range(n)``."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator) -> None:
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self._perm = torch.randperm(n, generator=gen)
        self._pos = 0

    def next(self) -> torch.Tensor:
        out: list[torch.Tensor] = []
        need = self.batch_size
        while need > 0:
            if self._pos >= self.n:
                self._perm = torch.randperm(self.n, generator=self.gen)
                self._pos = 0
            take = self._perm[self._pos:self._pos + need]
            self._pos += int(take.numel())
            need -= int(take.numel())
            out.append(take)
        return torch.cat(out)


def _logits(model: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    try:
        out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ModelError(f"the model failed on a batch of shape {tuple(x.shape)}: "
                         f"{exc}") from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != k:
        raise ModelError(f"the model must return N×{k} logits, got "
                         f"{tuple(getattr(out, 'shape', ()))}")
    return out


def reverse_engineer(
    model: nn.Module,
    x: torch.Tensor,
    labels: Sequence[int],
    num_classes: int,
    cfg: ReverseConfig,
    *,
    seed: int,
    batch_gen: torch.Generator,
    on_step: Callable[[int], None] | None = None,
) -> dict[int, LabelTrigger]:
    """Optimise the triggers of ``labels`` jointly on clean inputs ``x`` (on the device).

    ``batch_gen`` draws the shared mini-batches; each label's random start comes from
    :func:`label_generator` (seed, label). ``on_step(n)`` is called after each step
    with the number of labels that were active in it.
    """
    dev = x.device
    c, h, w = (int(s) for s in x.shape[1:])
    mask_w: dict[int, torch.Tensor] = {}
    pat_w: dict[int, torch.Tensor] = {}
    start_mask: dict[int, torch.Tensor] = {}
    for lab in labels:
        g = label_generator(seed, lab, 0)
        m0 = torch.rand(h, w, generator=g)
        p0 = torch.rand(c, h, w, generator=g)
        mask_w[lab] = from_unit(m0).to(dev).requires_grad_(True)
        pat_w[lab] = from_unit(p0).to(dev).requires_grad_(True)
        start_mask[lab] = to_unit(mask_w[lab].detach()).cpu()
    params = [t for lab in labels for t in (mask_w[lab], pat_w[lab])]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
    scheds = {lab: cfg.schedule() for lab in labels}
    best: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
    done: dict[int, LabelTrigger] = {}
    stream = BatchStream(len(x), cfg.batch_size, batch_gen)
    active = list(labels)
    step = 0

    def finish(lab: int, reason: str) -> None:
        s = scheds[lab]
        if lab in best:
            m, p, asr = best[lab]
        else:  # never reached the threshold: keep the last mask, and say so
            m = to_unit(mask_w[lab].detach()).cpu()
            p = to_unit(pat_w[lab].detach()).cpu()
            asr = last_asr[lab]
        done[lab] = LabelTrigger(
            label=lab, mask=m, pattern=p, l1=float(m.abs().sum()), step_asr=asr,
            reached=s.reached, steps=s.steps, final_cost=s.cost,
            moved=float((m - start_mask[lab]).abs().max()), stop_reason=reason)

    last_asr: dict[int, float] = {}
    while active:
        n_act = len(active)
        targets = torch.tensor(active, device=dev)
        costs = torch.tensor([scheds[lab].cost for lab in active], device=dev,
                             dtype=x.dtype)
        tgt_rep = targets.repeat_interleave(cfg.batch_size)
        sum_asr = torch.zeros(n_act, device=dev)
        sum_l1 = torch.zeros(n_act, device=dev)
        for _ in range(cfg.mini_batches):
            xb = x[stream.next().to(dev)]
            m = to_unit(torch.stack([mask_w[lab] for lab in active]))  # L×H×W
            p = to_unit(torch.stack([pat_w[lab] for lab in active]))   # L×C×H×W
            m4 = m.unsqueeze(1).unsqueeze(1)                             # L×1×1×H×W
            stamped = (1.0 - m4) * xb.unsqueeze(0) + (m.unsqueeze(1) * p).unsqueeze(1)
            logits = _logits(model, stamped.reshape(n_act * len(xb), c, h, w), num_classes)
            ce = F.cross_entropy(logits, tgt_rep, reduction="none")
            ce = ce.view(n_act, len(xb)).mean(1)
            l1 = m.abs().sum((1, 2))
            loss = (ce + costs * l1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                hit = logits.argmax(1).view(n_act, len(xb)) == targets.unsqueeze(1)
                sum_asr += hit.float().mean(1)
                sum_l1 += l1.detach()
        step += 1
        asr_mean = (sum_asr / cfg.mini_batches).tolist()
        l1_mean = (sum_l1 / cfg.mini_batches).tolist()
        still: list[int] = []
        for i, lab in enumerate(active):
            s = scheds[lab]
            last_asr[lab] = asr_mean[i]
            if s.update(asr_mean[i], l1_mean[i]):
                best[lab] = (to_unit(mask_w[lab].detach()).cpu(),
                             to_unit(pat_w[lab].detach()).cpu(), asr_mean[i])
            if s.stopped:
                finish(lab, "early_stop")
            elif s.steps >= cfg.max_steps:
                finish(lab, "max_steps")
            else:
                still.append(lab)
        if cfg.prune_ratio is not None and step >= cfg.prune_after and still:
            still = _prune(still, scheds, done, cfg.prune_ratio, finish)
        active = still
        if on_step is not None:
            on_step(n_act)
    return done


def _prune(active: list[int], scheds: dict[int, CostSchedule], done: dict[int, LabelTrigger],
           ratio: float, finish: Callable[[int, str], None]) -> list[int]:
    """Retire labels whose best norm is ``> ratio ×`` the median of all labels' norms.

    Only labels that reached the threshold and whose λ has already been raised (the
    shrinking phase) are retired; their norm can only shrink further, but a label this
    far above the median does not move the median or the MAD of the others.
    """
    norms = [scheds[lab].best_l1 for lab in active] + [t.l1 for t in done.values()]
    finite = [v for v in norms if math.isfinite(v)]
    if len(finite) < len(norms):
        return active
    finite.sort()
    k = len(finite)
    med = (finite[(k - 1) // 2] + finite[k // 2]) / 2.0
    keep: list[int] = []
    for lab in active:
        s = scheds[lab]
        if s.reached and s.up_flag and s.best_l1 > ratio * med:
            finish(lab, "pruned")
        else:
            keep.append(lab)
    return keep
