"""What detectors return, and the one conversion of results to strict JSON.

Results are frozen dataclasses with ``to_dict()``; the commands, reports and
benchmarks consume only those. :func:`to_json` is the single conversion used for every
report and answer: NumPy and torch scalars and arrays become plain numbers and lists,
NaN becomes ``null`` and ±infinity ``±1e308`` (strict JSON has neither; a score of
+infinity must still sort above every finite one), so every ``score`` stays a number
where higher means more suspicious.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["DataScanResult", "FilterResult", "ModelScanResult", "to_json", "utf8_safe"]

#: what ±infinity becomes in JSON
JSON_INF = 1e308


def utf8_safe(text: str) -> str:
    """``text`` with characters UTF-8 cannot encode (lone surrogates, as file names with
    non-UTF-8 bytes give) written as backslash escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _text(value: Any) -> str:
    try:
        return utf8_safe(str(value))
    except ValueError:  # an integer too long to print
        return f"<integer of {value.bit_length()} bits>"


def to_json(value: Any) -> Any:
    """``value`` as strict JSON data.

    Mappings and sequences recursively (keys as text); torch tensors, NumPy arrays and
    scalars as numbers and lists; NaN -> ``None``; ±inf and integers beyond a float's
    range -> ±1e308; strings UTF-8-safe; sets sorted; bytes as hex; paths and any other
    object as their text.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > 1023:
            return JSON_INF if value > 0 else -JSON_INF
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return float(value) if math.isfinite(value) else (JSON_INF if value > 0 else -JSON_INF)
    if isinstance(value, str):
        return utf8_safe(value)
    if isinstance(value, Mapping):
        return {_text(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, (set, frozenset)):
        items = [to_json(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, os.PathLike):
        return _text(os.fspath(value))
    return _text(value)


@dataclass(frozen=True)
class ModelScanResult:
    """Outcome of a model-level detector."""

    detector: str
    verdict: Literal["backdoored", "clean"]
    score: float
    suspected_targets: tuple[int, ...]
    seconds: float
    seed: int
    params: Mapping[str, Any]
    p_value: float | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()
    #: one p-value per class label for "this label is a backdoor target" (``None`` when
    #: the detector has no per-label evidence); scan names targets from these
    label_p_values: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (images are not included; reports save them as files)."""
        return to_json({
            "verdict": self.verdict,
            "score": float(self.score),
            "p_value": self.p_value,
            **({} if self.label_p_values is None
               else {"label_p_values": list(self.label_p_values)}),
            "suspected_targets": list(self.suspected_targets),
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            "warnings": list(self.warnings),
            **dict(self.evidence),
        })


@dataclass(frozen=True)
class DataScanResult:
    """Outcome of a data-level detector: one score and one flag per training sample."""

    detector: str
    verdict: Literal["poisoned", "clean"]
    scores: np.ndarray
    flagged: np.ndarray
    seconds: float
    seed: int
    params: Mapping[str, Any]
    per_class: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    images: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()

    @property
    def flagged_indices(self) -> np.ndarray:
        return np.flatnonzero(self.flagged)

    @property
    def score(self) -> float:
        """Share of samples flagged (higher = more suspicious)."""
        return float(self.flagged.mean()) if self.flagged.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return to_json({
            "verdict": self.verdict,
            "score": self.score,
            "num_flagged": int(self.flagged.sum()),
            "flagged_indices": self.flagged_indices,
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            "per_class": dict(self.per_class),
            "warnings": list(self.warnings),
            **dict(self.evidence),
        })


@dataclass(frozen=True)
class FilterResult:
    """Outcome of an input-level detector on a batch of inputs."""

    detector: str
    verdict: Literal["triggered", "clean"]
    scores: np.ndarray
    flagged: np.ndarray
    predictions: np.ndarray
    threshold: float
    frr: float
    seconds: float
    seed: int
    params: Mapping[str, Any]
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_json({
            "verdict": self.verdict,
            "flagged": self.flagged.astype(bool),
            "predictions": self.predictions,
            "threshold": self.threshold,
            "frr": self.frr,
            "seconds": self.seconds,
            "seed": self.seed,
            "params": dict(self.params),
            **dict(self.evidence),
        })
