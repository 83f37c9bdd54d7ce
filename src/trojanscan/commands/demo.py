"""``trojanscan demo``: the embedded default, offline, end to end.

Trains (or loads cached) a BadNets-backdoored and a clean twin small CNN on
Fashion-MNIST (scikit-learn's digits when the Debian package is absent, saying so), and
three clean reference models (other seeds) whose Neural Cleanse scans calibrate the
decision, then runs ``scan`` on the backdoored model and its twin, ``scan-data`` on
the poisoned training set and ``filter`` on a batch of triggered and clean inputs, and
tells what was found against the ground truth.

The steps are independent jobs (five trainings, five scans, a data scan and a filter)
run by ``jobs`` worker processes (default 2, one per core here) with the CPU threads
split between them (measured on 2 cores with cached models, ``--quick``: 63 s with two
single-threaded workers, 75 s in one process using two threads). A scan of the backdoored model
and its twin waits for the reference models' scans; everything else starts as soon as
its model is trained. ``jobs=1`` runs everything in this process, in order.

Sizes: ``--quick`` trains on 10,000 images for two epochs and runs Neural Cleanse on
500 clean images with 2 mini-batches per optimisation step (``mini_batches=2``; the
scan default is 4) and STRIP's calibration on 1,000; the full demo trains on 30,000
images for three epochs, and runs the scan defaults on 1,000 images, Activation
Clustering, and a 2,000-image STRIP calibration.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing as mp
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DataError, TrojanscanWarning
from ..io.outputs import Output, check_outputs
from ..progress import progress
from ..training import TrainConfig
from ..utils import seed_everything

ATTACK = "badnets:size=4,location=bottom-right,target=0"
#: clean models trained with other seeds, the references of Neural Cleanse's decision
N_REFERENCES = 3
#: share of the backdoored model's training set that is poisoned (relabelled to the target)
POISON_RATE = 0.1
#: Fashion-MNIST training images used by the quick and the full demo
QUICK_TRAIN, FULL_TRAIN = 10_000, 30_000
#: Neural Cleanse settings of the quick demo (fewer mini-batches per step)
QUICK_NC = {"mini_batches": 2}


@dataclass(frozen=True)
class DemoPlan:
    dataset: str
    train: ImageDataset
    test: ImageDataset
    config: TrainConfig
    note: str


def _plan(quick: bool, seed: int) -> DemoPlan:
    """The demo's data and training settings (loaded once per process and setting)."""
    return _plan_cached(quick, seed, os.environ.get("TROJANSCAN_FASHION_MNIST_DIR"))


@functools.lru_cache(maxsize=2)
def _plan_cached(quick: bool, seed: int, _fmnist_dir: str | None) -> DemoPlan:
    from ..io.data import load_dataset

    try:
        train = load_dataset("fashion-mnist:train")
        test = load_dataset("fashion-mnist:test")
        name, note = "fashion-mnist", "Fashion-MNIST (Debian package dataset-fashion-mnist)"
        g = torch.Generator().manual_seed(seed)
        n_train = QUICK_TRAIN if quick else FULL_TRAIN
        train = train.subset(torch.randperm(len(train), generator=g)[:n_train].sort().values)
        # smaller batches and a larger step than TrainConfig's defaults: the few epochs
        # the demo can afford still reach ~0.81 (quick) / ~0.87 (full) accuracy
        cfg = TrainConfig(epochs=2 if quick else 3, batch_size=64, lr=2e-3)
    except DataError as exc:
        train, test = load_dataset("digits:train"), load_dataset("digits:test")
        name = "digits"
        note = (f"scikit-learn digits (8×8) — Fashion-MNIST is not available here: {exc}")
        cfg = TrainConfig(epochs=15 if quick else 30, batch_size=64, lr=2e-3)
    return DemoPlan(name, train, test, cfg, note)


def _attack_spec(dataset: str) -> str:
    return ATTACK if dataset == "fashion-mnist" else "badnets:size=2,location=bottom-right,target=0"


