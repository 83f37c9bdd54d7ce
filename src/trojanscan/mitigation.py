"""Backdoor mitigation by unlearning — Wang et al., "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019, Section VI-C.

Fine-tune the model on clean data where a share (20% in the paper) of each mini-batch
carries a reversed trigger (from :class:`~trojanscan.detectors.neural_cleanse.NeuralCleanse`)
while keeping its *true* label: the model learns that the trigger means nothing. The
paper fine-tunes for one epoch on 10% of the training data. Defaults here (measured on
Fashion-MNIST, docs/benchmarks/neural_cleanse.md): SGD with momentum 0.9, lr 0.005
decaying to 0 along a cosine, 2 epochs, batch 64 — Adam, or SGD without the decay, cost
1.5–2.5 points of clean accuracy on 6,000 samples, most of it from the fine-tuning itself.

Needs labelled clean data. The user's model is never modified: :func:`unlearn` trains a
deep copy. :func:`evaluate_mitigation` measures clean accuracy and the attack success
rate (ASR) of each trigger before and after on held-out data.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .attacks.metrics import checked_logits
from .classifier import borrow_model, freeze, model_device
from .dataset import ImageDataset
from .exceptions import DataError, ModelError, bad_param
from .maths.triggers import stamp
from .progress import progress
from .results import to_json
from .utils import batches, pick_device, seed_everything


@dataclass(frozen=True)
class Trigger:
    """A mask (H×W, [0, 1]) and pattern (C×H×W, [0, 1]) sending inputs to ``label``."""

    label: int
    mask: torch.Tensor
    pattern: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``(1 − m)·x + m·p`` on a batch N×C×H×W."""
        return stamp(x, self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype))

    def dilated(self) -> Trigger:
        """The same trigger with its mask grown by one pixel (3×3 max-pool)."""
        m = F.max_pool2d(self.mask[None, None], 3, stride=1, padding=1)[0, 0]
        return Trigger(self.label, m, self.pattern)


OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class UnlearnConfig:
    """Fine-tuning settings of :func:`unlearn` (the paper's 20% stamped share).

    The learning rate decays to 0 along a cosine over the run (lets the model settle
    back, as the trainer does). ``optimizer``: ``"sgd"`` (momentum 0.9) or ``"adam"``;
    ``dilate``: probability that a stamped sample gets the trigger's mask dilated by one
    pixel (3×3 max-pool) — the reversed trigger is a minimal part of the real one, and
    unlearning a slightly larger one may generalise better to it (beyond the paper).
    ``distill``: weight d in [0, 1] of a self-distillation term (beyond the paper; 0 is
    the paper): the loss becomes ``(1 − d)·CE(f(x̃), y) + d·KL(f₀(x) ‖ f(x̃))`` where x̃
    is the (possibly stamped) input, x the same sample unstamped and f₀ the original
    model, frozen. On unstamped samples it keeps the model's clean behaviour (most of
    the accuracy unlearning costs comes from fine-tuning a few thousand samples); on
    stamped ones it asks that the trigger change nothing the original model said about
    the clean sample.
    ``refresh``: number of times, spread evenly over the run, that each reversed trigger
    is re-optimised against the model being fine-tuned (beyond the paper; 0 is the
    paper). The reversed trigger is only an approximation of the real one: once the
    model has unlearned it, what is left of the backdoor answers to a nearby trigger.
    A refresh runs ``refresh_steps`` projected gradient steps (:func:`refine_trigger`) of
    cross-entropy towards the label on mini-batches of the fine-tuning data, from the
    current trigger, with the mask's L1 norm kept at most the original reversed mask's
    (an adversarial search within the same budget); from then on stamped samples carry
    the original or the latest refreshed trigger, equally often.
    """

    stamp_fraction: float = 0.2
    epochs: int = 2
    lr: float = 5e-3
    batch_size: int = 64
    optimizer: str = "sgd"
    dilate: float = 0.0
    distill: float = 0.0
    refresh: int = 0
    refresh_steps: int = 50

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise bad_param("optimizer", OPTIMIZERS, self.optimizer)
        if not isinstance(self.dilate, (int, float)) or not 0.0 <= self.dilate <= 1.0:
            raise bad_param("dilate", "a float in [0, 1]", self.dilate)
        if (isinstance(self.distill, bool) or not isinstance(self.distill, (int, float))
                or not 0.0 <= self.distill <= 1.0):
            raise bad_param("distill", "a float in [0, 1]", self.distill)
        for name, low in (("epochs", 1), ("refresh", 0), ("refresh_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad_param(name, f"an integer >= {low}", v)
        if not 0.0 < self.stamp_fraction < 1.0:
            raise bad_param("stamp_fraction", "a float in (0, 1)", self.stamp_fraction)
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise bad_param("lr", "a float > 0", self.lr)
        if (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                or self.batch_size < 2):
            raise bad_param("batch_size", "an integer >= 2", self.batch_size)


def project_mask(m: torch.Tensor, budget: float, iters: int = 50) -> torch.Tensor:
    """Euclidean projection of ``m`` onto ``{0 ≤ m ≤ 1, Σm ≤ budget}``: ``clip(m − τ, 0, 1)``
    with the smallest ``τ ≥ 0`` that meets the budget (bisection). Small entries go to 0
    first and large ones keep their lead (a uniform rescale would shrink the trigger's
    core as much as its fringe)."""
    out = m.clamp(0.0, 1.0)
    if float(out.sum()) <= budget:
        return out
    lo, hi = 0.0, float(m.max())
    for _ in range(iters):
        tau = 0.5 * (lo + hi)
        if float((m - tau).clamp(0.0, 1.0).sum()) > budget:
            lo = tau
        else:
            hi = tau
    return (m - hi).clamp(0.0, 1.0)


def refine_trigger(net: nn.Module, x: torch.Tensor, trigger: Trigger, *, steps: int,
                   budget: float, gen: torch.Generator, batch_size: int = 64,
                   lr: float = 0.1) -> Trigger:
    """``trigger`` re-optimised against ``net`` (see :class:`UnlearnConfig`'s ``refresh``).

    Projected gradient descent on the mask and pattern themselves, loss cross-entropy to
    ``trigger.label`` on random mini-batches of ``x`` (a CPU tensor). Each step moves a
    tensor by ``lr`` times its gradient divided by the gradient's largest entry (relative
    sizes kept: Adam's per-pixel normalisation would push every pixel up alike and the
    budget would cancel it), then clips the pattern to [0, 1] and projects the mask onto
    ``{0 ≤ m ≤ 1, Σm ≤ budget}`` (:func:`project_mask`). ``net`` is left in the mode it
    was in, its parameters untouched.
    """
    dev = model_device(net)
    was_training = net.training
    net.eval()
    with torch.enable_grad():  # callers may be under no_grad
        out = _refine(net, x, trigger, steps=steps, budget=budget, gen=gen,
                      batch_size=batch_size, lr=lr, dev=dev)
    net.train(was_training)
    return out


def _refine(net: nn.Module, x: torch.Tensor, trigger: Trigger, *, steps: int, budget: float,
            gen: torch.Generator, batch_size: int, lr: float, dev: torch.device) -> Trigger:
    """The loop of :func:`refine_trigger` (gradients enabled, ``net`` in eval mode)."""
    m = trigger.mask.detach().clone().to(dev).requires_grad_(True)
    p = trigger.pattern.detach().clone().to(dev).requires_grad_(True)
    target = torch.full((min(batch_size, len(x)),), trigger.label, dtype=torch.int64,
                        device=dev)
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        logits = checked_logits(net, stamp(x[idx].to(dev), m, p))
        loss = F.cross_entropy(logits, target[:len(idx)])
        grad_m, grad_p = torch.autograd.grad(loss, [m, p])
        with torch.no_grad():
            m -= lr * grad_m / (grad_m.abs().max() + 1e-12)
            p -= lr * grad_p / (grad_p.abs().max() + 1e-12)
            p.clamp_(0.0, 1.0)
            m.copy_(project_mask(m, budget))
    return Trigger(trigger.label, m.detach().cpu(), p.detach().cpu())


def unlearn(model: nn.Module, clean: ImageDataset, triggers: Sequence[Trigger], *,
            config: UnlearnConfig | None = None, seed: int = 0,
            device: str | torch.device | None = None) -> nn.Module:
    """A fine-tuned *copy* of ``model`` that has unlearned ``triggers`` (module docstring).

    Each epoch, a seeded ``stamp_fraction`` of the samples carries one of the triggers
    (chosen uniformly) and keeps its true label; with ``config.refresh``, after each
    refresh half of those samples carry the trigger's latest refreshed version instead.
    Returns the copy in eval mode on the CPU; ``model`` itself is unchanged.
    """
    cfg = config or UnlearnConfig()
    cfg.validate()
    if not triggers:
        raise bad_param("triggers", "at least one reversed trigger", list(triggers))
    y_all = clean.labels()
    if len(clean) < cfg.batch_size:
        raise DataError(f"{clean.source}: unlearning needs at least {cfg.batch_size} labelled "
                        f"clean samples, got {len(clean)}")
    gen = seed_everything(seed)
    dev = pick_device(device)
    with borrow_model(model):
        try:
            net = copy.deepcopy(model)
        except Exception as exc:
            raise ModelError(f"cannot copy the model for fine-tuning: {exc}") from exc
    net = net.to(dev)
    teacher: nn.Module | None = None
    if cfg.distill > 0:
        teacher = freeze(copy.deepcopy(net))
    params = list(net.parameters())
    if not params:
        raise ModelError("the model has no parameters to fine-tune")
    for p in params:
        p.requires_grad_(True)
    opt: torch.optim.Optimizer = (torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
                                  if cfg.optimizer == "sgd" else
                                  torch.optim.Adam(params, lr=cfg.lr))
    originals = list(triggers)
    k = len(originals)
    current = list(originals)
    budgets = [float(t.mask.sum()) for t in originals]
    base = [(t, t.dilated()) for t in originals]
    # variants j < k: the originals; j >= k (only when refreshing): their refreshed versions
    variants = base + (base if cfg.refresh else [])
    n = len(clean)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    n_stamp = max(1, round(cfg.stamp_fraction * n))
    # refreshes at evenly spaced steps strictly inside the run (none at step 0); a run of
    # fewer steps than refreshes gets fewer (distinct) refreshes
    refresh_at = {min(steps - 1, max(1, round(steps * (i + 1) / (cfg.refresh + 1))))
                  for i in range(cfg.refresh)} if steps > 1 else set()
    net.train()
    step = 0
    with progress("unlearning", steps) as bar:
        for _ in range(cfg.epochs):
            stamped = torch.zeros(n, dtype=torch.bool)
            stamped[torch.randperm(n, generator=gen)[:n_stamp]] = True
            which = torch.randint(len(originals), (n,), generator=gen)
            grow = torch.rand(n, generator=gen) < cfg.dilate
            # drawn only when refreshing, so that refresh=0 keeps the paper's draws
            fresh = (torch.rand(n, generator=gen) < 0.5 if cfg.refresh
                     else torch.zeros(n, dtype=torch.bool))
            perm = torch.randperm(n, generator=gen)
            for sl in batches(n, cfg.batch_size):
                if step in refresh_at:
                    current = [refine_trigger(net, clean.x, t, steps=cfg.refresh_steps,
                                              budget=b, gen=gen)
                               for t, b in zip(current, budgets)]
                    variants = base + [(t, t.dilated()) for t in current]
                step += 1
                idx = perm[sl]
                xb = clean.x[idx].to(dev)
                soft = None
                if teacher is not None:
                    with torch.no_grad():
                        soft = F.log_softmax(checked_logits(teacher, xb), dim=1)
                for j, (plain, grown) in enumerate(variants):
                    use = (which[idx] == j % k) & (fresh[idx] == (j >= k))
                    for trig, g in ((plain, False), (grown, True)):
                        sel = (stamped[idx] & use & (grow[idx] == g)).to(dev)
                        if bool(sel.any()):
                            xb[sel] = trig.apply(xb[sel])
                logits = checked_logits(net, xb)
                loss = F.cross_entropy(logits, y_all[idx].to(dev))
                if soft is not None:
                    kl = F.kl_div(F.log_softmax(logits, dim=1), soft, log_target=True,
                                  reduction="batchmean")
                    loss = (1.0 - cfg.distill) * loss + cfg.distill * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.advance()
    return freeze(net).cpu()


@torch.no_grad()
def _accuracy_and_asr(model: nn.Module, ds: ImageDataset,
                      attacks: Mapping[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]],
                      batch_size: int = 500) -> tuple[float, dict[str, float]]:
    """Clean accuracy, and per named attack the share of inputs (true label != target)
    sent to the target once the attack's stamp function is applied."""
    dev = model_device(model)
    y = ds.labels()
    correct = 0
    hits = {name: 0 for name in attacks}
    total = {name: 0 for name in attacks}
    with borrow_model(model):
        for sl in batches(len(ds), batch_size):
            xb, yb = ds.x[sl].to(dev), y[sl].to(dev)
            correct += int((checked_logits(model, xb).argmax(1) == yb).sum())
            for name, (fn, target) in attacks.items():
                keep = yb != target
                if not bool(keep.any()):
                    continue
                pred = checked_logits(model, fn(xb[keep])).argmax(1)
                hits[name] += int((pred == target).sum())
                total[name] += int(keep.sum())
    asr = {name: hits[name] / total[name] if total[name] else float("nan") for name in attacks}
    return correct / len(ds), asr


@dataclass(frozen=True)
class MitigationResult:
    """A repaired model with its before/after measurements on held-out data."""

    model: nn.Module
    labels: tuple[int, ...]
    clean_accuracy_before: float
    clean_accuracy_after: float
    asr_before: Mapping[str, float]
    asr_after: Mapping[str, float]
    num_finetune: int
    num_holdout: int
    seconds: float
    seed: int
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_json({
            "labels": list(self.labels),
            "clean_accuracy_before": self.clean_accuracy_before,
            "clean_accuracy_after": self.clean_accuracy_after,
            "clean_accuracy_drop": self.clean_accuracy_before - self.clean_accuracy_after,
            "asr_before": dict(self.asr_before),
            "asr_after": dict(self.asr_after),
            "num_finetune": self.num_finetune,
            "num_holdout": self.num_holdout,
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
        })


def evaluate_mitigation(before: nn.Module, after: nn.Module, holdout: ImageDataset,
                        triggers: Sequence[Trigger],
                        extra: Mapping[str, tuple[Callable[[torch.Tensor], torch.Tensor],
                                                  int]] | None = None,
                        ) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Clean accuracy and ASRs of ``before`` and ``after`` on ``holdout``.

    ASR keys: ``reversed_<label>`` for each reversed trigger, plus the names in ``extra``
    (e.g. ``true_trigger`` → (an attack's ``apply``, its target) in benchmarks).
    """
    attacks: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        f"reversed_{t.label}": (t.apply, t.label) for t in triggers}
    attacks.update(extra or {})
    acc0, asr0 = _accuracy_and_asr(before, holdout, attacks)
    acc1, asr1 = _accuracy_and_asr(after, holdout, attacks)
    return acc0, acc1, asr0, asr1


def split_clean(ds: ImageDataset, holdout: float, seed: int) -> tuple[ImageDataset,
                                                                       ImageDataset]:
    """Seeded split of labelled clean data into (fine-tune, held-out) parts."""
    if not 0.0 < holdout < 1.0:
        raise bad_param("holdout", "a float in (0, 1)", holdout)
    ds.labels()
    n_hold = round(holdout * len(ds))
    if n_hold < 1 or len(ds) - n_hold < 2:
        raise DataError(f"{ds.source}: {len(ds)} samples are too few to split into fine-tuning "
                        "and held-out parts")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed + 104_729))
    return ds.subset(perm[n_hold:].sort().values), ds.subset(perm[:n_hold].sort().values)


def mitigate(model: nn.Module, finetune: ImageDataset, holdout: ImageDataset,
             triggers: Sequence[Trigger], *, config: UnlearnConfig | None = None,
             seed: int = 0, device: str | torch.device | None = None,
             extra: Mapping[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]
             | None = None) -> MitigationResult:
    """Unlearn ``triggers`` on ``finetune`` and measure before/after on ``holdout``."""
    t0 = time.perf_counter()
    cfg = config or UnlearnConfig()
    after = unlearn(model, finetune, triggers, config=cfg, seed=seed, device=device)
    before = model
    if model_device(model) != torch.device("cpu"):
        after = after.to(model_device(model))
    acc0, acc1, asr0, asr1 = evaluate_mitigation(before, after, holdout, triggers, extra)
    return MitigationResult(
        model=after.cpu(), labels=tuple(t.label for t in triggers),
        clean_accuracy_before=acc0, clean_accuracy_after=acc1, asr_before=asr0,
        asr_after=asr1, num_finetune=len(finetune), num_holdout=len(holdout),
        seconds=time.perf_counter() - t0, seed=seed,
        params=dict(cfg.__dict__))


def triggers_from_result(result: Any, labels: Sequence[int] | None = None) -> list[Trigger]:
    """Reversed triggers of ``labels`` (default: the flagged ones) from a NC result."""
    from .detectors.neural_cleanse import reversed_trigger

    chosen = list(result.suspected_targets) if labels is None else list(labels)
    out = []
    for lab in chosen:
        mask, pattern = reversed_trigger(result, int(lab))
        out.append(Trigger(int(lab), mask, pattern))
    return out


__all__ = [
    "MitigationResult",
    "Trigger",
    "UnlearnConfig",
    "evaluate_mitigation",
    "mitigate",
    "split_clean",
    "triggers_from_result",
    "unlearn",
]
