"""A trigger-search probe for MNTD's sum: how cheaply does each class flip, against clean models?

Beyond the paper (Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P
2021). MNTD's queries, and the stamps of :mod:`trojanscan.mntd.stamps`, are fixed before
the model under test is seen; a trigger they do not resemble — a patch that fires on one
source class only — goes unnoticed (docs/benchmarks/mntd.md). This probe searches on the
model itself, as Neural Cleanse does (Wang et al., IEEE S&P 2019), but per *source*
class and without a target:

* for every class ``s``, a mask ``m_s = σ(a_s)`` (1×H×W) and a pattern ``p_s = σ(b_s)``
  (C×H×W) are optimised (Adam, :attr:`SearchConfig.steps` steps from a faint random
  mask; the defaults keep one scan of a small CNN under a second on one CPU thread) so
  that the stamped anchors of class ``s`` (``(1 − m_s)·x + m_s·p_s``) leave it; the
  cost is ``mean(−log(1 − P(s | stamped x))) + λ·‖m_s‖₁``;
* the response is the ``K`` final costs: a backdoor (all-to-one, all-to-all or
  source-specific) makes some class cheap to leave;
* classes differ in how cheaply they leave on clean models too (shirt ↔ T-shirt), so
  each cost is read as a z-score against clean *reference* models' costs
  (:meth:`SearchProbe.fit_reference`); the raw output is the largest ``−z``.

Nothing is trained on shadows: the probe's only fitted values are the reference mean and
standard deviation per class. The search is seeded (:attr:`SearchConfig.seed`), so a
model's score is the same on every run on one device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import ModelError, bad_param

#: the bundle entry kind (and detector variant) of the probe
SEARCH = "search"


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of the per-class trigger search."""

    anchors_per_class: int = 5
    steps: int = 40
    lr: float = 0.2
    mask_cost: float = 0.01  # λ: the cost of one fully masked pixel
    mask_init: float = -3.0  # initial mask logit (σ(−3) ≈ 0.05) ...
    init_noise: float = 0.5  # ... plus N(0, init_noise²)
    seed: int = 0

    def validate(self) -> None:
        for name in ("anchors_per_class", "steps"):
            if int(getattr(self, name)) < 1:
                raise bad_param(name, "an integer >= 1", getattr(self, name))
        for name in ("lr", "mask_cost"):
            if not float(getattr(self, name)) > 0:
                raise bad_param(name, "a float > 0", getattr(self, name))
        if not float(self.init_noise) >= 0:
            raise bad_param("init_noise", "a float >= 0", self.init_noise)
        for name in ("anchors_per_class", "steps", "seed"):  # stored as float32: exact
            if not 0 <= int(getattr(self, name)) < 2**24:
                raise bad_param(name, "an integer in [0, 2**24)", getattr(self, name))

    def as_tensor(self) -> torch.Tensor:
        # float32, as a bundle stores it (and as every device holds it)
        return torch.tensor([float(getattr(self, f.name)) for f in fields(self)],
                            dtype=torch.float32)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> SearchConfig:
        values = t.tolist()
        if len(values) != len(fields(cls)):
            raise ValueError(f"a search config holds {len(fields(cls))} values, got "
                             f"{len(values)}")
        # bundles store tensors as float32: 7 significant digits are what survives
        kw = {f.name: (round(v) if f.type in (int, "int") else float(f"{v:.7g}"))
              for f, v in zip(fields(cls), values)}
        return cls(**kw)  # type: ignore[arg-type]