def _cached_or_train(path: Path, quick: bool, plan_seed: int, spec: str | None, seed: int,
                     device: str, key: dict[str, Any]) -> dict[str, Any]:
    """Load the model's sidecar when its settings match ``key``; else train and save.
    Returns the sidecar (accuracy, ASR, …). Runs in a worker: rebuilds the plan there."""
    from ..attacks import parse_attack
    from ..utils import atomic_write_text
    from ..zoo import make_model, save_model, save_poisoned_data

    sidecar = path.with_suffix(".json")
    if path.exists() and sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None  # an unreadable cache entry is retrained
        if isinstance(meta, dict) and meta.get("demo_key") == key:
            return meta
    plan = _plan(quick, plan_seed)
    attack = None if spec is None else parse_attack(spec)
    trained = make_model(plan.train, plan.test, attack=attack, poison_rate=POISON_RATE,
                         arch="small_cnn", seed=seed, config=plan.config, device=device,
                         description=f"training {'backdoored' if attack else 'clean'} model")
    save_model(trained, path)
    if attack is not None:
        save_poisoned_data(trained, plan.train, path.parent / "poisoned_train.npz")
    meta = json.loads(sidecar.read_text())
    meta["demo_key"] = key
    atomic_write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return meta


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


# -- running the steps ---------------------------------------------------------------

class _Inline:
    """The executor API, running each task at once in this process (``jobs=1``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed over like a worker's error
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _worker_init(threads: int) -> None:
    """A worker: its share of the CPU threads, and no progress bars (the parent shows
    one over the steps)."""
    torch.set_num_threads(threads)
    from ..progress import set_quiet

    set_quiet(True)


def _executor(jobs: int) -> ProcessPoolExecutor | _Inline:
    if jobs <= 1:
        return _Inline()
    threads = max(1, torch.get_num_threads() // jobs)
    return ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(threads,))


def _timed(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the seconds it took (in the worker)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _scan_reference(**kwargs: Any) -> int:
    """A reference model's scan: its verdict is not the point, its norms are (so Neural
    Cleanse's warning about deciding without references is silenced)."""
    from . import scan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrojanscanWarning)
        return int(scan.run(**kwargs))


