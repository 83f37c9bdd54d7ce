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

Beyond the paper, ``data_members`` > 0 also trains the ``qt_data`` ensemble
(:data:`DATA_ENSEMBLE`): that many query-tuned meta-classifiers (seeds apart) whose
queries *start* from the defender's images, one class after another, and stay in
[0, 1] within ``data_query_eps`` (L∞) of their start. The detector sums their outputs,
each standardised against its held-out benign shadows.

``stamp_members`` > 0 (beyond the paper) also trains that many stamp-probing
meta-classifiers (:mod:`trojanscan.mntd.stamps`, seeds ``seed + i``): learned stamps on
the defender's images, read as class-order-free probability changes; the detector sums
them as it sums ``qt_data``.

``query_holdout`` > 0 keeps that share of the defender's images (per class) out of every
shadow's training and starts the members' queries there instead: shadows have memorised
their own training images, the models under test have not, so queries started on
training images can learn a membership cue that does not transfer
(:func:`query_pool_split`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..dataset import ImageDataset
from ..exceptions import DataError, bad_param
from .calibration import auroc, threshold_at_fpr
from .executor import RunSummary, Task, run_tasks
from .jumbo import POISONINGS, check_options
from .meta import DATA_ENSEMBLE, VARIANTS, MetaClassifier, MetaConfig, fit_meta, raw_scores
from .pretrained import MetaBundle
from .recipe import trained_recipe
from .regime import check_regime
from .search import SearchProbe, fit_search_probes
from .shadows import (
    ShadowData,
    ShadowSpec,
    check_holdout,
    check_reusable,
    load_shadow,
    plan_shadows,
    shadow_path,
    shadow_task,
)
from .stamps import STAMP, StampConfig, StampMeta, fit_stamp_meta


@dataclass(frozen=True)
class TrainSettings:
    """Every setting of an MNTD training run (recorded in the bundle's JSON)."""

    num_shadows: int = 256  # per kind (benign, jumbo)
    num_val: int = 32  # per kind, held out for epoch selection and calibration
    archs: tuple[str, ...] = ("small_cnn", "lenet", "mlp")
    shadow_epochs: int = 20
    shadow_batch_size: int = 64
    shadow_lr: float = 1e-3
    shadow_subsample: float = 1.0  # each shadow trains on this random share of the data
    shadow_poisoning: str = "append"  # "append" (reference) or "replace" (see jumbo.py)
    shadow_regime: str = "fixed"  # "fixed" (reference) or "random" recipes (see regime.py)
    jumbo_rates: str = "paper"  # "paper" U(0.05, 0.5) or "low" (see jumbo.py)
    jumbo_family: str = "paper"  # "paper" (all-to-one) or "wide" (+ source-specific; jumbo.py)
    variants: tuple[str, ...] = VARIANTS
    num_queries: int = 10
    hidden: int = 20
    meta_epochs: int = 10
    meta_lr: float = 1e-3
    meta_batch_size: int = 1
    response: str = "logits"  # as the reference code (see meta.RESPONSES)
    query_range: str = "free"
    data_members: int = 0  # members of the qt_data ensemble (0: the paper's variants only)
    data_query_eps: float = 0.1  # their queries' L∞ distance from the starting images
    query_holdout: float = 0.0  # share of the data kept out of the shadows for those starts
    stamp_members: int = 0  # stamp-probing meta-classifiers (beyond the paper; stamps.py)
    stamp_count: int = 8  # their stamps
    stamp_anchors: int = 2  # their clean anchor images per class
    stamp_epochs: int = 20
    stamp_family: str = "paper"  # the jumbo triggers the stamp members train against
    #: the per-class trigger-search probe and its flow readout (search.py; read against
    #: the benign training shadows, then against reference models when the bundle is
    #: calibrated on them)
    search_probe: bool = False
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
        if not 0 <= int(self.data_members) <= 64:
            raise bad_param("data_members", "an integer in [0, 64]", self.data_members)
        check_holdout(self.query_holdout)
        if self.query_holdout and not self.data_members:
            raise bad_param("query_holdout", "0 unless data_members > 0 (only the qt_data "
                            "members start queries from images)", self.query_holdout)
        if not 0 <= int(self.stamp_members) <= 64:
            raise bad_param("stamp_members", "an integer in [0, 64]", self.stamp_members)
        self.stamp_config().validate()
        if self.search_probe and self.num_shadows - self.num_val < 3:
            raise bad_param("num_shadows", f"at least num_val + 3 = {self.num_val + 3} with "
                            "the search probe (it reads against the benign training shadows; "
                            "'trojanscan mntd train --no-search-probe' leaves it out)",
                            self.num_shadows)
        if not 0 < float(self.data_query_eps) <= 1:
            raise bad_param("data_query_eps", "a float in (0, 1]", self.data_query_eps)
        if not 0 < self.fpr < 1:
            raise bad_param("fpr", "a float in (0, 1)", self.fpr)
        self.meta_config(self.variants[0]).validate()
        if self.shadow_poisoning not in POISONINGS:
            raise bad_param("poisoning", POISONINGS, self.shadow_poisoning)
        check_regime(self.shadow_regime)
        check_options(self.jumbo_rates, self.jumbo_family)
        check_options(self.jumbo_rates, self.stamp_family)

    def specs(self, seed: int) -> list[ShadowSpec]:
        return plan_shadows(self.num_shadows, self.archs, seed=seed, epochs=self.shadow_epochs,
                            batch_size=self.shadow_batch_size, lr=self.shadow_lr,
                            subsample=self.shadow_subsample,
                            poisoning=self.shadow_poisoning, regime=self.shadow_regime,
                            rates=self.jumbo_rates, family=self.jumbo_family,
                            holdout=self.query_holdout)

    def meta_config(self, variant: str) -> MetaConfig:
        return MetaConfig(variant=variant, num_queries=self.num_queries,  # type: ignore[arg-type]
                          hidden=self.hidden, epochs=self.meta_epochs, lr=self.meta_lr,
                          batch_size=self.meta_batch_size, response=self.response,  # type: ignore[arg-type]
                          query_range=self.query_range)  # type: ignore[arg-type]

    def member_config(self) -> MetaConfig:
        """The configuration of every ``qt_data`` member."""
        return replace(self.meta_config("qt"), query_init="data", query_range="unit",
                       query_eps=float(self.data_query_eps))

    def member_names(self) -> tuple[str, ...]:
        return tuple(member_name(i) for i in range(int(self.data_members)))

    def stamp_config(self) -> StampConfig:
        """The configuration of every stamp member (classifier lr: ``meta_lr``)."""
        return StampConfig(num_stamps=int(self.stamp_count),
                           anchors_per_class=int(self.stamp_anchors), hidden=self.hidden,
                           epochs=int(self.stamp_epochs), lr=self.meta_lr)

    def placed_specs(self, seed: int, folder: str | Path, *, stamps: bool = False,
                     ) -> list[tuple[ShadowSpec, Path]]:
        """Every planned shadow with its file: the set the paper's variants and ``qt_data``
        train on, or (``stamps``) the one the stamp members train on — the same benign
        shadows, and jumbo shadows of ``stamp_family``, kept in the sub-folder
        ``jumbo-<family>/`` when that differs from ``jumbo_family``."""
        family = self.stamp_family if stamps else self.jumbo_family
        specs = replace(self, jumbo_family=family).specs(seed)
        own = Path(folder) / f"jumbo-{family}"
        return [(s, shadow_path(own if s.kind == "jumbo" and family != self.jumbo_family
                                else folder, s)) for s in specs]

    def stamp_names(self) -> tuple[str, ...]:
        return tuple(f"{STAMP}.{i}" for i in range(int(self.stamp_members)))

    def needs_images(self) -> bool:
        """Whether some meta-classifier starts from the defender's labelled images."""
        return bool(self.data_members or self.stamp_members)


def member_name(i: int) -> str:
    return f"{DATA_ENSEMBLE}.{i}"


def check_member_data(settings: TrainSettings, data: ImageDataset) -> None:
    """Raise a DataError, before any training, when the ``qt_data`` or stamp members cannot
    start from ``data`` (fewer images than queries, or no labels)."""
    if not settings.needs_images():
        return
    if data.y is None:
        raise DataError(f"{data.source}: the qt_data and stamp members start from the "
                        "defender's labelled images, but the share is unlabelled; use "
                        "--data-members 0 --stamp-members 0")
    if not settings.data_members:
        return
    pool = query_pool_split(data, settings.query_holdout)[1]  # its size ignores the seed
    if len(pool) < settings.num_queries:
        where = (f"the {len(pool)} kept out of shadow training" if settings.query_holdout
                 else f"the share's {len(pool)}")
        raise DataError(f"{data.source}: the qt_data members start their "
                        f"{settings.num_queries} queries from the defender's images, but "
                        f"there are only {where}; use a larger --share"
                        f"{' or --query-holdout' if settings.query_holdout else ''}, fewer "
                        "--queries or --data-members 0")


def query_pool_split(data: ImageDataset, holdout: float, *, seed: int = 0,
                     ) -> tuple[ImageDataset, ImageDataset]:
    """(shadow part, query pool) of the defender's share: per class, ``round(holdout·n)``
    images (at least 1, never all ``n``) go to the pool, seeded; order kept.

    ``holdout == 0`` returns ``(data, data)``: the shadows train on everything and the
    queries start from those same images (the recipe before ``query_holdout``)."""
    check_holdout(holdout)
    if not holdout:
        return data, data
    if data.y is None:
        raise DataError(f"{data.source}: --query-holdout needs labelled data")
    labels = data.labels()
    g = torch.Generator().manual_seed(int(seed) + 7919)
    pool = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n = int(idx.numel())
        k = min(max(1, round(float(holdout) * n)), n - 1)
        pool.append(idx[torch.randperm(n, generator=g)[:k]])
    in_pool = torch.zeros(len(data), dtype=torch.bool)
    in_pool[torch.cat(pool)] = True
    return (data.subset(torch.nonzero(~in_pool).flatten()),
            data.subset(torch.nonzero(in_pool).flatten()))


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
    """Train the planned shadows not yet in ``folder`` (resumable) on ``data.train`` less the
    ``query_holdout`` pool (:func:`query_pool_split` with the same ``seed``)."""
    settings.validate()
    data = replace(data, train=query_pool_split(data.train, settings.query_holdout,
                                                seed=seed)[0])
    placed = settings.placed_specs(seed, folder)
    if settings.stamp_members:  # the stamp members' own jumbo shadows, if of another family
        placed += [(s, p) for s, p in settings.placed_specs(seed, folder, stamps=True)
                   if p.parent != Path(folder)]
    for spec, path in placed:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            check_reusable(path, spec)
    tasks = [Task(s.key if p.parent == Path(folder) else f"{s.key}-{s.family}", p, (s,))
             for s, p in placed]
    return run_tasks(shadow_task, tasks, shared=data, backend=backend, workers=workers,
                     address=address, description="shadow models")


@dataclass
class LoadedShadows:
    models: list[torch.nn.Module] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)


