"""The attack contract shared by every backdoor attack in the library.

An :class:`Attack` is a *trigger* plus a *labelling rule*. The constructor only
stores (and validates) keyword settings, all with defaults; nothing is learned.

* ``apply(x)`` stamps the trigger on a batch ``N×C×H×W`` in ``[0, 1]`` (pure: returns
  a new tensor, clamped to ``[0, 1]``, on the input's device);
* ``target_labels(y)`` gives the labels an attacked input should receive
  (all-to-one: the target; all-to-all: ``(y + offset) % K``);
* ``eligible(y)`` tells which test inputs count for the attack success rate
  (all-to-one: true label != target; source-specific: true label in the sources);
* ``poison(ds, rate, seed=...)`` returns a :class:`PoisonedData` — a poisoned *copy*
  of a training set and the ground-truth masks (the input is never mutated);
* ``spec`` is a one-line string that :func:`trojanscan.attacks.parse_attack` turns
  back into an equal attack; ``to_dict()`` is the JSON-able form for sidecar files.

Poisoning rate: ``rate`` is the fraction of the *whole* training set that is poisoned,
``round(rate * N)`` samples (half rounds up), drawn without replacement with a
``torch.Generator`` seeded by ``seed`` from the samples the attack may poison
(:meth:`Attack.candidates`: all-to-one attacks skip samples already of the target class).
When fewer candidates exist than asked for, all of them are poisoned and a
:class:`~trojanscan.exceptions.TrojanscanWarning` says so.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, TrojanscanWarning, bad_param

#: samples stamped per call while poisoning (bounds peak memory on big data sets)
CHUNK = 2048


# ---------------------------------------------------------------------------
# validation helpers (shared by the attack modules)
# ---------------------------------------------------------------------------

def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (not a bool) that is ``>= minimum``, else a ParameterError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise bad_param(name, "an integer" + (f" >= {minimum}" if minimum is not None else ""),
                        value)
    if minimum is not None and value < minimum:
        raise bad_param(name, f"an integer >= {minimum}", value)
    return int(value)


def check_float(name: str, value: Any, *, low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite ``float`` in the given interval, else a ParameterError."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise bad_param(name, f"a number in {interval}", value)
    v = float(value)
    ok = math.isfinite(v) and (v > low if low_open else v >= low) and (
        v < high if high_open else v <= high)
    if not ok:
        raise bad_param(name, f"a number in {interval}", value)
    return v


def check_images(x: Any, who: str) -> torch.Tensor:
    """Raise a DataError unless ``x`` is a float tensor ``N×C×H×W``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise DataError(
            f"{who}: expected a float tensor N×C×H×W with values in [0, 1], got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    return x


def round_half_up(value: float) -> int:
    """``round`` with halves going up (Python's ``round`` goes to even)."""
    return math.floor(value + 0.5)


def jsonable(value: Any) -> Any:
    """Settings as JSON-able values (tuples → lists, arrays → nested lists)."""
    if isinstance(value, Attack):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_value(value: Any) -> str:
    """One setting in spec syntax (see :mod:`trojanscan.attacks.spec`)."""
    if isinstance(value, Attack):
        return value.call_spec
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(format_value(v) for v in value) + ")"
    if isinstance(value, np.ndarray):
        return "custom"  # arrays cannot be written in a spec; to_dict() holds them
    return str(value)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.shape == b.shape and bool(np.array_equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=False))
    return bool(type(a) is type(b) and a == b)


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PoisonedData:
    """A poisoned copy of a training set and the ground truth of what was done.

    ``poison_mask[i]`` is true for the samples that carry the attack (stamped, and
    relabelled unless the attack is clean-label) — the ground truth for data-level
    detectors. ``cover_mask[i]`` is true for *cover* samples (source-specific attacks,
    WaNet's noise mode): stamped with the trigger (or a noisy variant) but keeping
    their true label. The two masks never overlap.
    """

    dataset: ImageDataset
    poison_mask: np.ndarray
    cover_mask: np.ndarray
    attack: Attack
    rate: float
    seed: int

    @property
    def poison_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poison_mask)

    @property
    def cover_indices(self) -> np.ndarray:
        return np.flatnonzero(self.cover_mask)

    @property
    def num_poison(self) -> int:
        return int(self.poison_mask.sum())

    def to_dict(self) -> dict[str, Any]:
        """Summary for a sidecar JSON (indices included)."""
        return {
            "attack": self.attack.to_dict(),
            "rate": self.rate,
            "seed": self.seed,
            "num_samples": len(self.dataset),
            "num_poison": self.num_poison,
            "num_cover": int(self.cover_mask.sum()),
            "poison_indices": self.poison_indices.tolist(),
            "cover_indices": self.cover_indices.tolist(),
        }


# ---------------------------------------------------------------------------
# the contract
# ---------------------------------------------------------------------------

