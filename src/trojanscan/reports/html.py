"""Render a report dict (and its builder's sections) as self-contained HTML."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .text import esc, number, score_text, targets_text, verdict_sentence

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:72em;
color:#222;line-height:1.4;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.verdict{font-size:1.4em;padding:.6em 1em;border-radius:6px;display:inline-block;font-weight:600}
.bad{background:#fde2e1;color:#8a1c13;border:1px solid #f1a29b}
.good{background:#e3f6e5;color:#14532d;border:1px solid #9fd8a8}
.na{background:#eee;color:#444;border:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f6f6f6}
.suspect{background:#fde2e1}.grid{display:flex;flex-wrap:wrap;gap:.6em}
.card{border:1px solid #ddd;border-radius:4px;padding:.3em;text-align:center;font-size:.85em}
.card.suspect{border-color:#d33}.card img{image-rendering:pixelated;width:84px;height:84px}
.lead{font-size:1.15em}img.plot{max-width:100%}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.8em}
"""

_BAD = {"backdoored", "poisoned", "triggered"}
_GOOD = {"clean"}


def _is_bad(verdict: Any) -> bool:
    return isinstance(verdict, str) and verdict in _BAD


def _verdict_html(doc: dict[str, Any], names: Sequence[str] | None) -> str:
    verdict = doc.get("verdict")
    good = isinstance(verdict, str) and verdict in _GOOD
    cls = "bad" if _is_bad(verdict) else "good" if good else "na"
    return (f'<div class="verdict {cls}">Verdict: {esc(verdict)}</div>'
            f'<p class="lead">{esc(verdict_sentence(doc, names))}</p>')


def _kv_table(rows: Mapping[str, Any]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _detector_table(detectors: dict[str, Any], names: Sequence[str] | None) -> str:
    if not detectors:
        return "<p>No detector ran.</p>"
    head = ("<tr><th>detector</th><th>verdict</th><th>score</th><th>suspected targets / "
            "flagged</th><th>seconds</th><th>note</th></tr>")
    rows = []
    for name, d in detectors.items():
        if not isinstance(d, dict):
            continue
        verdict = d.get("verdict", "")
        flagged = (targets_text(d["suspected_targets"], names) if "suspected_targets" in d
                   else d.get("num_flagged", ""))
        warnings = d.get("warnings") or []
        if not isinstance(warnings, (list, tuple)):
            warnings = [warnings]
        note = d.get("reason", "") or "; ".join(str(w) for w in warnings)
        score_s = number(d.get("score"), ".3f")
        sec_s = number(d.get("seconds"), ".1f")
        cls = ' class="suspect"' if _is_bad(verdict) else ""
        rows.append(f"<tr{cls}><td>{esc(name)}</td><td>{esc(verdict)}</td><td>{score_s}</td>"
                    f"<td>{esc(flagged)}</td><td>{sec_s}</td><td>{esc(note)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _summary(doc: dict[str, Any], names: Sequence[str] | None) -> dict[str, str]:
    """The top-level figures, rounded for people (``report.json`` keeps them whole)."""
    out: dict[str, str] = {}
    for key in ("score", "p_value", "threshold", "frr"):
        if key in doc:
            out[key] = score_text(doc[key]) if key != "p_value" else (number(doc[key], ".3g")
                                                                      or "-")
    if "suspected_targets" in doc:
        out["suspected_targets"] = targets_text(doc["suspected_targets"], names)
    for key in ("num_samples", "num_flagged"):
        if key in doc:
            out[key] = str(doc[key])
    return out


def render_html(doc: dict[str, Any], sections: Sequence[tuple[str, str]] = (),
                class_names: Sequence[str] | None = None) -> str:
    """The whole page: the verdict sentence first, then the detectors, the methods'
    sections (HTML fragments, escaped by their authors) and the run manifest."""
    names = class_names
    title = f"trojanscan {doc.get('command', '')} report"
    parts = [f"<h1>{esc(title)}</h1>", _verdict_html(doc, names)]
    summary = _summary(doc, names)
    if summary:
        parts.append(_kv_table(summary))
    parts.append("<h2>Detectors</h2>" + _detector_table(doc.get("detectors", {}), names))
    for sec_title, fragment in sections:
        parts.append(f"<h2>{esc(sec_title)}</h2>{fragment}")
    manifest = {"created": doc.get("created"), "seed": doc.get("seed"),
                "seconds": doc.get("seconds"), "tool": doc.get("tool"),
                "versions": doc.get("versions")}
    inputs = "".join(
        f"<tr><td>{esc(i.get('role'))}</td><td>{esc(i.get('path'))}</td>"
        f"<td>{esc(i.get('format'))}</td><td><code>{esc(i.get('sha256'))}</code></td></tr>"
        for i in doc.get("inputs", []))
    parts.append("<h2>Run manifest</h2>" + _kv_table(manifest)
                 + "<table><tr><th>role</th><th>path</th><th>format</th><th>sha256</th></tr>"
                 + inputs + "</table>"
                 + "<h3>Parameters</h3><pre>" + esc(json.dumps(doc.get("params", {}), indent=2))
                 + "</pre>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            f"img-src data:; style-src 'unsafe-inline'\">"
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>")
