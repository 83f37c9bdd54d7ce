"""Formatting for people: escaped text, rounded numbers, class labels with names.

Full precision stays in ``report.json``; what a person reads (HTML, the terminal) is
rounded here.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["class_label", "esc", "number", "score_text", "targets_text", "verdict_sentence"]

_BAD = {"backdoored", "poisoned", "triggered"}


def esc(value: Any) -> str:
    """HTML-escape any value's string form."""
    return html.escape(str(value))


def number(value: Any, fmt: str) -> str:
    """``value`` formatted as a number, or empty when it is not one (or not a float's
    size)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    try:
        return format(float(value), fmt)
    except OverflowError:
        return ""


def score_text(value: Any) -> str:
    """A score for people: three decimals (``0.99995…`` reads ``1.000``), ``-`` when
    there is none."""
    return number(value, ".3f") or "-"


def class_label(index: Any, names: Sequence[str] | None = None) -> str:
    """``3`` or, where the data names its classes, ``3 (Dress)``."""
    if names and isinstance(index, int) and not isinstance(index, bool) \
            and 0 <= index < len(names) and names[index] != str(index):
        return f"{index} ({names[index]})"
    return str(index)


def targets_text(targets: Any, names: Sequence[str] | None = None) -> str:
    """Suspected target classes as one line, with names where known."""
    if isinstance(targets, (list, tuple)):
        return ", ".join(class_label(t, names) for t in targets) or "-"
    return "-" if targets in (None, "") else str(targets)


def verdict_sentence(doc: dict[str, Any], names: Sequence[str] | None = None) -> str:
    """The report's conclusion in one sentence, for the top of the page."""
    verdict = doc.get("verdict")
    command = doc.get("command")
    score = number(doc.get("score"), ".3f")
    with_score = f" (score {score})" if score else ""
    if command == "scan":
        if verdict == "backdoored":
            targets = targets_text(doc.get("suspected_targets"), names)
            tp = doc.get("target_p_values")
            tp = tp if isinstance(tp, list) else []
            named = [t for t in doc.get("suspected_targets") or []
                     if isinstance(t, int) and 0 <= t < len(tp)
                     and isinstance(tp[t], (int, float))]
            p_text = (" (target p-value" + ("s " if len(named) > 1 else " ")
                      + ", ".join(f"{tp[t]:.2g}" for t in named) + ")") if named else ""
            return (f"This model looks backdoored{with_score}; suspected target class(es): "
                    f"{targets}{p_text}.")
        if verdict == "clean":
            return f"No backdoor was found in this model{with_score}."
    if command == "scan-data":
        n, total = doc.get("num_flagged"), doc.get("num_samples")
        if verdict == "poisoned":
            return f"{n} of {total} training samples look poisoned."
        if verdict == "clean":
            return f"No poisoned training sample was found among {total}."
    if command == "filter":
        flagged = doc.get("flagged")
        n = sum(bool(f) for f in flagged) if isinstance(flagged, list) else None
        total = len(flagged) if isinstance(flagged, list) else None
        if verdict == "triggered":
            return f"{n} of {total} inputs look triggered."
        if verdict == "clean":
            return f"No triggered input was found among {total}."
    if isinstance(verdict, str) and verdict in _BAD:
        return f"Verdict: {verdict}{with_score}."
    return f"Verdict: {verdict}."
