"""A stamp-probing meta-classifier: MNTD whose queries are learned stamps on clean images.

Beyond the paper (Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P
2021). MNTD's meta-classifier reads a model's raw outputs on a few learned query inputs.
On models trained on other data than the shadows those outputs mostly tell *how* a
model was trained (its logit scale, what it memorised), not whether it has a backdoor:
held-out shadows are separated almost perfectly, real models much less well.
This variant asks a question whose answer does not depend on
the model's own clean behaviour:

* the queries are ``J`` learned *stamps* — a mask ``m = σ(a)`` (1×H×W) and a pattern
  ``p = σ(b)`` (C×H×W), as in Neural Cleanse's trigger parametrisation, so a stamp can be
  a full-intensity patch or a faint whole-image blend — applied to ``N`` fixed clean
  anchor images of the defender's (``(1 − m)·x + m·p``), stratified over the classes;
* the response is the *change* in the model's class probabilities that each stamp
  causes on each anchor (``softmax(f(stamped)) − softmax(f(x))``), so what the model
  outputs on clean inputs cancels out, and probabilities are bounded whatever the logit
  scale;
* the features do not depend on which class is the target: per stamp, the classes'
  mean gains sorted in decreasing order (an all-to-one backdoor: one class gains on every
  anchor), and per source class the largest gain of another class on that class's
  anchors, sorted (a source-specific backdoor: one source flips; all-to-all: every
  source flips to a different class).

Stamps and the one-hidden-layer classifier are trained jointly with BCE on the benign and
jumbo shadows, as MNTD's query tuning is; the epoch with the best AUROC on the held-out
shadows is kept. Raw outputs are higher for more suspicious models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import ModelError, bad_param
from ..progress import progress
from ..utils import pick_device, seed_everything
from .meta import BestEpoch

#: the bundle entry kind, and ensemble name, of stamp-probing meta-classifiers
STAMP = "stamp"


@dataclass(frozen=True)
class StampConfig:
    """Hyper-parameters of the stamp-probing meta-classifier."""

    num_stamps: int = 8
    anchors_per_class: int = 4
    hidden: int = 20
    epochs: int = 20
    lr: float = 1e-3  # the classifier's (MNTD's)
    stamp_lr: float = 0.05  # the stamps' mask and pattern logits
    mask_init: float = -2.0  # initial mask logit (σ(−2) ≈ 0.12), plus N(0, 1) noise

    def validate(self) -> None:
        for name in ("num_stamps", "anchors_per_class", "hidden", "epochs"):
            if int(getattr(self, name)) < 1:
                raise bad_param(name, "an integer >= 1", getattr(self, name))
        for name in ("lr", "stamp_lr"):
            if not float(getattr(self, name)) > 0:
                raise bad_param(name, "a float > 0", getattr(self, name))


def pair_gains(base: torch.Tensor, stamped: torch.Tensor,
               labels: torch.Tensor) -> torch.Tensor:
    """``J×K×K``: per stamp, source class and class, the mean probability gain on that
    source's anchors (sources without anchors count 0)."""
    k = base.shape[-1]
    d = stamped - base.unsqueeze(0)
    onehot = F.one_hot(labels.long(), k).to(d.dtype)
    return torch.einsum("jnc,ns->jsc", d, onehot) / onehot.sum(0).clamp_min(1)[:, None]