def default_jobs() -> int:
    """Worker processes of the demo: 2 where there are at least 2 CPUs, else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def run(*, out: Path, quick: bool, seed: int, device: str, cache: Path | None,
        quiet: bool, jobs: int | None = None) -> int:
    from ..attacks import parse_attack
    from ..exceptions import bad_param

    t0 = time.perf_counter()
    jobs = default_jobs() if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise bad_param("jobs", "an integer >= 1", jobs)
    seed_everything(seed)
    out = Path(out)
    check_outputs([Output("--out", out, folder=True)]
                  + ([] if cache is None else [Output("--cache", Path(cache), folder=True)]),
                  [])
    models = Path(cache) if cache is not None else out / "models"
    data_dir = out / "data"
    models.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(quick, seed)
    spec = _attack_spec(plan.dataset)
    attack = parse_attack(spec)
    assert attack is not None  # the demo's spec is a real attack
    _say(quiet, f"trojanscan demo — data: {plan.note}; {jobs} worker process"
                f"{'es' if jobs > 1 else ''}")
    key = {"dataset": plan.dataset, "quick": quick, "seed": seed, "attack": spec,
           "n_train": len(plan.train), "epochs": plan.config.epochs,
           "poison_rate": POISON_RATE}

    # held-out data: calibration/clean half and an input batch from the other half
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(plan.test), generator=g)
    n_clean = min(1000 if quick else 2000, len(plan.test) // 2)
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

    clean_npz = str(data_dir / "clean.npz")
    scan_args = {"data": clean_npz, "seed": seed, "device": device, "arch": None,
                 "trust_pickle": False, "max_samples": 500 if quick else 1000, "quiet": True,
                 "json_out": False,
                 "param": [f"neural_cleanse.{k}={v}" for k, v in QUICK_NC.items()]
                 if quick else None}
    bd_path, clean_path = models / "backdoored.pt", models / "clean.pt"
    ref_paths = [models / f"reference-{i}.pt" for i in range(N_REFERENCES)]
    ref_dir = out / "references"
    poisoned = models / "poisoned_train.npz"

    executor = _executor(jobs)
    # one bar over the steps when workers run them (their own bars are off); in process
    # (jobs=1) each step shows its own bar, and rich allows one live display at a time
    stack = contextlib.ExitStack()
    bar = (stack.enter_context(progress("demo: trainings, scans, data scan, filter",
                                        2 * N_REFERENCES + 6)) if jobs > 1 else None)

    def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut = executor.submit(_timed, fn, *args, **kwargs)
        if bar is not None:
            fut.add_done_callback(lambda _: bar.advance())
        return fut

    try:
        # every training first (the backdoored model's first: the data scan and the
        # filter need it), then each follow-up as soon as its model exists
        trainings = {
            "backdoored": submit(_cached_or_train, bd_path, quick, seed, spec,
                                      seed, device, {**key, "kind": "bd"}),
            **{f"reference-{i}": submit(_cached_or_train, path, quick, seed,
                                             None, seed + 1000 + i, device,
                                             {**key, "kind": "reference", "index": i})
               for i, path in enumerate(ref_paths)},
            "clean": submit(_cached_or_train, clean_path, quick, seed, None,
                                 seed, device, {**key, "kind": "clean"}),
        }
        ref_scans = []
        for i, path in enumerate(ref_paths):
            trainings[f"reference-{i}"].result()
            ref_scans.append(submit(
                _scan_reference, model=path, detectors="neural_cleanse",
                out=ref_dir / f"reference-{i}", nc_reference=None, **scan_args))
        bd_meta, _ = trainings["backdoored"].result()
        data_scan = submit(
            scan_data.run, train=str(poisoned), model=bd_path,
            detectors=None,  # the command's default, quick or not
            poison_rate_bound=None, out=out / "scan-data", export_clean=None, verify=False,
            seed=seed, device=device, arch=None, trust_pickle=False, quiet=True,
            json_out=False)
        filtering = submit(
            filter_cmd.run, model=bd_path, inputs=str(data_dir / "inputs.npz"),
            calibrate=clean_npz, frr=0.01, detector="strip", out=out / "filter", seed=seed,
            device=device, arch=None, trust_pickle=False, quiet=True, json_out=False)
        cl_meta, _ = trainings["clean"].result()
        train_s = sum(f.result()[1] for f in trainings.values())
        _say(quiet, f"1. Trained a backdoored small CNN ({spec}, {POISON_RATE:.0%} of the "
                    f"training set poisoned): clean accuracy "
                    f"{bd_meta['clean_accuracy']:.3f}, attack success rate "
                    f"{bd_meta['asr']:.3f}; a clean twin: accuracy "
                    f"{cl_meta['clean_accuracy']:.3f}; and {N_REFERENCES} clean reference "
                    f"models (other seeds). Models: {models} [{train_s:.0f} s of work]")

        # Neural Cleanse's paper rule flags labels that are easy targets in *every* model
        # (Fashion-MNIST's "Bag"); its reference decision compares each label with the
        # same label in clean models of the same task, scanned once
        ref_s = sum(f.result()[1] for f in ref_scans)
        scans = {label: submit(scan.run, model=path, detectors=None,
                                    out=out / f"scan-{label}", nc_reference=[ref_dir],
                                    **scan_args)
                 for label, path in (("backdoored", bd_path), ("clean", clean_path))}
        scan_s = ref_s + sum(f.result()[1] for f in scans.values())
        bd = json.loads((out / "scan-backdoored" / "report.json").read_text())
        cl = json.loads((out / "scan-clean" / "report.json").read_text())
        _say(quiet, f"2. scan (Neural Cleanse against the {N_REFERENCES} reference models, "
                    f"and MNTD): backdoored model → {bd['verdict'].upper()} (score "
                    f"{bd['score']:.2f}, suspected target(s) {bd['suspected_targets']}; true "
                    f"target {attack.target}); clean model → {cl['verdict'].upper()} (score "
                    f"{cl['score']:.2f}). [{scan_s:.0f} s of work]")

        _, data_s = data_scan.result()
        rep = json.loads((out / "scan-data" / "report.json").read_text())
        truth = np.load(poisoned)["poison_mask"]
        flagged = np.zeros(len(truth), bool)
        flagged[np.asarray(rep["flagged_indices"], dtype=np.int64)] = True
        tp = int((flagged & truth).sum())
        _say(quiet, f"3. scan-data: {rep['verdict'].upper()} — flagged {int(flagged.sum())} "
                    f"of {len(truth)} training samples; {tp} of the {int(truth.sum())} "
                    f"poisoned ones (recall {tp / max(1, truth.sum()):.2f}, precision "
                    f"{tp / max(1, flagged.sum()):.2f}). [{data_s:.0f} s of work]")

        _, filter_s = filtering.result()
        rep = json.loads((out / "filter" / "report.json").read_text())
        fl = np.asarray(rep["flagged"], dtype=bool)
        _say(quiet, f"4. filter (STRIP, FRR 1%): flagged {int(fl[is_triggered].sum())}/"
                    f"{int(is_triggered.sum())} triggered inputs and "
                    f"{int(fl[~is_triggered].sum())}/{int((~is_triggered).sum())} clean "
                    f"ones. [{filter_s:.0f} s of work]")
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        stack.close()

    reports = [str(out / d / "report.html") for d in ("scan-backdoored", "scan-clean",
                                                       "scan-data", "filter")]
    _say(quiet, "Reports:\n  " + "\n  ".join(reports))
    _say(quiet, f"Done in {time.perf_counter() - t0:.0f} s.")
    return 0
