"""``trojanscan scan-data``: which training samples are poisoned?

Loads TRAIN and the model trained on it, runs the data-level detectors on features
extracted once (:func:`trojanscan.data_scan.scan_data`), writes the contract's report
(``scores.npy`` plus one ``scores_<detector>.npy`` each, per-class statistics, score
histograms and cluster projections in the HTML), optionally exports TRAIN without the
flagged samples and retrains on it to check that the backdoor is gone (``--verify``;
the network retrained is the one ``--arch`` names — files beside the model never choose
code). Outputs are checked before any work. Exit code 1 when samples are flagged, 0 when
none are.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..data_scan import DataScan, Verification, export_clean, scan_data, verify_by_retraining
from ..dataset import ImageDataset
from ..detectors.base import DataScanResult
from ..exceptions import DetectorNotApplicable, ParameterError, TrojanscanWarning, bad_param
from ..io.outputs import Input, Output, check_outputs, report_folder, sidecar_of
from ..report import Report, esc
from ..utils import seed_everything
from ._common import emit_json

#: built-in training sets and the held-out split ``--verify`` evaluates on
TEST_SPLITS = {"fashion-mnist:train": "fashion-mnist:test", "digits:train": "digits:test",
               "synthetic-rgb:train": "synthetic-rgb:test"}
#: formats whose architecture comes from ``--arch`` (``torch``: a state_dict file; a
#: pickled whole module, only with ``--trust-pickle``, carries its own)
WEIGHT_FORMATS = ("safetensors", "torch")
#: a sidecar larger than this is not read (``trojanscan train`` writes a few kB)
MAX_SIDECAR_BYTES = 4 << 20
MAX_SPEC_CHARS = 2000


# ----------------------------------------------------------------------------- inputs


def read_sidecar(model: Path) -> dict[str, Any]:
    """The JSON written beside a model by ``trojanscan train`` (``MODEL.json``), if any.

    Untrusted, as the model is: its ``arch`` is never imported or called (only
    ``--arch`` chooses code; :func:`sidecar_hint` may quote it in a message), its attack
    spec is parsed into the built-in attack library only (:func:`sidecar_attack`), and
    its training settings are used only when they are plain numbers in range
    (:func:`sidecar_train_config`).
    """
    path = sidecar_of(model)
    if path == Path(model) or not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def sidecar_hint(sidecar: dict[str, Any]) -> str:
    """A hint naming the sidecar's architecture for an error message (never imported):
    printable, at most 80 characters, quoted."""
    name = sidecar.get("arch")
    if not isinstance(name, str) or not name.strip():
        return ""
    import shlex

    shown = "".join(c if c.isprintable() else "?" for c in name.strip())[:80]
    return (f"; the model's sidecar JSON names the architecture {shown!r}: pass --arch "
            f"{shlex.quote(shown)} if you trust it (the sidecar never chooses code)")


def spec_files(spec: str) -> list[str]:
    """The values of an attack spec that name a file (a pattern the spec would read)."""
    from ..attacks.patterns import FILE_SUFFIXES

    words = (w.strip() for w in re.split(r"[,()+=:]", spec))
    return [w for w in words if w.lower().endswith(FILE_SUFFIXES)]


def sidecar_attack(sidecar: dict[str, Any]) -> Any:
    """The sidecar's attack (built-in attack library only), None when absent or not
    usable (a warning says why; verification then reports no attack success rate)."""
    from ..attacks import parse_attack

    entry = sidecar.get("attack")
    spec = entry.get("spec") if isinstance(entry, dict) else None
    if not isinstance(spec, str):
        return None
    try:
        if len(spec) > MAX_SPEC_CHARS:
            raise ParameterError(f"longer than {MAX_SPEC_CHARS} characters")
        named = spec_files(spec)
        if named:  # a sidecar never makes this process open a file of its choosing
            raise ParameterError(f"it names the file {named[0]!r}; pattern files are "
                                 "read only from an attack spec given on the command line")
        return parse_attack(spec)
    except Exception as exc:  # untrusted text: any failure means "no attack known"
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        warnings.warn(f"cannot use the sidecar's attack spec ({first}); verification "
                      "reports no attack success rate", TrojanscanWarning, stacklevel=2)
        return None


#: sidecar training settings taken for ``--verify``: name -> (type, low, high)
_TRAIN_FIELDS: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 100), "batch_size": (int, 1, 4096), "lr": (float, 1e-8, 1.0),
    "weight_decay": (float, 0.0, 1.0), "lr_decay": (bool, 0, 1)}


def sidecar_train_config(sidecar: dict[str, Any]) -> Any:
    """The sidecar's training settings as a ``TrainConfig`` (None when it has none).

    A setting is taken only when it is a known key holding a plain number in range;
    others keep their defaults, with a warning naming them: a sidecar must neither crash
    verification nor make it run for days.
    """
    from ..training import TrainConfig

    raw = sidecar.get("train_config")
    if not isinstance(raw, dict):
        return None
    clean: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        spec = _TRAIN_FIELDS.get(key) if isinstance(key, str) else None
        if spec is None:
            ignored.append(str(key)[:40])
            continue
        kind, low, high = spec
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and low <= value <= high)
        if ok:
            clean[key] = kind(value)
        else:
            ignored.append(key)
    if ignored:
        shown = ", ".join(repr(k) for k in ignored[:5]) + (", ..." if len(ignored) > 5 else "")
        warnings.warn(f"the sidecar's train_config settings {shown} are not plain settings "
                      "in range; verification uses the defaults for them", TrojanscanWarning,
                      stacklevel=2)
    return TrainConfig(**clean)


def _check_export_path(export: Path | None) -> None:
    if export is not None and Path(export).suffix.lower() != ".npz":
        raise bad_param("export_clean", "a path ending in .npz", str(export))


def _test_split(train_spec: str, cleaned: ImageDataset, seed: int
                ) -> tuple[ImageDataset, ImageDataset, str]:
    """Held-out data for ``--verify``: the built-in's test split, else 10% of TRAIN."""
    from ..io.data import load_dataset
    from .train import split_holdout

    key = train_spec.strip().lower()
    if key in TEST_SPLITS and not Path(train_spec).exists():
        return cleaned, load_dataset(TEST_SPLITS[key]), TEST_SPLITS[key]
    fit, held = split_holdout(cleaned, 0.1, seed)
    return fit, held, "10% of the cleaned TRAIN held out"


