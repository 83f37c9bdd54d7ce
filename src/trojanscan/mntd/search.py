"""A trigger-search probe for MNTD's sum: how cheaply does each class flip, against clean models?

Beyond the paper (Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P
2021). MNTD's queries, and the stamps of :mod:`trojanscan.mntd.stamps`, are fixed before
the model under test is seen; a trigger they do not resemble — a patch that fires on one
source class only — goes unnoticed. This probe searches on the
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

A second readout of the same search, :class:`FlowProbe`, asks *where* each
class went: a backdoor sends a source's stamped anchors to its target, a class clean
models seldom reach from there (sandal from shirt), where a clean model's cheapest way
out leads to a look-alike (T-shirt). Its response is the ``K×K`` matrix of mean class
probabilities on each class's stamped anchors; its raw output is the largest
off-diagonal ``+z`` against the clean reference models' matrices. Both readouts come
from one search (:func:`shared_respond` runs it once per model).

Nothing is trained on shadows: the probes' only fitted values are the reference mean and
standard deviation per class (or class pair). The search is seeded
(:attr:`SearchConfig.seed`), so a model's score is the same on every run on one device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import ModelError, bad_param

#: the bundle entry kind (and detector variant) of the probe
SEARCH = "search"
#: the bundle entry kind (and detector variant) of the flow readout (:class:`FlowProbe`)
SEARCH_FLOW = "search_flow"
#: added to each class pair's reference spread of flows (probabilities), so that a pair
#: no clean model ever takes (spread ~0) does not turn noise into a huge z-score
FLOW_SPREAD_FLOOR = 0.01


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


def search_outcome(model: nn.Module, anchors: torch.Tensor, labels: torch.Tensor,
                   num_classes: int, config: SearchConfig = SearchConfig(),
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The cheapest found cost of leaving each class (``K``) and where its stamped anchors
    went: the mean class probabilities on them at the end of the search (``K×K``, row =
    the anchors' class). A class without anchors gives NaN (cost and row). ``model`` is
    not changed and gets no gradients."""
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

    def costs() -> tuple[torch.Tensor, torch.Tensor]:
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
        probs = F.softmax(out, dim=1)
        own = probs.gather(1, y[:, None])[:, 0]
        leave = -torch.log((1 - own).clamp_min(1e-6))
        cost = (onehot @ leave) / counts.clamp_min(1) + config.mask_cost * m.flatten(1).sum(1)
        return cost, probs

    with torch.enable_grad():
        for _ in range(int(config.steps)):
            ga, gb = torch.autograd.grad(costs()[0].sum(), [a, b])
            a.grad, b.grad = ga, gb
            opt.step()
    with torch.no_grad():
        final, probs = costs()
        flows = (onehot @ probs.detach()) / counts.clamp_min(1)[:, None]
    have = counts > 0
    nan = float("nan")
    return (torch.where(have, final.detach(), torch.full_like(final, nan)),
            torch.where(have[:, None], flows, torch.full_like(flows, nan)))


