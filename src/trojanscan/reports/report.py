"""The report builder: ``report.json`` (the contract's keys) and a self-contained
``report.html``.

A :class:`Report` collects the run manifest (tool, versions, seed, inputs with hashes,
parameters), the verdict and each detector's ``to_dict()``, plus images, figures and
arrays written beside it. ``write`` produces both files atomically; the HTML inlines
every image as a data URI and references nothing on the network.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..results import to_json, utf8_safe
from ..utils import atomic_path, atomic_write_bytes, atomic_write_text
from .html import render_html
from .plots import pyplot

SCHEMA_VERSION = 1


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape results."""
    out = {"python": platform.python_version(), "trojanscan": __version__}
    for mod in ("torch", "numpy", "scipy", "sklearn", "onnx", "onnxruntime"):
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, "__version__"):
            out[mod] = str(m.__version__)
    return out


def png_bytes(image: np.ndarray, *, scale: int = 1) -> bytes:
    """Encode an ``H×W`` or ``H×W×C`` (C in 1, 3) float array in [0, 1] as PNG."""
    from PIL import Image

    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[2] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))  # C×H×W -> H×W×C
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    arr = np.nan_to_num(arr, nan=0.0).clip(0.0, 1.0)
    img = Image.fromarray(np.round(arr * 255).astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Asset:
    rel: str
    data: bytes


@dataclass
class Report:
    """Builder for one command's report folder (``out_dir``)."""

    command: str
    out_dir: Path
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    class_names: Sequence[str] | None = None
    sections: list[tuple[str, str]] = field(default_factory=list)
    _assets: list[_Asset] = field(default_factory=list)
    _inputs: list[dict[str, Any]] = field(default_factory=list)
    _detectors: dict[str, Any] = field(default_factory=dict)
    _created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                          .isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    # -- content -------------------------------------------------------------------
    def add_input(self, *, role: str, path: str, sha256: str | None, format: str,
                  **extra: Any) -> None:
        self._inputs.append({"role": role, "path": str(path), "sha256": sha256,
                             "format": format, **extra})

    def set(self, **values: Any) -> None:
        """Set top-level report keys (``verdict``, ``score``, ...)."""
        self.data.update(values)

    def set_class_names(self, names: Sequence[str] | None) -> None:
        """Name the classes (from the data) so people read ``3 (Dress)``, not ``3``; the
        JSON gains a ``class_names`` list."""
        if names:
            self.class_names = tuple(str(n) for n in names)
            self.data["class_names"] = list(self.class_names)

    def add_detector(self, name: str, result: dict[str, Any]) -> None:
        self._detectors[name] = result

    def add_section(self, title: str, fragment: str) -> None:
        """Add an HTML fragment (already escaped by the caller) under a heading."""
        self.sections.append((title, fragment))

    def add_image(self, name: str, image: np.ndarray, *, scale: int = 1) -> str:
        """Save an image as ``images/<name>.png``; return its path relative to the report."""
        rel = f"images/{_safe(name)}.png"
        self._assets.append(_Asset(rel, png_bytes(image, scale=scale)))
        return rel

    def add_figure(self, name: str, fig: Any) -> str:
        """Save a matplotlib figure as PNG (and close it); return its relative path."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt = pyplot()
        if plt is not None:
            plt.close(fig)
        rel = f"images/{_safe(name)}.png"
        self._assets.append(_Asset(rel, buf.getvalue()))
        return rel

    def add_array(self, name: str, array: np.ndarray) -> str:
        """Save ``array`` as ``<name>.npy`` (no pickle); return the file name."""
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        rel = name if name.endswith(".npy") else f"{_safe(name)}.npy"
        self._assets.append(_Asset(rel, buf.getvalue()))
        return rel

    def image_uri(self, rel: str) -> str:
        """A data URI of a previously added image (for inline HTML)."""
        for a in self._assets:
            if a.rel == rel:
                return "data:image/png;base64," + base64.b64encode(a.data).decode()
        raise KeyError(rel)

    # -- output --------------------------------------------------------------------
    def to_dict(self, seconds: float | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "trojanscan", "version": __version__},
            "command": self.command,
            "seed": self.seed,
            "created": self._created,
            "inputs": list(self._inputs),
            "verdict": self.data.get("verdict"),
            "seconds": None if seconds is None else round(float(seconds), 3),
            "versions": versions(),
            "params": dict(self.params),
        }
        doc.update({k: v for k, v in self.data.items() if k != "verdict"})
        doc["detectors"] = dict(self._detectors)
        return to_json(doc)

    def write(self, seconds: float | None = None) -> Path:
        """Write assets, ``report.json`` and ``report.html`` atomically; return the JSON path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for a in self._assets:
            atomic_write_bytes(self.out_dir / a.rel, a.data)
        doc = self.to_dict(seconds)
        json_path = self.out_dir / "report.json"
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        atomic_write_text(self.out_dir / "report.html",
                          utf8_safe(render_html(doc, self.sections, self.class_names)))
        return json_path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
