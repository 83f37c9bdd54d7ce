"""The ``scan`` report: the fused verdict, each detector's outcome and evidence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .report import Report
from .sections import model_result_section, target_section
from .text import esc

if TYPE_CHECKING:
    from ..scan import ScanResult

__all__ = ["write_scan_report"]


def write_scan_report(result: ScanResult, *, out: Path, model_path: Path, loaded: object,
                      data: str | None, clean_sha: str | None, clean_format: str | None,
                      seed: int, params: Mapping[str, object], seconds: float,
                      class_names: Sequence[str] | None = None,
                      data_free: Mapping[str, object] | None = None) -> Path:
    """The contract's ``scan`` report (JSON + HTML) in ``out``. ``data`` is ``None`` for a
    data-free scan; ``data_free`` then says what ran without data (key ``data_free``)."""
    rep = Report(command="scan", out_dir=out, seed=seed, params=dict(params))
    rep.set_class_names(class_names)
    rep.add_input(role="model", path=str(model_path), sha256=getattr(loaded, "sha256", None),
                  format=getattr(loaded, "format", "unknown"))
    if data is not None:
        rep.add_input(role="clean_data", path=data, sha256=clean_sha,
                      format=clean_format or "unknown")
    if data_free is not None:
        rep.set(data_free=dict(data_free))
        rep.add_section("No clean data", f"<p>{esc(str(data_free.get('note', '')))}</p>")
    rep.set(verdict=result.verdict, score=result.score, p_value=result.p_value,
            suspected_targets=list(result.suspected_targets),
            target_p_values=(None if result.fused.target_p_values is None
                             else list(result.fused.target_p_values)),
            fusion={"rule": "bonferroni-min-p", "alpha": result.alpha,
                    "decisive": result.fused.decisive,
                    "target_rule": ("per-label bonferroni-min-p, holm across labels, "
                                    "else the smallest"
                                    if result.fused.target_p_values is not None
                                    else "significant detectors' targets"),
                    "detectors_used": list(result.results)},
            model={"input_shape": list(getattr(loaded, "input_shape", None) or []),
                   "num_classes": getattr(loaded, "num_classes", None)})
    for name, d in result.detectors_dict().items():
        rep.add_detector(name, d)
    target_section(rep, result.fused.target_p_values, result.suspected_targets,
                   {n: r.label_p_values for n, r in result.results.items()})
    for name, r in result.results.items():
        model_result_section(rep, name, r)
    return rep.write(seconds)
