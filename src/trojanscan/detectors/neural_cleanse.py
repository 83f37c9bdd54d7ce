"""Neural Cleanse — Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019.

Needs the model (gradients w.r.t. its input) and a few hundred clean inputs; no labels,
no training data. For every label ``t`` it reverse-engineers the smallest trigger (a
mask and a pattern in the input space [0, 1]) that sends clean inputs to ``t``; a
backdoor target needs a much smaller trigger than the other labels. The per-label mask
L1 norms go through the paper's one-sided MAD outlier test (anomaly index > 2 below the
median, :mod:`trojanscan.maths.outliers`), and, beyond the paper, a family-wise p-value.

Modes:

``faithful``
    the reference code (``bolunwang/backdoor``, ``visualizer.py``): one label after the
    other, 1,000 clean samples in mini-batches of 32 (31 per step), up to 1,000 steps,
    λ schedule of :mod:`._nc_schedule` with early stop after 25 steps without
    improvement once λ has moved both ways.
``fast`` (default)
    the same loss, parameterisation, optimiser and schedule, but all K labels optimised
    jointly in one batched forward/backward pass (labels × mini-batch), 4 mini-batches
    per step, early stop once the best norm has not improved by 1% for 10 steps (or,
    once λ has gone up, for 20 steps even if λ never came down: the norm has converged
    while the step ASR hovers around the threshold), and
    K-Arm-style pruning (Shen et al., "Backdoor Scanning for Deep Neural Networks through
    K-Arm Optimization", ICML 2021) restricted to what keeps the outlier test sound:
    after a 15-step warm-up, a *settled* label (λ went up and came down again) whose
    norm is over 1.5× the median norm (an upper bound of the final median) is retired,
    and the decision is re-checked with every retired norm at its low estimate; a label
    is flagged only if both agree. K-Arm's arm scheduling (``arms``: only the labels
    with the smallest norms so far run, the others wait) is available, off by default:
    without retiring unsettled labels it only reorders the work.

Both modes split a step's stamped inputs into forward/backward passes that fit memory
(:mod:`._nc_memory`: the model's measured activation bytes per input against a budget —
free CUDA memory, or a share of the available RAM); gradients are summed before the
optimiser step, so the maths does not change. The chosen ``pass_batch`` is in the
evidence.

Decision (``decision``):

``"index"``
    the paper: labels below the median with anomaly index > ``threshold`` (2);
``"p_value"``
    labels whose family-wise p-value under a null of iid log-normal norms
    (:func:`~trojanscan.maths.outliers.anomaly_p_values`) is below ``alpha``;
``"reference"``
    labels whose norm is significantly smaller than the same label's norm in clean
    *reference* models of the same task, run in the same mode (``reference``: R ≥ 2
    norm vectors, or report/reference JSON files, see :func:`load_reference`);
    Bonferroni-adjusted p-value below ``alpha``
    (:func:`~trojanscan.maths.outliers.reference_p_values`). Removes the false alarms
    on labels that need small triggers in every clean model (Fashion-MNIST's "Bag");
``"auto"`` (default)
    ``"reference"`` when references are given, else ``"index"``.

Every rule's flagged set and all per-label statistics are in the evidence; ``p_value``
is the smallest p-value of the rule used (the MAD-null one for ``"index"``) and
``score = 1 − p_value``.

Known to fail on triggers that are not small in L1 (e.g. a blended full-image pattern,
input-specific or warping triggers), on all-to-all attacks (no single target), and it
costs K optimisations. The model must take inputs in [0, 1] (normalisation inside it):
the trigger lives in that space.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..classifier import borrow_model, check_classifier, freeze, model_device
from ..dataset import ImageDataset
from ..exceptions import (
    DataError,
    DetectorNotApplicable,
    IncompatibleError,
    ModelError,
    TrojanscanWarning,
    bad_param,
)
from ..maths.outliers import anomaly_index, anomaly_p_values, reference_p_values, target_p_values
from ..maths.triggers import stamp
from ..progress import progress
from ..utils import pick_device, seed_everything
from ._nc_memory import memory_budget, per_sample_bytes, plan_pass_batch
from ._nc_reverse import (
    LabelTrigger,
    ReverseConfig,
    converged_estimate,
    label_generator,
    reverse_engineer,
)
from .base import ModelDetector, ModelScanResult

MODES = ("fast", "faithful")
DECISIONS = ("auto", "index", "p_value", "reference")

#: settings each mode uses for the options left at None
PRESETS: dict[str, dict[str, Any]] = {
    "faithful": {"max_steps": 1000, "mini_batches": None, "early_stop_patience": 25,
                 "early_stop_threshold": 1.0, "prune_ratio": None, "arms": "all"},
    "fast": {"max_steps": 200, "mini_batches": 4, "early_stop_patience": 10,
             "early_stop_threshold": 0.99, "prune_ratio": 1.5, "arms": "all"},
}
#: values of ``arms`` besides a positive integer
ARMS = ("all", "half")


def resolve_arms(arms: int | str, k: int) -> int | None:
    """Labels optimised per step after the warm-up (None: all of them)."""
    if arms == "all":
        return None
    n = k // 2 + 1 if arms == "half" else int(arms)
    return None if n >= k else n


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise bad_param(name, f"an integer >= {minimum}", value)
    return int(value)


def _float(name: str, value: Any, low: float, high: float, *, low_open: bool = True,
           high_open: bool = False) -> float:
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise bad_param(name, f"a number in {interval}", value)
    v = float(value)
    ok = (math.isfinite(v) and (v > low if low_open else v >= low)
          and (v < high if high_open else v <= high))
    if not ok:
        raise bad_param(name, f"a number in {interval}", value)
    return v


class NeuralCleanse(ModelDetector):
    """Neural Cleanse trigger reverse-engineering (module docstring).

    Settings left at ``None`` take the mode's preset (:data:`PRESETS`); ``mini_batches``
    None in faithful mode means ``n_samples // batch_size`` as in the reference.
    """

    name: ClassVar[str] = "neural_cleanse"

    def __init__(
        self,
        *,
        mode: str = "fast",
        n_samples: int = 1000,
        batch_size: int = 32,
        max_steps: int | None = None,
        mini_batches: int | None = None,
        lr: float = 0.1,
        init_cost: float = 1e-3,
        attack_success: float = 0.99,
        patience: int = 5,
        early_stop_patience: int | None = None,
        early_stop_threshold: float | None = None,
        prune_ratio: float | None = None,
        arms: int | str | None = None,
        pass_batch: int | None = None,
        decision: str = "auto",
        reference: Any = None,
        threshold: float = 2.0,
        alpha: float = 0.05,
        images: bool = True,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        self.mode = mode
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.mini_batches = mini_batches
        self.lr = lr
        self.init_cost = init_cost
        self.attack_success = attack_success
        self.patience = patience
        self.early_stop_patience = early_stop_patience
        self.early_stop_threshold = early_stop_threshold
        self.prune_ratio = prune_ratio
        self.arms = arms
        self.pass_batch = pass_batch
        self.decision = decision
        self.reference = reference
        self.threshold = threshold
        self.alpha = alpha
        self.images = images
        self.seed = seed
        self.device = device

    # -- settings -----------------------------------------------------------------
    def resolved_params(self) -> dict[str, Any]:
        """All settings, validated, with the mode's preset filled in for ``None``."""
        if self.mode not in MODES:
            raise bad_param("mode", MODES, self.mode)
        if self.decision not in DECISIONS:
            raise bad_param("decision", DECISIONS, self.decision)
        preset = PRESETS[self.mode]
        decision = self.decision
        if decision == "auto":
            decision = "index" if self.reference is None else "reference"
        if decision == "reference" and self.reference is None:
            raise bad_param("reference", "clean reference models' norms for "
                            "decision='reference'", None)
        p: dict[str, Any] = {"mode": self.mode, "decision": decision}
        p["n_samples"] = _int("n_samples", self.n_samples, 1)
        p["batch_size"] = _int("batch_size", self.batch_size, 1)
        p["max_steps"] = _int("max_steps", preset["max_steps"] if self.max_steps is None
                              else self.max_steps, 1)
        mb = self.mini_batches if self.mini_batches is not None else preset["mini_batches"]
        p["mini_batches"] = (max(1, p["n_samples"] // p["batch_size"]) if mb is None
                             else _int("mini_batches", mb, 1))
        p["lr"] = _float("lr", self.lr, 0.0, math.inf, high_open=True)
        p["init_cost"] = _float("init_cost", self.init_cost, 0.0, math.inf, high_open=True)
        p["attack_success"] = _float("attack_success", self.attack_success, 0.0, 1.0)
        p["patience"] = _int("patience", self.patience, 1)
        esp = preset["early_stop_patience"] if self.early_stop_patience is None \
            else self.early_stop_patience
        p["early_stop_patience"] = _int("early_stop_patience", esp, 1)
        est = preset["early_stop_threshold"] if self.early_stop_threshold is None \
            else self.early_stop_threshold
        p["early_stop_threshold"] = _float("early_stop_threshold", est, 0.0, 1.0)
        pr = preset["prune_ratio"] if self.prune_ratio is None else self.prune_ratio
        if self.mode == "faithful" and self.prune_ratio is not None:
            raise bad_param("prune_ratio", "None in faithful mode (no pruning)",
                            self.prune_ratio)
        p["prune_ratio"] = None if pr is None else _float("prune_ratio", pr, 1.0, math.inf,
                                                          high_open=True)
        arms = preset["arms"] if self.arms is None else self.arms
        if self.mode == "faithful" and arms != "all":
            raise bad_param("arms", "None or 'all' in faithful mode (every label runs)",
                            self.arms)
        if not (arms in ARMS or (isinstance(arms, (int, np.integer))
                                 and not isinstance(arms, bool) and arms >= 1)):
            raise bad_param("arms", "'all', 'half' or an integer >= 1", self.arms)
        p["arms"] = arms if isinstance(arms, str) else int(arms)
        p["pass_batch"] = (None if self.pass_batch is None
                           else _int("pass_batch", self.pass_batch, 1))
        p["threshold"] = _float("threshold", self.threshold, 0.0, math.inf, high_open=True)
        p["alpha"] = _float("alpha", self.alpha, 0.0, 1.0, high_open=True)
        if not isinstance(self.images, bool):
            raise bad_param("images", "True or False", self.images)
        p["images"] = self.images
        p["seed"] = _int("seed", self.seed, 0)
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise bad_param("device", "None, 'auto', 'cpu', 'cuda', 'cuda:N'", self.device)
        p["device"] = self.device
        ref = load_reference(self.reference, self.mode)
        p["reference"] = None if ref is None else ref
        return p

    def _config(self, p: Mapping[str, Any], k: int, pass_batch: int) -> ReverseConfig:
        return ReverseConfig(
            arms=resolve_arms(p["arms"], k), pass_batch=pass_batch,
            max_steps=p["max_steps"], mini_batches=p["mini_batches"],
            batch_size=p["batch_size"], lr=p["lr"], init_cost=p["init_cost"],
            attack_success=p["attack_success"], patience=p["patience"],
            early_stop_patience=p["early_stop_patience"],
            early_stop_threshold=p["early_stop_threshold"], prune_ratio=p["prune_ratio"],
            stall_patience=(None if p["mode"] == "faithful"
                            else 2 * p["early_stop_patience"]),
            prune_after=3 * p["patience"])

    # -- the method ---------------------------------------------------------------
    def fit(self, model: nn.Module, clean: ImageDataset) -> ModelScanResult:
        """Reverse-engineer one trigger per label of ``model`` on ``clean`` inputs."""
        t0 = time.perf_counter()
        p = self.resolved_params()
        if not isinstance(model, nn.Module):
            raise ModelError(f"neural_cleanse: expected a torch nn.Module, got "
                             f"{type(model).__name__}")
        if not isinstance(clean, ImageDataset):
            raise DataError(f"neural_cleanse: expected an ImageDataset of clean inputs, got "
                            f"{type(clean).__name__}")
        if len(clean) < 1:
            raise DataError(f"{clean.source}: no clean inputs")
        try:
            dev = pick_device(p["device"])
        except (RuntimeError, ValueError) as exc:
            raise bad_param("device", "None, 'auto', 'cpu', 'cuda', 'cuda:N'",
                            p["device"]) from exc
        seed_everything(p["seed"])
        sub = _subset(clean, p["n_samples"], p["seed"])
        with borrow_model(model):
            net = _on_device(model, dev)
            x = sub.x.to(dev)
            k = check_classifier(net, x[:2], what="clean data",
                                 num_labels=None if clean.y is None else clean.num_classes)
            if p["reference"] is not None and p["reference"].shape[1] != k:
                raise IncompatibleError(f"neural_cleanse: the reference norms have "
                                        f"{p['reference'].shape[1]} labels but the model "
                                        f"has {k}")
            if k < 3:
                raise DetectorNotApplicable(
                    f"neural_cleanse needs a model with at least 3 classes for its outlier "
                    f"test, this one has {k}")
            _check_gradients(net, x[:2])
            plan = _plan_passes(net, x, k, p, dev)
            cfg = self._config(p, k, plan["pass_batch"])
            triggers = self._reverse(net, x, k, p, cfg)
            asr = _trigger_asr(net, x, sub.y, triggers, batch_size=plan["pass_batch"])
        return self._result(triggers, asr, sub, k, p, plan, time.perf_counter() - t0)

    def reference_norms(self) -> np.ndarray | None:
        """The reference models' norms (R×K) this detector compares with, or None."""
        return load_reference(self.reference, self.mode)

    def _reverse(self, net: nn.Module, x: torch.Tensor, k: int, p: Mapping[str, Any],
                 cfg: ReverseConfig) -> dict[int, LabelTrigger]:
        seed = p["seed"]
        with progress(f"neural cleanse ({p['mode']})", k * cfg.max_steps) as bar:
            if p["mode"] == "faithful":
                out: dict[int, LabelTrigger] = {}
                for lab in range(k):
                    res = reverse_engineer(net, x, [lab], k, cfg, seed=seed,
                                           batch_gen=label_generator(seed, lab, 1),
                                           on_step=bar.advance)
                    out.update(res)
                    bar.update(completed=(lab + 1) * cfg.max_steps)
                return out
            return reverse_engineer(net, x, list(range(k)), k, cfg, seed=seed,
                                    batch_gen=label_generator(seed, k, 2),
                                    on_step=bar.advance)

    def _result(self, triggers: dict[int, LabelTrigger], asr: list[float], sub: ImageDataset,
                k: int, p: Mapping[str, Any], plan: Mapping[str, Any],
                seconds: float) -> ModelScanResult:
        labels = list(range(k))
        norms = np.array([triggers[lab].l1 for lab in labels], dtype=np.float64)
        reached = [triggers[lab].reached for lab in labels]
        pruned = [lab for lab in labels if triggers[lab].stop_reason == "pruned"]
        ends = _pruned_estimates(triggers, pruned, p["prune_ratio"])
        ref: np.ndarray | None = p["reference"]
        index, pvals, ref_p, paper, calibrated, by_ref = _decide(norms, reached, ref, p)
        safe = np.maximum(norms, 1e-12)
        sensitive = False
        if pruned:
            # a retired label's norm is an upper bound of its converged norm. If the label
            # ends above the median, the upper bound only enlarges the MAD (conservative);
            # if its converged norm were lower, the median would be overestimated (false
            # alarms): flags must also hold with each retired norm at its low estimate
            other = norms.copy()
            other[pruned] = [e[0] for e in ends]
            _i, o_p, o_ref_p, o_paper, o_cal, o_ref = _decide(other, reached, ref, p)
            keep = (set(paper) & set(o_paper), set(calibrated) & set(o_cal),
                    set(by_ref) & set(o_ref))
            sensitive = sensitive or (keep[0] != set(paper) or keep[1] != set(calibrated)
                                      or keep[2] != set(by_ref))
            paper = [lab for lab in paper if lab in keep[0]]
            calibrated = [lab for lab in calibrated if lab in keep[1]]
            by_ref = [lab for lab in by_ref if lab in keep[2]]
            pvals = np.maximum(pvals, o_p)
            if ref_p is not None and o_ref_p is not None:
                ref_p = np.maximum(ref_p, o_ref_p)
        chosen = {"index": paper, "p_value": calibrated, "reference": by_ref}[p["decision"]]
        flagged = sorted(chosen, key=lambda lab: norms[lab])
        used_p = ref_p if p["decision"] == "reference" and ref_p is not None else pvals
        min_label = int(np.argmin(norms))
        warn: list[str] = []
        for lab in labels:
            t = triggers[lab]
            if not t.reached:
                warn.append(f"neural_cleanse: label {lab}: the optimisation never reached "
                            f"ASR {p['attack_success']} in {t.steps} steps (last step "
                            f"{t.step_asr:.3f}); its norm is the last mask's and it is "
                            "never flagged")
            if t.moved < 1e-4:
                warn.append(f"neural_cleanse: label {lab}: the mask did not move from its "
                            "random start; the result for this label is meaningless")
        if flagged and p["decision"] != "reference":
            warn.append("neural_cleanse: decided without clean reference models; labels "
                        "that are easy targets in every model of a task (Fashion-MNIST's "
                        "'Bag') are flagged as well: compare with clean models of the same "
                        "task (scan --nc-reference) before acting")
        for msg in warn:
            warnings.warn(msg, TrojanscanWarning, stacklevel=3)
        min_p = float(used_p.min())
        evidence: dict[str, Any] = {
            "mode": p["mode"],
            "decision": p["decision"],
            "num_classes": k,
            "num_samples": len(sub),
            "anomaly_index": float(index[min_label]),
            "min_label": min_label,
            "flagged_labels": flagged,
            "index_flagged_labels": paper,
            "p_value_flagged_labels": calibrated,
            "reference_flagged_labels": by_ref if ref is not None else None,
            "reference_p_values": None if ref_p is None else ref_p.tolist(),
            "num_reference_models": 0 if ref is None else int(ref.shape[0]),
            "l1_norms": norms.tolist(),
            "anomaly_indices": index.tolist(),
            "p_values": pvals.tolist(),
            "asr": asr,
            "step_asr": [triggers[lab].step_asr for lab in labels],
            "reached_threshold": reached,
            "steps": [triggers[lab].steps for lab in labels],
            "stop_reasons": [triggers[lab].stop_reason for lab in labels],
            "final_cost": [triggers[lab].final_cost for lab in labels],
            "median_l1": float(np.median(norms)),
            "mad_l1": float(1.4826 * np.median(np.abs(norms - np.median(norms)))),
            "total_steps": int(sum(triggers[lab].steps for lab in labels)),
            "sample_passes": int(sum(triggers[lab].steps for lab in labels)
                                 * p["mini_batches"] * p["batch_size"]),
            "pruned_labels": pruned,
            "pruned_norm_estimates": [[e[0], e[1], e[2]] for e in ends],
            "pruning_sensitive": sensitive,
            "arms": resolve_arms(p["arms"], k),
            "pass_batch": plan["pass_batch"],
            "per_sample_bytes": plan["per_sample_bytes"],
            "memory_budget_bytes": plan["budget_bytes"],
            "device": plan["device"],
        }
        images = _images(triggers, sub) if p["images"] else {}
        params = {key: v for key, v in p.items() if key not in ("images", "reference")}
        params["reference"] = None if ref is None else f"{ref.shape[0]} clean reference models"
        return ModelScanResult(
            detector=self.name,
            verdict="backdoored" if flagged else "clean",
            score=float(1.0 - min_p),
            suspected_targets=tuple(flagged),
            seconds=seconds,
            seed=p["seed"],
            params=params,
            p_value=min_p,
            evidence=evidence,
            images=images,
            warnings=tuple(warn),
            label_p_values=tuple(target_p_values(safe, ref, reached=reached).tolist()),
        )


# -- helpers -------------------------------------------------------------------------


def _decide(norms: np.ndarray, reached: list[bool], ref: np.ndarray | None,
            p: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                           list[int], list[int], list[int]]:
    """Anomaly indices, MAD-null p-values, reference p-values and each rule's flags."""
    labels = range(len(norms))
    index = anomaly_index(norms)
    safe = np.maximum(norms, 1e-12)
    pvals = anomaly_p_values(safe, seed=p["seed"])
    paper = [lab for lab in labels if index[lab] > p["threshold"] and reached[lab]]
    calibrated = [lab for lab in labels if pvals[lab] < p["alpha"] and reached[lab]]
    ref_p: np.ndarray | None = None
    by_ref: list[int] = []
    if ref is not None:
        ref_p = reference_p_values(safe, ref)
        by_ref = [lab for lab in labels if ref_p[lab] < p["alpha"] and reached[lab]]
    return index, pvals, ref_p, paper, calibrated, by_ref


def _pruned_estimates(triggers: Mapping[int, LabelTrigger], pruned: list[int],
                      ratio: float | None) -> list[tuple[float, float, float]]:
    """(low, middle, high) converged-norm estimate of each retired label.

    Scaled by how much the labels that ran to their end shrank from the same number of
    steps (:func:`~._nc_reverse.converged_estimate`); the smallest-norm finished label
    (the candidate target, which shrinks more than the others) is left out of the
    factors. Without two such labels: (norm / ``ratio``, norm, norm).
    """
    ran = [lab for lab, t in triggers.items() if t.stop_reason != "pruned" and t.reached]
    if ran:
        ran.remove(min(ran, key=lambda lab: triggers[lab].l1))
    histories = [triggers[lab].history for lab in ran]
    out: list[tuple[float, float, float]] = []
    for lab in pruned:
        t = triggers[lab]
        est = converged_estimate(t.history, histories)
        out.append(est if est is not None else (t.l1 / (ratio or 1.0), t.l1, t.l1))
    return out


def _plan_passes(net: nn.Module, x: torch.Tensor, k: int, p: Mapping[str, Any],
                 dev: torch.device) -> dict[str, Any]:
    """Inputs per forward/backward pass: given, or from measured memory and a budget."""
    labels = k if p["mode"] == "fast" else 1
    wanted = labels * p["batch_size"]
    if p["pass_batch"] is not None:
        return {"pass_batch": min(wanted, p["pass_batch"]), "per_sample_bytes": None,
                "budget_bytes": None, "device": str(dev)}
    try:
        per = per_sample_bytes(net, x[:2])
    except Exception as exc:  # a model that cannot run on the data
        raise ModelError(f"the model failed on clean inputs: {exc}") from exc
    budget = memory_budget(dev)
    return {"pass_batch": plan_pass_batch(per, budget, wanted), "per_sample_bytes": per,
            "budget_bytes": budget, "device": str(dev)}


def _subset(clean: ImageDataset, n: int, seed: int) -> ImageDataset:
    """At most ``n`` clean samples, drawn without replacement (seeded), in data order."""
    if len(clean) <= n:
        return clean
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(clean), generator=gen)[:n].sort().values
    return clean.subset(idx)


