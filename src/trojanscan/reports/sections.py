"""HTML sections for model-level evidence: reversed triggers, norm charts, scores."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..results import ModelScanResult
from .plots import bar_chart
from .report import Report
from .text import class_label, esc, number

_IMG_KEY = re.compile(r"^(?P<kind>[a-z_]+?)_(?P<label>\d+)$")


def _chart(rep: Report, name: str, values: Mapping[int, float], highlight: set[int],
           ylabel: str, title: str, hline: float | None = None) -> str | None:
    fig = bar_chart(values, highlight, ylabel=ylabel, title=title, hline=hline,
                    names=rep.class_names)
    return None if fig is None else rep.add_figure(name, fig)


def _per_label(evidence: Mapping[str, Any], key: str) -> dict[int, float]:
    raw = evidence.get(key)
    if isinstance(raw, Mapping):
        return {int(k): float(v) for k, v in raw.items() if v is not None}
    if isinstance(raw, (list, tuple)):
        return {i: float(v) for i, v in enumerate(raw) if v is not None}
    return {}


#: how Neural Cleanse's ``decision`` evidence reads in the report
_DECISIONS = {
    "index": "the paper's rule (MAD anomaly index > 2, below the median)",
    "p_value": "calibrated p-value of the anomaly index under a no-backdoor null",
    "reference": "compared with the same labels' norms in {n} clean reference models",
}


def target_section(rep: Report, fused: Sequence[float] | None, named: Sequence[int],
                   per_detector: Mapping[str, Sequence[float] | None]) -> None:
    """A table of the per-label p-values for "this label is a backdoor target": fused
    across detectors and each detector's own (nothing when no detector gave any)."""
    if fused is None:
        return
    dets = [(n, p) for n, p in per_detector.items() if p is not None]
    head = "".join(f"<th>{esc(n)}</th>" for n, _ in dets)
    rows = []
    for label, q in enumerate(fused):
        cells = "".join(f"<td>{number(p[label], '.3g') if label < len(p) else '-'}</td>"
                        for _, p in dets)
        tag = ' class="suspect"' if label in set(named) else ""
        rows.append(f"<tr{tag}><td>{esc(class_label(label, rep.class_names))}</td>"
                    f"<td>{number(q, '.3g')}</td>{cells}</tr>")
    rep.add_section("Target labels", "<p>p-value per label that it is a backdoor target: "
                    "fused across detectors (Bonferroni min-p per label; targets named by a "
                    "Holm step across labels, suspects highlighted).</p>"
                    f"<table><tr><th>label</th><th>fused</th>{head}</tr>"
                    + "".join(rows) + "</table>")


def model_result_section(rep: Report, name: str, result: ModelScanResult) -> None:
    """Add the evidence of one model-level detector to the report."""
    suspects = set(result.suspected_targets)
    parts: list[str] = []
    ev = result.evidence
    if result.p_value is not None:
        parts.append(f"<p>p-value {number(result.p_value, '.3g')}; "
                     f"score {number(result.score, '.3f')}.</p>")
    rule = _DECISIONS.get(str(ev.get("decision")))
    if rule:
        n_ref = ev.get("num_reference_models") or 0
        parts.append(f"<p>Decision: {esc(rule.format(n=n_ref))}.</p>")
    norms = _per_label(ev, "l1_norms")
    if norms:
        rel = _chart(rep, f"{name}_l1_norms", norms, suspects, "L1 norm of mask",
                         "Reversed-trigger size per label (suspects in red)")
        if rel:
            parts.append(f'<img class="plot" alt="L1 norms" src="{rep.image_uri(rel)}">')
    idx = _per_label(ev, "anomaly_indices")
    if idx:
        rel = _chart(rep, f"{name}_anomaly", idx, suspects, "anomaly index",
                         "MAD anomaly index (flag: below median and > 2)", hline=2.0)
        if rel:
            parts.append(f'<img class="plot" alt="anomaly index" src="{rep.image_uri(rel)}">')
    grouped: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    others: list[str] = []
    for key, img in result.images.items():
        m = _IMG_KEY.match(key)
        if m:
            grouped[int(m.group("label"))][m.group("kind")] = img
        else:
            rel = rep.add_image(f"{name}_{key}", img)
            others.append(f'<div class="card"><img alt="{esc(key)}" '
                          f'src="{rep.image_uri(rel)}"><br>{esc(key)}</div>')
    if others:
        parts.append('<div class="grid">' + "".join(others) + "</div>")
    if grouped:
        cards = []
        for label in sorted(grouped):
            imgs = grouped[label]
            cls = "card suspect" if label in suspects else "card"
            inner = []
            for kind in ("mask", "pattern", "stamped", *sorted(set(imgs) - {"mask", "pattern",
                                                                          "stamped"})):
                if kind in imgs:
                    rel = rep.add_image(f"{name}_{kind}_{label}", imgs[kind])
                    inner.append(f'<div><img alt="{esc(kind)} {label}" '
                                 f'src="{rep.image_uri(rel)}"><br>{esc(kind)}</div>')
            norm = f"<br>L1 {norms[label]:.1f}" if label in norms else ""
            tag = " — suspect" if label in suspects else ""
            shown = esc(class_label(label, rep.class_names))
            cards.append(f'<div class="{cls}"><b>label {shown}{tag}</b>{norm}'
                         f'<div class="grid">{"".join(inner)}</div></div>')
        parts.append('<div class="grid">' + "".join(cards) + "</div>")
    if result.warnings:
        parts.append("<ul>" + "".join(f"<li>{esc(w)}</li>" for w in result.warnings) + "</ul>")
    title = {"neural_cleanse": "Neural Cleanse: reversed triggers",
             "mntd": "MNTD: meta-classifier"}.get(name, name)
    if parts:
        rep.add_section(title, "".join(parts))