def stamp_features(base: torch.Tensor, stamped: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """Class-order-free features of probability changes.

    ``base``: ``N×K`` probabilities on the clean anchors; ``stamped``: ``J×N×K`` on the
    stamped anchors; ``labels``: the anchors' classes (``N``). Returns ``J×2K``: per stamp
    the classes' mean gain over all anchors, sorted decreasingly, then per source class
    the largest mean gain of any *other* class on that source's anchors, sorted
    decreasingly (sources without anchors count 0).
    """
    k = base.shape[-1]
    overall = (stamped - base.unsqueeze(0)).mean(dim=1).sort(dim=-1, descending=True).values
    per_source = pair_gains(base, stamped, labels)
    own = torch.eye(k, dtype=torch.bool, device=base.device).unsqueeze(0)
    flip = per_source.masked_fill(own, float("-inf")).max(dim=-1).values
    flip = flip.sort(dim=-1, descending=True).values
    return torch.cat([overall, flip], dim=-1)


class StampMeta(nn.Module):
    """Learned stamps on fixed anchor images plus a one-hidden-layer classifier."""

    anchors: torch.Tensor
    anchor_labels: torch.Tensor
    one_class = False  # a binary (BCE) meta-classifier, as MNTD's ``qt``

    def __init__(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, num_classes: int,
                 *, num_stamps: int = 8, hidden: int = 20) -> None:
        super().__init__()
        if anchors.dim() != 4 or anchor_labels.shape != (anchors.shape[0],):
            raise bad_param("anchors", "N×C×H×W images with N labels",
                            f"{tuple(anchors.shape)} with {tuple(anchor_labels.shape)}")
        self.num_classes = int(num_classes)
        c, h, w = anchors.shape[1:]
        self.input_shape = (int(c), int(h), int(w))
        self.register_buffer("anchors", anchors.float().clone())
        self.register_buffer("anchor_labels", anchor_labels.long().clone())
        self.mask_logits = nn.Parameter(torch.zeros(num_stamps, 1, h, w))
        self.pattern_logits = nn.Parameter(torch.zeros(num_stamps, c, h, w))
        self.fc = nn.Linear(num_stamps * 2 * self.num_classes, hidden)
        self.out = nn.Linear(hidden, 1)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], num_classes: int) -> StampMeta:
        """Rebuild a trained one from its ``state_dict`` (sizes read from the tensors)."""
        meta = cls(state["anchors"], state["anchor_labels"], num_classes,
                   num_stamps=int(state["mask_logits"].shape[0]),
                   hidden=int(state["fc.weight"].shape[0]))
        meta.load_state_dict(state)
        return meta

    @property
    def num_stamps(self) -> int:
        return int(self.mask_logits.shape[0])

    @property
    def hidden(self) -> int:
        return int(self.fc.out_features)

    @property
    def num_queries(self) -> int:
        """Inputs the model answers per scan: the anchors, clean and under every stamp."""
        return int(self.anchors.shape[0]) * (1 + self.num_stamps)

    def preview(self) -> torch.Tensor:
        """What to show of the learned queries: each stamp on the first anchor (``J×C×H×W``)."""
        m = torch.sigmoid(self.mask_logits)
        p = torch.sigmoid(self.pattern_logits)
        return ((1 - m) * self.anchors[:1] + m * p).detach()

    def stamped(self) -> torch.Tensor:
        """Every anchor under every stamp: ``(J·N)×C×H×W``, stamp-major."""
        m = torch.sigmoid(self.mask_logits).unsqueeze(1)
        p = torch.sigmoid(self.pattern_logits).unsqueeze(1)
        x = self.anchors.unsqueeze(0)
        return ((1 - m) * x + m * p).reshape(-1, *self.input_shape)

    def probabilities(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's class probabilities on the clean anchors (``N×K``) and on the
        stamped ones (``J×N×K``); gradients flow to the stamps."""
        n = self.anchors.shape[0]
        out = model(torch.cat([self.anchors, self.stamped()]))
        want = (n * (1 + self.num_stamps), self.num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            raise ModelError(f"MNTD: expected outputs of shape {want} on the stamped anchors, "
                             f"got {tuple(getattr(out, 'shape', ()))}")
        prob = F.softmax(out, dim=-1)
        return prob[:n], prob[n:].reshape(self.num_stamps, n, -1)

    def respond(self, model: nn.Module) -> torch.Tensor:
        """The model's features (``J×2K``); gradients flow to the stamps."""
        base, stamped = self.probabilities(model)
        return stamp_features(base, stamped, self.anchor_labels)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Raw suspicion per model from stacked features ``B×J×2K``."""
        h = F.relu(self.fc(features.reshape(features.shape[0], -1)))
        return self.out(h).squeeze(1)

    def forward(self, models: Sequence[nn.Module]) -> torch.Tensor:
        return self.head(torch.stack([self.respond(m) for m in models]))


def pick_anchors(images: torch.Tensor, labels: torch.Tensor, per_class: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random images of every class (all of a class that has fewer)."""
    idx: list[int] = []
    for c in torch.unique(labels).tolist():
        pool = torch.nonzero(labels == c).flatten()
        take = pool[torch.randperm(len(pool), generator=gen)[:per_class]]
        idx.extend(take.tolist())
    if not idx:
        raise bad_param("anchor images", "at least one labelled image", 0)
    t = torch.tensor(sorted(idx))
    return images[t].float(), labels[t].long()


@dataclass
class StampFit:
    """A trained stamp meta-classifier and how its training went."""

    meta: StampMeta
    config: StampConfig
    best_epoch: int
    val_auroc: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def fit_stamp_meta(models: Sequence[nn.Module], labels: Sequence[int], *,
                   images: torch.Tensor, image_labels: torch.Tensor, num_classes: int,
                   config: StampConfig = StampConfig(),
                   val_models: Sequence[nn.Module] = (), val_labels: Sequence[int] = (),
                   seed: int = 0, device: str | torch.device | None = None,
                   description: str = "stamp meta-classifier") -> StampFit:
    """Train stamps and classifier on shadows (1 = jumbo, 0 = benign) with BCE, one
    shadow per step as MNTD; anchors are drawn from ``images`` (the defender's)."""
    config.validate()
    y_all = np.asarray(labels, dtype=np.int64)
    if len(models) != len(y_all) or len(set(y_all.tolist())) < 2:
        raise bad_param("labels", "one label per model, benign (0) and trojaned (1)",
                        sorted(set(y_all.tolist())))
    gen = seed_everything(seed)
    dev = pick_device(device)
    anchors, anchor_labels = pick_anchors(images, image_labels, config.anchors_per_class, gen)
    meta = StampMeta(anchors, anchor_labels, num_classes, num_stamps=config.num_stamps,
                     hidden=config.hidden)
    with torch.no_grad():
        meta.mask_logits.copy_(config.mask_init + torch.randn(meta.mask_logits.shape,
                                                              generator=gen))
        meta.pattern_logits.copy_(torch.randn(meta.pattern_logits.shape, generator=gen))
    meta.to(dev)
    for m in (*models, *val_models):
        m.to(dev).eval()
        for p in m.parameters():
            p.requires_grad_(False)
    opt = torch.optim.Adam([
        {"params": [meta.mask_logits, meta.pattern_logits], "lr": config.stamp_lr},
        {"params": [*meta.fc.parameters(), *meta.out.parameters()], "lr": config.lr}])
    best = BestEpoch(val_models, val_labels, config.epochs)
    y_t = torch.as_tensor(y_all, dtype=torch.float32, device=dev)
    history: list[dict[str, float]] = []
    n = len(models)
    with progress(description, config.epochs * n) as bar:
        for epoch in range(1, config.epochs + 1):
            meta.train()
            total = 0.0
            for i in torch.randperm(n, generator=gen).tolist():
                loss = F.binary_cross_entropy_with_logits(meta([models[i]]), y_t[i:i + 1])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                bar.advance()
            record = {"epoch": float(epoch), "loss": total / n}
            best.end_epoch(meta, epoch, record)
            history.append(record)
    val_auroc = best.finish(meta)
    return StampFit(meta, config, best.epoch, val_auroc, history)
