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
whose norm has settled far above the median), and, optionally, after a warm-up,
optimising only the ``arms`` most promising labels per step (Shen et al., "Backdoor
Scanning for Deep Neural Networks through K-Arm Optimization", ICML 2021); waiting
labels keep their state and run when a running label finishes.

A step's stamped inputs may be split into several forward/backward passes of at most
``pass_batch`` inputs (memory); the gradients are summed before the optimiser step, so
the update is the one of a single pass.
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
    #: stop a label whose norm has not improved for this many steps once λ went up,
    #: even if λ never came down (None: only the reference's early stop)
    stall_patience: int | None = None
    #: K-Arm-style pruning: retire a settled label (λ went up and down) whose best norm
    #: exceeds this × the median of all labels' best norms (None: never)
    prune_ratio: float | None = None
    #: pruning and arm scheduling start after this many steps (the warm-up, when every
    #: label is optimised)
    prune_after: int = 0
    #: K-Arm-style scheduling: after the warm-up at most this many labels — those with the
    #: smallest current trigger norm — are optimised per step; the others wait, keeping
    #: their state, until they are pruned or their turn comes (None: all labels, always)
    arms: int | None = None
    #: stamped inputs per forward/backward pass; a step's ``labels × batch_size`` inputs
    #: are split into passes of at most this many, gradients accumulated (None: one pass)
    pass_batch: int | None = None

    def schedule(self) -> CostSchedule:
        return CostSchedule(init_cost=self.init_cost, threshold=self.attack_success,
                            patience=self.patience, multiplier_up=self.multiplier_up,
                            multiplier_down=self.multiplier_down, early_stop=True,
                            early_stop_threshold=self.early_stop_threshold,
                            early_stop_patience=self.early_stop_patience,
                            stall_patience=self.stall_patience)


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
    #: best L1 so far after each of its steps (inf before the threshold is reached)
    history: tuple[float, ...] = ()


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
    active = sorted(labels)
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
            moved=float((m - start_mask[lab]).abs().max()), stop_reason=reason,
            history=tuple(hist[lab]))

    last_asr: dict[int, float] = {}
    hist: dict[int, list[float]] = {lab: [] for lab in labels}
    while active:
        run = _select_arms(active, scheds, cfg.arms) if step >= cfg.prune_after else active
        n_act = len(run)
        targets = torch.tensor(run, device=dev)
        costs = torch.tensor([scheds[lab].cost for lab in run], device=dev, dtype=x.dtype)
        sum_asr = torch.zeros(n_act, device=dev)
        sum_l1 = torch.zeros(n_act, device=dev)
        w_mask = [mask_w[lab] for lab in run]
        w_pat = [pat_w[lab] for lab in run]
        for _ in range(cfg.mini_batches):
            xb = x[stream.next().to(dev)]
            opt.zero_grad(set_to_none=True)
            hit, l1 = _accumulate(model, xb, w_mask, w_pat, targets, costs, num_classes,
                                  cfg.pass_batch)
            opt.step()
            sum_asr += hit
            sum_l1 += l1
        step += 1
        asr_mean = (sum_asr / cfg.mini_batches).tolist()
        l1_mean = (sum_l1 / cfg.mini_batches).tolist()
        still: list[int] = []
        for i, lab in enumerate(run):
            s = scheds[lab]
            last_asr[lab] = asr_mean[i]
            if s.update(asr_mean[i], l1_mean[i]):
                best[lab] = (to_unit(mask_w[lab].detach()).cpu(),
                             to_unit(pat_w[lab].detach()).cpu(), asr_mean[i])
            hist[lab].append(s.best_l1)
            if s.stopped:
                finish(lab, "early_stop")
            elif s.steps >= cfg.max_steps:
                finish(lab, "max_steps")
            else:
                still.append(lab)
        still = sorted(still + [lab for lab in active if lab not in set(run)])
        if cfg.prune_ratio is not None and step >= cfg.prune_after and still:
            still = _prune(still, scheds, hist, cfg.prune_ratio, finish)
        active = still
        if on_step is not None:
            on_step(n_act)
    return done


def _select_arms(active: list[int], scheds: dict[int, CostSchedule],
                 arms: int | None) -> list[int]:
    """The ``arms`` labels with the smallest best norm so far (unreached ones last).

    K-Arm's scheduler picks the arm with the best current objective; here the objective
    is the label's best trigger norm (its λ-weighted loss is not comparable across labels
    whose λ differ). Deterministic: ties go to the lower label.
    """
    if arms is None or len(active) <= arms:
        return active
    order = sorted(active, key=lambda lab: (scheds[lab].best_l1, lab))
    return sorted(order[:arms])