def _on_device(model: nn.Module, dev: torch.device) -> nn.Module:
    """The model itself when it already lives on ``dev``, else a copy moved there."""
    cur = model_device(model, dev)
    if cur == dev:
        return model
    try:
        net = copy.deepcopy(model).to(dev)
    except Exception as exc:  # some modules cannot be copied or moved
        raise ModelError(f"cannot move the model from {cur} to {dev}: {exc}") from exc
    return freeze(net)


def _check_gradients(net: nn.Module, x: torch.Tensor) -> None:
    """Neural Cleanse needs gradients of the logits w.r.t. the input."""
    probe = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        try:
            out = net(probe)
        except Exception as exc:  # a model that cannot run on the data
            raise ModelError(f"the model failed on clean inputs: {exc}") from exc
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not out.requires_grad:
            raise DetectorNotApplicable("neural_cleanse needs gradients of the logits with "
                                        "respect to the input; this model gives none")
        (grad,) = torch.autograd.grad(out.sum(), probe, allow_unused=True)
    if grad is None or not bool(torch.isfinite(grad).all()):
        raise DetectorNotApplicable("neural_cleanse needs finite gradients of the logits with "
                                    "respect to the input; this model gives none")


@torch.no_grad()
def _trigger_asr(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                 triggers: dict[int, LabelTrigger], batch_size: int = 500) -> list[float]:
    """ASR of each reversed trigger on the clean samples (those of other labels if known)."""
    out: list[float] = []
    dev = x.device
    for lab in sorted(triggers):
        t = triggers[lab]
        keep = torch.ones(len(x), dtype=torch.bool) if y is None else (y != lab)
        xs = x[keep.to(dev)] if bool(keep.any()) else x
        m, pat = t.mask.to(dev), t.pattern.to(dev)
        hits = 0
        for s in range(0, len(xs), batch_size):
            logits = net(stamp(xs[s:s + batch_size], m, pat))
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            hits += int((logits.argmax(1) == lab).sum())
        out.append(hits / max(1, len(xs)))
    return out


