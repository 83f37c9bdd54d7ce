"""``trojanscan filter``: which of these inputs carry a trigger? (offline, on a batch)

Calibrates a runtime detector (``strip``) on the clean ``--calibrate``
data at ``--frr``, scores every input and writes the contract's ``filter`` report:
``verdict`` (``"triggered"`` if any input is flagged), ``flagged`` and ``predictions``
(one per input), ``threshold``, ``frr`` (the target) with ``frr_measured`` (on held-out
clean inputs), and ``scores.npy`` (one suspicion score per input, higher = more
suspicious). Exit code 1 when any input is flagged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..detectors import create
from ..exceptions import bad_param
from ..guard import RUNTIME_DETECTORS
from ..io.outputs import Input, check_outputs, report_folder, sidecar_of
from ..report import Report, esc
from ..utils import seed_everything
from ._common import emit_json, load_inputs, parse_params

#: flagged inputs shown as thumbnails in the HTML report
MAX_THUMBNAILS = 24


def _histogram(rep: Report, det: Any, scores: np.ndarray) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    clean = np.concatenate([det.fit_scores_, det.holdout_scores_])
    lo = float(min(clean.min(), scores.min()))
    hi = float(max(clean.max(), scores.max(), det.threshold_))
    bins = np.linspace(lo, hi + 1e-9, 50).tolist()
    ax.hist(clean, bins=bins, alpha=0.6, density=True, label="clean (calibration)")
    ax.hist(scores, bins=bins, alpha=0.6, density=True, label="inputs")
    ax.axvline(det.threshold_, color="crimson", linestyle="--", label="threshold")
    ax.set_xlabel("suspicion score (higher = more suspicious)")
    ax.legend(fontsize=8)
    return rep.add_figure("scores", fig)


def _sections(rep: Report, det: Any, x: Any, scores: np.ndarray, flagged: np.ndarray,
              preds: np.ndarray) -> None:
    info = det.calibration_info()
    meas = info.get("frr_measured")
    rows = {
        "detector": det.name,
        "threshold": f"{det.threshold_:.6g} ({info['threshold_method']} fit)",
        "target FRR": f"{det.frr:g}",
        "measured FRR (holdout)": "n/a" if meas is None else
        f"{meas:.4f} on {info['num_holdout']} clean inputs "
        f"(95% upper bound {info['frr_measured_upper95']:.4f})",
        "flagged": f"{int(flagged.sum())} of {len(flagged)}",
        "score": info.get("score", ""),
    }
    if info.get("calibration_warning"):
        rows["calibration warning"] = info["calibration_warning"]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows.items())
    html = f"<table>{table}</table>"
    fig = _histogram(rep, det, scores)
    if fig is not None:
        html += f'<p><img class="plot" src="{rep.image_uri(fig)}" alt="score histogram"></p>'
    rep.add_section("Runtime filter", html)
    idx = np.flatnonzero(flagged)
    if idx.size:
        top = idx[np.argsort(-scores[idx], kind="stable")][:MAX_THUMBNAILS]
        cards = []
        for i in top:
            img = x[int(i)].numpy()
            rel = rep.add_image(f"flagged_{int(i)}", img, scale=1)
            cards.append(f'<div class="card suspect"><img src="{rep.image_uri(rel)}" '
                         f'alt="input {int(i)}"><br>#{int(i)} → class {int(preds[i])}<br>'
                         f"score {scores[i]:.3g}</div>")
        more = f"<p>{idx.size - len(top)} more not shown.</p>" if idx.size > len(top) else ""
        rep.add_section("Flagged inputs (most suspicious first)",
                        f'<div class="grid">{"".join(cards)}</div>{more}')


def run(*, model: Path, inputs: str, calibrate: str, frr: float, detector: str, out: Path,
        seed: int, device: str, arch: str | None, trust_pickle: bool, quiet: bool,
        json_out: bool, param: list[str] | None = None) -> int:
    from ..io.data import load_dataset

    t0 = time.perf_counter()
    seed_everything(seed)
    check_outputs([report_folder("--out", out)],
                  [Input("MODEL", model), Input("model sidecar", sidecar_of(model)),
                   Input("INPUTS", inputs), Input("--calibrate", calibrate)])
    if detector not in RUNTIME_DETECTORS:
        raise bad_param("detector", RUNTIME_DETECTORS, detector)
    extra = parse_params(param)
    create(detector, frr=frr, seed=seed, **extra)  # unknown names fail before any loading
    loaded, clean = load_inputs(model, calibrate, arch=arch, trust_pickle=trust_pickle,
                                device=device, need_labels=False)
    assert clean is not None
    data = load_dataset(inputs, need_labels=False)
    if data.input_shape != clean.input_shape:
        raise bad_param("INPUTS", f"inputs of the calibration data's shape "
                        f"{'×'.join(map(str, clean.input_shape))}",
                        "×".join(map(str, data.input_shape)))
    det = create(detector, frr=frr, seed=seed, device=str(loaded.device), **extra)
    det.fit(loaded.module, clean)
    result = det.filter(data.x)

    rep = Report(command="filter", out_dir=out, seed=seed,
                 params={"detector": detector, "frr": frr, "device": str(loaded.device),
                         "arch": arch, "detector_params": det.get_params()})
    rep.set_class_names(clean.class_names or data.class_names)
    rep.add_input(role="model", path=str(model), sha256=loaded.sha256, format=loaded.format)
    rep.add_input(role="inputs", path=inputs, sha256=data.sha256, format=data.format)
    rep.add_input(role="calibrate", path=calibrate, sha256=clean.sha256, format=clean.format)
    scores_file = rep.add_array("scores.npy", result.scores.astype(np.float32))
    info = det.calibration_info()
    flagged_idx = np.flatnonzero(result.flagged)
    rep.set(verdict=result.verdict, num_inputs=len(result.scores),
            num_flagged=int(result.flagged.sum()),
            flagged=result.flagged.astype(bool), flagged_indices=flagged_idx,
            predictions=result.predictions, threshold=result.threshold, frr=float(frr),
            frr_measured=info["frr_measured"],
            frr_measured_upper95=info["frr_measured_upper95"], scores_file=scores_file,
            detector=detector,
            mean_forwards_per_input=result.evidence.get("mean_forwards_per_input"))
    det_dict = result.to_dict()
    for key in ("flagged", "predictions"):
        det_dict.pop(key, None)  # already top-level; keep the detector entry short
    det_dict.update(scores_file=scores_file, score=float(result.flagged.mean()))
    rep.add_detector(detector, det_dict)
    _sections(rep, det, data.x, result.scores, result.flagged, result.predictions)
    path = rep.write(time.perf_counter() - t0)
    if json_out:
        emit_json(path)
    if info.get("calibration_warning"):
        print(f"warning: {info['calibration_warning']}", file=sys.stderr)
    if not json_out and not quiet:
        meas = info["frr_measured"]
        meas_s = "n/a" if meas is None else f"{meas:.4f}"
        verdict = "TRIGGERED" if result.verdict == "triggered" else "CLEAN"
        print(f"{verdict}: {len(flagged_idx)} of {len(result.scores)} inputs flagged by "
              f"{detector} (threshold {result.threshold:.4g}, target FRR {frr:g}, measured "
              f"FRR {meas_s} on {info['num_holdout']} held-out clean inputs)")
        print(f"report: {path} and {path.with_suffix('.html')}")
    return 1 if result.verdict == "triggered" else 0
