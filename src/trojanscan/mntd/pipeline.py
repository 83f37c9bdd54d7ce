"""MNTD end to end: defender's share → shadow models → meta-classifiers → bundle.

Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans Using Meta Neural Analysis",
IEEE S&P 2021. Used by ``trojanscan mntd train`` and ``scripts/make_mntd_pretrained.py``:

1. :func:`defender_share` — a seeded random share of the clean data (the paper: 2%);
2. :func:`train_shadow_set` — ``num_shadows`` benign and ``num_shadows`` jumbo shadows as
   resumable tasks (:mod:`trojanscan.mntd.executor`);
3. :func:`fit_bundle` — the last ``num_val`` shadows of each kind are held out; each
   variant is trained on the rest, the held-out ones select the epoch (binary variants)
   and calibrate the scores (raw outputs of held-out benign shadows → p-values, the
   threshold at the chosen false-positive rate).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..dataset import ImageDataset
from ..exceptions import DataError, bad_param
from .calibration import auroc, threshold_at_fpr
from .executor import RunSummary, run_tasks
from .meta import VARIANTS, MetaConfig, fit_meta, raw_scores
from .pretrained import MetaBundle
from .shadows import (
    ShadowData,
    ShadowSpec,
    load_shadow,
    plan_shadows,
    shadow_path,
    shadow_task,
    shadow_tasks,
)


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of an MNTD training run (recorded in the bundle's JSON)."""

    num_shadows: int = 256  # per kind (benign, jumbo)
    num_val: int = 32  # per kind, held out for epoch selection and calibration
    archs: tuple[str, ...] = ("small_cnn", "lenet", "mlp")
    shadow_epochs: int = 20
    shadow_batch_size: int = 64
    shadow_lr: float = 1e-3
    variants: tuple[str, ...] = VARIANTS
    num_queries: int = 10
    hidden: int = 20
    meta_epochs: int = 10
    meta_lr: float = 1e-3
    meta_batch_size: int = 1
    response: str = "logits"
    query_range: str = "free"
    fpr: float = 0.05  # threshold: at most this share of held-out benign shadows flagged

    def validate(self) -> None:
        if self.num_shadows < 2:
            raise bad_param("num_shadows", "an integer >= 2", self.num_shadows)
        if not 1 <= self.num_val < self.num_shadows:
            raise bad_param("num_val", f"an integer in [1, {self.num_shadows - 1}]",
                            self.num_val)
        for v in self.variants:
            if v not in VARIANTS:
                raise bad_param("variants", VARIANTS, v)
        if not self.variants:
            raise bad_param("variants", VARIANTS, "nothing")
        if not 0 < self.fpr < 1:
            raise bad_param("fpr", "a float in (0, 1)", self.fpr)

    def specs(self, seed: int) -> list[ShadowSpec]:
        return plan_shadows(self.num_shadows, self.archs, seed=seed, epochs=self.shadow_epochs,
                            batch_size=self.shadow_batch_size, lr=self.shadow_lr)

    def meta_config(self, variant: str) -> MetaConfig:
        return MetaConfig(variant=variant, num_queries=self.num_queries,  # type: ignore[arg-type]
                          hidden=self.hidden, epochs=self.meta_epochs, lr=self.meta_lr,
                          batch_size=self.meta_batch_size, response=self.response,  # type: ignore[arg-type]
                          query_range=self.query_range)  # type: ignore[arg-type]


def share_indices(n: int, share: float, *, seed: int = 0,
                  max_samples: int | None = None) -> torch.Tensor:
    """Sorted indices of a seeded random ``share`` of ``n`` samples (at most ``max_samples``)."""
    if not 0 < share <= 1:
        raise bad_param("share", "a float in (0, 1]", share)
    k = max(1, round(share * n))
    if max_samples is not None:
        k = min(k, max_samples)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:k].sort().values


def defender_share(ds: ImageDataset, share: float, *, seed: int = 0,
                   max_samples: int | None = None) -> ImageDataset:
    """The defender's clean share of ``ds``: :func:`share_indices`, order kept."""
    sub = ds.subset(share_indices(len(ds), share, seed=seed, max_samples=max_samples))
    if int(torch.unique(sub.labels()).numel()) < 2:
        raise DataError(f"{ds.source}: the defender's share ({len(sub)} samples) holds fewer "
                        "than 2 classes; use a larger --share")
    return sub


