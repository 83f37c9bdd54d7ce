"""``trojanscan scan``: is this model backdoored?"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..classifier import check_classifier, known_classifier
from ..exceptions import ParameterError
from ..io.outputs import Input, check_outputs, report_folder, sidecar_of
from ..reports.scan import write_scan_report
from ..reports.text import score_text, targets_text
from ..scan import ScanResult, data_free_names, parse_detectors, scan_model
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


def parse_input_shape(text: str | None) -> tuple[int, int, int] | None:
    """``--input-shape C,H,W`` as a tuple (``None`` when not given)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).replace("x", ",").replace("×", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1 or max(dims) > 100_000:
        raise ParameterError(f"invalid --input-shape {text!r}: expected C,H,W with three "
                             "positive integers, e.g. 1,28,28")
    return dims[0], dims[1], dims[2]


def run(*, model: Path, data: str | None, detectors: str | None, out: Path, seed: int,
        device: str, arch: str | None, trust_pickle: bool, max_samples: int | None,
        quiet: bool, json_out: bool, nc_reference: list[Path] | None = None,
        param: list[str] | None = None, input_shape: str | None = None,
        references: str = "none", references_count: int | None = None,
        references_cache: Path | None = None) -> int:
    refs_auto = check_references(references, references_count, data, nc_reference)
    if data is None:
        return run_data_free(model=model, detectors=detectors, out=out, seed=seed,
                             device=device, arch=arch, trust_pickle=trust_pickle,
                             max_samples=max_samples, quiet=quiet, json_out=json_out,
                             nc_reference=nc_reference, param=param, input_shape=input_shape)
    t0 = time.perf_counter()
    seed_everything(seed)
    shape = parse_input_shape(input_shape)
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
    if shape is not None and tuple(clean.input_shape) != shape:
        raise ParameterError(f"--input-shape {','.join(map(str, shape))} disagrees with the "
                             f"data's {','.join(map(str, clean.input_shape))}")
    clean = subsample(clean, max_samples, seed)
    # load_inputs checked the model on this data once; the detectors reuse that answer
    assert loaded.num_classes is not None
    self_refs: dict[str, Any] | None = None
    if refs_auto:
        clean, det_params, self_refs = _self_references(
            loaded, clean, detectors, det_params, seed=seed, count=references_count,
            cache=references_cache)
    with known_classifier(loaded.module, clean.input_shape, loaded.num_classes):
        result = scan_model(loaded.module, clean, detectors=detectors, seed=seed,
                            device=loaded.device, detector_params=det_params)
    params = {"detectors": detectors, "max_samples": max_samples, "device": str(loaded.device),
              "arch": arch, "nc_reference": refs, "references": references,
              **({"self_references": self_refs} if self_refs is not None else {}),
              "detector_params": {n: q for n, p in det_params.items()
                                  if (q := {k: v for k, v in p.items()
                                            if k not in ("reference", "architecture_null")})}}
    path = write_scan_report(result, out=out, model_path=model, loaded=loaded, data=data,
                             clean_sha=clean.sha256, clean_format=clean.format, seed=seed,
                             params=params, seconds=time.perf_counter() - t0,
                             class_names=clean.class_names)
    if json_out:
        emit_json(path)
    elif not quiet:
        print_summary(result, path, clean.class_names)
        if self_refs is not None:
            print(f"self-references: {self_refs['note']} ({self_refs['seconds']:.1f} s)")
    return 1 if result.verdict == "backdoored" else 0


REFERENCES = ("none", "auto")


def check_references(references: str, count: int | None, data: str | None,
                     nc_reference: list[Path] | None) -> bool:
    """``--references`` checked before any work; True for ``auto``."""
    if references not in REFERENCES:
        raise ParameterError(f"invalid --references {references!r}: expected one of "
                             f"{', '.join(REFERENCES)}")
    if count is not None and (references != "auto" or not 2 <= count <= 16):
        raise ParameterError(f"invalid --references-count {count!r}: expected an integer in "
                             "[2, 16], with --references auto")
    if references != "auto":
        return False
    if data is None:
        raise ParameterError("--references auto needs --data (self-references are trained "
                             "on the labelled clean data)")
    if nc_reference:
        raise ParameterError("give Neural Cleanse's references with --nc-reference or "
                             "--references auto, not both")
    return True


def _self_references(loaded: Any, clean: Any, detectors: str | None,
                     det_params: dict[str, dict[str, Any]], *, seed: int, count: int | None,
                     cache: Path | None) -> tuple[Any, dict[str, dict[str, Any]],
                                                  dict[str, Any]]:
    """Self-references for ``scan --references auto``: the held-out clean data, the
    detector settings with their null, and the report's ``self_references`` entry."""
    from ..self_reference import DEFAULT_COUNT, default_cache_dir, prepare_self_references

    names = parse_detectors(detectors, "model")
    sr = prepare_self_references(
        loaded.module, clean, names, n=count or DEFAULT_COUNT, seed=seed,
        cache_dir=cache if cache is not None else default_cache_dir(),
        device=loaded.device, detector_params=det_params)
    return sr.clean, sr.detector_params, sr.summary


def _model_input_shape(loaded: Any, given: tuple[int, int, int] | None, model: Path
                       ) -> tuple[int, int, int]:
    """The shape a data-free scan probes: ``--input-shape``, else the ONNX graph's."""
    if given is not None:
        return given
    graph_shape = getattr(loaded.module, "input_shape", None) if loaded.format == "onnx" \
        else None
    if isinstance(graph_shape, tuple) and len(graph_shape) == 3:
        return int(graph_shape[0]), int(graph_shape[1]), int(graph_shape[2])
    raise ParameterError(f"the input shape of {model} is unknown: give --input-shape C,H,W "
                         "(e.g. 1,28,28) or --data")


def run_data_free(*, model: Path, detectors: str | None, out: Path, seed: int, device: str,
                  arch: str | None, trust_pickle: bool, max_samples: int | None, quiet: bool,
                  json_out: bool, nc_reference: list[Path] | None, param: list[str] | None,
                  input_shape: str | None) -> int:
    """``scan MODEL`` without ``--data``: the data-free detectors on the input shape."""
    from ..io.models import load_model

    t0 = time.perf_counter()
    seed_everything(seed)
    shape = parse_input_shape(input_shape)
    if nc_reference:
        raise ParameterError("--nc-reference needs --data (Neural Cleanse needs clean data)")
    if max_samples is not None:
        raise ParameterError("--max-samples needs --data (it limits the clean samples)")
    check_outputs([report_folder("--out", out)],
                  [Input("MODEL", model), Input("model sidecar", sidecar_of(model))])
    det_params = parse_detector_params(param)
    names = data_free_names(detectors, "give --data")
    if not Path(model).exists():
        raise ParameterError(f"invalid MODEL: expected an existing file, got {str(model)!r}")
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle, device=device,
                        input_shape=shape)
    shape = _model_input_shape(loaded, shape, model)
    k = check_classifier(loaded.module, torch.full((2, *shape), 0.5),
                         what=f"inputs of shape {','.join(map(str, shape))}")
    loaded = dataclasses.replace(loaded, input_shape=shape, num_classes=k)
    with known_classifier(loaded.module, shape, k):
        result = scan_model(loaded.module, None, detectors=names, seed=seed,
                            device=loaded.device, detector_params=det_params,
                            input_shape=shape)
    params = {"detectors": detectors, "device": str(loaded.device), "arch": arch,
              "input_shape": list(shape), "detector_params": det_params}
    path = write_scan_report(result, out=out, model_path=model, loaded=loaded, data=None,
                             clean_sha=None, clean_format=None, seed=seed, params=params,
                             seconds=time.perf_counter() - t0,
                             data_free=data_free_summary(result, shape))
    if json_out:
        emit_json(path)
    elif not quiet:
        print_summary(result, path, None)
        print("no clean data: data-free detectors only "
              f"({', '.join(result.results) or 'none'} ran)")
    return 1 if result.verdict == "backdoored" else 0


def data_free_summary(result: ScanResult, shape: tuple[int, int, int]) -> dict[str, Any]:
    """The report's ``data_free`` entry: what ran without data, and what could not."""
    ran = list(result.results)
    note = (f"No clean data were given: only data-free detectors ran ({', '.join(ran)}), on "
            f"the input shape {','.join(map(str, shape))} and the [0,1] input range alone.")
    if "mntd" in result.not_applicable:
        note += f" MNTD did not run: {result.not_applicable['mntd']}."
    for name, reason in result.not_applicable.items():
        if name != "mntd":
            note += f" {name} did not run: {reason}."
    return {"clean_data_used": False, "detectors_run": ran,
            "not_applicable": dict(result.not_applicable), "input_shape": list(shape),
            "note": note}
