"""Meta-classifier files: saving, loading, and the ones shipped with the package.

A *bundle* is two files with the same stem: ``STEM.safetensors`` holds the tensors of
one or more variants (``qt.queries``, ``qt.fc.weight``, …, ``one_class.w``) and
``STEM.json`` says what they are: the model shape they fit (``input_shape``,
``num_classes``), each variant's settings and calibration (raw scores of held-out
benign and trojaned shadow models, the decision threshold), the SHA-256 of the weights
file and how it was trained. No pickles anywhere. A bundle may also hold *ensembles*
(``"ensembles": {"qt_data": ["qt_data.0", …]}`` in the JSON): named groups of entries
whose meta-classifier kind (``"kind"``: ``qt``, ``no_qt``, ``one_class``, ``stamp`` —
trojanscan.mntd.stamps — or ``search`` / ``search_flow`` — trojanscan.mntd.search; an
entry without it is named after its kind) the detector scores together. Bundles without
ensembles (format version 1) load unchanged.

Shipped bundles (``trojanscan/data/``, made by ``scripts/make_mntd_pretrained.py``):
``fashion-mnist`` for 1×28×28 → 10 models and ``digits`` for 1×8×8 → 10 models;
:func:`find_builtin` picks one by shape.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..exceptions import IncompatibleError, ModelError, ParameterError
from ..utils import atomic_path, atomic_write_text, sha256_file
from .meta import VARIANTS, MetaClassifier
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
FORMAT_VERSION = 2  # 2: entries may carry "kind"; optional "ensembles"
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

    def shape_text(self) -> str:
        return f"{'×'.join(map(str, self.input_shape))} → {self.num_classes}"

    def variant(self, name: str) -> tuple[Meta, Mapping[str, Any]]:
        if name in (SEARCH, SEARCH_FLOW) and name not in self.variants:
            what = "trigger-search probe" if name == SEARCH else "search flow readout"
            raise ModelError(f"MNTD: {self.name} has no {what}; train a bundle "
                             "with 'trojanscan mntd train' (it adds one unless "
                             "--no-search-probe) or add one with "
                             "scripts/make_mntd_pretrained.py --search-only")
        if name not in self.variants:
            raise ParameterError(f"invalid variant: expected one of "
                                 f"{', '.join(sorted(self.variants))} (in {self.name}), "
                                 f"got {name!r}")
        return self.variants[name], self.calibration.get(name, {})

    def members(self, ensemble: str) -> tuple[str, ...]:
        if ensemble not in self.ensembles:
            have = ", ".join(sorted(self.ensembles)) or "none"
            flag = "--stamp-members" if ensemble == STAMP else "--data-members"
            raise ModelError(f"MNTD: {self.name} has no {ensemble!r} ensemble (it has: "
                             f"{have}); train one with 'trojanscan mntd train "
                             f"{flag} N'")
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
    for name, meta in bundle.variants.items():
        for k, v in meta.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous().float()
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
            shape = {"search": dict(asdict(meta.config))}
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
        **{k: v for k, v in bundle.info.items()
           if k not in _STRUCTURAL},
    }
    atomic_write_text(sidecar, json.dumps(doc, indent=1) + "\n")
    return weights, sidecar


#: keys save_bundle writes from the bundle itself; a loaded bundle's info (its whole old
#: JSON) must not override them
_STRUCTURAL = ("format", "format_version", "name", "input_shape", "num_classes", "weights",
               "variants", "ensembles")


#: entry keys that describe a meta-classifier's shape (not its calibration)
_SHAPE_KEYS = ("num_queries", "hidden", "one_class", "response", "num_stamps", "search")


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
        tensors = load_file(str(weights))
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
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise ModelError(f"{sidecar}: not a valid MNTD meta-classifier ({exc})") from exc
    return MetaBundle(str(doc.get("name", sidecar.stem)), shape, k, variants,  # type: ignore[arg-type]
                      calibration, doc, sidecar, ensembles)


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