# ----------------------------------------------------------------------------- report


def _histograms(rep: Report, name: str, result: DataScanResult, labels: np.ndarray,
                truth: np.ndarray | None = None) -> str | None:
    """Per-class score histograms (flagged samples in red)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    classes = np.unique(labels)
    cols = min(5, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), squeeze=False)
    scores = np.log10(1e-6 + np.maximum(result.scores.astype(np.float64), 0))
    for ax, c in zip(axes.ravel(), classes, strict=False):
        sel = labels == c
        s, fl = scores[sel], result.flagged[sel]
        bins = np.linspace(float(s.min()), float(s.max()) + 1e-9, 40)
        ax.hist(s[~fl], bins=bins, color="#4a7bd0", label="kept")
        if fl.any():
            ax.hist(s[fl], bins=bins, color="#d33", label="flagged")
        ax.set_title(f"class {int(c)} ({int(fl.sum())} flagged)", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(classes):]:
        ax.axis("off")
    fig.suptitle(f"{name}: log10 score per class", fontsize=9)
    fig.tight_layout()
    return rep.add_figure(f"{name}_histograms", fig)


def _projections(rep: Report, name: str, result: DataScanResult) -> str | None:
    """Activation Clustering's per-class 2-D views of the reduced activations."""
    views = {k: v for k, v in result.images.items() if k.startswith("projection_")}
    if not views:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted(views, key=lambda k: int(k.split("_")[1]))
    cols = min(5, len(keys))
    rows = int(np.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows), squeeze=False)
    for ax, key in zip(axes.ravel(), keys, strict=False):
        v = views[key]
        label = key.split("_")[1]
        info = result.per_class.get(label, {})
        colors = np.where(v[:, 2] > 0.5, "#e08a1e", "#4a7bd0")
        ax.scatter(v[:, 0], v[:, 1], s=3, c=colors, linewidths=0)
        flag = " ⚑" if info.get("detected") else ""
        ax.set_title(f"class {label}: rel {info.get('relative_size', 0):.2f}, "
                     f"sil {info.get('silhouette', 0):.2f}{flag}", fontsize=7)
        ax.tick_params(labelsize=5)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{name}: 2-means clusters on the first two components", fontsize=9)
    fig.tight_layout()
    return rep.add_figure(f"{name}_projections", fig)


_CLASS_COLUMNS = ("num_samples", "detected", "num_flagged", "separation", "suspect_fraction",
                  "relative_size", "silhouette", "k", "top_whitened_eigenvalue", "statistic",
                  "across_class_index", "threshold", "reason")