def source_costs(model: nn.Module, anchors: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, config: SearchConfig = SearchConfig()) -> torch.Tensor:
    """The cheapest found cost of leaving each class (``K``; NaN for a class without
    anchors). ``model`` is not changed and gets no gradients."""
    k = int(num_classes)
    dev = anchors.device
    c, h, w = anchors.shape[1:]
    gen = torch.Generator().manual_seed(int(config.seed))
    a = (config.mask_init + config.init_noise * torch.randn(k, 1, h, w, generator=gen)
         ).to(dev).requires_grad_()
    b = torch.zeros(k, c, h, w, device=dev).requires_grad_()
    y = labels.long()
    onehot = F.one_hot(y, k).to(anchors.dtype).T  # K×N
    counts = onehot.sum(1)
    opt = torch.optim.Adam([a, b], lr=float(config.lr))

    def costs() -> torch.Tensor:
        m = torch.sigmoid(a)
        # each anchor's class's mask and pattern, gathered (and scattered back in the
        # backward pass) by matmuls rather than indexing, whose CUDA backward is not
        # deterministic
        m_y = (onehot.T @ m.flatten(1)).view(-1, 1, h, w)
        p_y = (onehot.T @ torch.sigmoid(b).flatten(1)).view(-1, c, h, w)
        x = (1 - m_y) * anchors + m_y * p_y
        out = model(x)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(y), k):
            raise ModelError(f"MNTD: expected outputs of shape {(len(y), k)} on the search "
                             f"anchors, got {tuple(getattr(out, 'shape', ()))}")
        own = F.softmax(out, dim=1).gather(1, y[:, None])[:, 0]
        leave = -torch.log((1 - own).clamp_min(1e-6))
        return (onehot @ leave) / counts.clamp_min(1) + config.mask_cost * m.flatten(1).sum(1)

    with torch.enable_grad():
        for _ in range(int(config.steps)):
            ga, gb = torch.autograd.grad(costs().sum(), [a, b])
            a.grad, b.grad = ga, gb
            opt.step()
    with torch.no_grad():
        final = costs().detach()
    return torch.where(counts > 0, final, torch.full_like(final, float("nan")))