def _accumulate(model: nn.Module, xb: torch.Tensor, w_mask: list[torch.Tensor],
                w_pat: list[torch.Tensor], targets: torch.Tensor, costs: torch.Tensor,
                num_classes: int, pass_batch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``Σ_labels CE_mean + λ·‖m‖₁`` on one mini-batch, in passes.

    Returns each label's hit rate on the mini-batch and its mask L1 (detached). With
    ``pass_batch`` None or at least ``labels × batch`` this is one pass.
    """
    n_lab, b = len(w_mask), len(xb)
    c, h, w = (int(v) for v in xb.shape[1:])
    hits = torch.zeros(n_lab, device=xb.device)
    l1_out = torch.zeros(n_lab, device=xb.device)
    cap = n_lab * b if pass_batch is None else max(1, pass_batch)
    if cap >= b:  # whole labels per pass
        per = cap // b
        for lo in range(0, n_lab, per):
            hi = min(n_lab, lo + per)
            m = to_unit(torch.stack(w_mask[lo:hi]))                      # L×H×W
            p = to_unit(torch.stack(w_pat[lo:hi]))                       # L×C×H×W
            stamped = ((1.0 - m.unsqueeze(1).unsqueeze(1)) * xb.unsqueeze(0)
                       + (m.unsqueeze(1) * p).unsqueeze(1))
            logits = _logits(model, stamped.reshape((hi - lo) * b, c, h, w), num_classes)
            tgt = targets[lo:hi]
            ce = F.cross_entropy(logits, tgt.repeat_interleave(b), reduction="none")
            ce = ce.view(hi - lo, b).mean(1)
            l1 = m.abs().sum((1, 2))
            (ce + costs[lo:hi] * l1).sum().backward()
            with torch.no_grad():
                hit = logits.argmax(1).view(hi - lo, b) == tgt.unsqueeze(1)
                hits[lo:hi] = hit.float().mean(1)
                l1_out[lo:hi] = l1.detach()
        return hits, l1_out
    for i in range(n_lab):  # one label's mini-batch split over several passes
        n_hit = 0
        for lo in range(0, b, cap):
            part = xb[lo:lo + cap]
            m = to_unit(w_mask[i])
            p = to_unit(w_pat[i])
            stamped = (1.0 - m) * part + m * p
            logits = _logits(model, stamped, num_classes)
            tgt = targets[i].expand(len(part))
            loss = F.cross_entropy(logits, tgt, reduction="sum") / b
            l1 = m.abs().sum()
            if lo == 0:
                loss = loss + costs[i] * l1
                l1_out[i] = l1.detach()
            loss.backward()
            n_hit += int((logits.argmax(1) == tgt).sum())
        hits[i] = n_hit / b
    return hits, l1_out


def median_upper_bound(norms: Sequence[float]) -> float:
    """Median of per-label best norms (``inf`` for labels without one yet).

    Each label's best norm only falls as its optimisation goes on, and the median is
    monotone in every value, so this bounds the median of the final norms from above.
    """
    vals = sorted(norms)
    k = len(vals)
    lo, hi = vals[(k - 1) // 2], vals[k // 2]
    return hi if math.isinf(hi) else (lo + hi) / 2.0


def _prune(active: list[int], scheds: dict[int, CostSchedule], hist: dict[int, list[float]],
           ratio: float, finish: Callable[[int, str], None]) -> list[int]:
    """Retire settled labels whose best norm is ``> ratio ×`` the median of all labels.

    The median is over every label's best norm so far, an upper bound of the final
    median (:func:`median_upper_bound`). Only *settled* labels are retired: λ has gone up
    and come down again, so the mask is near the smallest that still works. Measured,
    a label's best norm at that point was at most 1.17× its converged norm, whereas
    after the 15-step warm-up it was 2.7–8.8×: a norm taken earlier can still end below
    the median, overestimate the median and the reference norms, and raise false alarms.
    """
    med = median_upper_bound([h[-1] if h else math.inf for h in hist.values()])
    if math.isinf(med):
        return active
    keep: list[int] = []
    for lab in active:
        s = scheds[lab]
        if s.reached and s.up_flag and s.down_flag and s.best_l1 > ratio * med:
            finish(lab, "pruned")
        else:
            keep.append(lab)
    return keep


def converged_estimate(history: Sequence[float], converged: Sequence[Sequence[float]]
                       ) -> tuple[float, float, float] | None:
    """(low, middle, high) estimate of a retired label's converged norm, or None.

    ``history`` is the retired label's best norm per step, ``converged`` those of
    labels that ran to their end. Each converged label's shrink factor from the
    retired label's stage to its end (final / norm at that stage) scales the retired
    norm; the range of those factors gives the range of the estimate. None when fewer
    than two converged labels ran that long.
    """
    if not history or math.isinf(history[-1]):
        return None
    stage = len(history)
    factors = sorted(h[-1] / h[stage - 1] for h in converged
                     if len(h) >= stage and math.isfinite(h[stage - 1]) and h[stage - 1] > 0)
    if len(factors) < 2:
        return None
    mid = factors[len(factors) // 2] if len(factors) % 2 else (
        factors[len(factors) // 2 - 1] + factors[len(factors) // 2]) / 2.0
    raw = history[-1]
    return raw * factors[0], raw * mid, raw * factors[-1]