def low_z(costs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``max_s −(costs_s − mean_s) / std_s`` per row of ``B×K`` costs (NaN costs skipped)."""
    z = (costs - mean) / std
    return (-z).nan_to_num(nan=float("-inf")).max(dim=-1).values


def high_flow_z(flows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``max_{s≠t} (flows_st − mean_st) / std_st`` per row of ``B×K²`` flattened flows
    (NaN rows skipped; the diagonal, a class staying itself, is not read)."""
    k = math.isqrt(flows.shape[-1])
    if k * k != flows.shape[-1]:
        raise bad_param("flows", "K×K values flattened", flows.shape[-1])
    z = (flows - mean) / std
    off = ~torch.eye(k, dtype=torch.bool, device=flows.device).flatten()
    return z[..., off].nan_to_num(nan=float("-inf")).max(dim=-1).values


def target_flow_z(flows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """Per target class ``t``: ``max_{s≠t} (flows_st − mean_st) / std_st`` for one model's
    ``K²`` flattened flows — the per-label evidence behind :func:`high_flow_z` (whose value
    is the largest of these). ``-inf`` for a class no other class's anchors can reach."""
    k = math.isqrt(flows.shape[-1])
    if flows.dim() != 1 or k * k != flows.shape[-1]:
        raise bad_param("flows", "one model's K×K values flattened", tuple(flows.shape))
    z = ((flows - mean) / std).view(k, k).detach().cpu().double()
    z = z.nan_to_num(nan=float("-inf"))
    z.fill_diagonal_(float("-inf"))
    return z.max(dim=0).values.numpy()


class SearchProbe(nn.Module):
    """Per-class trigger search on fixed anchors, read against clean reference models:
    the cost of leaving each class (:class:`FlowProbe`: where it went)."""

    anchors: torch.Tensor
    anchor_labels: torch.Tensor
    ref_mean: torch.Tensor
    ref_std: torch.Tensor
    settings: torch.Tensor
    one_class = True  # calibrated on clean models only, as MNTD's one-class variant
    #: the bundle entry kind
    kind = SEARCH
    #: where a calibration keeps the held-out benign shadows' responses
    responses_key = "benign_costs"

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
        self.register_buffer("ref_mean", torch.zeros(self.response_width))
        self.register_buffer("ref_std", torch.ones(self.response_width))
        self.register_buffer("settings", config.as_tensor())

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], num_classes: int) -> SearchProbe:
        probe = cls(state["anchors"], state["anchor_labels"], num_classes,
                    SearchConfig.from_tensor(state["settings"]))
        probe.load_state_dict(state)
        return probe

    @property
    def response_width(self) -> int:
        """Values per model response: one cost per class."""
        return self.num_classes

    @property
    def config(self) -> SearchConfig:
        return SearchConfig.from_tensor(self.settings)

    @property
    def num_queries(self) -> int:
        """Inputs the model answers per scan: the anchors at every search step."""
        return int(self.anchors.shape[0]) * (int(self.config.steps) + 1)

    def search_key(self) -> str:
        """Equal for two probes whose searches are the same (anchors and settings):
        :func:`shared_respond` runs such a search once per model."""
        h = hashlib.sha256(str(self.num_classes).encode())
        # the settings the search runs with (the stored ones, read back), so that a probe
        # rebuilt from another's config has the same key
        for t in (self.anchors, self.anchor_labels, self.config.as_tensor()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def preview(self) -> torch.Tensor:
        """One anchor per class (the search itself depends on the model)."""
        first = [int(torch.nonzero(self.anchor_labels == c)[0]) for c in
                 torch.unique(self.anchor_labels).tolist()]
        return self.anchors[first]

    def run(self, model: nn.Module, seed: int = 0) -> torch.Tensor:
        """The whole search outcome: ``K`` costs, then the ``K×K`` flows flattened.
        ``seed`` offsets the search's random start from the stored one (0: the start
        the reference statistics were measured with)."""
        config = self.config
        if seed:
            config = replace(config, seed=int(config.seed) + int(seed))
        costs, flows = search_outcome(model, self.anchors, self.anchor_labels,
                                      self.num_classes, config)
        return torch.cat([costs, flows.flatten()])

    def select(self, outcome: torch.Tensor) -> torch.Tensor:
        """This probe's response in outcome(s) of :meth:`run`: the costs."""
        return outcome[..., :self.num_classes]

    def respond(self, model: nn.Module) -> torch.Tensor:
        """The model's response (``response_width`` values)."""
        return self.select(self.run(model))

    def readout(self, responses: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
        """Raw suspicion per row of ``responses`` against these statistics."""
        return low_z(responses, mean, std)

    def spread(self, std: torch.Tensor) -> torch.Tensor:
        """The reference spread as stored (guarded against zero)."""
        return std.clamp_min(1e-3)

    def head(self, responses: torch.Tensor) -> torch.Tensor:
        """Raw suspicion per model from stacked responses ``B×response_width``."""
        return self.readout(responses, self.ref_mean, self.ref_std)

    def forward(self, models: Sequence[nn.Module]) -> torch.Tensor:
        return self.head(torch.stack([self.respond(m) for m in models]))

    def fit_reference(self, responses: torch.Tensor) -> np.ndarray:
        """Set the mean and spread per value to those of reference models' responses
        (``R×response_width``, R ≥ 3) and return each reference model's raw output with
        itself left out of the statistics (so that they spread as an unseen clean
        model's)."""
        responses = responses.to(self.ref_mean)
        r = responses.shape[0]
        if responses.dim() != 2 or responses.shape[1] != self.response_width or r < 3:
            raise bad_param("reference responses", f"R×{self.response_width} with R >= 3",
                            tuple(responses.shape))
        with torch.no_grad():
            self.ref_mean.copy_(responses.nanmean(0).nan_to_num(0.0))
            self.ref_std.copy_(self.spread(_nanstd(responses)))
            loo = []
            for i in range(r):
                rest = torch.cat([responses[:i], responses[i + 1:]])
                loo.append(float(self.readout(responses[i:i + 1],
                                              rest.nanmean(0).nan_to_num(0.0),
                                              self.spread(_nanstd(rest)))[0]))
        return np.asarray(loo, dtype=np.float64)


class FlowProbe(SearchProbe):
    """The same search read for where each class's stamped anchors went: the largest
    off-diagonal z-score of the ``K×K`` mean probabilities against clean reference
    models (a backdoor sends a source to a class clean models seldom reach from it)."""

    kind = SEARCH_FLOW
    responses_key = "benign_flows"

    @classmethod
    def from_probe(cls, probe: SearchProbe) -> FlowProbe:
        """A flow readout of ``probe``'s search (same anchors and settings; not yet read
        against reference models)."""
        return cls(probe.anchors.detach().cpu(), probe.anchor_labels.detach().cpu(),
                   probe.num_classes, probe.config)

    @property
    def response_width(self) -> int:
        return self.num_classes * self.num_classes

    def select(self, outcome: torch.Tensor) -> torch.Tensor:
        return outcome[..., self.num_classes:]

    def readout(self, responses: torch.Tensor, mean: torch.Tensor,
                std: torch.Tensor) -> torch.Tensor:
        return high_flow_z(responses, mean, std)

    def spread(self, std: torch.Tensor) -> torch.Tensor:
        return std + FLOW_SPREAD_FLOOR


def shared_respond(probe: SearchProbe, model: nn.Module,
                   memo: MutableMapping[str, torch.Tensor], *, seed: int = 0,
                   ) -> torch.Tensor:
    """``probe.respond(model)`` (the search's start offset by ``seed``), running the
    search only if no probe with the same search has run it on this ``model`` with
    this seed before (``memo``: one per model)."""
    key = f"{probe.search_key()}:{int(seed)}"
    if key not in memo:
        memo[key] = probe.run(model, seed)
    return probe.select(memo[key])


def respond_raw(meta: Any, model: nn.Module, memo: MutableMapping[str, torch.Tensor],
                *, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A bundle entry's responses to ``model`` and its raw output, read the way the detector
    reads a suspect model (a search probe searches from ``seed``, sharing the search through
    ``memo``; nothing is refitted)."""
    with torch.no_grad():
        responses = (shared_respond(meta, model, memo, seed=seed)
                     if isinstance(meta, SearchProbe) else meta.respond(model))
        raw = float(meta.head(responses.unsqueeze(0))[0])
    return responses, raw


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    mean = x.nanmean(0, keepdim=True)
    n = (~x.isnan()).sum(0).clamp_min(2)
    return (((x - mean) ** 2).nansum(0) / (n - 1)).sqrt().nan_to_num(1.0)


def model_costs(probe: SearchProbe, models: Sequence[nn.Module],
                memos: Sequence[MutableMapping[str, torch.Tensor]] | None = None,
                ) -> torch.Tensor:
    """Stacked responses (``R×response_width``: per-class costs, or a
    :class:`FlowProbe`'s flows) of ``models``; with ``memos`` (one per model, see
    :func:`shared_respond`) a search already run on a model is not run again."""
    if not models:
        raise bad_param("models", "at least one model", 0)
    if memos is not None and len(memos) != len(models):
        raise bad_param("memos", f"one per model ({len(models)})", len(memos))
    if memos is None:
        return torch.stack([probe.respond(m).detach().cpu() for m in models])
    return torch.stack([shared_respond(probe, m, memo).detach().cpu()
                        for m, memo in zip(models, memos)])


def _entry_calibration(probe: SearchProbe, benign_responses: torch.Tensor, *, fpr: float,
                       normalised_on: str, count: int) -> dict[str, Any]:
    from .calibration import threshold_at_fpr

    benign_raw = probe.head(benign_responses).numpy().astype(np.float64)
    return {"kind": probe.kind, "normalised_on": normalised_on, "normalised_count": count,
            probe.responses_key: [[round(float(v), 6) for v in row]
                                  for row in benign_responses],
            "benign_raw": [round(float(v), 6) for v in benign_raw],
            "threshold": float(threshold_at_fpr(benign_raw, fpr)), "fpr": fpr}


def fit_search_probes(images: torch.Tensor, image_labels: torch.Tensor, num_classes: int, *,
                      normalise_on: Sequence[nn.Module],
                      held_out_benign: Sequence[nn.Module],
                      config: SearchConfig = SearchConfig(), seed: int = 0,
                      fpr: float = 0.05, flow: bool = True,
                      ) -> dict[str, tuple[SearchProbe, dict[str, Any]]]:
    """The search probe (and with ``flow`` its :class:`FlowProbe` readout, from the same
    searches), by entry kind: anchors drawn from the defender's ``images``, responses
    read against ``normalise_on`` (clean models: the benign training shadows until
    :func:`with_reference_models` replaces them), each with its bundle calibration: the
    ``held_out_benign`` shadows' responses and raw outputs, and the threshold at
    ``fpr``."""
    from .stamps import pick_anchors

    config.validate()
    if len(normalise_on) < 3 or not held_out_benign:
        raise bad_param("models", "at least 3 clean models to normalise on and 1 held-out "
                        "benign shadow", (len(normalise_on), len(held_out_benign)))
    gen = torch.Generator().manual_seed(int(seed))
    anchors, labels = pick_anchors(images, image_labels, config.anchors_per_class, gen)
    probe = SearchProbe(anchors, labels, num_classes, config)
    probes = [probe, FlowProbe.from_probe(probe)] if flow else [probe]
    norm_memos: list[dict[str, torch.Tensor]] = [{} for _ in normalise_on]
    held_memos: list[dict[str, torch.Tensor]] = [{} for _ in held_out_benign]
    out = {}
    for p in probes:
        p.fit_reference(model_costs(p, normalise_on, norm_memos))
        out[p.kind] = (p, _entry_calibration(
            p, model_costs(p, held_out_benign, held_memos), fpr=fpr,
            normalised_on="benign_shadows", count=len(normalise_on)))
    return out


def with_reference_models(probe: SearchProbe, calibration: dict[str, Any],
                          models: Sequence[nn.Module],
                          memos: Sequence[MutableMapping[str, torch.Tensor]] | None = None,
                          ) -> tuple[SearchProbe, dict[str, Any]]:
    """A copy of ``probe`` read against clean reference ``models`` and its calibration:
    the held-out benign shadows' raw outputs recomputed from their stored responses, and
    ``reference_raw``, each reference model's output with itself left out. ``memos``
    (one per model) share the searches between probes of the same search."""
    import copy

    key = probe.responses_key
    if key not in calibration:
        raise ModelError(f"MNTD: the {probe.kind} entry's calibration has no {key}")
    new = copy.deepcopy(probe)
    loo = new.fit_reference(model_costs(new, models, memos))
    cal = {**calibration, **_entry_calibration(
        new, torch.tensor(calibration[key], dtype=torch.float32),
        fpr=float(calibration.get("fpr", 0.05)), normalised_on="reference_models",
        count=len(models))}
    cal["reference_raw"] = [round(float(v), 6) for v in loo]
    return new, cal
