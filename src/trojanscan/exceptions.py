"""Exceptions raised by trojanscan.

Library code raises only these; the CLI catches :class:`TrojanscanError` at the
boundary, prints one line (``error: <message>``) on stderr and exits with code 2.

Hierarchy::

    TrojanscanError                      base of everything we raise on purpose
    ├── InputError                       the user's input is wrong (exit 2)
    │   ├── DataError                    a data set cannot be read or is invalid
    │   │   └── UnknownFormatError       no loader recognises the file / name
    │   ├── ModelError                   a model cannot be loaded or called
    │   │   ├── UnsafeModelError         loading would unpickle (needs --trust-pickle)
    │   │   └── NotAClassifierError      outputs are not N×K finite logits with K ≥ 2
    │   ├── IncompatibleError            model and data (or meta-classifier) disagree
    │   │   └── NotAClassifierError      (also one: the model cannot serve the command)
    │   └── ParameterError               a setting is out of range / unknown
    │       └── NotFittedError           a detector is used before ``fit``
    ├── DependencyError                  an optional extra is not installed
    └── DetectorNotApplicable            a detector cannot run on this model/data
                                         (reported in the scan, never fatal there)

    TrojanscanWarning                    base of our warnings
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class TrojanscanError(Exception):
    """Base class of every error trojanscan raises on purpose."""


class InputError(TrojanscanError):
    """The user's input (files, data, options) is wrong."""


class DataError(InputError):
    """A data set cannot be read or does not satisfy the contract."""


class UnknownFormatError(DataError):
    """No loader recognises the given file, folder or built-in name."""


class ModelError(InputError):
    """A model cannot be loaded or does not behave like a classifier."""


class UnsafeModelError(ModelError):
    """Loading the model would unpickle arbitrary code; refused without --trust-pickle."""


class IncompatibleError(InputError):
    """Two inputs disagree (input shape, number of classes, meta-classifier shape)."""


class NotAClassifierError(ModelError, IncompatibleError):
    """The model does not output ``N×K`` finite logits with ``K ≥ 2`` (a regressor, a
    one-output scorer, NaN): every detector needs a classifier. Both a
    :class:`ModelError` and an :class:`IncompatibleError`."""


class ParameterError(InputError, ValueError):
    """A parameter is out of range or unknown."""


class NotFittedError(ParameterError, AttributeError):
    """A detector's learned state is read before ``fit`` has run (as scikit-learn's)."""


class DependencyError(TrojanscanError, ImportError):
    """An optional dependency is missing."""


class DetectorNotApplicable(TrojanscanError):
    """A detector cannot run on this model or data; the reason is the message."""


class TrojanscanWarning(UserWarning):
    """Base class of trojanscan's warnings."""


def bad_param(name: str, allowed: str | Iterable[Any], got: Any) -> ParameterError:
    """Build a :class:`ParameterError` naming the parameter, what is allowed and what came.

    >>> str(bad_param("frr", "a float in (0, 1)", 2.0))
    "invalid frr: expected a float in (0, 1), got 2.0"
    """
    if not isinstance(allowed, str):
        allowed = "one of " + ", ".join(repr(a) for a in allowed)
    return ParameterError(f"invalid {name}: expected {allowed}, got {got!r}")


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or raise :class:`DependencyError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DependencyError(
            f"{module} is required for this feature: pip install 'trojanscan[{extra}]'"
            f" ({exc})"
        ) from exc


def printable(text: str) -> str:
    """``text`` on one line, safe for a terminal: characters that are not printable (line
    breaks, escape sequences, lone surrogates from non-UTF-8 file names) as escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@contextmanager
def printable_errors() -> Iterator[None]:
    """Re-raise a :class:`TrojanscanError` whose message quotes untrusted names (zip
    members, ONNX operators, file names) with those names escaped onto one line."""
    try:
        yield
    except TrojanscanError as exc:
        text = str(exc)
        shown = printable(text)
        if shown == text:
            raise
        raise type(exc)(shown) from exc
