"""The one plotting helper of the reports: matplotlib (optional extra ``plots``) on
the ``Agg`` backend, or nothing when it is not installed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["bar_chart", "pyplot"]


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on a file-only backend, or ``None`` when matplotlib is not
    installed (reports then go without figures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def bar_chart(values: Mapping[int, float], highlight: set[int], *, ylabel: str, title: str,
              hline: float | None = None, names: Sequence[str] | None = None) -> Any | None:
    """A bar per class (``highlight`` in red), or ``None`` without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    labels = sorted(values)
    fig, ax = plt.subplots(figsize=(6, 2.6))
    colors = ["#d33" if k in highlight else "#4a7bd0" for k in labels]
    ticks = [names[k] if names and 0 <= k < len(names) else str(k) for k in labels]
    ax.bar(range(len(labels)), [values[k] for k in labels], color=colors)
    ax.set_xticks(range(len(labels)), ticks, rotation=45 if names else 0,
                  ha="right" if names else "center")
    if hline is not None:
        ax.axhline(hline, color="#555", linestyle="--", linewidth=1)
    ax.set_xlabel("class")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig
