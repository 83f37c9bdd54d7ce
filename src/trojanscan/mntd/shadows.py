"""MNTD's shadow models: benign ones and jumbo-trojaned ones, one file each.

Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans Using Meta Neural Analysis",
IEEE S&P 2021. The defender holds a small clean share of the task's data (the paper:
2%) and trains many small models on it: *benign* shadows on the share as it is,
*jumbo* shadows on the share plus stamped, relabelled copies with a trigger drawn from
:mod:`trojanscan.mntd.jumbo`. Both kinds cycle through the same architectures.

Every shadow is an independent task (:func:`shadow_task`) with its own seed derived from
the run's seed, its kind and its index, so the set does not depend on the order or the
backend that trained it. A finished shadow is one ``safetensors`` file holding the
``state_dict`` and, in the header's metadata, a JSON description (architecture, shapes,
trigger, accuracy, attack success rate); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import archs
from ..dataset import ImageDataset
from ..exceptions import DataError, ModelError, bad_param
from ..training import train_model
from ..utils import atomic_path
from .executor import Task
from .jumbo import POISONINGS, JumboTrigger, check_options, poison_with, sample_trigger
from .regime import Regime, check_regime, sample_regime

KINDS = ("benign", "jumbo")
META_KEY = "trojanscan_mntd_shadow"
Kind = Literal["benign", "jumbo"]


@dataclass(frozen=True)
class ShadowSpec:
    """Everything that determines one shadow model (besides the shared data)."""

    kind: Kind
    index: int
    arch: str
    seed: int
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    subsample: float = 1.0  # share of the defender's data this shadow trains on
    poisoning: str = "append"  # jumbo shadows: "append" (reference) or "replace"
    regime: str = "fixed"  # "fixed": the fields above; "random": drawn per shadow (regime.py)
    rates: str = "paper"  # jumbo injection ratios: "paper" U(0.05, 0.5) or "low" (jumbo.py)
    family: str = "paper"  # jumbo triggers: "paper" (all-to-one) or "wide" (jumbo.py)
    holdout: float = 0.0  # share of the defender's data kept out for the queries (pipeline.py)

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.index:04d}"

    def recipe(self) -> Regime:
        """How this shadow is trained: the spec's fields (``fixed``) or a recipe drawn from
        the shadow's own seed (``random``; the spec's epochs, batch size, lr and subsample
        are then not used)."""
        if self.regime == "random":
            return sample_regime(np.random.default_rng([self.seed, 1]))
        return Regime(self.epochs, self.batch_size, self.lr, subsample=self.subsample)


@dataclass(frozen=True)
class ShadowData:
    """Data shared by all shadow tasks: the defender's clean share and an eval split."""

    train: ImageDataset
    num_classes: int
    eval: ImageDataset | None = None
    device: str | None = None


def derive_seed(seed: int, kind: str, index: int) -> int:
    """A 31-bit seed for shadow ``index`` of ``kind``, independent of order."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, KINDS.index(kind), int(index)])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


def plan_shadows(num_per_kind: int, arch_names: Sequence[str], *, seed: int = 0,
                 epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                 subsample: float = 1.0, poisoning: str = "append",
                 kinds: Sequence[str] = KINDS, regime: str = "fixed",
                 rates: str = "paper", family: str = "paper",
                 holdout: float = 0.0) -> list[ShadowSpec]:
    """``num_per_kind`` shadows of each kind, architectures taken in turn (``holdout`` is
    only recorded: the caller keeps that share of the data out of their training)."""
    if num_per_kind < 1:
        raise bad_param("num_shadows", "an integer >= 1", num_per_kind)
    if not 0 < subsample <= 1:
        raise bad_param("subsample", "a float in (0, 1]", subsample)
    if poisoning not in POISONINGS:
        raise bad_param("poisoning", POISONINGS, poisoning)
    check_regime(regime)
    check_options(rates, family)
    check_holdout(holdout)
    if not arch_names:
        raise bad_param("archs", f"one or more of {', '.join(archs.ARCHS)}", arch_names)
    for a in arch_names:
        if a not in archs.ARCHS:
            raise bad_param("archs", list(archs.ARCHS), a)
    for k in kinds:
        if k not in KINDS:
            raise bad_param("kinds", KINDS, k)
    return [ShadowSpec(k, i, arch_names[i % len(arch_names)], derive_seed(seed, k, i),  # type: ignore[arg-type]
                       epochs, batch_size, lr, subsample, poisoning, regime, rates, family,
                       float(holdout))
            for k in kinds for i in range(num_per_kind)]


def check_holdout(holdout: float) -> None:
    if not 0 <= float(holdout) <= 0.5:
        raise bad_param("query_holdout", "a float in [0, 0.5]", holdout)


def shadow_path(folder: str | Path, spec: ShadowSpec) -> Path:
    return Path(folder) / f"{spec.key}.safetensors"


def shadow_tasks(specs: Sequence[ShadowSpec], folder: str | Path) -> list[Task]:
    """Executor tasks (resumable: a task whose file exists is skipped)."""
    return [Task(s.key, shadow_path(folder, s), (s,)) for s in specs]


@torch.no_grad()
def _asr(model: nn.Module, trigger: JumboTrigger, data: ImageDataset) -> float:
    keep = trigger.eligible(data.labels())
    if not bool(keep.any()):
        return float("nan")
    pred = model(trigger.apply(data.x[keep])).argmax(1)
    return float((pred == trigger.target).float().mean())


@torch.no_grad()
def _accuracy(model: nn.Module, data: ImageDataset) -> float:
    return float((model(data.x).argmax(1) == data.labels()).float().mean())


def train_shadow(spec: ShadowSpec, data: ShadowData) -> tuple[nn.Module, dict[str, Any]]:
    """Train one shadow model; returns it (eval mode, CPU) and its description."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    trigger = None
    train = data.train
    recipe = spec.recipe()
    if recipe.subsample < 1.0:
        k = max(2, round(recipe.subsample * len(train)))
        train = train.subset(torch.from_numpy(np.sort(rng.choice(len(train), k, replace=False))))
    if spec.kind == "jumbo":
        trigger = sample_trigger(rng, train.input_shape, data.num_classes, spec.rates,
                                 spec.family)
        train = poison_with(train, trigger, rng, spec.poisoning)
    model = train_model(spec.arch, train, config=recipe.config(), seed=spec.seed,
                        device=data.device, num_classes=data.num_classes,
                        description=f"shadow {spec.key}")
    meta: dict[str, Any] = {
        **asdict(spec), "input_shape": list(train.input_shape),
        "num_classes": data.num_classes, "train_samples": len(train),
        "trigger": None if trigger is None else trigger.to_dict(),
        "recipe": recipe.to_dict(),
    }
    if data.eval is not None:
        meta["accuracy"] = _accuracy(model, data.eval)
        meta["asr"] = None if trigger is None else _asr(model, trigger, data.eval)
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return model, meta