def _class_table(per_class: dict[str, Any]) -> str:
    cols = [c for c in _CLASS_COLUMNS if any(c in e for e in per_class.values())]
    head = "<tr><th>class</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
    body = []
    for label, e in sorted(per_class.items(), key=lambda kv: int(kv[0])):
        cls = ' class="suspect"' if e.get("detected") else ""
        cells = "".join(f"<td>{esc(_fmt(e.get(c, '')))}</td>" for c in cols)
        body.append(f"<tr{cls}><td>{esc(label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(scan: DataScan, *, rep: Report, train: ImageDataset) -> None:
    """Fill ``rep`` with the contract's scan-data keys, arrays and HTML sections."""
    labels = train.labels().numpy()
    rep.set(verdict=scan.verdict, num_samples=len(train),
            flagged_indices=scan.flagged_indices.tolist(), num_flagged=int(scan.flagged.sum()),
            scores_file=rep.add_array("scores.npy", scan.scores.astype(np.float32)),
            combine=scan.combine, not_applicable=dict(scan.not_applicable),
            combination=dict(scan.evidence or {}),
            carried_by=list((scan.evidence or {}).get("carried_by", [])),
            features={"layer": scan.features.layer,
                      "dimensions": int(scan.features.features.shape[1]),
                      "seconds": round(scan.features.seconds, 3)})
    for name, result in scan.results.items():
        d = result.to_dict()
        d["scores_file"] = rep.add_array(f"scores_{name}.npy", result.scores)
        rep.add_detector(name, d)
        parts = [_class_table(dict(result.per_class))]
        hist = _histograms(rep, name, result, labels)
        if hist:
            parts.append(f'<img class="plot" src="{rep.image_uri(hist)}" '
                         f'alt="{esc(name)} score histograms">')
        proj = _projections(rep, name, result)
        if proj:
            parts.append(f'<img class="plot" src="{rep.image_uri(proj)}" '
                         f'alt="{esc(name)} cluster projections">')
        for w in result.warnings:
            parts.append(f"<p>{esc(w)}</p>")
        rep.add_section(f"{name}: {result.verdict}, {int(result.flagged.sum())} flagged "
                        f"({result.seconds:.1f} s)", "".join(parts))
    for name, reason in scan.not_applicable.items():
        rep.add_section(f"{name}: not applicable", f"<p>{esc(reason)}</p>")


def _verification_section(rep: Report, v: Verification) -> None:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(val))}</td></tr>"
                   for k, val in v.to_dict().items())
    rep.add_section("Verification: retrained on the cleaned data", f"<table>{rows}</table>")


