"""Command-line options checked before any work starts: seeds, devices, numbers.

Every command accepts exactly the documented range of each option and refuses anything
else with one :class:`~trojanscan.exceptions.ParameterError` naming the option, what is
allowed and what was received (the CLI prints it as one line and exits with code 2):

* ``--seed``: an integer in ``[0, 2**32 - 1]`` — the range every random generator the
  methods use accepts as it is (NumPy's legacy seeding and scikit-learn's
  ``random_state`` stop at ``2**32 - 1``; torch at ``2**64 - 1``; negative seeds are
  refused by NumPy);
* ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with ``N`` below the number of
  visible GPUs (``cuda`` only where CUDA is available), ``mps`` where available;
* floats: finite (no ``nan``, ``inf``) and within each option's range;
* integers: within each option's range (counts at least 1, ``--port`` in [0, 65535]).

Only the standard library is imported at module level; torch only to look at devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..exceptions import bad_param

__all__ = ["FLOAT_RULES", "INT_RULES", "SEED_MAX", "check_device", "check_options",
           "check_seed"]

#: largest accepted ``--seed`` (``2**32 - 1``)
SEED_MAX = 2**32 - 1
#: device names accepted besides ``cuda:N``
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Range:
    """A closed or open interval; ``None`` is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return not (self.high is not None
                    and (v >= self.high if self.high_open else v > self.high))

    def describe(self, kind: str) -> str:
        if self.high is None and self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None and self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"{kind} in {lo}{self.low:g}, {self.high:g}{hi}"


#: option name (as the command functions receive it) -> range; ``None`` values pass
FLOAT_RULES: dict[str, Range] = {
    "frr": Range(0.0, 1.0, low_open=True, high_open=True),
    "poison_rate": Range(0.0, 1.0, high_open=True),
    "poison_rate_bound": Range(0.0, 0.5, low_open=True),
    "lr": Range(0.0, low_open=True),
    "stamp_fraction": Range(0.0, 1.0, low_open=True, high_open=True),
    "dilate": Range(0.0, 1.0),
    "distill": Range(0.0, 1.0),
    "share": Range(0.0, 1.0, low_open=True),
    "data_query_eps": Range(0.0, 1.0, low_open=True),
    "query_holdout": Range(0.0, 0.5),
    "body_timeout": Range(0.0, low_open=True),
    "model_timeout": Range(0.0, low_open=True),
}

#: integer options: name -> (lowest, highest or None)
INT_RULES: dict[str, tuple[int, int | None]] = {
    "max_samples": (1, None),
    "epochs": (1, None),
    "batch_size": (1, None),
    "jobs": (1, None),
    "workers": (1, None),
    "ray_workers": (0, None),  # scan-zoo --workers: 0 scans in-process without Ray
    "port": (0, 65535),
    "max_batch": (1, None),
    "refresh": (0, None),
    "unlearn_epochs": (1, None),
    "num_shadows": (2, None),
    "num_val": (1, None),
    "shadow_epochs": (1, None),
    "meta_epochs": (1, None),
    "queries": (1, None),
    "data_members": (0, 64),
    "stamp_members": (0, 64),
    "reference_models": (0, None),
    "references_count": (2, 16),
}


#: options whose flag is not their name with dashes
_FLAGS = {"ray_workers": "--workers"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_seed(value: Any, flag: str = "--seed") -> int:
    """``value`` if it is an integer in ``[0, SEED_MAX]``, else a ParameterError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise bad_param(flag, f"an integer in [0, {SEED_MAX}] (0 to 2**32 - 1)", value)
    return value


def check_device(value: Any, flag: str = "--device") -> str:
    """``value`` if it names a device this machine has (see the module), else a
    ParameterError saying what is available."""
    import torch

    spec = value.strip().lower() if isinstance(value, str) else value
    allowed = "auto, cpu, cuda or cuda:N"
    if not isinstance(spec, str) or not spec:
        raise bad_param(flag, allowed, value)
    if spec in ("auto", "cpu"):
        return spec
    kind, colon, index = spec.partition(":")
    if kind == "mps" and not colon:
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise bad_param(flag, f"{allowed} (MPS is not available here)", value)
        return spec
    if kind != "cuda" or (colon and not index.isdigit()):
        raise bad_param(flag, allowed, value)
    if not torch.cuda.is_available():
        raise bad_param(flag, "auto or cpu (CUDA is not available here: no GPU, or torch "
                              "built without CUDA)", value)
    count = torch.cuda.device_count()
    if colon and int(index) >= count:
        raise bad_param(flag, f"auto, cpu, cuda or cuda:0 to cuda:{count - 1} ({count} "
                              f"GPU{'s' if count != 1 else ''} visible)", value)
    return spec


def _check_float(name: str, value: Any, rule: Range) -> None:
    if value is None:
        return
    allowed = rule.describe("a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_param(_flag(name), allowed, value)
    if not math.isfinite(value) or not rule.contains(float(value)):
        raise bad_param(_flag(name), allowed, value)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if value is None:
        return
    allowed = (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        raise bad_param(_flag(name), allowed, value)


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check every option of a command that this module knows (by name; others pass);
    return the options with ``device`` normalised (stripped, lower case)."""
    out = dict(options)
    for name, value in options.items():
        if name == "seed":
            check_seed(value)
        elif name == "device":
            out[name] = check_device(value)
        elif name in FLOAT_RULES:
            _check_float(name, value, FLOAT_RULES[name])
        elif name in INT_RULES:
            _check_int(name, value, *INT_RULES[name])
    return out