def save_shadow(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the ``state_dict`` and ``meta`` (in the header) atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


def read_shadow_meta(path: str | Path) -> dict[str, Any]:
    """The JSON description stored in a shadow file's header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable shadow-model file ({exc})") from exc
    if raw is None:
        raise ModelError(f"{path}: not an MNTD shadow-model file (no {META_KEY} metadata)")
    return dict(json.loads(raw))


def load_shadow(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a shadow model from its file (eval mode, CPU, parameters frozen)."""
    from safetensors.torch import load_file

    meta = read_shadow_meta(path)
    model = archs.build(meta["arch"], tuple(meta["input_shape"]), int(meta["num_classes"]))
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit {meta['arch']} ({exc})") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta


def shadow_task(task: Task, data: ShadowData) -> dict[str, Any]:
    """Executor entry point: train the task's shadow and write its file."""
    (spec,) = task.args
    model, meta = train_shadow(spec, data)
    assert task.output is not None
    save_shadow(task.output, model, meta)
    return {k: meta.get(k) for k in ("kind", "index", "arch", "accuracy", "asr", "seconds")}


#: ShadowSpec fields an existing file must match to be reused (missing = the default)
_SPEC_FIELDS = ("kind", "index", "arch", "seed", "epochs", "batch_size", "lr", "subsample",
                "poisoning", "regime", "rates", "family", "holdout")


def check_reusable(path: str | Path, spec: ShadowSpec) -> None:
    """Raise a DataError when an existing shadow file was trained with other settings
    (resuming must never mix shadows of two configurations)."""
    defaults = ShadowSpec("benign", 0, "mlp", 0)
    refuse_mismatch(path, {f: getattr(spec, f) for f in _SPEC_FIELDS},
                    {f: getattr(defaults, f) for f in _SPEC_FIELDS}, what="shadow")


def refuse_mismatch(path: str | Path, wanted: dict[str, Any], defaults: dict[str, Any], *,
                    what: str) -> None:
    """Raise a DataError when the model file at ``path`` records a setting other than
    ``wanted`` (a field it lacks counts as its ``defaults`` value)."""
    meta = read_shadow_meta(path)
    for f, v in wanted.items():
        if meta.get(f, defaults.get(f)) != v:
            raise DataError(f"{path}: this {what} was trained with {f}={meta.get(f)!r}, the "
                            f"run asks for {f}={v!r}; use another output folder or delete "
                            f"the old {what}s")


def list_shadows(folder: str | Path, kind: str | None = None) -> list[Path]:
    """Shadow files in ``folder`` (of one kind if given), sorted by kind and index."""
    pattern = f"{kind}-*.safetensors" if kind else "*-*.safetensors"
    return sorted(p for p in Path(folder).glob(pattern)
                  if p.name.split("-")[0] in KINDS)