def print_summary(scan: DataScan, json_path: Path, verification: Verification | None,
                  exported: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    style = "bold red" if scan.verdict == "poisoned" else "bold green"
    n = scan.features.num_samples
    carried = ", ".join((scan.evidence or {}).get("carried_by", [])) or "none"
    console.print(f"[{style}]{scan.verdict.upper()}[/]: {int(scan.flagged.sum())} of {n} "
                  f"samples flagged ({scan.combine} of {len(scan.results)} detector(s); "
                  f"carried by: {carried})")
    table = Table(show_header=True, header_style="bold")
    for col in ("detector", "verdict", "flagged", "classes", "seconds"):
        table.add_column(col)
    for name, r in scan.results.items():
        classes = r.evidence.get("classes_with_outliers", [])
        table.add_row(name, r.verdict, str(int(r.flagged.sum())),
                      ",".join(map(str, classes)) or "-", f"{r.seconds:.1f}")
    for name, reason in scan.not_applicable.items():
        table.add_row(name, "not applicable", "-", "-", "-")
        table.add_row("", f"[dim]{reason}[/]", "", "", "")
    console.print(table)
    if exported is not None:
        console.print(f"cleaned data: {exported}")
    if verification is not None:
        v = verification
        asr = ("" if v.asr_before is None else
               f", ASR {v.asr_before:.3f} -> {v.asr_after:.3f}")
        console.print(f"retrained {v.arch} on {v.num_trained} samples: clean accuracy "
                      f"{v.clean_accuracy_before:.4f} -> {v.clean_accuracy_after:.4f}{asr}")
    console.print(f"report: {json_path} and {json_path.with_suffix('.html')}")


# ----------------------------------------------------------------------------- command


def run(*, train: str, model: Path, detectors: str | None, poison_rate_bound: float | None,
        out: Path, export_clean: Path | None, verify: bool, seed: int, device: str,
        arch: str | None, trust_pickle: bool, quiet: bool, json_out: bool) -> int:
    from ..io.data import load_dataset
    from ..io.models import check_compatible, detect_format, load_model
    from ..maths.spectral import check_rate

    t0 = time.perf_counter()
    seed_everything(seed)
    eps = check_rate("poison_rate_bound", poison_rate_bound)
    _check_export_path(export_clean)
    model = Path(model)
    if not model.is_file():
        raise ParameterError(f"invalid MODEL: expected an existing file, got {str(model)!r}")
    check_outputs([report_folder("--out", out)]
                  + ([] if export_clean is None else [Output("--export-clean", export_clean)]),
                  [Input("TRAIN", train), Input("--model", model),
                   Input("model sidecar", sidecar_of(model))])
    fmt = detect_format(model)
    sidecar = read_sidecar(model)
    if verify and arch is None and fmt in ("torchscript", "onnx"):
        raise ParameterError(
            "--verify retrains the model's architecture: give --arch (a built-in name such "
            "as small_cnn, or package.module:factory)" + sidecar_hint(sidecar))
    ds = load_dataset(train, need_labels=True, min_classes=2)
    loaded = load_model(model, arch=arch if fmt in WEIGHT_FORMATS else None,
                        trust_pickle=trust_pickle, device=device, input_shape=ds.input_shape)
    loaded = check_compatible(loaded, ds)
    # only --arch chooses the network that is retrained (Activation Clustering's
    # reclassification, --verify); never the files beside the model
    retrain = arch
    scan = scan_data(loaded.module, ds, detectors=detectors, poison_rate_bound=eps, seed=seed,
                     device=loaded.device, arch=retrain)
    rep = Report(command="scan-data", out_dir=out, seed=seed,
                 params={"detectors": list(scan.results) + list(scan.not_applicable),
                         "poison_rate_bound": eps, "combine": scan.combine,
                         "device": str(loaded.device), "arch": retrain,
                         "export_clean": None if export_clean is None else str(export_clean),
                         "verify": verify})
    rep.set_class_names(ds.class_names)
    rep.add_input(role="train", path=train, sha256=ds.sha256, format=ds.format)
    rep.add_input(role="model", path=str(model), sha256=loaded.sha256, format=loaded.format)
    write_report(scan, rep=rep, train=ds)
    exported = None
    if export_clean is not None:
        exported = _export(ds, scan, export_clean, train)
        rep.set(export={"path": str(exported), "num_samples": int((~scan.flagged).sum()),
                        "num_removed": int(scan.flagged.sum())})
    verification = None
    if verify:
        verification = _verify(loaded, ds, scan, retrain, sidecar, train, seed)
        rep.set(verification=verification.to_dict())
        _verification_section(rep, verification)
    path = rep.write(seconds=time.perf_counter() - t0)
    if json_out:
        emit_json(path)
    elif not quiet:
        print_summary(scan, path, verification, exported)
    return 1 if scan.verdict == "poisoned" else 0


def _export(ds: ImageDataset, scan: DataScan, target: Path, train: str) -> Path:
    if scan.flagged.all():
        raise ParameterError("invalid export_clean: every sample is flagged, nothing to write")
    return export_clean(ds, scan.flagged, target, source_path=train)


def _verify(loaded: Any, ds: ImageDataset, scan: DataScan, arch: str | None,
            sidecar: dict[str, Any], train: str, seed: int) -> Verification:
    import torch

    if arch is None and loaded.format != "pickle":
        raise DetectorNotApplicable(
            "--verify retrains the model's architecture: give --arch (a built-in name such "
            "as small_cnn, or package.module:factory)" + sidecar_hint(sidecar))
    attack = sidecar_attack(sidecar)
    cfg = sidecar_train_config(sidecar)
    cleaned_mask = scan.flagged
    keep = torch.from_numpy(np.flatnonzero(~cleaned_mask))
    fit, test, test_source = _test_split(train, ds.subset(keep), seed)
    # the retrained model sees ``fit`` (the cleaned data, minus a hold-out if one was cut)
    fake_flags = np.zeros(len(fit), dtype=bool)
    v = verify_by_retraining(loaded.module, fit, fake_flags, arch=arch, test=test,
                             attack=attack, config=cfg, seed=seed, device=loaded.device)
    return Verification(v.arch, int(cleaned_mask.sum()), v.num_trained, test_source,
                        v.clean_accuracy_before, v.clean_accuracy_after, v.asr_before,
                        v.asr_after, v.attack, v.seconds, v.epochs)