def low_z(costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``max_s −(costs_s − mean_s) / std_s`` per row of ``B×K`` costs (NaN costs skipped)."""
    z = (costs - mean) / std
    return (-z).nan_to_num(nan=float("-inf")).max(dim=-1).values


class SearchProbe(nn.Module):
    """Per-class trigger search on fixed anchors, read against clean reference models."""

    anchors: torch.Tensor
    anchor_labels: torch.Tensor
    ref_mean: torch.Tensor
    ref_std: torch.Tensor
    settings: torch.Tensor
    one_class = True  # calibrated on clean models only, as MNTD's one-class variant

    def __init__(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, num_classes: int,
                 config: SearchConfig = SearchConfig()) -> None:
        super().__init__()
        if anchors.dim() != 4 or anchor_labels.shape != (anchors.shape[0],):
            raise bad_param("anchors", "N×C×H×W images with N labels",
                            f"{tuple(anchors.shape)} with {tuple(anchor_labels.shape)}")
        config.validate()
        self.num_classes = int(num_classes)
        c, h, w = anchors.shape[1:]
        self.input_shape = (int(c), int(h), int(w))
        self.register_buffer("anchors", anchors.float().clone())
        self.register_buffer("anchor_labels", anchor_labels.long().clone())
        self.register_buffer("ref_mean", torch.zeros(self.num_classes))
        self.register_buffer("ref_std", torch.ones(self.num_classes))
        self.register_buffer("settings", config.as_tensor())

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], num_classes: int) -> SearchProbe:
        probe = cls(state["anchors"], state["anchor_labels"], num_classes,
                    SearchConfig.from_tensor(state["settings"]))
        probe.load_state_dict(state)
        return probe

    @property
    def config(self) -> SearchConfig:
        return SearchConfig.from_tensor(self.settings)

    @property
    def num_queries(self) -> int:
        """Inputs the model answers per scan: the anchors at every search step."""
        return int(self.anchors.shape[0]) * (int(self.config.steps) + 1)

    def preview(self) -> torch.Tensor:
        """One anchor per class (the search itself depends on the model)."""
        first = [int(torch.nonzero(self.anchor_labels == c)[0]) for c in
                 torch.unique(self.anchor_labels).tolist()]
        return self.anchors[first]

    def respond(self, model: nn.Module) -> torch.Tensor:
        """The model's per-class search costs (``K``)."""
        return source_costs(model, self.anchors, self.anchor_labels, self.num_classes,
                            self.config)

    def head(self, responses: torch.Tensor) -> torch.Tensor:
        """Raw suspicion per model from stacked costs ``B×K``."""
        return low_z(responses, self.ref_mean, self.ref_std)

    def forward(self, models: Sequence[nn.Module]) -> torch.Tensor:
        return self.head(torch.stack([self.respond(m) for m in models]))

    def fit_reference(self, costs: torch.Tensor) -> np.ndarray:
        """Set the per-class mean and standard deviation to those of reference models'
        costs (``R×K``, R ≥ 3) and return each reference model's raw output with itself
        left out of the statistics (so that they spread as an unseen clean model's)."""
        costs = costs.to(self.ref_mean)
        r = costs.shape[0]
        if costs.dim() != 2 or costs.shape[1] != self.num_classes or r < 3:
            raise bad_param("reference costs", f"R×{self.num_classes} with R >= 3",
                            tuple(costs.shape))
        with torch.no_grad():
            self.ref_mean.copy_(costs.nanmean(0).nan_to_num(0.0))
            self.ref_std.copy_(_nanstd(costs).clamp_min(1e-3))
            loo = []
            for i in range(r):
                rest = torch.cat([costs[:i], costs[i + 1:]])
                loo.append(float(low_z(costs[i:i + 1], rest.nanmean(0).nan_to_num(0.0),
                                       _nanstd(rest).clamp_min(1e-3))[0]))
        return np.asarray(loo, dtype=np.float64)


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    mean = x.nanmean(0, keepdim=True)
    n = (~x.isnan()).sum(0).clamp_min(2)
    return (((x - mean) ** 2).nansum(0) / (n - 1)).sqrt().nan_to_num(1.0)


def model_costs(probe: SearchProbe, models: Sequence[nn.Module]) -> torch.Tensor:
    """Stacked per-class costs (``R×K``) of ``models``."""
    if not models:
        raise bad_param("models", "at least one model", 0)
    return torch.stack([probe.respond(m).detach().cpu() for m in models])


def _entry_calibration(probe: SearchProbe, benign_costs: torch.Tensor, *, fpr: float,
                       normalised_on: str, count: int) -> dict[str, Any]:
    from .calibration import threshold_at_fpr

    benign_raw = probe.head(benign_costs).numpy().astype(np.float64)
    return {"kind": SEARCH, "normalised_on": normalised_on, "normalised_count": count,
            "benign_costs": [[round(float(v), 6) for v in row] for row in benign_costs],
            "benign_raw": [round(float(v), 6) for v in benign_raw],
            "threshold": float(threshold_at_fpr(benign_raw, fpr)), "fpr": fpr}


def fit_search_probe(images: torch.Tensor, image_labels: torch.Tensor, num_classes: int, *,
                     normalise_on: Sequence[nn.Module], held_out_benign: Sequence[nn.Module],
                     config: SearchConfig = SearchConfig(), seed: int = 0,
                     fpr: float = 0.05) -> tuple[SearchProbe, dict[str, Any]]:
    """A probe whose anchors are drawn from the defender's ``images`` and whose costs are
    read against ``normalise_on`` (clean models: the benign training shadows until
    :func:`with_reference_models` replaces them), with its bundle calibration: the
    ``held_out_benign`` shadows' costs and raw outputs, and the threshold at ``fpr``."""
    from .stamps import pick_anchors

    config.validate()
    if len(normalise_on) < 3 or not held_out_benign:
        raise bad_param("models", "at least 3 clean models to normalise on and 1 held-out "
                        "benign shadow", (len(normalise_on), len(held_out_benign)))
    gen = torch.Generator().manual_seed(int(seed))
    anchors, labels = pick_anchors(images, image_labels, config.anchors_per_class, gen)
    probe = SearchProbe(anchors, labels, num_classes, config)
    probe.fit_reference(model_costs(probe, normalise_on))
    cal = _entry_calibration(probe, model_costs(probe, held_out_benign), fpr=fpr,
                             normalised_on="benign_shadows", count=len(normalise_on))
    return probe, cal


def with_reference_models(probe: SearchProbe, calibration: dict[str, Any],
                          models: Sequence[nn.Module]) -> tuple[SearchProbe, dict[str, Any]]:
    """A copy of ``probe`` read against clean reference ``models`` and its calibration:
    the held-out benign shadows' raw outputs recomputed from their stored costs, and
    ``reference_raw``, each reference model's output with itself left out."""
    import copy

    if "benign_costs" not in calibration:
        raise ModelError("MNTD: the search entry's calibration has no benign_costs")
    new = copy.deepcopy(probe)
    loo = new.fit_reference(model_costs(new, models))
    cal = {**calibration, **_entry_calibration(
        new, torch.tensor(calibration["benign_costs"], dtype=torch.float32),
        fpr=float(calibration.get("fpr", 0.05)), normalised_on="reference_models",
        count=len(models))}
    cal["reference_raw"] = [round(float(v), 6) for v in loo]
    return new, cal
