"""``trojanscan demo``: the embedded default, offline, end to end.

Trains (or loads cached) a BadNets-backdoored and a clean twin small CNN on
Fashion-MNIST (scikit-learn's digits when the Debian package is absent, saying so), and
three clean reference models (other seeds) whose Neural Cleanse scans calibrate the
decision, then runs ``scan`` on the backdoored model and its twin, ``scan-data`` on
the poisoned training set and ``filter`` on a batch of triggered and clean inputs, and
tells what was found against the ground truth. ``--quick`` trains on a subset for two
epochs.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, TrojanscanWarning
from ..training import TrainConfig
from ..utils import seed_everything

ATTACK = "badnets:size=4,location=bottom-right,target=0"
#: clean models trained with other seeds, the references of Neural Cleanse's decision
N_REFERENCES = 3


@dataclass(frozen=True)
class DemoPlan:
    dataset: str
    train: ImageDataset
    test: ImageDataset
    config: TrainConfig
    note: str


def _plan(quick: bool, seed: int) -> DemoPlan:
    from ..io.data import load_dataset

    try:
        train = load_dataset("fashion-mnist:train")
        test = load_dataset("fashion-mnist:test")
        name, note = "fashion-mnist", "Fashion-MNIST (Debian package dataset-fashion-mnist)"
        if quick:
            g = torch.Generator().manual_seed(seed)
            train = train.subset(torch.randperm(len(train), generator=g)[:15000].sort().values)
        cfg = TrainConfig(epochs=2 if quick else 5)
    except DataError as exc:
        train, test = load_dataset("digits:train"), load_dataset("digits:test")
        name = "digits"
        note = (f"scikit-learn digits (8×8) — Fashion-MNIST is not available here: {exc}")
        cfg = TrainConfig(epochs=15 if quick else 30, batch_size=64, lr=2e-3)
    return DemoPlan(name, train, test, cfg, note)


def _attack_spec(dataset: str) -> str:
    return ATTACK if dataset == "fashion-mnist" else "badnets:size=2,location=bottom-right,target=0"


def _cached_or_train(path: Path, plan: DemoPlan, attack: Any, seed: int, device: str,
                     key: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Load the model's sidecar when its settings match ``key``; else train and save."""
    from ..zoo import make_model, save_model, save_poisoned_data

    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        meta = json.loads(sidecar.read_text())
        if meta.get("demo_key") == key:
            return meta, None
    trained = make_model(plan.train, plan.test, attack=attack, poison_rate=0.1,
                         arch="small_cnn", seed=seed, config=plan.config, device=device,
                         description=f"training {'backdoored' if attack else 'clean'} model")
    save_model(trained, path)
    if attack is not None:
        save_poisoned_data(trained, plan.train, path.parent / "poisoned_train.npz")
    meta = json.loads(sidecar.read_text())
    meta["demo_key"] = key
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return meta, trained


