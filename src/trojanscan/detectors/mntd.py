"""Meta Neural Trojan Detection — Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI Trojans
Using Meta Neural Analysis", IEEE S&P 2021.

Needs the model only (the clean data just give the input shape): the model answers a
few tuned query inputs and a meta-classifier, trained beforehand on hundreds of benign
and jumbo-trojaned shadow models, reads the answers. Scoring takes milliseconds (the
default's trigger search: about half a second on one CPU thread).

Meta-classifiers for 1×28×28 → 10 (Fashion-MNIST-like) and 1×8×8 → 10 (digits) models
ship with the package and are picked by shape; for other shapes train one with
``trojanscan mntd train`` and pass its path as ``meta_classifier``.

Score: the binary variants (``qt``, ``no_qt``) give the meta-classifier's probability
(sigmoid of its BCE-trained output); ``one_class`` gives the share of held-out benign
shadows the model out-scores. ``combined`` (beyond the paper) sums the ``qt`` and
``one_class`` outputs, each standardised against its held-out benign shadows, and is
scored like ``one_class`` against the same sum over those shadows. ``qt_data`` (beyond
the paper, in bundles trained with ``--data-members N``, among them the shipped
Fashion-MNIST one): N query-tuned meta-classifiers whose queries start from the
defender's images and stay within a small L∞ ball of them, summed the same way.
``stamp`` (beyond the paper, trojanscan.mntd.stamps): meta-classifiers that learn stamps,
apply them to the defender's clean images and read the class-order-free change of the
model's probabilities; ``stamp_qt_data`` / ``stamp_qt`` / ``stamp_one_class`` add the stamp
members' mean z-score to that of ``qt_data`` / ``qt`` / ``one_class``
(``stamp_qt_data_one_class``: to both ``qt_data``'s and ``one_class``'s). ``search``
(beyond the paper, trojanscan.mntd.search): a per-class trigger search on the model
itself, each class's cost read against clean reference models; about half a second per
small CNN on one CPU thread. ``stamp_one_class_search`` and
``stamp_qt_data_one_class_search`` add its z-score to ``stamp_one_class`` and
``stamp_qt_data_one_class`` (``stamp_one_class_search_x2``: the search weighed twice).
``search_flow`` (beyond the paper): the same search read for where each
class's stamped anchors went, against the reference models (no second search);
``stamp_one_class_search_flow`` adds both readouts, each weighed twice, to
``stamp_one_class``.
The default ``auto`` takes the first whose parts the bundle
holds of ``stamp_one_class_search_flow`` (the shipped Fashion-MNIST one: 256 benign and
256 jumbo shadows, and 64 clean reference models), ``stamp_one_class_search_x2``,
``stamp_qt_data_one_class_search``,
``stamp_qt_data_one_class``, ``stamp_qt_data``, ``stamp_one_class``, ``qt_data`` and
the paper's ``qt``. On 288 held-out Fashion-MNIST models whose backdoors the attacker
verified, stamp_one_class_search_flow scores AUROC 0.972 (bootstrap 95% interval
0.951-0.989) against 0.957 for stamp_one_class_search_x2, flagging 81% of the
backdoored models and no clean one at the reference threshold (docs/BENCHMARKS.md).
``p_value``, threshold and (with reference models) score: by default (``calibration=
"auto"``) against the raw outputs of the bundle's clean *reference* models, trained
outside the defender's share with varied recipes (the shipped Fashion-MNIST bundle has 64),
else against its held-out benign shadows. The conformal p-value is no smaller than
1/(n+1); the verdict is raw output above the threshold at a 5% false-positive rate on that
null unless ``threshold`` overrides it. On fresh real models (set 13) the shadow null
flagged 8% of clean models (19–36% on other sets), the reference null none, at the price
of a far lower TPR (qt_data 0.25 vs 0.78): read the score as a ranking and the verdict as
evidence, not proof. MNTD names no target class.

Known to fail: backdoors far from the jumbo distribution whose effect does not show on
the queries (the paper's adaptive attacks), models whose output scale is unlike the
shadows' (temperature-scaled logits, probability outputs), and any architecture family
far from the shadows' (the shipped ones used small_cnn, lenet and mlp).
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import nn

from ..dataset import ImageDataset
from ..exceptions import DetectorNotApplicable, ModelError, TrojanscanWarning, bad_param
from ..mntd.calibration import (
    combine_standardised,
    ecdf_score,
    p_value,
    sigmoid,
    standardised_sums,
    threshold_at_fpr,
)
from ..mntd.meta import DATA_ENSEMBLE, VARIANTS
from ..mntd.pretrained import (
    MetaBundle,
    available_builtins,
    check_fits,
    find_builtin,
    resolve,
)
from ..mntd.search import SEARCH, SEARCH_FLOW, SearchProbe, shared_respond
from ..mntd.stamps import STAMP
from ..utils import pick_device
from .base import ModelDetector, ModelScanResult, borrow_model

#: the detector's variants: the bundle's, and their combination (beyond the paper)
COMBINED = "combined"
COMBINED_PARTS = ("qt", "one_class")
AUTO = "auto"
#: variants that add up other variants (beyond the paper): an ensemble's members count
#: 1/n each, so every named part weighs the same
MIXES: dict[str, tuple[str, ...]] = {
    "stamp_qt_data": (STAMP, DATA_ENSEMBLE),
    "stamp_qt": (STAMP, "qt"),
    "stamp_one_class": (STAMP, "one_class"),
    "stamp_qt_data_one_class": (STAMP, DATA_ENSEMBLE, "one_class"),
    "stamp_qt_data_one_class_search": (STAMP, DATA_ENSEMBLE, "one_class", SEARCH),
    "stamp_one_class_search": (STAMP, "one_class", SEARCH),
    "stamp_one_class_search_x2": (STAMP, "one_class", SEARCH),
    "stamp_one_class_search_flow": (STAMP, "one_class", SEARCH, SEARCH_FLOW),
}
#: a mix's named parts that weigh other than 1 (``_x2``: the search counts twice;
#: ``_flow``: both readouts of the search count twice; both chosen on development models)
MIX_WEIGHTS: dict[str, dict[str, float]] = {
    "stamp_one_class_search_x2": {SEARCH: 2.0},
    "stamp_one_class_search_flow": {SEARCH: 2.0, SEARCH_FLOW: 2.0},
}
#: what ``auto`` takes: the first whose parts the bundle holds, best first on held-out
#: models (docs/BENCHMARKS.md)
AUTO_ORDER = ("stamp_one_class_search_flow", "stamp_one_class_search_x2",
              "stamp_qt_data_one_class_search", "stamp_qt_data_one_class", "stamp_qt_data",
              "stamp_one_class", DATA_ENSEMBLE, "qt")
DETECTOR_VARIANTS = (AUTO, *VARIANTS, COMBINED, DATA_ENSEMBLE, STAMP, SEARCH, SEARCH_FLOW,
                     *MIXES)
#: the variants that sum several standardised meta-classifier outputs
SUMMED = (COMBINED, DATA_ENSEMBLE, STAMP, *MIXES)
#: the bundle ensembles a variant of the same name scores
ENSEMBLES = (DATA_ENSEMBLE, STAMP)
#: what the verdict's threshold, p-value and score are calibrated on
CALIBRATIONS = (AUTO, "shadows", "reference")
#: a backdoored verdict at the held-out shadows' threshold (benchmarks/results/
#: mntd_sets1516.json, mntd_sets1718.json: that threshold flags 11% (qt), 22% (qt_data)
#: and 68-69% (stamp_qt_data_one_class) of 72 fresh clean Fashion-MNIST models; the
#: reference models' none)
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


def holds(bundle: MetaBundle, variant: str) -> bool:
    """Whether the bundle has the entries ``variant`` scores with (``qt``, which every
    bundle is trained with, always counts)."""
    if variant in MIXES:
        return all(holds(bundle, v) for v in MIXES[variant])
    return variant in bundle.ensembles or variant in bundle.variants or variant == "qt"


def query_grid(queries: torch.Tensor) -> np.ndarray:
    """The queries side by side as one ``H×(Q·(W+1))`` (or ``×C``) image in [0, 1]."""
    q = queries.detach().cpu().clamp(0, 1)
    c, h = int(q.shape[1]), int(q.shape[2])
    pad = torch.ones(q.shape[0], c, h, 1)
    row = torch.cat([torch.cat([qi, pi], dim=2) for qi, pi in zip(q, pad)], dim=2)
    arr = row.numpy()
    return arr[0] if c == 1 else np.transpose(arr, (1, 2, 0))


class MNTD(ModelDetector):
    """MNTD with a shipped or user-trained meta-classifier (see the module docstring).

    ``meta_classifier``: ``None`` (pick the shipped one by the model's shape), a built-in
    name (``fashion-mnist``, ``digits``) or a path to a bundle (``.json``/``.safetensors``).
    ``variant``: ``auto`` (default: the first of :data:`AUTO_ORDER` whose parts the
    bundle holds: ``stamp_one_class_search_flow``, ``stamp_one_class_search_x2``,
    ``stamp_qt_data_one_class_search``,
    ``stamp_qt_data_one_class``, ``stamp_qt_data``, ``stamp_one_class``, ``qt_data``,
    ``qt``),
    ``qt`` (query tuning, the paper's), ``no_qt``, ``one_class``, ``combined`` (``qt`` +
    ``one_class``, standardised against the benign shadows), ``qt_data`` (the bundle's
    ensemble of data-started query-tuned members, summed the same way), ``stamp`` (its
    stamp-probing members) or
    ``stamp_qt_data`` / ``stamp_qt`` / ``stamp_one_class`` / ``stamp_qt_data_one_class``
    (the stamp members' mean z-score plus that of ``qt_data`` / ``qt`` / ``one_class`` /
    both ``qt_data`` and ``one_class``), ``search`` (the per-class trigger search) or
    ``stamp_qt_data_one_class_search`` / ``stamp_one_class_search`` (that plus the
    stamps, ``qt_data`` if named, and ``one_class``), ``stamp_one_class_search_x2`` (the
    same with the search weighed twice), ``search_flow`` (where the search sent each
    class) or ``stamp_one_class_search_flow`` (``stamp_one_class`` plus both readouts of
    the search, each weighed twice).
    ``threshold``: raw-output threshold overriding the bundle's (for the summed variants:
    in units of the summed z-scores).
    ``calibration``: the null distribution of threshold, p-value and score — ``auto``
    (default: the bundle's clean reference models where it has them, else its held-out
    benign shadows), ``shadows`` or ``reference`` (an error for a bundle without them).
    Against reference models the score is the share of them the model out-scores.
    """

    name: ClassVar[str] = "mntd"

    def __init__(self, *, meta_classifier: str | None = None, variant: str = AUTO,
                 threshold: float | None = None, calibration: str = AUTO, seed: int = 0,
                 device: str | None = None) -> None:
        self.meta_classifier = meta_classifier
        self.variant = variant
        self.threshold = threshold
        self.calibration = calibration
        self.seed = seed
        self.device = device

    def fit(self, model: nn.Module, clean: ImageDataset) -> ModelScanResult:
        t0 = time.perf_counter()
        if self.variant not in DETECTOR_VARIANTS:
            raise bad_param("variant", DETECTOR_VARIANTS, self.variant)
        if self.calibration not in CALIBRATIONS:
            raise bad_param("calibration", CALIBRATIONS, self.calibration)
        if not isinstance(clean, ImageDataset):
            raise bad_param("clean", "an ImageDataset", type(clean).__name__)
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
            variant = self.variant
            if variant == AUTO:
                variant = next(v for v in AUTO_ORDER if holds(bundle, v))
            parts, weights = self._parts(bundle, variant)
            raws: dict[str, float] = {}
            cals = {}
            memo: dict[str, torch.Tensor] = {}  # the search's two readouts: one search
            for v in parts:
                meta, cals[v] = bundle.variant(v)
                if dev.type != "cpu":
                    meta = copy.deepcopy(meta).to(dev)
                with torch.no_grad():
                    responses = (shared_respond(meta, model, memo)
                                 if isinstance(meta, SearchProbe) else meta.respond(model))
                    raws[v] = float(meta.head(responses.unsqueeze(0))[0])
                if v == parts[0]:
                    shown = meta
                    with torch.no_grad():
                        query_pred = model(meta.preview()).argmax(1).cpu().tolist()
        cal = cals[parts[0]]
        summed = variant in SUMMED
        benign_of = [list(cals[v].get("benign_raw", [])) for v in parts]
        if summed:
            try:
                raw, benign_arr = combine_standardised([raws[v] for v in parts], benign_of,
                                                       weights)
            except ValueError as exc:
                raise ModelError(f"MNTD: the {variant} variant needs calibration of "
                                 f"{', '.join(parts)} on the same benign shadows ({exc})"
                                 ) from exc
            benign: list[float] = benign_arr.tolist()
            default_threshold = threshold_at_fpr(benign, float(cal.get("fpr", 0.05)))
            one_class = True
        else:
            raw, benign = raws[parts[0]], benign_of[0]
            default_threshold = float(cal.get("threshold", 0.0))
            one_class = shown.one_class
        reference = self._reference_null(bundle, variant, parts, cals, benign_of, weights)
        if reference is not None:
            null = reference
            default_threshold = threshold_at_fpr(null, float(cal.get("fpr", 0.05)))
            score = ecdf_score(raw, null)
        else:
            null = benign
            score = ecdf_score(raw, benign) if one_class else sigmoid(raw)
        threshold = float(self.threshold if self.threshold is not None else default_threshold)
        p = p_value(raw, null) if len(null) else None
        verdict: Literal["backdoored", "clean"] = "backdoored" if raw > threshold else "clean"
        warn: tuple[str, ...] = ()
        if verdict == "backdoored" and reference is None and self.threshold is None:
            warn = (SHADOW_NULL_WARNING.format(variant=variant),)
            warnings.warn(warn[0], TrojanscanWarning, stacklevel=3)
        evidence = {
            "raw_score": raw, "threshold": threshold, "variant": variant,
            "meta_classifier": bundle.name,
            "meta_classifier_path": None if bundle.path is None else str(bundle.path),
            "num_queries": shown.num_queries, "query_predictions": query_pred,
            "component_raw_scores": raws if summed else None,
            "calibration": {"source": ("benign_shadows" if reference is None
                                       else "reference_models"),
                            "benign_shadows": len(benign),
                            "reference_models": 0 if reference is None else len(reference),
                            "validation_auroc": (None if summed else cal.get("val_auroc")),
                            "fpr": cal.get("fpr")},
        }
        return ModelScanResult(
            detector=self.name, verdict=verdict, score=float(score), suspected_targets=(),
            seconds=time.perf_counter() - t0, seed=self.seed, params=self.get_params(),
            p_value=p, evidence=evidence, warnings=warn,
            images={"mntd_queries": query_grid(shown.preview())})

    def _reference_null(self, bundle: MetaBundle, variant: str, parts: tuple[str, ...],
                        cals: dict, benign_of: list[list[float]],
                        weights: tuple[float, ...]) -> list[float] | None:
        """The clean reference models' raw outputs on ``variant``'s scale, when this
        calibration uses them (``None``: calibrate on the benign shadows)."""
        if self.calibration == "shadows":
            return None
        refs = [cals[v].get("reference_raw") for v in parts]
        if not all(refs):
            if self.calibration == "reference":
                raise ModelError(f"MNTD: calibration='reference' needs the meta-classifier's "
                                 f"reference models, and {bundle.name} has none for "
                                 f"{variant}; add them with trojanscan.mntd.reference.calibrate "
                                 "(scripts/make_mntd_pretrained.py --reference-only) or use "
                                 "calibration='shadows'")
            return None
        if variant not in SUMMED:
            return [float(v) for v in refs[0]]
        try:
            return standardised_sums(refs, benign_of, weights).tolist()
        except ValueError as exc:
            raise ModelError(f"MNTD: {bundle.name}'s reference outputs for {variant} do "
                             f"not match ({exc})") from exc

    @staticmethod
    def _parts(bundle: MetaBundle, variant: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The bundle entries ``variant`` scores with, and their weights in the sum."""
        if variant in MIXES:
            names: list[str] = []
            weights: list[float] = []
            for piece in MIXES[variant]:
                sub, _ = MNTD._parts(bundle, piece)
                names += sub
                weights += [MIX_WEIGHTS.get(variant, {}).get(piece, 1.0) / len(sub)] * len(sub)
            return tuple(names), tuple(weights)
        if variant in ENSEMBLES:
            members = bundle.members(variant)
            return members, (1.0,) * len(members)
        parts = COMBINED_PARTS if variant == COMBINED else (variant,)
        if variant == COMBINED and not set(parts) <= set(bundle.variants):
            raise ModelError(f"MNTD: the combined variant needs the bundle's "
                             f"{' and '.join(COMBINED_PARTS)} meta-classifiers; "
                             f"{bundle.name} has {', '.join(sorted(bundle.variants))}")
        return parts, (1.0,) * len(parts)

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