def train_shadow_set(data: ShadowData, folder: str | Path, settings: TrainSettings, *,
                     seed: int = 0, backend: str = "auto", workers: int | None = None,
                     address: str | None = None) -> RunSummary:
    """Train the planned shadows not yet in ``folder`` (resumable)."""
    settings.validate()
    Path(folder).mkdir(parents=True, exist_ok=True)
    tasks = shadow_tasks(settings.specs(seed), folder)
    return run_tasks(shadow_task, tasks, shared=data, backend=backend, workers=workers,
                     address=address, description="shadow models")


@dataclass
class LoadedShadows:
    models: list[torch.nn.Module] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)


def load_shadow_split(folder: str | Path, settings: TrainSettings, seed: int,
                      ) -> tuple[LoadedShadows, LoadedShadows]:
    """(training, held-out) shadows of the planned set; missing files are an error."""
    train, val = LoadedShadows(), LoadedShadows()
    missing = []
    for spec in settings.specs(seed):
        path = shadow_path(folder, spec)
        if not path.is_file():
            missing.append(path.name)
            continue
        model, meta = load_shadow(path)
        part = val if spec.index >= settings.num_shadows - settings.num_val else train
        part.models.append(model)
        part.labels.append(int(spec.kind == "jumbo"))
        part.meta.append(meta)
    if missing:
        raise DataError(f"{folder}: {len(missing)} planned shadow model(s) missing, e.g. "
                        f"{missing[0]}; run the shadow training first (it resumes)")
    return train, val


def _summary(shadows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("benign", "jumbo"):
        rows = [m for m in shadows if m["kind"] == kind]
        acc = [m["accuracy"] for m in rows if m.get("accuracy") is not None]
        asr = [m["asr"] for m in rows if m.get("asr") is not None]
        out[kind] = {"count": len(rows),
                     "mean_accuracy": float(np.mean(acc)) if acc else None,
                     "mean_asr": float(np.nanmean(asr)) if asr else None}
    return out


def fit_bundle(folder: str | Path, settings: TrainSettings, *, name: str,
               data: ImageDataset, seed: int = 0, device: str | None = None,
               extra_info: dict[str, Any] | None = None) -> MetaBundle:
    """Train each variant on the shadows in ``folder`` and calibrate it."""
    settings.validate()
    t0 = time.perf_counter()
    train, val = load_shadow_split(folder, settings, seed)
    shape = data.input_shape
    k = int(train.meta[0]["num_classes"])
    mean, std = float(data.x.mean()), float(data.x.std())
    variants, calibration, fits = {}, {}, {}
    yv = np.asarray(val.labels)
    for i, variant in enumerate(settings.variants):
        fit = fit_meta(train.models, train.labels, config=settings.meta_config(variant),
                       input_shape=shape, num_classes=k, val_models=val.models,
                       val_labels=val.labels, query_mean=mean, query_std=std,
                       seed=seed + 1000 * (i + 1), device=device,
                       description=f"meta-classifier ({variant})")
        raws = raw_scores(fit.meta, val.models)
        benign = raws[yv == 0]
        variants[variant] = fit.meta
        calibration[variant] = {
            "benign_raw": [round(float(v), 6) for v in benign],
            "trojaned_raw": [round(float(v), 6) for v in raws[yv == 1]],
            "threshold": threshold_at_fpr(benign, settings.fpr),
            "fpr": settings.fpr,
            "val_auroc": auroc(yv, raws),
            "best_epoch": fit.best_epoch,
        }
        fits[variant] = [{k2: round(v, 5) for k2, v in h.items()} for h in fit.history]
    info = {
        "training": {
            "settings": {**asdict(settings), "archs": list(settings.archs),
                         "variants": list(settings.variants)},
            "seed": seed,
            "data": {"source": data.source, "sha256": data.sha256, "samples": len(data),
                     "pixel_mean": mean, "pixel_std": std},
            "shadows": _summary(train.meta + val.meta),
            "history": fits,
            "meta_seconds": round(time.perf_counter() - t0, 1),
        },
        "tool": {"name": "trojanscan", "version": __version__},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **(extra_info or {}),
    }
    return MetaBundle(name, shape, k, variants, calibration, info)
