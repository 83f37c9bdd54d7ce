"""Clean *reference* models that calibrate MNTD's verdict on models trained like real ones.

Beyond the paper (Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P
2021, report AUROC only). A bundle's threshold and p-values are set on its held-out
benign *shadows*, which train on the defender's small share the shadows' way; clean
models trained on other, larger data score higher, so a threshold meant to flag 5% of
clean models flags 19–24% of real ones (docs/BENCHMARKS.md). Reference models are
clean models trained on data *outside* the share, each with its own recipe drawn from
its own seed:

* ``samples`` — log-uniform integer in :data:`SAMPLES` (capped by the pool);
* ``epochs`` — uniform integer in :data:`EPOCHS`;
* ``batch_size`` — one of :data:`BATCH_SIZES` (Adam, lr 1e-3, cosine decay: the trainer's
  defaults).

Their raw meta-classifier outputs are stored in each bundle entry's calibration as
``reference_raw``; the detector then sets threshold, p-value and score against them
(``calibration="auto"``). The meta-classifiers and the raw scores, hence AUROC, do not
change — except a search probe's (:mod:`trojanscan.mntd.search`), which reads its costs
against the reference models' (its ``reference_raw`` leaves each one out). Files use the
shadow format (:func:`~trojanscan.mntd.shadows.save_shadow`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, bad_param
from ..training import TrainConfig, evaluate, train_model
from .executor import RunSummary, Task, run_tasks
from .meta import raw_scores
from .pretrained import MetaBundle
from .search import SearchProbe, respond_raw, with_reference_models
from .shadows import load_shadow, refuse_mismatch, save_shadow

SAMPLES = (2000, 10000)
EPOCHS = (6, 20)
BATCH_SIZES = (64, 128)
#: fewest images per class the pool outside the share must hold
MIN_PER_CLASS = 20
REFERENCE_KIND = 2  # after the shadows' kinds (0 benign, 1 jumbo) in the seed sequence


@dataclass(frozen=True)
class ReferenceSpec:
    """Everything that determines one reference model (besides the pool it draws from)."""

    index: int
    arch: str
    seed: int
    samples: int
    epochs: int
    batch_size: int
    lr: float = 1e-3

    @property
    def key(self) -> str:
        return f"reference-{self.index:04d}"


def plan_references(num: int, arch_names: Sequence[str], *, pool_size: int,
                    seed: int = 0) -> list[ReferenceSpec]:
    """``num`` reference recipes cycling through ``arch_names``; each drawn from its own
    seed, so the plan does not depend on order (pure)."""
    if num < 1:
        raise bad_param("reference_models", "an integer >= 1", num)
    if not arch_names:
        raise bad_param("archs", "at least one architecture", "nothing")
    lo, hi = min(SAMPLES[0], pool_size), min(SAMPLES[1], pool_size)
    out = []
    for i in range(num):
        ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, REFERENCE_KIND, i])
        s = int(ss.generate_state(1)[0] & 0x7FFFFFFF)
        rng = np.random.default_rng(s)
        samples = int(np.rint(np.exp(rng.uniform(np.log(lo), np.log(hi))))) if hi > lo else hi
        out.append(ReferenceSpec(i, arch_names[i % len(arch_names)], s, samples,
                                 int(rng.integers(EPOCHS[0], EPOCHS[1] + 1)),
                                 int(BATCH_SIZES[int(rng.integers(len(BATCH_SIZES)))])))
    return out


def outside_share(data: ImageDataset, share_idx: torch.Tensor) -> ImageDataset:
    """``data`` less the defender's share (the reference models' pool); a DataError when
    too little is left to train clean models on."""
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[share_idx] = False
    pool = data.subset(torch.nonzero(keep).flatten())
    need = MIN_PER_CLASS * data.num_classes
    if len(pool) < need:
        raise DataError(f"{data.source}: reference models train on the data outside the "
                        f"defender's share, but only {len(pool)} samples are left (at least "
                        f"{need} needed: {MIN_PER_CLASS} per class); use a smaller --share "
                        "or --reference-models 0")
    return pool


@dataclass(frozen=True)
class ReferenceData:
    pool: ImageDataset
    num_classes: int
    eval: ImageDataset | None = None
    device: str | None = None


def train_reference(spec: ReferenceSpec, data: ReferenceData,
                    ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one reference model on a seeded random subset of the pool."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(spec.seed)
    k = min(spec.samples, len(data.pool))
    idx = torch.randperm(len(data.pool), generator=g)[:k].sort().values
    train = data.pool.subset(idx)
    config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr)
    model = train_model(spec.arch, train, config=config, seed=spec.seed, device=data.device,
                        num_classes=data.num_classes, description=spec.key)
    meta: dict[str, Any] = {**asdict(spec), "kind": "reference",
                            "input_shape": list(train.input_shape),
                            "num_classes": data.num_classes, "train_samples": k}
    if data.eval is not None:
        meta["accuracy"] = float(evaluate(model, data.eval, device=data.device))
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return model, meta


def reference_task(task: Task, data: ReferenceData) -> dict[str, Any]:
    """Executor entry point: train the task's reference model and write its file."""
    (spec,) = task.args
    model, meta = train_reference(spec, data)
    assert task.output is not None
    save_shadow(task.output, model, meta)
    return {k: meta.get(k) for k in ("index", "arch", "accuracy", "seconds")}


