"""Shared pieces of the command modules: loading inputs, printing summaries."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ..dataset import ImageDataset
from ..exceptions import ParameterError


def load_inputs(model: Path, data: str | None, *, arch: str | None, trust_pickle: bool,
                device: str, need_labels: bool = True, min_classes: int = 1,
                max_samples: int | None = None, seed: int = 0,
                ) -> tuple[Any, ImageDataset | None]:
    """Load the model and (optionally) a data set, and check they fit together.

    ``max_samples``/``seed``: read only the samples :func:`subsample` would keep."""
    from ..io.data import load_dataset
    from ..io.models import check_compatible, load_model

    if not Path(model).exists():
        raise ParameterError(f"invalid MODEL: expected an existing file, got {str(model)!r}")
    ds = None if data is None else load_dataset(data, need_labels=need_labels,
                                                min_classes=min_classes,
                                                max_samples=max_samples, seed=seed)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, device=device,
                        input_shape=None if ds is None else ds.input_shape)
    if ds is not None:
        loaded = check_compatible(loaded, ds)
    return loaded, ds


def subsample(ds: ImageDataset, max_samples: int | None, seed: int) -> ImageDataset:
    """At most ``max_samples`` samples, chosen with a seeded permutation (order kept):
    :func:`trojanscan.io.limits.select_rows`, the selection the loaders apply."""
    from ..io.limits import select_rows

    keep = select_rows(len(ds), max_samples, seed)
    return ds if keep is None else ds.subset(keep)


def emit_json(path: Path) -> None:
    """Print the report JSON to stdout (``--json``)."""
    sys.stdout.write(json.dumps(json.loads(path.read_text()), indent=2) + "\n")


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--param``) as detector keyword arguments.

    Values are read as JSON where they parse (``100``, ``0.5``, ``true``, ``null``,
    ``[3, 5]``) and kept as strings otherwise (``max``). NaN and infinity (``NaN``,
    ``nan``, ``inf``, ``1e999``, also inside lists) are refused. Keys are the detector's
    parameter names (``trojanscan detectors --params`` lists them); unknown ones, and
    values of the wrong type, are rejected by :func:`trojanscan.detectors.create`, not
    ignored.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, value = _key_value(item, item)
        out[key] = value
    return out


def _key_value(item: str, shown: str) -> tuple[str, Any]:
    """One ``KEY=VALUE`` of :func:`parse_params`; ``shown`` is the option as given."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise ParameterError(f"invalid --param {shown!r}: expected KEY=VALUE, e.g. "
                             "blend=max")
    try:
        value: Any = json.loads(raw)
    except (ValueError, RecursionError):
        value = raw
    if _non_finite(value):
        raise ParameterError(f"invalid --param {shown!r}: expected a finite number "
                             f"(NaN and infinity are refused), got {raw!r}")
    return key, value


_NON_FINITE_WORDS = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity",
                               "+infinity", "-infinity"})


def _non_finite(value: Any) -> bool:
    """NaN or infinity, as a number or a word, anywhere in a parsed ``--param`` value."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, str):
        return value.strip().lower() in _NON_FINITE_WORDS
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def parse_detector_params(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``DETECTOR.KEY=VALUE`` strings (``scan --param``) as per-detector keyword
    arguments, e.g. ``neural_cleanse.mode=faithful``. Values as in :func:`parse_params`;
    the detector must be a model-level one and the key one of its parameters."""
    from .. import detectors as registry

    out: dict[str, dict[str, Any]] = {}
    model_level = {n for n, level in registry.available().items() if level == "model"}
    for item in items or []:
        name, dot, rest = item.partition(".")
        name = name.strip()
        if not dot or "=" in name:
            raise ParameterError(f"invalid --param {item!r}: expected DETECTOR.KEY=VALUE, "
                                 "e.g. neural_cleanse.mode=faithful")
        if name not in model_level:
            raise ParameterError(f"invalid --param {item!r}: {name!r} is not a model-level "
                                 f"detector (one of {', '.join(sorted(model_level))})")
        accepted = registry.parameters(name)
        key, value = _key_value(rest, item)
        if key in ("seed", "device"):
            raise ParameterError(f"invalid --param {item!r}: set {key} with --{key}")
        if key not in accepted:
            raise ParameterError(f"invalid --param {item!r}: {name} has no parameter "
                                 f"{key!r}; accepted: {', '.join(accepted)}")
        registry.check_params(name, {key: value})  # its type, before any work
        out.setdefault(name, {})[key] = value
    return out


def nc_references(paths: list[Path] | None) -> list[str] | None:
    """``--nc-reference`` paths, checked now (bad references fail before any model is
    loaded); None when there are none."""
    refs = [str(p) for p in paths or []]
    if not refs:
        return None
    from ..detectors.neural_cleanse import load_reference

    load_reference(refs)
    return refs
