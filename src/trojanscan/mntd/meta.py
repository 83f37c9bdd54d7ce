"""MNTD's meta-classifier with query tuning, without it, and its one-class variant.

Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans Using Meta Neural Analysis",
IEEE S&P 2021, sections 4.3–4.4. A set of ``Q`` query inputs (10 in the paper) is fed
to the model under test; its ``Q×K`` outputs are concatenated and passed to a small
classifier with one hidden layer of 20 ReLU units:

* ``qt`` (query tuning, the paper's main method): the queries are parameters and are
  trained jointly with the classifier by back-propagating BCE through each shadow model
  (benign = 0, jumbo = 1); Adam, lr 1e-3, the epoch with the best validation AUROC kept;
* ``no_qt``: the same with the queries frozen at their random start;
* ``one_class``: trained on benign shadows only (no attack assumed) with the one-class
  neural-network objective ``½‖w‖² + ½‖V‖² + mean(relu(r − ⟨w, relu(V·o)⟩))/ν − r``, ``r``
  re-set to the ν-quantile (ν = 0.1) of the benign scores after every step; queries
  tuned as well. Its raw suspicion is ``r − ⟨w, h⟩`` (higher = less like the benign ones).

Outputs (``response``): raw ``logits`` as the reference code (default); ``softmax``,
``zscore`` (per-query standardised logits), ``scaled`` (per-query centred logits divided
by their root-mean-square over all queries: one scale per model) and ``sorted`` (softmax
with the classes put
in order of their mean probability over the queries, so the meta-classifier need not
learn every possible target class separately) are options (measured in
benchmarks/notes/mntd_development.md) — logit scale depends on how long and on how
much data a model was trained, and shadows see 2% of the data.
Queries start as Gaussian noise with the defender data's pixel mean and standard
deviation (reference code) and are not clipped (``query_range="unit"`` keeps them in
[0, 1]). Raw outputs are higher for more suspicious models;
:mod:`trojanscan.mntd.calibration` turns them into scores.
Where it fails: a backdoor unlike anything in the jumbo distribution and invisible in
the outputs on the tuned queries (the paper's adaptive attacks), and models whose
output scale differs a lot from the shadows' (e.g. temperature-scaled logits).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import ModelError, bad_param
from ..progress import progress
from ..utils import pick_device, seed_everything
from .calibration import auroc

VARIANTS = ("qt", "no_qt", "one_class")
RESPONSES = ("logits", "softmax", "zscore", "scaled", "sorted")
QUERY_RANGES = ("free", "unit")
QUERY_INITS = ("noise", "data")
#: the ensemble of query-tuned members started from the defender's images (pipeline.py)
DATA_ENSEMBLE = "qt_data"
Variant = Literal["qt", "no_qt", "one_class"]


@dataclass(frozen=True)
class MetaConfig:
    """Hyper-parameters of the meta-classifier (defaults: the paper's)."""

    variant: Variant = "qt"
    num_queries: int = 10
    hidden: int = 20
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 1  # shadow models per optimiser step (reference: 1)
    nu: float = 0.1  # one-class: share of benign shadows allowed outside
    response: Literal["logits", "softmax", "zscore", "scaled", "sorted"] = "logits"
    query_range: Literal["free", "unit"] = "free"  # "unit": queries kept in [0, 1]
    query_init: Literal["noise", "data"] = "noise"  # "data": start from defender images
    query_eps: float | None = None  # queries kept within this L∞ distance of their start

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise bad_param("variant", VARIANTS, self.variant)
        if self.response not in RESPONSES:
            raise bad_param("response", RESPONSES, self.response)
        if self.query_range not in QUERY_RANGES:
            raise bad_param("query_range", QUERY_RANGES, self.query_range)
        if self.query_init not in QUERY_INITS:
            raise bad_param("query_init", QUERY_INITS, self.query_init)
        if self.query_eps is not None and not self.query_eps > 0:
            raise bad_param("query_eps", "a float > 0 or None", self.query_eps)
        for name in ("num_queries", "hidden", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise bad_param(name, "an integer >= 1", getattr(self, name))
        if not self.lr > 0:
            raise bad_param("meta lr", "a float > 0", self.lr)
        if not 0 < self.nu < 1:
            raise bad_param("nu", "a float in (0, 1)", self.nu)


class MetaClassifier(nn.Module):
    """Queries plus a one-hidden-layer classifier over the model's responses."""

    r: torch.Tensor  # one-class radius (a buffer)

    def __init__(self, input_shape: Sequence[int], num_classes: int, *, num_queries: int = 10,
                 hidden: int = 20, one_class: bool = False,
                 response: str = "logits") -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.one_class = bool(one_class)
        self.response = response
        self.queries = nn.Parameter(torch.zeros(num_queries, *self.input_shape))
        self.fc = nn.Linear(num_queries * self.num_classes, hidden)
        if self.one_class:
            self.w = nn.Parameter(torch.randn(hidden) * 1e-3)
            self.register_buffer("r", torch.tensor(1.0))
        else:
            self.out = nn.Linear(hidden, 1)

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.fc.out_features)

    def preview(self) -> torch.Tensor:
        """What to show of the learned queries: the queries themselves (``Q×C×H×W``)."""
        return self.queries.detach()

    def respond(self, model: nn.Module) -> torch.Tensor:
        """The model's ``Q×K`` outputs on the queries (gradients flow to the queries)."""
        out = model(self.queries)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise ModelError(f"MNTD: the model must map N×C×H×W to N×K logits, got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        if out.shape != (self.num_queries, self.num_classes):
            want = (self.num_queries, self.num_classes)
            raise ModelError(f"MNTD: expected outputs of shape {want} on the queries, got "
                             f"{tuple(out.shape)}")
        return normalise_responses(out, self.response)

    def embed(self, responses: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(responses.reshape(responses.shape[0], -1)))

    def benignness(self, responses: torch.Tensor) -> torch.Tensor:
        """One-class only: ``⟨w, h⟩`` per model (higher = more like the benign shadows)."""
        return self.embed(responses) @ self.w

    def head(self, responses: torch.Tensor) -> torch.Tensor:
        """Raw suspicion per model from stacked responses ``B×Q×K`` (higher = trojaned)."""
        if self.one_class:
            return self.r - self.benignness(responses)
        return self.out(self.embed(responses)).squeeze(1)

    def forward(self, models: Sequence[nn.Module]) -> torch.Tensor:
        return self.head(torch.stack([self.respond(m) for m in models]))


def normalise_responses(out: torch.Tensor, response: str) -> torch.Tensor:
    """``logits`` as they are (reference code), ``softmax`` probabilities, or ``zscore``:
    each query's logits minus their mean over classes, divided by their standard
    deviation — invariant to the logits' shift and scale (temperature); or ``scaled``:
    the same centred logits divided by one root-mean-square over all queries and classes —
    invariant to the model's overall logit scale, but keeping how confident one query is
    relative to the others. ``out`` is ``Q×K`` (or ``…×Q×K``)."""
    if response == "softmax":
        return F.softmax(out, dim=-1)
    if response in ("zscore", "scaled"):
        centred = out - out.mean(dim=-1, keepdim=True)
        dims = (-1,) if response == "zscore" else (-2, -1)
        return centred / (centred.pow(2).mean(dim=dims, keepdim=True).sqrt() + 1e-6)
    if response == "sorted":
        prob = F.softmax(out, dim=-1)
        order = prob.mean(dim=-2, keepdim=True).argsort(dim=-1, descending=True)
        return prob.gather(-1, order.expand_as(prob))
    return out


def init_queries(meta: MetaClassifier, mean: float, std: float, gen: torch.Generator,
                 unit: bool = False, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> None:
    """Gaussian queries with the data's pixel mean and std (reference code), or (with
    ``images``, N×C×H×W) ``num_queries`` of those images drawn without replacement —
    with ``labels``, the classes taken in turn so that every class is among the first
    ``K`` queries; clipped to [0, 1] when ``unit``."""
    with torch.no_grad():
        noise = torch.randn(meta.queries.shape, generator=gen)
        if images is None:
            meta.queries.copy_(noise * std + mean)
        else:
            if tuple(images.shape[1:]) != tuple(meta.queries.shape[1:]):
                raise bad_param("query images", f"images of shape "
                                f"{tuple(meta.queries.shape[1:])}", tuple(images.shape))
            idx = _pick_queries(meta.num_queries, images.shape[0], labels, gen)
            meta.queries.copy_(images[idx].float())
        if unit:
            meta.queries.clamp_(0.0, 1.0)


def _pick_queries(q: int, n: int, labels: torch.Tensor | None,
                  gen: torch.Generator) -> torch.Tensor:
    """``q`` distinct indices into ``n`` images: a random draw, or with ``labels`` one per
    class in turn (classes in random order, images in random order within each)."""
    if not 1 <= q <= n or (labels is not None and len(labels) != n):
        raise bad_param("query images", f"at least {q} images (with one label each)",
                        f"{n} images, {None if labels is None else len(labels)} labels")
    perm = torch.randperm(n, generator=gen)
    if labels is None:
        return perm[:q]
    y = labels[perm]
    pools = [perm[y == c].tolist() for c in torch.unique(y).tolist()]
    order = torch.randperm(len(pools), generator=gen).tolist()
    pools = [pools[i] for i in order]
    picked: list[int] = []
    depth = 0
    while len(picked) < q:
        for pool in pools:
            if depth < len(pool) and len(picked) < q:
                picked.append(pool[depth])
        depth += 1
    return torch.tensor(picked)


@torch.no_grad()
def raw_scores(meta: nn.Module, models: Sequence[nn.Module], *,
               batch_size: int = 64) -> np.ndarray:
    """Raw suspicion of each model (no gradients); ``meta``: a meta-classifier whose
    forward maps a list of models to their raw outputs (this module's, or
    :class:`trojanscan.mntd.stamps.StampMeta`)."""
    meta.eval()
    out = [meta(models[i:i + batch_size]).detach().cpu()
           for i in range(0, len(models), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@dataclass
class FitResult:
    """A trained meta-classifier and how its training went."""

    meta: MetaClassifier
    config: MetaConfig
    best_epoch: int
    val_auroc: float | None
    history: list[dict[str, float]] = field(default_factory=list)


class BestEpoch:
    """Keeps the meta-classifier's state at the epoch with the best AUROC on held-out
    shadow models (reference code); does nothing without held-out models of both labels."""

    def __init__(self, val_models: Sequence[nn.Module], val_labels: Sequence[int],
                 epochs: int, enabled: bool = True) -> None:
        self.models = list(val_models)
        self.labels = np.asarray(val_labels, dtype=np.int64)
        self.enabled = enabled and len(self.models) > 0 and len(set(self.labels.tolist())) == 2
        self.state: dict[str, torch.Tensor] | None = None
        self.auc, self.epoch = -1.0, epochs

    def end_epoch(self, meta: nn.Module, epoch: int, record: dict[str, float]) -> None:
        """Score the held-out shadows after ``epoch`` (into ``record``), keep it if best."""
        if not self.enabled:
            return
        auc = auroc(self.labels, raw_scores(meta, self.models))
        record["val_auroc"] = auc
        if auc > self.auc:
            self.auc, self.epoch = auc, epoch
            self.state = copy.deepcopy(meta.state_dict())

    def finish(self, meta: nn.Module) -> float | None:
        """Load the best state (if any) and freeze ``meta`` on the CPU in eval mode;
        returns the best held-out AUROC (``None`` without selection)."""
        if self.state is not None:
            meta.load_state_dict(self.state)
        meta.eval().cpu()
        for p in meta.parameters():
            p.requires_grad_(False)
        return self.auc if self.enabled else None


def _frozen(model: nn.Module, dev: torch.device) -> nn.Module:
    """A shadow model on ``dev`` in eval mode with its parameters frozen (in place)."""
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _param_groups(meta: MetaClassifier, variant: str) -> list[nn.Parameter]:
    if variant == "no_qt":
        return [p for n, p in meta.named_parameters() if n != "queries"]
    return list(meta.parameters())


def fit_meta(models: Sequence[nn.Module], labels: Sequence[int], *, config: MetaConfig,
             input_shape: Sequence[int], num_classes: int,
             val_models: Sequence[nn.Module] = (), val_labels: Sequence[int] = (),
             query_mean: float = 0.5, query_std: float = 0.25, seed: int = 0,
             device: str | torch.device | None = None, description: str = "meta-classifier",
             query_images: torch.Tensor | None = None,
             query_labels: torch.Tensor | None = None) -> FitResult:
    """Train the meta-classifier of ``config.variant`` on shadow models.

    ``labels``: 1 = trojaned (jumbo), 0 = benign; the one-class variant uses only the
    benign ones. With validation models of both labels, the epoch with the best AUROC
    is kept (reference code); otherwise the last epoch. ``query_images`` (and, to take
    the classes in turn, ``query_labels``): the defender's images the queries start from
    when ``config.query_init == "data"``.
    """
    config.validate()
    one_class = config.variant == "one_class"
    y_all = np.asarray(labels, dtype=np.int64)
    if len(models) != len(y_all):
        raise bad_param("labels", f"one label per model ({len(models)})", len(y_all))
    if one_class:
        models = [m for m, y in zip(models, y_all) if y == 0]
        y_all = np.zeros(len(models), dtype=np.int64)
    elif len(set(y_all.tolist())) < 2:
        raise bad_param("labels", "benign (0) and trojaned (1) shadow models", sorted(set(y_all)))
    if not models:
        raise bad_param("models", "at least one benign shadow model", 0)
    gen = seed_everything(seed)
    dev = pick_device(device)
    meta = MetaClassifier(input_shape, num_classes, num_queries=config.num_queries,
                          hidden=config.hidden, one_class=one_class, response=config.response)
    unit = config.query_range == "unit"
    data_init = config.query_init == "data"
    if data_init and query_images is None:
        raise bad_param("query_images", "the defender's images (query_init='data')", None)
    init_queries(meta, query_mean, query_std, gen, unit, query_images if data_init else None,
                 query_labels if data_init else None)
    meta.to(dev)
    query_start = meta.queries.detach().clone()
    models = [_frozen(m, dev) for m in models]
    val_models = [_frozen(m, dev) for m in val_models]
    best = BestEpoch(val_models, val_labels, config.epochs, enabled=not one_class)
    opt = torch.optim.Adam(_param_groups(meta, config.variant), lr=config.lr)
    y_t = torch.as_tensor(y_all, dtype=torch.float32, device=dev)
    history: list[dict[str, float]] = []
    n = len(models)
    steps = config.epochs * ((n + config.batch_size - 1) // config.batch_size)
    with progress(description, steps) as bar:
        for epoch in range(1, config.epochs + 1):
            meta.train()
            perm = torch.randperm(n, generator=gen).tolist()
            seen: list[float] = []
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = perm[start:start + config.batch_size]
                resp = torch.stack([meta.respond(models[i]) for i in idx])
                if one_class:
                    s = meta.benignness(resp)
                    reg = 0.5 * (meta.w ** 2).sum() + 0.5 * sum(
                        (p ** 2).sum() for p in meta.fc.parameters())
                    loss = reg + F.relu(meta.r - s).mean() / config.nu - meta.r
                else:
                    loss = F.binary_cross_entropy_with_logits(meta.head(resp), y_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if config.query_eps is not None:
                    with torch.no_grad():
                        meta.queries.copy_(torch.minimum(torch.maximum(
                            meta.queries, query_start - config.query_eps),
                            query_start + config.query_eps))
                if unit:
                    with torch.no_grad():
                        meta.queries.clamp_(0.0, 1.0)
                total += float(loss.detach()) * len(idx)
                if one_class:
                    seen.extend(s.detach().cpu().tolist())
                    meta.r.fill_(float(np.quantile(seen, config.nu)))
                bar.advance()
            record = {"epoch": float(epoch), "loss": total / n}
            best.end_epoch(meta, epoch, record)
            history.append(record)
    val_auroc = best.finish(meta)
    return FitResult(meta, config, best.epoch, val_auroc, history)
