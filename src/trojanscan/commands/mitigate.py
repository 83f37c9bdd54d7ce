"""``trojanscan mitigate``: find a backdoor with Neural Cleanse and unlearn it.

Steps: load MODEL and labelled clean DATA; split DATA (seeded) into a fine-tuning part
(80%) and a held-out part (20%); run Neural Cleanse (fast mode) on the fine-tuning part;
if labels are flagged, fine-tune a copy of the model with their reversed triggers
stamped on 20% of the samples (true labels kept, :mod:`trojanscan.mitigation`), measure
clean accuracy and reversed-trigger ASR before and after on the held-out part, and write
the repaired model as TorchScript to ``--out``.

``--out`` must differ from MODEL (the input is never overwritten). When nothing is
flagged, no model is written (copying it unchanged would look like a repair): the report
says so and the exit code is 0. Exit code 1 when a backdoor was found (and unlearned), as
virus scanners do when they find and clean something; 2 on errors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classifier import known_classifier
from ..exceptions import ModelError
from ..io.outputs import Input, Output, check_outputs, report_folder, sidecar_of
from ..reports import Report
from ..utils import atomic_path, seed_everything
from ._common import emit_json, load_inputs, nc_references

#: share of DATA held out to measure the mitigation
HOLDOUT = 0.2


def _to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    model = model.eval().cpu()
    if isinstance(model, torch.jit.ScriptModule):
        return model
    try:
        return torch.jit.script(model)
    except Exception:
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, example.cpu())
                probe = torch.cat([example.cpu()] * 3)  # another batch size than traced
                same = torch.allclose(traced(probe), model(probe), atol=1e-4)
        except Exception as exc:
            raise ModelError(f"cannot export the repaired model as TorchScript: {exc}") from exc
        if not same:
            raise ModelError("cannot export the repaired model as TorchScript: its trace "
                             "gives other outputs on another batch size") from None
        return traced


def save_torchscript(model: nn.Module, example: torch.Tensor, out: Path) -> None:
    """Write ``model`` as TorchScript to ``out`` atomically."""
    scripted = _to_torchscript(model, example)
    with atomic_path(out) as tmp:
        torch.jit.save(scripted, str(tmp))


def run(*, model: Path, data: str, out: Path, report: Path, seed: int, device: str,
        arch: str | None, trust_pickle: bool, quiet: bool, json_out: bool,
        nc_reference: list[Path] | None = None, stamp_fraction: float = 0.2,
        dilate: float = 0.0, distill: float = 0.0, refresh: int = 0,
        unlearn_epochs: int = 2) -> int:
    from ..detectors.neural_cleanse import NeuralCleanse
    from ..mitigation import UnlearnConfig, mitigate, split_clean, triggers_from_result
    from ..reports.sections import model_result_section

    t0 = time.perf_counter()
    model, out = Path(model), Path(out)
    check_outputs([Output("--out", out), report_folder("--report", report)],
                  [Input("MODEL", model), Input("model sidecar", sidecar_of(model)),
                   Input("--data", data),
                   *(Input("--nc-reference", r) for r in nc_reference or [])])
    cfg = UnlearnConfig(stamp_fraction=stamp_fraction, dilate=dilate, distill=distill,
                        refresh=refresh, epochs=unlearn_epochs)
    cfg.validate()  # bad settings fail before any work
    refs = nc_references(nc_reference)
    seed_everything(seed)
    loaded, ds = load_inputs(model, data, arch=arch, trust_pickle=trust_pickle, device=device,
                             min_classes=2)
    assert ds is not None
    finetune, holdout = split_clean(ds, HOLDOUT, seed)
    detector = NeuralCleanse(seed=seed, device=str(loaded.device), reference=refs)
    assert loaded.num_classes is not None  # load_inputs checked the model on the data
    with known_classifier(loaded.module, ds.input_shape, loaded.num_classes):
        result = detector.fit(loaded.module, finetune)
    rep = Report(command="mitigate", out_dir=report, seed=seed,
                 params={"device": str(loaded.device), "arch": arch, "holdout": HOLDOUT,
                         "detector": detector.get_params(), "unlearning": cfg.__dict__})
    rep.set_class_names(ds.class_names)
    rep.add_input(role="model", path=str(model), sha256=loaded.sha256, format=loaded.format)
    rep.add_input(role="clean_data", path=data, sha256=ds.sha256, format=ds.format)
    rep.add_detector("neural_cleanse", result.to_dict())
    model_result_section(rep, "neural_cleanse", result)
    info: dict[str, Any]
    if result.verdict == "backdoored":
        triggers = triggers_from_result(result)
        mit = mitigate(loaded.module, finetune, holdout, triggers, config=cfg, seed=seed,
                       device=loaded.device)
        save_torchscript(mit.model, ds.x[:1], out)
        info = {"model_written": True, "out": str(out), **mit.to_dict()}
        message = (f"backdoor target(s) {', '.join(map(str, result.suspected_targets))} "
                   f"unlearned; wrote {out}")
    else:
        info = {"model_written": False, "out": None, "labels": []}
        message = "no backdoor found by neural_cleanse: nothing to unlearn, no model written"
    info["message"] = message
    rep.set(verdict=result.verdict, score=result.score, p_value=result.p_value,
            suspected_targets=list(result.suspected_targets), mitigation=info)
    path = rep.write(time.perf_counter() - t0)
    if json_out:
        emit_json(path)
    elif not quiet:
        print(message)
        if info["model_written"]:
            for key, before in info["asr_before"].items():
                print(f"  ASR {key}: {before:.4f} -> {info['asr_after'][key]:.4f}")
            print(f"  clean accuracy: {info['clean_accuracy_before']:.4f} -> "
                  f"{info['clean_accuracy_after']:.4f} (held-out {info['num_holdout']} "
                  "samples)")
        print(f"report: {path} and {path.with_suffix('.html')}")
    return 1 if result.verdict == "backdoored" else 0