def reference_path(folder: str | Path, spec: ReferenceSpec) -> Path:
    return Path(folder) / f"{spec.key}.safetensors"


def train_reference_set(data: ReferenceData, folder: str | Path, specs: Sequence[ReferenceSpec],
                        *, backend: str = "auto", workers: int | None = None,
                        address: str | None = None) -> RunSummary:
    """Train the planned reference models not yet in ``folder`` (resumable)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if reference_path(folder, spec).is_file():
            refuse_mismatch(reference_path(folder, spec), asdict(spec), {},
                            what="reference model")
    tasks = [Task(s.key, reference_path(folder, s), (s,)) for s in specs]
    return run_tasks(reference_task, tasks, shared=data, backend=backend, workers=workers,
                     address=address, description="reference models")


def load_references(folder: str | Path, specs: Sequence[ReferenceSpec],
                    ) -> tuple[list[torch.nn.Module], list[dict[str, Any]]]:
    missing = [s.key for s in specs if not reference_path(folder, s).is_file()]
    if missing:
        raise DataError(f"{folder}: {len(missing)} planned reference model(s) missing, e.g. "
                        f"{missing[0]}; train them first (it resumes)")
    loaded = [load_shadow(reference_path(folder, s)) for s in specs]
    return [m for m, _ in loaded], [meta for _, meta in loaded]


def with_references(bundle: MetaBundle, models: Sequence[torch.nn.Module],
                    metas: Sequence[dict[str, Any]], *,
                    data: dict[str, Any] | None = None) -> MetaBundle:
    """A copy of ``bundle`` whose every entry's calibration holds ``reference_raw`` (its raw
    output on each reference model) and whose info describes the reference models."""
    if len(models) < 2:
        raise bad_param("reference_models", "at least 2 models", len(models))
    if len(models) < 3 and any(isinstance(m, SearchProbe) for m in bundle.variants.values()):
        raise bad_param("reference_models", "at least 3 models (the search probe reads its "
                        "costs against them)", len(models))
    calibration = {}
    variants = dict(bundle.variants)
    memos: list[dict[str, torch.Tensor]] = [{} for _ in models]  # one search per model
    with torch.no_grad():
        for name, meta in bundle.variants.items():
            if isinstance(meta, SearchProbe):  # read against the reference models too
                variants[name], calibration[name] = with_reference_models(
                    meta, dict(bundle.calibration.get(name, {})), list(models), memos)
                continue
            raws = raw_scores(meta, list(models))
            if not np.all(np.isfinite(raws)):
                raise DataError(f"MNTD: a reference model gives a non-finite {name} output")
            calibration[name] = {**bundle.calibration.get(name, {}),
                                 "reference_raw": [round(float(v), 6) for v in raws]}
    acc = [m["accuracy"] for m in metas if m.get("accuracy") is not None]
    info = {**bundle.info, "reference": {
        "count": len(models),
        "recipe": {"samples": list(SAMPLES), "epochs": list(EPOCHS),
                   "batch_sizes": list(BATCH_SIZES), "lr": 1e-3},
        "archs": sorted({str(m["arch"]) for m in metas}),
        "train_samples": {"min": int(min(m["train_samples"] for m in metas)),
                          "max": int(max(m["train_samples"] for m in metas))},
        "mean_accuracy": float(np.mean(acc)) if acc else None,
        **({"data": data} if data else {}),
    }}
    return replace(bundle, variants=variants, calibration=calibration, info=info,
                   recipe=replace(bundle.recipe, calibration="reference"))


def add_references(bundle: MetaBundle, models: Sequence[torch.nn.Module], *,
                   source: dict[str, Any], seed: int = 0) -> MetaBundle:
    """A copy of ``bundle`` whose reference null also holds ``models``: clean models the
    bundle's own reference recipe does not make (other architectures, recipes, data),
    e.g. clean models of the family a user scans. Each entry's ``reference_raw`` gains
    the entry's raw output on each model, read exactly as the detector reads a suspect
    (searches from ``seed``; the search probe is not refitted, so the outputs already
    there do not change). ``source`` describes the added models in the bundle's info
    (``reference.added``, one record per call)."""
    if not models:
        raise bad_param("models", "at least one clean model", 0)
    missing = [n for n in bundle.variants
               if not bundle.calibration.get(n, {}).get("reference_raw")]
    if missing or bundle.recipe.calibration != "reference":
        raise DataError(f"MNTD: {bundle.name} is not calibrated on reference models "
                        f"({', '.join(missing) or 'its recipe reads its shadows'}); add "
                        "reference models of its own recipe first (mntd train "
                        "--reference-models N)")
    calibration = {}
    memos: list[dict[str, torch.Tensor]] = [{} for _ in models]
    for name, meta in bundle.variants.items():
        raws = [respond_raw(meta, m, memo, seed=seed)[1] for m, memo in zip(models, memos)]
        if not np.all(np.isfinite(raws)):
            raise DataError(f"MNTD: an added reference model gives a non-finite {name} "
                            "output")
        cal = dict(bundle.calibration[name])
        cal["reference_raw"] = [*cal["reference_raw"], *(round(float(v), 6) for v in raws)]
        calibration[name] = cal
    ref = dict(bundle.info.get("reference") or {})
    added = [*ref.get("added", []), {"count": len(models), "seed": int(seed), **source}]
    ref["added"] = added
    ref["total"] = len(next(iter(calibration.values()))["reference_raw"])
    return replace(bundle, calibration=calibration, info={**bundle.info, "reference": ref})


def own_references(bundle: MetaBundle) -> MetaBundle:
    """``bundle`` with its reference null cut back to its own recipe's reference models:
    those :func:`add_references` added are left out (``bundle`` itself when it has none)."""
    ref = bundle.info.get("reference") or {}
    if not ref.get("added"):
        return bundle
    n = int(ref["count"])
    calibration = {k: ({**c, "reference_raw": list(c["reference_raw"])[:n]}
                       if "reference_raw" in c else c)
                   for k, c in bundle.calibration.items()}
    info = {**bundle.info, "reference": {k: v for k, v in ref.items()
                                         if k not in ("added", "total")}}
    return replace(bundle, calibration=calibration, info=info)


def calibrate(bundle: MetaBundle, pool: ImageDataset, folder: str | Path, *, num: int,
              seed: int = 0, archs: Sequence[str] | None = None,
              eval_data: ImageDataset | None = None, device: str | None = None,
              backend: str = "auto", workers: int | None = None, address: str | None = None,
              data_info: dict[str, Any] | None = None) -> tuple[MetaBundle, RunSummary]:
    """Train ``num`` reference models on ``pool`` (resumable, in ``folder``) and return
    ``bundle`` calibrated on them (:func:`with_references`) with the training run."""
    if tuple(pool.input_shape) != tuple(bundle.input_shape) or (
            pool.num_classes != bundle.num_classes):
        raise DataError(f"{pool.source}: reference data is "
                        f"{'×'.join(map(str, pool.input_shape))} → {pool.num_classes}, the "
                        f"meta-classifier {bundle.name!r} fits {bundle.shape_text()}")
    if archs is None:
        settings = bundle.info.get("training", {}).get("settings", {})
        archs = tuple(settings.get("archs") or ("small_cnn", "lenet", "mlp"))
    specs = plan_references(num, tuple(archs), pool_size=len(pool), seed=seed)
    run = train_reference_set(ReferenceData(pool, bundle.num_classes, eval_data, device),
                              folder, specs, backend=backend, workers=workers,
                              address=address)
    models, metas = load_references(folder, specs)
    info = {"source": pool.source, "sha256": pool.sha256, "samples": len(pool), "seed": seed,
            **(data_info or {})}
    return with_references(bundle, models, metas, data=info), run
