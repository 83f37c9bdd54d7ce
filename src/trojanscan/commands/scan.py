"""``trojanscan scan``: is this model backdoored?"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ..classifier import known_classifier
from ..exceptions import ParameterError
from ..io.outputs import Input, check_outputs, report_folder, sidecar_of
from ..reports.scan import write_scan_report
from ..reports.text import score_text, targets_text
from ..scan import ScanResult, scan_model
from ..utils import seed_everything
from ._common import emit_json, load_inputs, nc_references, parse_detector_params, subsample


def print_summary(result: ScanResult, json_path: Path,
                  class_names: Sequence[str] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(stderr=False)
    style = "bold red" if result.verdict == "backdoored" else "bold green"
    names = class_names
    targets = (f" — suspected target(s): {escape(targets_text(result.suspected_targets, names))}"
               if result.suspected_targets else "")
    console.print(f"[{style}]{result.verdict.upper()}[/] (score {score_text(result.score)})"
                  f"{targets}")
    table = Table(show_header=True, header_style="bold")
    for col in ("detector", "verdict", "score", "p-value", "targets", "seconds"):
        table.add_column(col)
    for name, r in result.results.items():
        table.add_row(name, r.verdict, score_text(r.score),
                      "-" if r.p_value is None else f"{r.p_value:.3g}",
                      escape(targets_text(r.suspected_targets, names)), f"{r.seconds:.1f}")
    for name, reason in result.not_applicable.items():
        table.add_row(name, "not applicable", "-", "-", "-", "-")
        table.add_row("", f"[dim]{reason}[/]", "", "", "", "")
    console.print(table)
    console.print(f"report: {json_path} and {json_path.with_suffix('.html')}")


def run(*, model: Path, data: str, detectors: str | None, out: Path, seed: int, device: str,
        arch: str | None, trust_pickle: bool, max_samples: int | None, quiet: bool,
        json_out: bool, nc_reference: list[Path] | None = None,
        param: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    seed_everything(seed)
    check_outputs([report_folder("--out", out)],
                  [Input("MODEL", model), Input("model sidecar", sidecar_of(model)),
                   Input("--data", data),
                   *(Input("--nc-reference", r) for r in nc_reference or [])])
    refs = nc_references(nc_reference)
    det_params = parse_detector_params(param)
    if refs:
        if "reference" in det_params.get("neural_cleanse", {}):
            raise ParameterError("give Neural Cleanse's references with --nc-reference or "
                                 "--param neural_cleanse.reference=..., not both")
        det_params.setdefault("neural_cleanse", {})["reference"] = refs
    loaded, clean = load_inputs(model, data, arch=arch, trust_pickle=trust_pickle,
                                device=device, min_classes=2, max_samples=max_samples, seed=seed)
    assert clean is not None
    clean = subsample(clean, max_samples, seed)
    # load_inputs checked the model on this data once; the detectors reuse that answer
    assert loaded.num_classes is not None
    with known_classifier(loaded.module, clean.input_shape, loaded.num_classes):
        result = scan_model(loaded.module, clean, detectors=detectors, seed=seed,
                            device=loaded.device, detector_params=det_params)
    params = {"detectors": detectors, "max_samples": max_samples, "device": str(loaded.device),
              "arch": arch, "nc_reference": refs,
              "detector_params": {n: q for n, p in det_params.items()
                                  if (q := {k: v for k, v in p.items() if k != "reference"})}}
    path = write_scan_report(result, out=out, model_path=model, loaded=loaded, data=data,
                             clean_sha=clean.sha256, clean_format=clean.format, seed=seed,
                             params=params, seconds=time.perf_counter() - t0,
                             class_names=clean.class_names)
    if json_out:
        emit_json(path)
    elif not quiet:
        print_summary(result, path, clean.class_names)
    return 1 if result.verdict == "backdoored" else 0
