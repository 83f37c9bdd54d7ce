"""A zoo's outputs: ``zoo.json`` (rows + summary), ``zoo.csv`` and ``zoo.html``.

``zoo.json`` follows ``schemas/zoo.schema.json``: ``{"schema_version", "tool",
"command", "created", "models": [...], "summary": {...}}`` with one row per model.
With ground truth (``--labels`` or a manifest's ``label`` column) the summary holds the
rank AUROC of the fused scores over the labelled models that were scanned, the ROC
points, and the shipped verdict's confusion counts, TPR and FPR. ``zoo.html`` is one
self-contained page (no network, inline SVG and script): a sortable table linking each
model's report, a histogram of scores and, with labels, the ROC curve.
"""

from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..report import json_safe, utf8_safe
from ..utils import atomic_write_text
from .metrics import auroc, confusion, roc_points

ZOO_SCHEMA_VERSION = 1


def summarise(rows: Sequence[dict[str, Any]], *, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``summary`` of ``zoo.json`` from the model rows (``extra``: run facts)."""
    ok = [r for r in rows if r.get("error") is None]
    flagged = [r for r in ok if r["verdict"] == "backdoored"]
    labelled = [r for r in ok if r.get("label") is not None]
    labels = [int(r["label"]) for r in labelled]
    scores = [float(r["score"]) for r in labelled]
    conf = confusion(labels, [r["verdict"] == "backdoored" for r in labelled])
    out: dict[str, Any] = {
        "models": len(rows), "scanned": sum(1 for r in ok if not r.get("resumed")),
        "resumed": sum(1 for r in ok if r.get("resumed")),
        "failed": len(rows) - len(ok), "flagged": len(flagged),
        "clean": len(ok) - len(flagged), "labelled": len(labelled),
        "auroc": auroc(labels, scores) if labelled else None,
        "roc": [[f, t] for f, t in roc_points(labels, scores)],
        "confusion": conf.to_dict() if labelled else None,
        "tpr": conf.tpr if labelled else None, "fpr": conf.fpr if labelled else None,
        "scan_seconds": round(sum(float(r.get("seconds") or 0.0) for r in rows), 3),
    }
    out.update(extra)
    return out


def zoo_document(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    doc = {"schema_version": ZOO_SCHEMA_VERSION,
           "tool": {"name": "trojanscan", "version": __version__},
           "command": "scan-zoo",
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "models": list(rows), "summary": summary}
    safe: dict[str, Any] = json_safe(doc)
    return safe


def write_outputs(out: Path, doc: dict[str, Any]) -> Path:
    """Write ``zoo.json``, ``zoo.csv`` and ``zoo.html`` atomically; return the JSON path."""
    path = out / "zoo.json"
    atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "zoo.csv", to_csv(doc["models"]))
    atomic_write_text(out / "zoo.html", utf8_safe(render_html(doc)))
    return path


def _detector_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for n in r.get("detectors") or {}:
            if n not in names:
                names.append(n)
    return names


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per model; per-detector scores as ``score_<detector>`` columns."""
    dets = _detector_names(rows)
    cols = ["name", "path", "sha256", "arch", "label", "verdict", "score", "p_value",
            "suspected_targets", "seconds", "resumed", "error", "report"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols + [f"score_{d}" for d in dets])
    for r in rows:
        line = [_fmt(r.get(c)) if c != "suspected_targets"
                else " ".join(map(str, r.get(c) or [])) for c in cols]
        line += [_fmt(((r.get("detectors") or {}).get(d) or {}).get("score")) for d in dets]
        w.writerow(line)
    return buf.getvalue()


# -- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
.verdict{font-size:16px;font-weight:600;margin:8px 0}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f2f2f2;cursor:pointer;user-select:none}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
tr.bd td.v{color:#b00;font-weight:600}tr.err td.v{color:#a60}
.facts td:first-child{font-weight:600}
svg text{font:11px system-ui,sans-serif}
"""

_JS = """
(function(){
  var table=document.getElementById('models');
  if(!table){return;}
  var heads=table.tHead.rows[0].cells;
  function key(cell,num){var t=cell.getAttribute('data-v');
    if(t===null){t=cell.textContent;}
    if(num){var x=parseFloat(t);return isNaN(x)?-Infinity:x;}return t.toLowerCase();}
  Array.prototype.forEach.call(heads,function(th,col){
    th.addEventListener('click',function(){
      var num=th.getAttribute('data-num')==='1';
      var asc=!th.classList.contains('asc');
      Array.prototype.forEach.call(heads,function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');
      var body=table.tBodies[0];
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a.cells[col],num),y=key(b.cells[col],num);
        return (x<y?-1:x>y?1:0)*(asc?1:-1);});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
})();
"""


def _e(v: Any) -> str:
    return html.escape(_fmt(v))


def histogram_svg(rows: Sequence[dict[str, Any]], bins: int = 20) -> str:
    """Scores in ``bins`` bins over [0, 1]; stacked by label when labels exist."""
    ok = [r for r in rows if r.get("error") is None and r.get("score") is not None]
    groups = {"backdoored": [], "clean": [], "unlabelled": []}  # type: dict[str, list[float]]
    for r in ok:
        lab = r.get("label")
        g = "unlabelled" if lab is None else ("backdoored" if int(lab) == 1 else "clean")
        groups[g].append(min(max(float(r["score"]), 0.0), 1.0))
    colours = {"clean": "#4a8", "backdoored": "#c44", "unlabelled": "#68a"}
    counts = {g: [0] * bins for g in groups}
    for g, vals in groups.items():
        for v in vals:
            counts[g][min(int(v * bins), bins - 1)] += 1
    top = max([sum(counts[g][i] for g in groups) for i in range(bins)] + [1])
    w, h, pad = 480, 200, 30
    bw = (w - 2 * pad) / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 40}" '
             'role="img" aria-label="histogram of scores">',
             f'<line x1="{pad}" y1="{h}" x2="{w - pad}" y2="{h}" stroke="#333"/>']
    for i in range(bins):
        base = float(h)
        for g in ("clean", "backdoored", "unlabelled"):
            c = counts[g][i]
            if not c:
                continue
            bh = (h - 20) * c / top
            parts.append(f'<rect x="{pad + i * bw:.1f}" y="{base - bh:.1f}" '
                         f'width="{bw - 1:.1f}" height="{bh:.1f}" fill="{colours[g]}">'
                         f'<title>{g}: {c} in [{i / bins:.2f}, {(i + 1) / bins:.2f})</title>'
                         '</rect>')
            base -= bh
    for t in (0.0, 0.5, 1.0):
        x = pad + t * (w - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{h + 14}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{w / 2}" y="{h + 32}" text-anchor="middle">fused score '
                 f'(max bin: {top} models)</text>')
    legend = [g for g in ("clean", "backdoored", "unlabelled") if groups[g]]
    for j, g in enumerate(legend):
        parts.append(f'<rect x="{pad + j * 110}" y="2" width="10" height="10" '
                     f'fill="{colours[g]}"/><text x="{pad + 14 + j * 110}" y="11">{g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def roc_svg(points: Sequence[Sequence[float]], auc: float | None) -> str:
    w = h = 260
    pad = 30
    side = w - 2 * pad

    def xy(f: float, t: float) -> str:
        return f"{pad + f * side:.1f},{pad + (1 - t) * side:.1f}"

    path = " ".join(xy(float(f), float(t)) for f, t in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 10}" '
            'role="img" aria-label="ROC curve">'
            f'<rect x="{pad}" y="{pad}" width="{side}" height="{side}" fill="none" '
            'stroke="#333"/>'
            f'<line x1="{pad}" y1="{pad + side}" x2="{pad + side}" y2="{pad}" '
            'stroke="#bbb" stroke-dasharray="4 3"/>'
            f'<polyline points="{path}" fill="none" stroke="#c44" stroke-width="2"/>'
            f'<text x="{w / 2}" y="{h - 2}" text-anchor="middle">false-positive rate</text>'
            f'<text x="10" y="{h / 2}" transform="rotate(-90 10 {h / 2})" '
            'text-anchor="middle">true-positive rate</text>'
            f'<text x="{pad + 6}" y="{pad + 14}">AUROC {_fmt(auc)}</text></svg>')


def render_html(doc: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = doc["models"]
    s: dict[str, Any] = doc["summary"]
    dets = _detector_names(rows)
    verdict = (f"Verdict: {s['flagged']} of {s['models']} models flagged as backdoored, "
               f"{s['clean']} clean, {s['failed']} failed")
    facts = [("models", s["models"]), ("scanned now", s["scanned"]),
             ("resumed (report kept)", s["resumed"]), ("failed", s["failed"]),
             ("backend", f"{s.get('backend')} ({s.get('workers')} workers)"),
             ("wall seconds", s.get("seconds")), ("seed", s.get("seed")),
             ("detectors", s.get("detectors") or "default")]
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<title>trojanscan scan-zoo</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>trojanscan scan-zoo</h1>", f"<div class='verdict'>{_e(verdict)}</div>",
           "<table class='facts'>"]
    out += [f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in facts]
    out.append("</table>")
    if s.get("labelled"):
        c = s.get("confusion") or {}
        out.append("<h2>Against ground truth</h2><table class='facts'>")
        for k, v in (("labelled models scanned", s["labelled"]), ("AUROC", s.get("auroc")),
                     ("TPR at the shipped threshold", s.get("tpr")),
                     ("FPR at the shipped threshold", s.get("fpr")),
                     ("TP / FP / TN / FN", f"{c.get('tp')} / {c.get('fp')} / "
                                           f"{c.get('tn')} / {c.get('fn')}")):
            out.append(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>")
        out.append("</table>")
        if s.get("roc"):
            out.append("<h2>ROC curve</h2>" + roc_svg(s["roc"], s.get("auroc")))
    out.append("<h2>Scores</h2>" + histogram_svg(rows))
    heads = [("model", 0), ("verdict", 0), ("score", 1), ("targets", 0), ("label", 1)]
    heads += [(d, 1) for d in dets] + [("seconds", 1), ("error", 0)]
    out.append("<h2>Models</h2><p>Click a column to sort.</p><table id='models'><thead><tr>")
    out += [f"<th data-num='{n}'>{_e(h)}</th>" for h, n in heads]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cls = "err" if r.get("error") else ("bd" if r.get("verdict") == "backdoored" else "")
        name = _e(r.get("name"))
        link = (f"<a href='{html.escape(r['report'])}'>{name}</a>" if r.get("report")
                else name)
        label = r.get("label")
        cells = [f"<td data-v='{name}' title='{_e(r.get('path'))}'>{link}</td>",
                 f"<td class='v'>{_e(r.get('verdict'))}</td>",
                 f"<td>{_e(r.get('score'))}</td>",
                 f"<td>{_e(' '.join(map(str, r.get('suspected_targets') or [])))}</td>",
                 f"<td>{'' if label is None else _e(label)}</td>"]
        for d in dets:
            cells.append(f"<td>{_e(((r.get('detectors') or {}).get(d) or {}).get('score'))}"
                         "</td>")
        cells += [f"<td>{_e(r.get('seconds'))}</td>", f"<td>{_e(r.get('error'))}</td>"]
        out.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>")
    out.append(f"</tbody></table><script>{_JS}</script></body></html>")
    return "\n".join(out)