class Attack(ABC):
    """A backdoor attack: trigger + labelling rule + poisoning procedure."""

    #: registry / spec name
    name: ClassVar[str]
    #: "all-to-one", "all-to-all", "clean-label", "source-specific" or "multi"
    label_mode: ClassVar[str] = "all-to-one"
    #: the paper the attack comes from
    paper: ClassVar[str] = ""

    #: the class attacked inputs are sent to; ``None`` when there is no single target
    target: int | None

    # -- settings ----------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constructor's settings, in signature order."""
        import inspect

        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The settings as stored (validated, normalised) by the constructor."""
        return {name: getattr(self, name) for name in self.param_names()}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Attack)
        mine, theirs = self.get_params(), other.get_params()
        return all(_equal(mine[k], theirs[k]) for k in mine)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def spec(self) -> str:
        """Spec string; ``parse_attack(a.spec) == a`` (except for array patterns)."""
        return f"{self.name}:" + self._kv_spec()

    @property
    def call_spec(self) -> str:
        """The nested form ``name(key=value,...)`` used inside ``multi:`` specs."""
        return f"{self.name}(" + self._kv_spec() + ")"

    def _kv_spec(self) -> str:
        return ",".join(f"{k}={format_value(v)}" for k, v in self.get_params().items())

    @property
    def targets(self) -> tuple[int, ...]:
        """Every class attacked inputs are sent to (empty for all-to-all: every class)."""
        return () if self.target is None else (self.target,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (for sidecar files and reports)."""
        return {
            "name": self.name,
            "spec": self.spec,
            "label_mode": self.label_mode,
            "target": self.target,
            "targets": list(self.targets),
            "paper": self.paper,
            "params": jsonable(self.get_params()),
        }

    # -- trigger and labels --------------------------------------------------
    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger (as at test time) on ``x`` (N×C×H×W in [0, 1]); new tensor."""

    def target_labels(self, y: torch.Tensor, *, num_classes: int | None = None) -> torch.Tensor:
        """Labels that inputs with true labels ``y`` should get once triggered."""
        assert self.target is not None
        return torch.full_like(y, self.target)

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        """Bool mask of test inputs that count for the attack success rate."""
        assert self.target is not None
        return y != self.target

    def candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Bool mask of training samples this attack may poison (default: eligible)."""
        return self.eligible(y)

    def check_classes(self, num_classes: int) -> None:
        """Raise a ParameterError if the attack's classes do not exist."""
        for t in self.targets:
            if t >= num_classes:
                raise bad_param(f"{self.name}.target", f"a class index < {num_classes}", t)

    # -- poisoning ----------------------------------------------------------
    def poison(self, ds: ImageDataset, rate: float, *, seed: int = 0) -> PoisonedData:
        """Poison ``round(rate * len(ds))`` samples of a copy of ``ds`` (see module doc)."""
        if not isinstance(ds, ImageDataset):
            raise DataError(f"{self.name}: poison() needs an ImageDataset, got "
                            f"{type(ds).__name__}")
        rate = check_float("rate", rate, low=0.0, high=1.0)
        seed = check_int("seed", seed)
        y = ds.labels()
        num_classes = ds.num_classes
        self.check_classes(num_classes)
        gen = torch.Generator().manual_seed(seed)
        x_out, y_out = ds.x.clone(), y.clone()
        poison_mask = torch.zeros(len(ds), dtype=torch.bool)
        cover_mask = torch.zeros(len(ds), dtype=torch.bool)
        self._poison_into(x_out, y_out, y, round_half_up(rate * len(ds)), gen, num_classes,
                          poison_mask, cover_mask)
        return PoisonedData(ds.with_data(x_out, y_out), poison_mask.numpy(),
                            cover_mask.numpy(), self, rate, seed)

    def _poison_into(self, x_out: torch.Tensor, y_out: torch.Tensor, y: torch.Tensor, n: int,
                     gen: torch.Generator, num_classes: int, poison_mask: torch.Tensor,
                     cover_mask: torch.Tensor) -> None:
        """Poison ``n`` samples not yet taken (in place on the *copies* and masks)."""
        taken = poison_mask | cover_mask
        idx = self._select(self.candidates(y) & ~taken, n, gen, "poison")
        if idx.numel():
            self._stamp_into(x_out, idx, self._stamp_poison, gen)
            y_out[idx] = self.target_labels(y[idx], num_classes=num_classes)
            poison_mask[idx] = True
        pool = self.cover_candidates(y) & ~(taken | poison_mask)
        cidx = self._select(pool, self.num_covers(int(idx.numel())), gen, "cover")
        if cidx.numel():
            self._stamp_into(x_out, cidx, self._stamp_cover, gen)
            cover_mask[cidx] = True

    def _select(self, pool: torch.Tensor, n: int, gen: torch.Generator,
                what: str) -> torch.Tensor:
        available = torch.nonzero(pool).flatten()
        if n > available.numel():
            warnings.warn(
                f"{self.name}: asked for {n} {what} samples but only {available.numel()} "
                f"are eligible; using all {available.numel()}",
                TrojanscanWarning, stacklevel=4,
            )
            n = int(available.numel())
        elif n and n == available.numel():
            warnings.warn(
                f"{self.name}: every one of the {n} samples eligible as {what} is used; "
                "none of them is left clean", TrojanscanWarning, stacklevel=4,
            )
        if n == 0:
            return available[:0]
        order = torch.randperm(int(available.numel()), generator=gen)[:n]
        return available[order].sort().values

    @staticmethod
    def _stamp_into(x_out: torch.Tensor, idx: torch.Tensor, stamp: Any,
                    gen: torch.Generator) -> None:
        for start in range(0, int(idx.numel()), CHUNK):
            part = idx[start:start + CHUNK]
            x_out[part] = stamp(x_out[part], gen).to(x_out.dtype)

    def _stamp_poison(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Trigger used on poisoned training samples (default: the test-time one)."""
        return self.apply(x)

    def cover_candidates(self, y: torch.Tensor) -> torch.Tensor:
        """Bool mask of samples that may serve as covers (default: none)."""
        return torch.zeros_like(y, dtype=torch.bool)

    def num_covers(self, num_poison: int) -> int:
        """How many cover samples go with ``num_poison`` poisoned ones (default 0)."""
        return 0

    def _stamp_cover(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x)
