"""Meta Neural Trojan Detection — Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans
Using Meta Neural Analysis", IEEE S&P 2021.

Needs the model only (the clean data just give the input shape): the model answers a
few tuned query inputs and a meta-classifier, trained beforehand on hundreds of benign
and jumbo-trojaned shadow models, reads the answers. MNTD's verdict names no target
class; with the trigger search of the shipped Fashion-MNIST bundle it gives one p-value
per label (``label_p_values``: where the search's stamped anchors go, against the
reference models), from which ``scan`` names targets.

Meta-classifier *bundles* for 1×28×28 → 10 (Fashion-MNIST-like) and 1×8×8 → 10 (digits)
models ship with the package and are picked by shape; for other shapes train one with
``trojanscan mntd train`` and pass its path as ``meta_classifier``.

Each bundle declares its *recipe* (:mod:`trojanscan.mntd.recipe`): which of its entries
the default (``variant="auto"``) reads, their weights and the null it is calibrated on.
The shipped Fashion-MNIST bundle's recipe sums, as z-scores against its held-out benign
shadows, three stamp-probing meta-classifiers (:mod:`trojanscan.mntd.stamps`), the
paper's one-class meta-classifier and, weighed twice each, the two readouts of a per-class
trigger search on the model itself (:mod:`trojanscan.mntd.search`; about a second per
small CNN on one CPU thread); it is calibrated on 100 clean reference models: 64 trained
with varied recipes of its own, and 36 trained elsewhere (other architectures and
optimisers), added with :func:`trojanscan.mntd.reference.add_references`. The shipped
digits bundle's recipe is the paper's ``qt``. The paper's variants can also be named:
``qt`` (query tuning), ``no_qt`` and ``one_class``, where the bundle holds them (the
digits bundle does; the Fashion-MNIST one holds ``one_class``).

Score: one binary meta-classifier (``qt``, ``no_qt``) on its held-out benign shadows
gives its probability (sigmoid of its BCE-trained output); otherwise the score is the
share of the null (reference models, or held-out benign shadows) the model out-scores.
The p-value is the conformal one inside the null's range and a fitted tail beyond it
(:func:`~trojanscan.mntd.calibration.tail_p_value`), so it orders models beyond every
reference; the verdict is raw output above the
threshold at the recipe's false-positive rate (5%) on that null unless ``threshold``
overrides it. Clean models trained on other data than the shadows out-score held-out
shadows, so a verdict calibrated on shadows flags many clean models (the detector warns);
read the score as a ranking and the verdict as evidence, not proof. Benchmark figures
and the commands behind them are in docs/BENCHMARKS.md.

Known to fail: backdoors far from the jumbo distribution whose effect does not show on
the queries (the paper's adaptive attacks), models whose output scale is unlike the
shadows' (temperature-scaled logits, probability outputs), and any architecture family
far from the shadows' (the shipped ones used small_cnn, lenet and mlp).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..dataset import ImageDataset
from ..exceptions import DetectorNotApplicable, ModelError, TrojanscanWarning, bad_param
from ..mntd.calibration import (
    combine_standardised,
    ecdf_score,
    fit_tail,
    sigmoid,
    standardised_sums,
    tail_p_value,
    threshold_at_fpr,
)
from ..mntd.meta import VARIANTS
from ..mntd.pretrained import (
    MetaBundle,
    available_builtins,
    check_fits,
    find_builtin,
    resolve,
)
from ..mntd.recipe import Recipe, single
from ..mntd.reference import own_references
from ..mntd.search import FlowProbe, respond_raw, target_flow_z
from ..utils import pick_device
from .base import ModelDetector, ModelScanResult, borrow_model

AUTO = "auto"
#: the detector's variants: the bundle's recipe, or one of the paper's meta-classifiers
DETECTOR_VARIANTS = (AUTO, *VARIANTS)
#: what the verdict's threshold, p-value and score are calibrated on
CALIBRATIONS = (AUTO, "shadows", "reference")
#: which reference models the null holds: all, or only those of the bundle's own recipe
REFERENCE_SETS = ("all", "own")
SHADOW_NULL_WARNING = (
    "mntd: the {variant} verdict is calibrated on held-out shadow models, which clean "
    "models trained on other data out-score (on fresh Fashion-MNIST models this threshold "
    "flagged 11-69% of the clean ones, depending on the variant): read the score as a "
    "ranking, or calibrate on clean reference models ('trojanscan mntd train "
    "--reference-models N')")


def _device_of(model: nn.Module, fallback: str | None) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return pick_device(fallback)


def query_grid(queries: torch.Tensor) -> np.ndarray:
    """The queries side by side as one ``H×(Q·(W+1))`` (or ``×C``) image in [0, 1]."""
    q = queries.detach().cpu().clamp(0, 1)
    c, h = int(q.shape[1]), int(q.shape[2])
    pad = torch.ones(q.shape[0], c, h, 1)
    row = torch.cat([torch.cat([qi, pi], dim=2) for qi, pi in zip(q, pad)], dim=2)
    arr = row.numpy()
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


class MNTD(ModelDetector):
    """MNTD with a shipped or user-trained meta-classifier bundle (see the module docstring).

    ``meta_classifier``: ``None`` (pick the shipped one by the model's shape), a built-in
    name (``fashion-mnist``, ``digits``) or a path to a bundle (``.json``/``.safetensors``).
    ``variant``: ``auto`` (default: the bundle's recipe) or one of the paper's
    meta-classifiers the bundle holds — ``qt`` (query tuning), ``no_qt``, ``one_class``.
    ``threshold``: raw-output threshold overriding the calibrated one (for a summed
    recipe: in units of the summed z-scores).
    ``calibration``: the null distribution of threshold, p-value and score — ``auto``
    (default: the recipe's; for a named variant, the bundle's clean reference models
    where it has them, else its held-out benign shadows), ``shadows`` or ``reference``
    (an error for a bundle without them). Against a null the score is the share of it
    the model out-scores.
    ``architecture_null``: raw outputs (on this detector's scale) of clean models of the
    model's own architecture, e.g. self-references (:mod:`trojanscan.self_reference`); the
    model's raw output is lowered by how far their median lies above the null's median
    (never raised) before threshold, score and p-value; the evidence keeps both.
    ``references``: ``all`` (default) reads against every reference model the bundle holds;
    ``own`` only against those of its own recipe, leaving out clean models added with
    :func:`~trojanscan.mntd.reference.add_references` (more sensitive on models trained
    like them, more false alarms on models trained otherwise).
    ``seed``: the trigger search's random start (a recipe with a search; other parts are
    deterministic). Seed 0 starts the search where the bundle's reference models were
    searched from; other seeds show how stable a score is.
    """

    name: ClassVar[str] = "mntd"
    #: runs without clean data (``input_shape`` instead): only the shape is read
    data_free: ClassVar[bool] = True

    def __init__(self, *, meta_classifier: str | None = None, variant: str = AUTO,
                 threshold: float | None = None, calibration: str = AUTO, seed: int = 0,
                 device: str | None = None,
                 input_shape: tuple[int, int, int] | None = None,
                 architecture_null: list[float] | None = None,
                 references: str = "all") -> None:
        self.meta_classifier = meta_classifier
        self.variant = variant
        self.threshold = threshold
        self.calibration = calibration
        self.seed = seed
        self.device = device
        self.input_shape = input_shape
        self.architecture_null = architecture_null
        self.references = references

    def fit(self, model: nn.Module, clean: ImageDataset | None = None) -> ModelScanResult:
        t0 = time.perf_counter()
        if self.variant not in DETECTOR_VARIANTS:
            raise bad_param("variant", DETECTOR_VARIANTS, self.variant)
        if self.calibration not in CALIBRATIONS:
            raise bad_param("calibration", CALIBRATIONS, self.calibration)
        if self.references not in REFERENCE_SETS:
            raise bad_param("references", REFERENCE_SETS, self.references)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**32):
            raise bad_param("seed", "an integer in [0, 2**32)", self.seed)
        if clean is None and self.input_shape is not None and len(self.input_shape) == 3:
            c, h, w = (int(d) for d in self.input_shape)
            shape = (c, h, w)
        elif not isinstance(clean, ImageDataset):
            raise bad_param("clean", "an ImageDataset (or input_shape (C, H, W) without data)",
                            type(clean).__name__)
        else:
            shape = clean.input_shape
        bundle = resolve(self.meta_classifier)
        with borrow_model(model):
            dev = _device_of(model, self.device)
            k = self._num_classes(model, shape, dev)
            if bundle is None:
                bundle = find_builtin(shape, k)
                if bundle is None:
                    have = ", ".join(f"{n} ({b.shape_text()})"
                                     for n, b in available_builtins().items()) or "none"
                    raise DetectorNotApplicable(
                        f"no MNTD meta-classifier for {'×'.join(map(str, shape))} → {k} "
                        f"models (shipped: {have}); train one with 'trojanscan mntd train'")
            check_fits(bundle, shape, k)
            if self.references == "own":
                bundle = own_references(bundle)
            recipe = self._recipe(bundle)
            parts, weights = recipe.entries(bundle.ensembles)
            raws: dict[str, float] = {}
            cals = {}
            memo: dict[str, torch.Tensor] = {}  # the search's two readouts: one search
            target_z: np.ndarray | None = None
            for v in parts:
                meta, cals[v] = bundle.variant(v)
                if dev.type != "cpu":
                    meta = copy.deepcopy(meta).to(dev)
                responses, raws[v] = respond_raw(meta, model, memo, seed=self.seed)
                if isinstance(meta, FlowProbe):
                    target_z = target_flow_z(responses, meta.ref_mean, meta.ref_std)
                if v == parts[0]:
                    shown = meta
                    with torch.no_grad():
                        query_pred = model(meta.preview()).argmax(1).cpu().tolist()
        added = (bundle.info.get("reference") or {}).get("added", [])
        summed = recipe.summed(bundle.ensembles)
        benign_of = [list(cals[v].get("benign_raw", [])) for v in parts]
        raw, benign, null, threshold = self._calibrated(bundle, recipe, parts, weights, raws,
                                                        cals, benign_of)
        one_class = summed or shown.one_class
        on_reference = null is not benign
        shift = self._architecture_shift(null)
        raw_seen, raw = raw, raw - shift
        score = ecdf_score(raw, null) if (on_reference or one_class) else sigmoid(raw)
        threshold = float(self.threshold if self.threshold is not None else threshold)
        tail = fit_tail(null) if len(null) else None
        p, p_source = tail_p_value(raw, null, tail) if len(null) else (None, None)
        label_p = self._label_p_values(target_z, cals.get("search_flow", {}), on_reference)
        verdict: Literal["backdoored", "clean"] = "backdoored" if raw > threshold else "clean"
        label = "default" if self.variant == AUTO else self.variant
        warn: tuple[str, ...] = ()
        if verdict == "backdoored" and not on_reference and self.threshold is None:
            warn = (SHADOW_NULL_WARNING.format(variant=label),)
            warnings.warn(warn[0], TrojanscanWarning, stacklevel=3)
        cal = cals[parts[0]]
        evidence = {
            "raw_score": raw_seen, "threshold": threshold,
            "architecture_null": None if self.architecture_null is None else {
                "raw_scores": [float(v) for v in self.architecture_null], "shift": shift,
                "shifted_raw_score": raw}, "variant": self.variant,
            "recipe": recipe.to_dict(),
            "meta_classifier": bundle.name,
            "meta_classifier_path": None if bundle.path is None else str(bundle.path),
            "num_queries": shown.num_queries, "query_predictions": query_pred,
            "component_raw_scores": raws if summed else None,
            "p_value_source": p_source,
            "p_value_empirical": None if p is None else (1 + sum(b >= raw for b in null))
            / (len(null) + 1),
            "tail_model": None if tail is None else tail.to_dict(),
            "target_flow_z": None if target_z is None else target_z.tolist(),
            "calibration": {"source": ("reference_models" if on_reference
                                       else "benign_shadows"),
                            "benign_shadows": len(benign),
                            "reference_models": len(null) if on_reference else 0,
                            "reference_added": [
                                {"label": a.get("label"), "count": a.get("count")}
                                for a in added] if on_reference else [],
                            "validation_auroc": (None if summed else cal.get("val_auroc")),
                            "fpr": recipe.fpr},
        }
        return ModelScanResult(
            detector=self.name, verdict=verdict, score=float(score), suspected_targets=(),
            seconds=time.perf_counter() - t0, seed=self.seed, params=self.get_params(),
            p_value=p, evidence=evidence, warnings=warn, label_p_values=label_p,
            images={"mntd_queries": query_grid(shown.preview())})

    def _architecture_shift(self, null: list[float]) -> float:
        """How far the null moves up to the median raw output of clean models of the
        model's own architecture (``architecture_null``, e.g. self-references): the
        model's raw output is lowered by it before threshold, score and p-value. Never
        negative: an architecture-matched null only removes the offset that clean models
        of an unlike architecture show, it never makes the detector more sensitive."""
        arch = self.architecture_null
        if arch is None:
            return 0.0
        vals = np.asarray([float(v) for v in arch], dtype=np.float64)
        if vals.size < 2 or not np.all(np.isfinite(vals)):
            raise bad_param("architecture_null", "at least 2 finite raw outputs of clean "
                            "models of the model's architecture", arch)
        if not len(null):
            return 0.0
        return float(max(0.0, np.median(vals) - float(np.median(null))))

    @staticmethod
    def _label_p_values(target_z: np.ndarray | None, flow_cal: Mapping[str, Any],
                        on_reference: bool,
                        ) -> tuple[float, ...] | None:
        """Per-label p-values for "this label is a target", from the trigger search's
        flows: label ``t``'s statistic is its largest flow z-score from any other class,
        read against the clean reference models' largest flow z-score over *all* class
        pairs (left-out, so a clean model's own maximum), by :func:`tail_p_value`. Each is
        therefore a p-value over every label at once (family-wise). ``None`` without the
        search, or when the verdict is not calibrated on reference models."""
        refs = flow_cal.get("reference_raw")
        if target_z is None or not on_reference or not refs:
            return None
        tail = fit_tail(refs)
        return tuple(float(tail_p_value(float(z), refs, tail)[0]) if np.isfinite(z) else 1.0
                     for z in target_z)

    def _recipe(self, bundle: MetaBundle) -> Recipe:
        """The bundle's recipe (``auto``) or the named variant alone, on the null that
        ``calibration`` asks for."""
        if self.variant == AUTO:
            recipe = bundle.recipe
        else:
            _, cal = bundle.variant(self.variant)
            recipe = single(self.variant, bool(cal.get("reference_raw")),
                            float(cal.get("fpr", bundle.recipe.fpr)))
        if self.calibration == AUTO or self.calibration == recipe.calibration:
            return recipe
        if self.calibration == "reference":
            names, _ = recipe.entries(bundle.ensembles)
            if not all(bundle.calibration.get(n, {}).get("reference_raw") for n in names):
                raise ModelError(f"MNTD: calibration='reference' needs the meta-classifier's "
                                 f"reference models, and {bundle.name} has none for "
                                 f"{self.variant}; add them with "
                                 "trojanscan.mntd.reference.calibrate or use "
                                 "calibration='shadows'")
        return Recipe(recipe.parts, self.calibration, recipe.fpr)

    @staticmethod
    def _calibrated(bundle: MetaBundle, recipe: Recipe, parts: tuple[str, ...],
                    weights: tuple[float, ...], raws: dict[str, float], cals: dict,
                    benign_of: list[list[float]],
                    ) -> tuple[float, list[float], list[float], float]:
        """The raw output, the benign shadows' outputs on its scale, the null it is read
        against (the benign list itself, or the reference models' outputs) and the
        calibrated threshold."""
        fpr = recipe.fpr
        if recipe.summed(bundle.ensembles):
            try:
                raw, benign_arr = combine_standardised([raws[v] for v in parts], benign_of,
                                                       weights)
            except ValueError as exc:
                raise ModelError(f"MNTD: {bundle.name}'s recipe needs calibration of "
                                 f"{', '.join(parts)} on the same benign shadows ({exc})"
                                 ) from exc
            benign: list[float] = benign_arr.tolist()
            threshold = threshold_at_fpr(benign, fpr)
        else:
            raw, benign = raws[parts[0]], benign_of[0]
            threshold = float(cals[parts[0]].get("threshold", 0.0))
        if recipe.calibration == "shadows":
            return raw, benign, benign, threshold
        refs = [cals[v]["reference_raw"] for v in parts]
        if not recipe.summed(bundle.ensembles):
            null = [float(v) for v in refs[0]]
        else:
            try:
                null = standardised_sums(refs, benign_of, weights).tolist()
            except ValueError as exc:
                raise ModelError(f"MNTD: {bundle.name}'s reference outputs do not match "
                                 f"({exc})") from exc
        return raw, benign, null, threshold_at_fpr(null, fpr)

    @staticmethod
    def _num_classes(model: nn.Module, shape: tuple[int, int, int], dev: torch.device) -> int:
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, *shape, device=dev))
        except Exception as exc:  # any failure of a user's model on well-formed input
            raise ModelError(f"MNTD: the model cannot process inputs of shape "
                             f"{'×'.join(map(str, shape))} ({type(exc).__name__}: {exc})"
                             ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            raise ModelError(f"MNTD: the model must return N×K logits, got "
                             f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        return int(out.shape[1])
