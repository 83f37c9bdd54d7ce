"""Jumbo learning: the random trojan triggers MNTD's backdoored shadow models carry.

Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans Using Meta Neural Analysis",
IEEE S&P 2021, section 4.2 (jumbo learning). Each trojaned shadow model gets its own
trigger drawn from a broad family so that the meta-classifier learns what "trojaned"
looks like in general, not one attack:

* shape — a square patch of side 2–5 pixels (sides above half the image are left out
  for small images, e.g. 2–4 on 8×8) at a uniformly random place, or the whole image
  (a blend); each side is equally likely (1/5 the whole image on 28×28);
* pattern — a random binary mask over the patch (or image) with a random number of
  ones in ``[1, s² - 1]``;
* transparency — patches: ``alpha ~ U(0.2, 0.6)``, where ``alpha > 0.5`` becomes 1
  (an opaque patch a quarter of the time); whole-image blends: ``alpha ~ U(0.05, 0.2)``;
* stamping — ``x' = (1 - alpha) x + alpha * mask`` under the patch, every channel;
* target class uniform; injection ratio ``rate ~ U(0.05, 0.5)`` (``rates="paper"``).

Beyond the paper, ``rates="low"`` draws the injection ratio log-uniformly from
``[0.02, 0.2]``: the paper's rates damage a shadow's clean accuracy (by 3 points on
average on Fashion-MNIST shadows, measured), a cue that stealthy real backdoors, trained
at a few percent poison, do not give; lower rates make the meta-classifier learn the
backdoor itself. The other properties of a trigger do not depend on ``rates`` (same seed,
same trigger, only the ratio differs).

Beyond the paper, ``family="wide"`` turns a third of the jumbo triggers *source-specific*
(Tang et al., USENIX Security 2021): the same trigger, but only samples of 1–3 random
source classes (not the target) are relabelled to the target, and as many stamped
*cover* samples of the other classes keep their true labels, so the shadow learns
"trigger AND source class". The paper's family holds only all-to-one triggers, which
teach the meta-classifier nothing about a backdoor that ignores most inputs
(benchmarks/notes/mntd_development.md). The trigger itself (shape,
pattern, transparency, target, rate) is drawn exactly as for ``"paper"`` from the same
generator, the source classes after it.

These are the reference implementation's settings for MNIST-sized inputs. Poisoning
(``mode``): ``"append"`` (the reference) adds ``round(rate × N)`` stamped, relabelled
copies of random training samples to the ``N`` clean ones, so a trojaned shadow trains on
up to 1.5× the data and steps of a benign one — a cue that real poisoned models, whose
poison replaces clean samples, do not carry; ``"replace"`` stamps and relabels the same
share, ``rate / (1 + rate)`` (5–33%), of the ``N`` samples in place.
Functions here are pure (NumPy generator in, trigger out) and tested without any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import bad_param

PATCH_SIDES = (2, 3, 4, 5)
PATCH_ALPHA = (0.2, 0.6)
OPAQUE_ABOVE = 0.5
BLEND_ALPHA = (0.05, 0.2)
RATE = (0.05, 0.5)
LOW_RATE = (0.02, 0.2)  # rates="low": log-uniform
RATES = ("paper", "low")
FAMILIES = ("paper", "wide")
SOURCE_SPECIFIC_SHARE = 1 / 3  # family="wide": share of source-specific triggers
SOURCE_CLASSES = (1, 3)  # family="wide": how many source classes (inclusive range)
POISONINGS = ("append", "replace")


@dataclass(frozen=True)
class JumboTrigger:
    """One sampled trigger: where, what, how transparent, which target, how much poison."""

    kind: Literal["patch", "blend"]
    row: int
    col: int
    mask: np.ndarray  # s×s (patch) or H×W (blend) of 0/1 float32
    alpha: float
    target: int
    rate: float
    sources: tuple[int, ...] = ()  # source-specific: only these classes go to target

    @property
    def size(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on ``x`` (N×C×H×W in [0, 1]); a new tensor."""
        h, w = self.size
        if self.row + h > x.shape[2] or self.col + w > x.shape[3]:
            raise bad_param("trigger", f"a trigger that fits {tuple(x.shape[2:])} images",
                            f"{h}×{w} at ({self.row}, {self.col})")
        out = x.clone()
        m = torch.from_numpy(self.mask).to(device=x.device, dtype=x.dtype)
        region = out[:, :, self.row:self.row + h, self.col:self.col + w]
        out[:, :, self.row:self.row + h, self.col:self.col + w] = (
            (1.0 - self.alpha) * region + self.alpha * m)
        return out.clamp_(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the mask as rows of '0'/'1' characters)."""
        return {"kind": self.kind, "row": self.row, "col": self.col,
                "mask": ["".join("1" if v else "0" for v in r) for r in self.mask > 0.5],
                "alpha": self.alpha, "target": self.target, "rate": self.rate,
                "sources": list(self.sources)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JumboTrigger:
        mask = np.array([[c == "1" for c in r] for r in d["mask"]], dtype=np.float32)
        return cls(d["kind"], int(d["row"]), int(d["col"]), mask, float(d["alpha"]),
                   int(d["target"]), float(d["rate"]),
                   tuple(int(c) for c in d.get("sources", ())))

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Which labels the trigger should send to the target: the sources, or every
        class but the target."""
        if self.sources:
            return torch.isin(y, torch.tensor(self.sources, dtype=y.dtype, device=y.device))
        return y != self.target