def _hwc(t: torch.Tensor) -> np.ndarray:
    """C×H×W → H×W (one channel) or H×W×C float32 in [0, 1]."""
    a = t.detach().cpu().float().clamp(0, 1).numpy()
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def _images(triggers: dict[int, LabelTrigger], sub: ImageDataset) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    y = sub.y
    for lab, t in sorted(triggers.items()):
        i = 0
        if y is not None:
            other = torch.nonzero(y != lab).flatten()
            i = int(other[0]) if other.numel() else 0
        out[f"mask_{lab}"] = t.mask.numpy().astype(np.float32)
        out[f"pattern_{lab}"] = _hwc(t.pattern)
        out[f"stamped_{lab}"] = _hwc(stamp(sub.x[i:i + 1], t.mask, t.pattern)[0])
    return out


def _norms_from_json(doc: Any, where: str) -> tuple[list[list[float]], str | None]:
    """Norm vectors (and mode) from a report.json, a reference file or a result dict."""
    if isinstance(doc, Mapping) and isinstance(doc.get("detectors"), Mapping):
        doc = doc["detectors"].get("neural_cleanse")
        if not isinstance(doc, Mapping):
            raise DataError(f"{where}: the report has no neural_cleanse result")
    if not isinstance(doc, Mapping) or "l1_norms" not in doc:
        raise DataError(f"{where}: expected a trojanscan report.json, a Neural Cleanse result "
                        "or a reference file with 'l1_norms'")
    norms = doc["l1_norms"]
    mode = doc.get("mode") or (doc.get("params") or {}).get("mode")
    if norms and not isinstance(norms[0], (list, tuple)):
        norms = [norms]
    return [[float(v) for v in row] for row in norms], mode


