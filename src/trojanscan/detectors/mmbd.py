"""MM-BD — Wang, Xiang, Miller & Kesidis, "MM-BD: Post-Training Detection of Backdoor
Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic",
IEEE S&P 2024.

Needs the model only (no data): the input shape and the ``[0, 1]`` input range. For
each class ``k`` it maximises the margin ``f_k(x) − max_{j≠k} f_j(x)`` over inputs by
gradient ascent from random starts; a backdoor target class, which a trigger wins by a
wide margin wherever it is stamped, reaches an abnormally large maximum margin. The
largest per-class statistic is tested against a Gamma null fitted to the other
classes' statistics, with the order-statistic correction ``1 − H0(r_max)^K``
(:mod:`trojanscan.maths.margins`).

Faithful settings (the reference code): 30 uniform random starts per class, 300 plain
gradient steps of size 0.01 on the summed margins (the reference builds a fresh SGD
optimiser with momentum every step, so the momentum never acts), inputs clamped to
``[0, 1]`` in the forward pass only, a class stops early once its loss changes by less
than a relative 1e-5; the statistic is the largest margin of the last evaluated step;
α = 0.05.

``mode``: ``faithful`` (default) reads the paper's p-value. ``calibrated`` reads a
parametric bootstrap of the paper's own test under a Gamma fitted to the other classes
(:func:`trojanscan.maths.margins.calibrated_log_p`): the paper's p-value is
anti-conservative — fitted on the ``K − 1`` smallest of ``K`` null draws the Gamma's
tail is too thin, and about a quarter to a third of null draws fall below 0.05 (measured
on synthetic Gamma statistics, ``K = 10``). Both p-values are in the evidence either way.

Per-class p-values (``label_p_values``): each class's statistic against a Gamma fitted to
the others; for the largest class this is the model's p-value, for the others it is
conservative. Suspected targets: the classes whose p-value is below α, when the model's
is.

Known to fail: backdoors whose target margin is no larger than what clean classes reach
(weak or source-specific triggers, sample-specific attacks the maximiser cannot reach
from random starts), models whose classes differ widely in natural margin (a few-class
task, a heavily imbalanced one), and too few classes for a null (K < 3 is refused).
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..classifier import borrow_model, check_logits, model_device
from ..dataset import ImageDataset
from ..exceptions import DetectorNotApplicable, ModelError, bad_param
from ..maths.margins import calibrated_log_p, label_p_values, margins
from ..progress import progress
from ..utils import pick_device
from .base import ModelDetector, ModelScanResult

MODES = ("faithful", "calibrated")


def _image(x: torch.Tensor) -> np.ndarray:
    """One ``C×H×W`` input as an ``H×W`` (or ``H×W×C``) array in [0, 1]."""
    arr = x.detach().cpu().clamp(0, 1).numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


class MMBD(ModelDetector):
    """MM-BD (see the module docstring). Data-free: ``fit(model)`` with ``input_shape``
    set, or ``fit(model, clean)`` (only the data's input shape is used).

    ``n_init`` random starts per class, ``steps`` gradient steps of size ``lr``, early
    stop at relative loss change ``tol``; ``alpha`` the significance level;
    ``draws`` the bootstrap size of the calibrated p-value; ``batch_size`` inputs per
    forward pass; ``input_shape`` ``(C, H, W)`` when no data are given.
    """

    name: ClassVar[str] = "mmbd"
    #: runs without clean data (``trojanscan scan`` without ``--data``)
    data_free: ClassVar[bool] = True

    def __init__(self, *, mode: str = "faithful", n_init: int = 30, steps: int = 300,
                 lr: float = 0.01, tol: float = 1e-5, alpha: float = 0.05,
                 draws: int = 200, batch_size: int = 300,
                 input_shape: tuple[int, int, int] | None = None, seed: int = 0,
                 device: str | None = None) -> None:
        self.mode = mode
        self.n_init = n_init
        self.steps = steps
        self.lr = lr
        self.tol = tol
        self.alpha = alpha
        self.draws = draws
        self.batch_size = batch_size
        self.input_shape = input_shape
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ checks
    def _check(self) -> None:
        if self.mode not in MODES:
            raise bad_param("mode", MODES, self.mode)
        for key in ("n_init", "steps", "draws", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_param(key, "a positive integer", v)
        for key in ("lr", "tol"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise bad_param(key, "a positive number", v)
        if not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise bad_param("alpha", "a float in (0, 1)", self.alpha)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**32):
            raise bad_param("seed", "an integer in [0, 2**32)", self.seed)

    def _shape(self, clean: ImageDataset | None) -> tuple[int, int, int]:
        if clean is not None:
            if not isinstance(clean, ImageDataset):
                raise bad_param("clean", "an ImageDataset or None", type(clean).__name__)
            s = clean.input_shape
            return int(s[0]), int(s[1]), int(s[2])
        shape = self.input_shape
        try:
            dims = tuple(int(d) for d in shape) if shape is not None else ()
        except (TypeError, ValueError):
            dims = ()
        if len(dims) != 3 or min(dims) < 1 or isinstance(shape, (str, bytes)):
            raise bad_param("input_shape", "(C, H, W) with positive integers (MM-BD needs "
                            "the input shape when no data are given)", shape)
        return dims[0], dims[1], dims[2]

    # ------------------------------------------------------------------ fit
    def fit(self, model: nn.Module, clean: ImageDataset | None = None) -> ModelScanResult:
        t0 = time.perf_counter()
        self._check()
        shape = self._shape(clean)
        with borrow_model(model):
            dev = model_device(model, pick_device(self.device))
            k = self._num_classes(model, shape, dev)
            if k < 3:
                raise DetectorNotApplicable(
                    f"MM-BD fits its null to the other classes' statistics and needs at "
                    f"least 3 classes; the model has {k}")
            stats, best, steps_run = self._maximise(model, shape, k, dev)
        return self._result(stats, best, steps_run, shape, t0)

    @staticmethod
    def _num_classes(model: nn.Module, shape: tuple[int, int, int],
                     dev: torch.device) -> int:
        try:
            with torch.no_grad():
                out = model(torch.full((2, *shape), 0.5, device=dev))
        except Exception as exc:  # any failure of a user's model on well-formed input
            raise ModelError(f"MM-BD: the model cannot process inputs of shape "
                             f"{'×'.join(map(str, shape))} ({type(exc).__name__}: {exc})"
                             ) from exc
        return check_logits(out, 2, what=f"inputs of shape {'×'.join(map(str, shape))}")

    def _maximise(self, model: nn.Module, shape: tuple[int, int, int], k: int,
                  dev: torch.device) -> tuple[np.ndarray, torch.Tensor, list[int]]:
        """Gradient ascent on the margins of ``n_init`` random starts per class; the
        per-class statistic, each class's best input and the steps each class ran."""
        n = self.n_init
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.rand((k * n, *shape), generator=gen).to(dev)
        labels = torch.arange(k, device=dev).repeat_interleave(n)
        last_loss = np.full(k, 1000.0)
        active = np.ones(k, dtype=bool)
        steps_run = [0] * k
        final = torch.full((k, n), -math.inf)
        with progress("mmbd: maximising margins", self.steps) as bar:
            for _ in range(self.steps):
                classes = np.flatnonzero(active)
                rows = torch.from_numpy(
                    (classes[:, None] * n + np.arange(n)[None, :]).ravel()).to(dev)
                grads, m = self._step(model, x, labels, rows)
                with torch.no_grad():
                    x[rows] -= self.lr * grads
                per_class = m.view(len(classes), n)
                loss = -per_class.sum(1).double().numpy()
                for j, c in enumerate(classes):
                    final[c] = per_class[j]
                    steps_run[c] += 1
                    prev = last_loss[c]
                    if prev != 0 and abs(prev - loss[j]) / abs(prev) < self.tol:
                        active[c] = False
                    last_loss[c] = loss[j]
                bar.advance()
                if not active.any():
                    break
        stats = final.max(dim=1)
        best = x.detach().view(k, n, *shape)[torch.arange(k), stats.indices.to(dev)]
        return stats.values.double().numpy(), best.cpu(), steps_run

    def _step(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the negated summed margin w.r.t. ``x[rows]``, and the margins."""
        grads, ms = [], []
        for start in range(0, len(rows), self.batch_size):
            idx = rows[start:start + self.batch_size]
            xi = x[idx].detach().requires_grad_(True)
            with torch.enable_grad():
                out = model(xi.clamp(0, 1))
                m = margins(out, labels[idx])
                (-m.sum()).backward()
            if xi.grad is None or not torch.isfinite(m).all():
                raise ModelError("MM-BD: the model's margins are not finite or carry no "
                                 "gradient with respect to its input")
            grads.append(xi.grad)
            ms.append(m.detach().cpu())
        return torch.cat(grads), torch.cat(ms)

    def _result(self, stats: np.ndarray, best: torch.Tensor, steps_run: list[int],
                shape: tuple[int, int, int], t0: float) -> ModelScanResult:
        k = int(stats.size)
        calibrated = self.mode == "calibrated"
        logs, nulls = label_p_values(stats, calibrated=calibrated, draws=self.draws,
                                     seed=self.seed)
        top = int(np.argmax(stats))
        faithful_log, _ = label_p_values(stats) if calibrated else (logs, nulls)
        cal_log = (logs[top] if calibrated else
                   calibrated_log_p(float(stats[top]), np.delete(stats, top),
                                    draws=self.draws, seed=self.seed + top)[0])
        log_p = float(logs[top])
        p = math.exp(log_p)
        verdict: Literal["backdoored", "clean"] = "backdoored" if p < self.alpha else "clean"
        label_ps = tuple(math.exp(v) for v in logs)
        targets = (tuple(int(c) for c in np.argsort(logs, kind="stable")
                         if label_ps[int(c)] < self.alpha)
                   if verdict == "backdoored" else ())
        others = np.delete(stats, top)
        evidence = {
            "mode": self.mode,
            "max_margins": [float(v) for v in stats],
            "tested_class": top,
            "statistic": float(stats[top]),
            "null": nulls[top].to_dict() | {"classes": [c for c in range(k) if c != top]},
            "compared": (f"class {top}'s maximum margin {stats[top]:.4g} against a "
                         f"{nulls[top].kind} null fitted to the other {k - 1} classes' "
                         f"(median {float(np.median(others)):.4g}), as the largest of {k}"),
            "faithful_p_value": math.exp(float(faithful_log[top])),
            "calibrated_p_value": math.exp(float(cal_log)),
            "neg_log10_p_value": -float(faithful_log[top]) / math.log(10),
            "alpha": self.alpha,
            "steps_run": steps_run,
            "input_shape": list(shape),
            "data_used": False,
        }
        return ModelScanResult(
            detector=self.name, verdict=verdict, score=float(1.0 - p),
            suspected_targets=targets, seconds=time.perf_counter() - t0, seed=self.seed,
            params=self.get_params(), p_value=p, evidence=evidence,
            images={f"mmbd_max_input_{top}": _image(best[top])},
            label_p_values=label_ps)