def _save_npz(path: Path, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    from ..utils import atomic_path

    arrays = {"x": np.round(x.numpy() * 255).clip(0, 255).astype(np.uint8)}
    if y is not None:
        arrays["y"] = y.numpy()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def run(*, out: Path, quick: bool, seed: int, device: str, cache: Path | None,
        quiet: bool) -> int:
    from ..attacks import parse_attack

    t0 = time.perf_counter()
    seed_everything(seed)
    out = Path(out)
    models = Path(cache) if cache is not None else out / "models"
    data_dir = out / "data"
    models.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(quick, seed)
    spec = _attack_spec(plan.dataset)
    attack = parse_attack(spec)
    assert attack is not None  # the demo's spec is a real attack
    _say(quiet, f"trojanscan demo — data: {plan.note}")
    key = {"dataset": plan.dataset, "quick": quick, "seed": seed, "attack": spec,
           "n_train": len(plan.train), "epochs": plan.config.epochs}
    bd_path, clean_path = models / "backdoored.pt", models / "clean.pt"
    bd_meta, _ = _cached_or_train(bd_path, plan, attack, seed, device, {**key, "kind": "bd"})
    cl_meta, _ = _cached_or_train(clean_path, plan, None, seed, device, {**key, "kind": "clean"})
    ref_paths = [models / f"reference-{i}.pt" for i in range(N_REFERENCES)]
    for i, path in enumerate(ref_paths):
        _cached_or_train(path, plan, None, seed + 1000 + i, device,
                         {**key, "kind": "reference", "index": i})
    _say(quiet, f"1. Trained a backdoored small CNN ({spec}, 10% of the training set "
                f"poisoned): clean accuracy {bd_meta['clean_accuracy']:.3f}, attack success "
                f"rate {bd_meta['asr']:.3f}; a clean twin: accuracy "
                f"{cl_meta['clean_accuracy']:.3f}; and {N_REFERENCES} clean reference models "
                f"(other seeds). Models: {models}")

    # held-out data: calibration/clean half and an input batch from the other half
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(plan.test), generator=g)
    n_clean = min(2000, len(plan.test) // 2)
    clean_idx = perm[:n_clean].sort().values
    rest = perm[n_clean:]
    clean_ds = plan.test.subset(clean_idx)
    _save_npz(data_dir / "clean.npz", clean_ds.x, clean_ds.labels())
    y_rest = plan.test.labels()[rest]
    n_in = min(100, len(rest) // 2)
    trig_src = rest[attack.eligible(y_rest)][:n_in]
    benign = rest[:n_in]
    x_inputs = torch.cat([attack.apply(plan.test.x[trig_src]), plan.test.x[benign]])
    is_triggered = np.r_[np.ones(len(trig_src), bool), np.zeros(len(benign), bool)]
    _save_npz(data_dir / "inputs.npz", x_inputs)

    from . import filter as filter_cmd
    from . import scan, scan_data

    max_samples = 500 if quick else 1000
    clean_npz = str(data_dir / "clean.npz")

    def _scan(path: Path, dest: Path, detectors: str | None,
              refs: list[Path] | None) -> int:
        return scan.run(model=path, data=clean_npz, detectors=detectors, out=dest, seed=seed,
                        device=device, arch=None, trust_pickle=False, max_samples=max_samples,
                        quiet=True, json_out=False, nc_reference=refs)

    # Neural Cleanse's paper rule flags labels that are easy targets in *every* model
    # (Fashion-MNIST's "Bag"); its reference decision compares each label with the same
    # label in clean models of the same task, scanned once
    ref_dir = out / "references"
    for i, path in enumerate(ref_paths):
        with warnings.catch_warnings():  # their verdicts are not the point, their norms are
            warnings.simplefilter("ignore", TrojanscanWarning)
            _scan(path, ref_dir / f"reference-{i}", "neural_cleanse", None)
    for label, path in (("backdoored", bd_path), ("clean", clean_path)):
        _scan(path, out / f"scan-{label}", None, [ref_dir])
    bd = json.loads((out / "scan-backdoored" / "report.json").read_text())
    cl = json.loads((out / "scan-clean" / "report.json").read_text())
    _say(quiet, f"2. scan (Neural Cleanse against the {N_REFERENCES} reference models, and "
                f"MNTD): backdoored model → {bd['verdict'].upper()} (score {bd['score']:.2f}, "
                f"suspected target(s) {bd['suspected_targets']}; true target "
                f"{attack.target}); clean model → {cl['verdict'].upper()} (score "
                f"{cl['score']:.2f}).")

    poisoned = models / "poisoned_train.npz"
    # --quick leaves out Activation Clustering, whose exclusionary reclassification
    # retrains a network (the longest step of the quick demo)
    scan_data.run(
        train=str(poisoned), model=bd_path,
        detectors="spectral_signatures,spectre" if quick else None, poison_rate_bound=None,
        out=out / "scan-data", export_clean=None, verify=False, seed=seed, device=device,
        arch=None, trust_pickle=False, quiet=True, json_out=False)
    rep = json.loads((out / "scan-data" / "report.json").read_text())
    truth = np.load(poisoned)["poison_mask"]
    flagged = np.zeros(len(truth), bool)
    flagged[np.asarray(rep["flagged_indices"], dtype=np.int64)] = True
    tp = int((flagged & truth).sum())
    _say(quiet, f"3. scan-data: {rep['verdict'].upper()} — flagged {int(flagged.sum())} of "
                f"{len(truth)} training samples; {tp} of the {int(truth.sum())} poisoned "
                f"ones (recall {tp / max(1, truth.sum()):.2f}, precision "
                f"{tp / max(1, flagged.sum()):.2f}).")

    filter_cmd.run(
        model=bd_path, inputs=str(data_dir / "inputs.npz"), calibrate=clean_npz, frr=0.01,
        detector="strip", out=out / "filter", seed=seed, device=device, arch=None,
        trust_pickle=False, quiet=True, json_out=False)
    rep = json.loads((out / "filter" / "report.json").read_text())
    fl = np.asarray(rep["flagged"], dtype=bool)
    _say(quiet, f"4. filter (STRIP, FRR 1%): flagged {int(fl[is_triggered].sum())}/"
                f"{int(is_triggered.sum())} triggered inputs and "
                f"{int(fl[~is_triggered].sum())}/{int((~is_triggered).sum())} clean ones.")

    reports = [str(out / d / "report.html") for d in ("scan-backdoored", "scan-clean",
                                                       "scan-data", "filter")]
    _say(quiet, "Reports:\n  " + "\n  ".join(reports))
    _say(quiet, f"Done in {time.perf_counter() - t0:.0f} s.")
    return 0