def load_reference(reference: Any, mode: str | None = None) -> np.ndarray | None:
    """Reference models' L1 norms as an R×K array (None when ``reference`` is None).

    ``reference`` is an R×K array / nested list, or a path (or list of paths) to JSON
    files — ``report.json`` of ``trojanscan scan`` runs on clean models, a file written by
    :func:`write_reference`, or a folder of such files (searched recursively). Files that
    record a mode must match ``mode``: norms from fast and faithful runs differ.
    """
    if reference is None:
        return None
    import json
    from pathlib import Path

    rows: list[list[float]] = []
    if isinstance(reference, (str, Path)) or (
            isinstance(reference, (list, tuple)) and reference
            and all(isinstance(r, (str, Path)) for r in reference)):
        paths = [Path(reference)] if isinstance(reference, (str, Path)) else [
            Path(r) for r in reference]
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                files += sorted(path.rglob("*.json"))
            elif path.is_file():
                files.append(path)
            else:
                raise bad_param("reference", "an existing JSON file or folder", str(path))
        if not files:
            raise bad_param("reference", "a folder holding report/reference JSON files",
                            [str(p) for p in paths])
        for f in files:
            try:
                doc = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DataError(f"{f}: cannot read a reference JSON file ({exc})") from exc
            norms, file_mode = _norms_from_json(doc, str(f))
            if mode is not None and file_mode is not None and file_mode != mode:
                raise bad_param("reference", f"norms from {mode}-mode runs", f"{file_mode}-mode "
                                f"norms in {f}")
            rows += norms
    else:
        rows = reference
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise bad_param("reference", "an R×K array of L1 norms, or JSON file paths",
                        type(reference).__name__) from exc
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 3:
        raise bad_param("reference", "norms of at least 2 reference models with >= 3 labels "
                        "(R×K)", f"shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise bad_param("reference", "positive, finite L1 norms", "other values")
    return arr


def write_reference(results: Any, path: Any) -> None:
    """Write the norms of Neural Cleanse results on clean models as a reference file."""
    from pathlib import Path

    from ..utils import atomic_write_text

    items = [results] if isinstance(results, ModelScanResult) else list(results)
    modes = {r.evidence.get("mode") for r in items}
    if len(modes) != 1:
        raise bad_param("results", "results of one mode", sorted(map(str, modes)))
    import json

    doc = {"mode": modes.pop(), "l1_norms": [list(r.evidence["l1_norms"]) for r in items]}
    atomic_write_text(Path(path), json.dumps(doc, indent=2) + "\n")


def reversed_trigger(result: ModelScanResult, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask H×W, pattern C×H×W) of ``label`` from a Neural Cleanse result's images."""
    try:
        mask = np.asarray(result.images[f"mask_{label}"], dtype=np.float32)
        pat = np.asarray(result.images[f"pattern_{label}"], dtype=np.float32)
    except KeyError as exc:
        raise bad_param("label", "a label whose reversed trigger is in the result (fit with "
                        "images=True)", label) from exc
    pat_t = torch.from_numpy(pat)
    pat_t = pat_t.unsqueeze(0) if pat_t.dim() == 2 else pat_t.permute(2, 0, 1)
    return torch.from_numpy(mask), pat_t.contiguous()


__all__ = ["ARMS", "DECISIONS", "MODES", "PRESETS", "NeuralCleanse", "load_reference",
           "reversed_trigger", "write_reference"]