def load_shadow_split(folder: str | Path, settings: TrainSettings, seed: int, *,
                      stamps: bool = False) -> tuple[LoadedShadows, LoadedShadows]:
    """(training, held-out) shadows of the planned set (``stamps``: the stamp members'
    set, :meth:`TrainSettings.placed_specs`); missing files are an error."""
    train, val = LoadedShadows(), LoadedShadows()
    missing = []
    for spec, path in settings.placed_specs(seed, folder, stamps=stamps):
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


@dataclass(frozen=True)
class _VariantJob:
    """What one variant's training task needs (shadows are read from ``folder``)."""

    folder: str
    settings: TrainSettings
    variant: str
    seed: int
    shape: tuple[int, int, int]
    mean: float
    std: float
    device: str | None
    member: int | None = None  # a qt_data member (variant is then "qt")
    stamp: int | None = None  # a stamp member


def _fit_variant(task: Task, data: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    """Executor task: train and calibrate one variant or ``qt_data`` member (``data``: the
    defender's images and labels, where member queries start); returns plain tensors and
    numbers."""
    (j,) = task.args
    train, val = load_shadow_split(j.folder, j.settings, j.seed, stamps=j.stamp is not None)
    k = int(train.meta[0]["num_classes"])
    if j.stamp is not None:
        return _fit_stamp_member(j, train, val, k, data)
    if j.member is None:
        config, images, labels = j.settings.meta_config(j.variant), None, None
        seed, what = j.seed + 1000 * (1 + VARIANTS.index(j.variant)), j.variant
    else:
        assert data is not None  # fit_bundle shares the images whenever members exist
        config, (images, labels) = j.settings.member_config(), data
        seed, what = j.seed + 1000 * (1 + len(VARIANTS) + j.member), member_name(j.member)
    fit = fit_meta(train.models, train.labels, config=config, input_shape=j.shape,
                   num_classes=k, val_models=val.models, val_labels=val.labels,
                   query_mean=j.mean, query_std=j.std, seed=seed, device=j.device,
                   description=f"meta-classifier ({what})", query_images=images,
                   query_labels=labels)
    yv = np.asarray(val.labels)
    raws = raw_scores(fit.meta, val.models)
    calibration = _calibration(raws, yv, j.settings.fpr, fit.best_epoch)
    if j.member is not None:
        calibration.update(kind=config.variant, query_init=config.query_init,
                           query_range=config.query_range, query_eps=config.query_eps)
    return _fitted(fit.meta, calibration, k, fit.history, train, val)


def _calibration(raws: np.ndarray, yv: np.ndarray, fpr: float, best_epoch: int,
                 ) -> dict[str, Any]:
    """Held-out shadows' raw outputs, the threshold at ``fpr`` and the held-out AUROC."""
    benign = raws[yv == 0]
    return {"benign_raw": [round(float(v), 6) for v in benign],
            "trojaned_raw": [round(float(v), 6) for v in raws[yv == 1]],
            "threshold": threshold_at_fpr(benign, fpr), "fpr": fpr,
            "val_auroc": auroc(yv, raws), "best_epoch": best_epoch}


def _fitted(meta: torch.nn.Module, calibration: dict[str, Any], k: int,
            history: Sequence[dict[str, float]], train: LoadedShadows, val: LoadedShadows,
            ) -> dict[str, Any]:
    return {"state": {n: t.detach().cpu() for n, t in meta.state_dict().items()},
            "calibration": calibration, "num_classes": k,
            "history": [{k2: round(v, 5) for k2, v in h.items()} for h in history],
            "shadows": _summary(train.meta + val.meta)}


def _fit_stamp_member(j: _VariantJob, train: LoadedShadows, val: LoadedShadows, k: int,
                      data: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any]:
    assert data is not None and j.stamp is not None  # fit_bundle shares the images
    fit = fit_stamp_meta(train.models, train.labels, images=data[0], image_labels=data[1],
                         num_classes=k, config=j.settings.stamp_config(),
                         val_models=val.models, val_labels=val.labels, seed=j.seed + j.stamp,
                         device=j.device, description=f"meta-classifier ({STAMP}.{j.stamp})")
    calibration = _calibration(raw_scores(fit.meta, val.models), np.asarray(val.labels),
                               j.settings.fpr, fit.best_epoch)
    calibration.update(kind=STAMP, num_anchors=int(fit.meta.anchors.shape[0]))
    return _fitted(fit.meta, calibration, k, fit.history, train, val)


def fit_search_entries(folder: str | Path, settings: TrainSettings, data: ImageDataset,
                       num_classes: int, *, seed: int = 0,
                       ) -> dict[str, tuple[SearchProbe, dict[str, Any]]]:
    """The trigger-search probe and its flow readout (search.py) with anchors from
    ``data`` (the defender's share), read against the benign training shadows in
    ``folder`` and calibrated on the held-out ones: bundle entries and their
    calibrations, by entry name (``search``, ``search_flow``)."""
    train, val = load_shadow_split(folder, settings, seed)
    return fit_search_probes(
        data.x, data.labels(), num_classes, seed=seed, fpr=settings.fpr,
        normalise_on=[m for m, y in zip(train.models, train.labels) if y == 0],
        held_out_benign=[m for m, y in zip(val.models, val.labels) if y == 0])


def fit_bundle(folder: str | Path, settings: TrainSettings, *, name: str,
               data: ImageDataset, seed: int = 0, device: str | None = None,
               extra_info: dict[str, Any] | None = None, backend: str = "sequential",
               workers: int | None = None, threads: int | None = None) -> MetaBundle:
    """Train each variant on the shadows in ``folder`` and calibrate it.

    ``data``: the defender's whole share, as given to :func:`train_shadow_set` (the
    ``qt_data`` members start their queries from its ``query_holdout`` pool).
    Variants are independent: ``backend="processes"`` trains them side by side.
    ``threads``: torch threads per variant (``None``: leave as is).
    """
    settings.validate()
    check_member_data(settings, data)
    t0 = time.perf_counter()
    shape = data.input_shape
    trained_on, pool = query_pool_split(data, settings.query_holdout, seed=seed)
    mean, std = float(trained_on.x.mean()), float(trained_on.x.std())
    jobs = [Task(v, None, (_VariantJob(str(folder), settings, v, seed, shape, mean, std,
                                       device),))
            for v in settings.variants]
    jobs += [Task(m, None, (_VariantJob(str(folder), settings, "qt", seed, shape, mean, std,
                                        device, i),))
             for i, m in enumerate(settings.member_names())]
    jobs += [Task(m, None, (_VariantJob(str(folder), settings, STAMP, seed, shape, mean, std,
                                        device, stamp=i),))
             for i, m in enumerate(settings.stamp_names())]
    shared = (pool.x, pool.labels()) if settings.needs_images() else None
    run = run_tasks(_fit_variant, jobs, shared=shared, backend=backend,
                    workers=workers, threads=threads, description="meta-classifiers")
    variants: dict[str, MetaClassifier | StampMeta | SearchProbe] = {}
    calibration: dict[str, Any] = {}
    fits: dict[str, Any] = {}
    k = 0
    shadow_summary: dict[str, Any] = {}
    stamp_summary: dict[str, Any] = {}
    for v in (*settings.variants, *settings.member_names(), *settings.stamp_names()):
        res = run.results[v]
        k = int(res["num_classes"])
        meta: MetaClassifier | StampMeta
        if v in settings.stamp_names():
            meta = StampMeta.from_state(res["state"], k)
        else:
            cfg = settings.meta_config(v) if v in VARIANTS else settings.member_config()
            meta = MetaClassifier(shape, k, num_queries=cfg.num_queries, hidden=cfg.hidden,
                                  one_class=cfg.variant == "one_class", response=cfg.response)
            meta.load_state_dict(res["state"])
        meta.eval()
        for p in meta.parameters():
            p.requires_grad_(False)
        variants[v], calibration[v], fits[v] = meta, res["calibration"], res["history"]
        if v in settings.stamp_names():
            stamp_summary = res["shadows"]  # their own jumbo family's shadows
        else:
            shadow_summary = res["shadows"]
    info = {
        "training": {
            "settings": {**asdict(settings), "archs": list(settings.archs),
                         "variants": list(settings.variants)},
            "seed": seed,
            "data": {"source": data.source, "sha256": data.sha256, "samples": len(data),
                     "shadow_samples": len(trained_on), "query_pool_samples": len(pool),
                     "pixel_mean": mean, "pixel_std": std},
            "shadows": shadow_summary,
            **({"stamp_shadows": {**stamp_summary, "family": settings.stamp_family}}
               if stamp_summary else {}),
            "history": fits,
            "meta_seconds": round(time.perf_counter() - t0, 1),
        },
        "tool": {"name": "trojanscan", "version": __version__},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **(extra_info or {}),
    }
    if settings.search_probe:
        for kind, (probe, cal) in fit_search_entries(folder, settings, data, k,
                                                     seed=seed).items():
            variants[kind], calibration[kind] = probe, cal
    ensembles = {DATA_ENSEMBLE: settings.member_names()} if settings.data_members else {}
    if settings.stamp_members:
        ensembles[STAMP] = settings.stamp_names()
    recipe = trained_recipe({*variants, *ensembles}, settings.variants)
    return MetaBundle(name, shape, k, variants, calibration, info, ensembles=ensembles,
                      recipe=recipe)
