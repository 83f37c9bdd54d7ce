"""Meta-classifier files: saving, loading, and the ones shipped with the package.

A *bundle* is two files with the same stem: ``STEM.safetensors`` holds the tensors of
its entries (``qt.queries``, ``qt.fc.weight``, …, ``one_class.w``) and ``STEM.json``
says what they are (format version 3):

* ``input_shape``, ``num_classes`` — the models it fits;
* ``weights`` — the tensors file and its SHA-256 (checked on load);
* ``variants`` — one object per entry: its kind (``"kind"``: ``qt``, ``no_qt``,
  ``one_class``, ``stamp`` — trojanscan.mntd.stamps — or ``search`` / ``search_flow`` —
  trojanscan.mntd.search; an entry without it is named after its kind), its shape and
  its calibration (``benign_raw``: outputs on the held-out benign shadows; optionally
  ``reference_raw``: on clean reference models; ``threshold``). A ``search_flow`` entry
  with ``"search_of": NAME`` reads the search of entry NAME and stores only its own
  reference statistics;
* ``ensembles`` (optional) — named groups of entries scored together
  (``"stamp": ["stamp.0", "stamp.1", "stamp.2"]``);
* ``recipe`` — what the detector's default reads: parts, weights and calibration
  (:mod:`trojanscan.mntd.recipe`);
* anything else (``training``, ``reference``, ``tool``) records how it was made.

Anchor images whose pixels are multiples of 1/255 are stored as ``uint8`` tensors (read
as ``u / 255``, exactly); every other tensor as float32.

No pickles anywhere. Older bundles (format versions 1 and 2: no recipe; a flow entry
with its own copy of the search's anchors) are translated on load: their recipe is what
the detector's default scored for them (:func:`trojanscan.mntd.recipe.legacy_recipe`).

Shipped bundles (``trojanscan/data/``, made by ``scripts/make_mntd_pretrained.py``, then
cut to what their recipe reads with ``trojanscan mntd slim``): ``fashion-mnist`` for
1×28×28 → 10 models and ``digits`` for 1×8×8 → 10 models; :func:`find_builtin` picks
one by shape.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..exceptions import IncompatibleError, ModelError, ParameterError
from ..utils import atomic_path, atomic_write_text, sha256_file
from .meta import VARIANTS, MetaClassifier
from .recipe import Recipe, legacy_recipe
from .search import SEARCH, SEARCH_FLOW, FlowProbe, SearchProbe
from .stamps import STAMP, StampMeta

#: a bundle entry: one of MNTD's meta-classifiers, a stamp-probing one or a search probe
Meta = MetaClassifier | StampMeta | SearchProbe
#: entry kinds a bundle may hold
KINDS = (*VARIANTS, STAMP, SEARCH, SEARCH_FLOW)
#: the entry kinds whose module is not a MetaClassifier
_OWN_CLASS: Mapping[str, type[StampMeta] | type[SearchProbe]] = {
    STAMP: StampMeta, SEARCH: SearchProbe, SEARCH_FLOW: FlowProbe}

FORMAT = "trojanscan-mntd-meta"
FORMAT_VERSION = 3  # 2: entries may carry "kind"; optional "ensembles"; 3: "recipe"
#: built-in name -> file stem in trojanscan/data
BUILTINS: Mapping[str, str] = {"fashion-mnist": "mntd_fmnist", "digits": "mntd_digits"}


@dataclass(frozen=True)
class MetaBundle:
    """Meta-classifiers for one model shape, with their calibration."""

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    variants: Mapping[str, Meta]
    calibration: Mapping[str, Mapping[str, Any]]
    info: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: ensemble name -> the names of its member entries (in ``variants``)
    ensembles: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: what the detector's default reads; ``None``: the default of a bundle written
    #: before recipes (:func:`trojanscan.mntd.recipe.legacy_recipe`)
    recipe: Recipe = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for e, names in self.ensembles.items():
            _check_ensemble(e, names, self.variants)
        if self.recipe is None:
            object.__setattr__(self, "recipe", self._legacy_recipe())
        names, _ = self.recipe.entries(self.ensembles)
        missing = [n for n in names if n not in self.variants]
        if missing:
            raise ValueError(f"the recipe reads entries {missing} the bundle does not hold")
        if self.recipe.calibration == "reference" and not all(
                self.calibration.get(n, {}).get("reference_raw") for n in names):
            raise ValueError("the recipe is calibrated on reference models, but not every "
                             "part has reference outputs")

    def _legacy_recipe(self) -> Recipe:
        def has_reference(names: tuple[str, ...]) -> bool:
            return all(self.calibration.get(n, {}).get("reference_raw") for n in names)

        groups = {**{n: (n,) for n in self.variants}, **self.ensembles}
        first = next(iter(self.calibration.values()), {})
        return legacy_recipe({e: len(m) for e, m in self.ensembles.items()},
                             set(self.variants),
                             {g for g, names in groups.items() if has_reference(names)},
                             float(first.get("fpr", 0.05)))

    def shape_text(self) -> str:
        return f"{'×'.join(map(str, self.input_shape))} → {self.num_classes}"

    def variant(self, name: str) -> tuple[Meta, Mapping[str, Any]]:
        """The entry ``name`` and its calibration."""
        if name not in self.variants:
            raise ParameterError(f"invalid variant: expected one of "
                                 f"{', '.join(sorted(self.variants))} (in {self.name}), "
                                 f"got {name!r}")
        return self.variants[name], self.calibration.get(name, {})

    def members(self, ensemble: str) -> tuple[str, ...]:
        """The entries of ``ensemble``."""
        if ensemble not in self.ensembles:
            have = ", ".join(sorted(self.ensembles)) or "none"
            raise ModelError(f"MNTD: {self.name} has no {ensemble!r} ensemble (it has: "
                             f"{have})")
        return self.ensembles[ensemble]


def save_bundle(stem: str | Path, bundle: MetaBundle) -> tuple[Path, Path]:
    """Write ``stem.safetensors`` and ``stem.json`` atomically; returns both paths."""
    from safetensors.torch import save_file

    stem = Path(stem)
    weights, sidecar = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tensors: dict[str, torch.Tensor] = {}
    variants: dict[str, Any] = {}
    for e, names in bundle.ensembles.items():
        _check_ensemble(e, names, bundle.variants)
    members = {m for names in bundle.ensembles.values() for m in names}
    searches = {meta.search_key(): name for name, meta in bundle.variants.items()
                if type(meta) is SearchProbe}
    for name, meta in bundle.variants.items():
        search_of = (searches.get(meta.search_key()) if isinstance(meta, FlowProbe)
                     else None)
        for k, v in meta.state_dict().items():
            if search_of is None or k in _FLOW_OWN:
                tensors[f"{name}.{k}"] = _stored(k, v.detach().cpu().contiguous().float())
        cal = dict(bundle.calibration.get(name, {}))
        kind = cal.pop("kind", name)
        if kind not in KINDS or not isinstance(meta, _OWN_CLASS.get(kind, MetaClassifier)) or (
                getattr(meta, "kind", kind) != kind):  # a FlowProbe is a SearchProbe
            raise ParameterError(f"invalid bundle entry {name!r}: expected a variant name "
                                 f"({', '.join(KINDS)}) or a 'kind' in its calibration "
                                 "that matches its meta-classifier")
        shape: dict[str, Any]
        if isinstance(meta, StampMeta):
            shape = {"num_stamps": meta.num_stamps, "hidden": meta.hidden}
        elif isinstance(meta, SearchProbe):
            shape = {"search": dict(asdict(meta.config)),
                     **({"search_of": search_of} if search_of else {})}
        else:
            shape = {"num_queries": meta.num_queries, "hidden": meta.hidden,
                     "one_class": meta.one_class, "response": meta.response}
        variants[name] = {
            **({"kind": kind} if name in members or kind != name else {}), **shape, **cal,
        }
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": bundle.name,
        "input_shape": list(bundle.input_shape), "num_classes": bundle.num_classes,
        "weights": {"file": weights.name, "sha256": sha256_file(weights)},
        "variants": variants,
        **({"ensembles": {k: list(v) for k, v in bundle.ensembles.items()}}
           if bundle.ensembles else {}),
        "recipe": bundle.recipe.to_dict(),
        **{k: v for k, v in bundle.info.items()
           if k not in _STRUCTURAL},
    }
    atomic_write_text(sidecar, json.dumps(doc, indent=1) + "\n")
    return weights, sidecar


#: keys save_bundle writes from the bundle itself; a loaded bundle's info (its whole old
#: JSON) must not override them
_STRUCTURAL = ("format", "format_version", "name", "input_shape", "num_classes", "weights",
               "variants", "ensembles", "recipe")


#: entry keys that describe a meta-classifier's shape (not its calibration)
_SHAPE_KEYS = ("num_queries", "hidden", "one_class", "response", "num_stamps", "search",
               "search_of")
#: the tensors a flow entry stores itself when it reads another entry's search
_FLOW_OWN = ("ref_mean", "ref_std")
#: the calibration keys the detector reads (what :func:`slim` keeps)
_READ_KEYS = ("kind", "benign_raw", "reference_raw", "threshold", "fpr", "val_auroc")


def _stored(key: str, t: torch.Tensor) -> torch.Tensor:
    """Anchor images whose pixels are whole multiples of 1/255 as ``uint8`` (read back
    exactly as ``u / 255``), anything else as it is."""
    if key == "anchors":
        u = (t * 255).round().clamp(0, 255).to(torch.uint8)
        if torch.equal(u.float() / 255, t):
            return u
    return t


def _check_ensemble(name: str, members: Any, entries: Mapping[str, Any]) -> None:
    """Raise a ValueError unless ``members`` is a non-empty list of distinct entry names."""
    if not isinstance(members, (list, tuple)) or not members or not all(
            isinstance(m, str) for m in members):
        raise ValueError(f"ensemble {name!r} must list entry names, got {members!r}")
    missing = [m for m in members if m not in entries]
    if missing:
        raise ValueError(f"ensemble {name!r} names missing entries {missing}")
    if len(set(members)) != len(members):
        raise ValueError(f"ensemble {name!r} names an entry twice: {list(members)}")


def _sidecar_of(path: Path) -> Path:
    return path if path.suffix == ".json" else path.with_suffix(".json")


def load_bundle(path: str | Path) -> MetaBundle:
    """Read a bundle from its ``.json``, ``.safetensors`` or common stem."""
    from safetensors.torch import load_file

    sidecar = _sidecar_of(Path(path))
    if not sidecar.is_file():
        raise ParameterError(f"invalid meta_classifier: expected a built-in name "
                             f"({', '.join(BUILTINS)}) or an MNTD meta-classifier file "
                             f"(.json + .safetensors), got {str(path)!r}")
    try:
        doc = json.loads(sidecar.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, not {FORMAT!r}")
        weights = sidecar.parent / doc["weights"]["file"]
        if sha256_file(weights) != doc["weights"]["sha256"]:
            raise ValueError(f"{weights.name} does not match the SHA-256 in {sidecar.name}")
        tensors = {n: (t.float() / 255 if t.dtype == torch.uint8 else t)
                   for n, t in load_file(str(weights)).items()}
        shape = tuple(int(s) for s in doc["input_shape"])
        k = int(doc["num_classes"])
        variants: dict[str, Meta] = {}
        calibration: dict[str, dict[str, Any]] = {}
        for name, spec in doc["variants"].items():
            kind = spec.get("kind", name)
            if kind not in KINDS:
                raise ValueError(f"unknown variant {kind!r} (entry {name!r})")
            prefix = f"{name}."
            state = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
            if kind == SEARCH_FLOW and "search_of" in spec:  # the search's own tensors
                other = f"{spec['search_of']}."
                state.update({n[len(other):]: t for n, t in tensors.items()
                              if n.startswith(other) and n[len(other):] not in _FLOW_OWN})
            meta: Meta
            if kind in _OWN_CLASS:  # stamps and search probes: sizes read from the tensors
                meta = _OWN_CLASS[kind].from_state(state, k)
                if meta.input_shape != shape:
                    raise ValueError(f"entry {name!r} has anchors of shape {meta.input_shape}")
            else:
                meta = MetaClassifier(shape, k, num_queries=int(spec["num_queries"]),
                                      hidden=int(spec["hidden"]),
                                      one_class=bool(spec["one_class"]),
                                      response=str(spec.get("response", "logits")))
                meta.load_state_dict(state)
            meta.eval()
            for p in meta.parameters():
                p.requires_grad_(False)
            variants[name] = meta
            calibration[name] = {key: v for key, v in spec.items() if key not in _SHAPE_KEYS}
        raw_ensembles = doc.get("ensembles", {})
        if not isinstance(raw_ensembles, dict):
            raise ValueError(f"'ensembles' must map names to entry lists, got "
                             f"{type(raw_ensembles).__name__}")
        for e, names in raw_ensembles.items():
            _check_ensemble(str(e), names, variants)
        ensembles = {str(e): tuple(names) for e, names in raw_ensembles.items()}
        recipe = Recipe.from_dict(doc["recipe"]) if "recipe" in doc else None
        return MetaBundle(str(doc.get("name", sidecar.stem)), shape, k,  # type: ignore[arg-type]
                          variants, calibration, doc, sidecar, ensembles,
                          recipe)  # type: ignore[arg-type]
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise ModelError(f"{sidecar}: not a valid MNTD meta-classifier ({exc})") from exc


def slim(bundle: MetaBundle) -> MetaBundle:
    """A copy of ``bundle`` with only what its recipe reads: those entries (and their
    ensembles), their calibration's read keys and, of the training record, all but the
    per-epoch history."""
    names, _ = bundle.recipe.entries(bundle.ensembles)
    keep = set(names)
    info = dict(bundle.info)
    if isinstance(info.get("training"), Mapping):
        info["training"] = {k: v for k, v in info["training"].items() if k != "history"}
    return replace(
        bundle, variants={n: m for n, m in bundle.variants.items() if n in keep},
        calibration={n: {k: v for k, v in c.items() if k in _READ_KEYS}
                     for n, c in bundle.calibration.items() if n in keep},
        ensembles={e: m for e, m in bundle.ensembles.items()
                   if e in dict(bundle.recipe.parts)},
        info=info)


def builtin_path(name: str) -> Path:
    """Path of the shipped bundle ``name`` (its ``.json``)."""
    stem = BUILTINS[name]
    return Path(str(resources.files("trojanscan") / "data" / f"{stem}.json"))


@functools.lru_cache(maxsize=8)
def _load_builtin(name: str) -> MetaBundle:
    return load_bundle(builtin_path(name))


def available_builtins() -> dict[str, MetaBundle]:
    """Shipped bundles that are present in this installation, by name."""
    return {n: _load_builtin(n) for n in BUILTINS if builtin_path(n).is_file()}


def resolve(meta_classifier: str | Path | None) -> MetaBundle | None:
    """A built-in name or a path → its bundle; ``None`` stays ``None`` (pick by shape)."""
    if meta_classifier is None:
        return None
    if str(meta_classifier) in BUILTINS and not Path(meta_classifier).exists():
        name = str(meta_classifier)
        if not builtin_path(name).is_file():
            raise ModelError(f"the built-in MNTD meta-classifier {name!r} is missing from "
                             "this installation (reinstall trojanscan)")
        return _load_builtin(name)
    return load_bundle(meta_classifier)


def find_builtin(input_shape: tuple[int, ...], num_classes: int) -> MetaBundle | None:
    """The shipped bundle for models of this shape, if there is one."""
    for bundle in available_builtins().values():
        if bundle.input_shape == tuple(input_shape) and bundle.num_classes == num_classes:
            return bundle
    return None


def check_fits(bundle: MetaBundle, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise an IncompatibleError when the bundle was trained for another model shape."""
    if bundle.input_shape != tuple(input_shape) or bundle.num_classes != num_classes:
        raise IncompatibleError(
            f"MNTD meta-classifier {bundle.name!r} fits models "
            f"{bundle.shape_text()} but this model is "
            f"{'×'.join(map(str, input_shape))} → {num_classes}; train one for this shape "
            "with 'trojanscan mntd train'")