def check_options(rates: str = "paper", family: str = "paper") -> None:
    """A ParameterError naming the option when ``rates`` or ``family`` is unknown."""
    if rates not in RATES:
        raise bad_param("rates", RATES, rates)
    if family not in FAMILIES:
        raise bad_param("jumbo_family", FAMILIES, family)


def patch_sides(h: int, w: int) -> tuple[int, ...]:
    """Patch sides the jumbo distribution draws from for ``h×w`` images."""
    return tuple(s for s in PATCH_SIDES if s <= min(h, w) // 2)


def sample_trigger(rng: np.random.Generator, input_shape: tuple[int, int, int],
                   num_classes: int, rates: str = "paper",
                   family: str = "paper") -> JumboTrigger:
    """Draw one trigger from the jumbo distribution (see the module docstring)."""
    _, h, w = input_shape
    if num_classes < 2:
        raise bad_param("num_classes", "an integer >= 2", num_classes)
    check_options(rates, family)
    sides = patch_sides(h, w)
    choice = int(rng.integers(len(sides) + 1))
    if choice < len(sides):
        s = sides[choice]
        kind: Literal["patch", "blend"] = "patch"
        mh = mw = s
        alpha = float(rng.uniform(*PATCH_ALPHA))
        if alpha > OPAQUE_ABOVE:
            alpha = 1.0
        row = int(rng.integers(h - s + 1))
        col = int(rng.integers(w - s + 1))
    else:
        kind, mh, mw, row, col = "blend", h, w, 0, 0
        alpha = float(rng.uniform(*BLEND_ALPHA))
    cells = mh * mw
    ones = int(rng.integers(1, cells))  # 1 .. cells - 1
    flat = np.zeros(cells, dtype=np.float32)
    flat[rng.choice(cells, ones, replace=False)] = 1.0
    target = int(rng.integers(num_classes))
    if rates == "low":
        rate = float(np.exp(rng.uniform(np.log(LOW_RATE[0]), np.log(LOW_RATE[1]))))
    else:
        rate = float(rng.uniform(*RATE))
    sources: tuple[int, ...] = ()
    if family == "wide" and num_classes > 2 and rng.random() < SOURCE_SPECIFIC_SHARE:
        hi = min(SOURCE_CLASSES[1], num_classes - 2)  # at least one class left as cover
        k = int(rng.integers(SOURCE_CLASSES[0], hi + 1))
        others = [c for c in range(num_classes) if c != target]
        sources = tuple(sorted(int(c) for c in rng.choice(others, k, replace=False)))
    return JumboTrigger(kind, row, col, flat.reshape(mh, mw), alpha, target, rate, sources)


def poison_fraction(rate: float) -> float:
    """Share of the training set replaced by poison for an injection ratio ``rate``: the
    reference *appends* ``rate × N`` copies, i.e. ``rate / (1 + rate)`` of the result."""
    return rate / (1.0 + rate)


def poison_with(ds: ImageDataset, trigger: JumboTrigger, rng: np.random.Generator,
                mode: str = "append") -> ImageDataset:
    """``ds`` poisoned with ``trigger`` (a new data set; ``ds`` is not modified).

    ``append``: ``round(rate × N)`` stamped copies relabelled ``target`` are appended;
    ``replace``: a random ``poison_fraction(rate)`` share is stamped and relabelled in
    place (same size as ``ds``).

    Source-specific triggers draw the poisoned samples from the source classes only
    (at most all of them when appending, half of them in place, so that clean source
    samples remain) and add as many stamped *covers* from the other non-target classes
    with their labels kept.
    """
    if mode not in POISONINGS:
        raise bad_param("poisoning", POISONINGS, mode)
    n = len(ds)
    frac = trigger.rate if mode == "append" else poison_fraction(trigger.rate)
    k = round(frac * n)
    y0 = ds.labels()
    candidates: int | np.ndarray = n  # rng.choice(n, ...) as the paper's family always did
    covers = np.zeros(0, dtype=np.int64)
    if trigger.sources:
        src = trigger.eligible(y0).numpy()
        candidates = np.flatnonzero(src)
        k = min(k, len(candidates) if mode == "append" else len(candidates) // 2)
        cover_pool = np.flatnonzero(~src & (y0.numpy() != trigger.target))
        covers = np.sort(rng.choice(cover_pool, min(k, len(cover_pool)), replace=False))
    if k == 0:
        return ds
    idx = torch.from_numpy(np.sort(rng.choice(candidates, k, replace=False)))
    cov = torch.from_numpy(covers)
    if mode == "append":
        x_bad = trigger.apply(ds.x[idx])
        y_bad = torch.full((k,), trigger.target, dtype=torch.int64)
        x_cov, y_cov = trigger.apply(ds.x[cov]), y0[cov]
        return ds.with_data(torch.cat([ds.x, x_bad, x_cov]), torch.cat([y0, y_bad, y_cov]))
    x, y = ds.x.clone(), y0.clone()
    x[idx] = trigger.apply(ds.x[idx])
    y[idx] = trigger.target
    if len(cov):
        x[cov] = trigger.apply(ds.x[cov])
    return ds.with_data(x, y)
