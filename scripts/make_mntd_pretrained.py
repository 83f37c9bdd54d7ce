"""Make the MNTD meta-classifiers shipped in ``src/trojanscan/data/`` (mntd_*.safetensors/.json).

MNTD — Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021.
Every setting is in :data:`PRESETS` below and recorded in the bundle's JSON; with the same
seed, data and torch build the shadows are the same (each shadow has its own derived
seed, whatever backend trains it). Shadows are resumable files under ``--workdir``.

Usage. The shipped Fashion-MNIST bundle (the paper's variants, the ``qt_data`` ensemble
of 5 since session 6 and the ``stamp`` ensemble of 3 since session 12, whose members train
against 256 extra ``wide``-family jumbo shadows in ``shadows/jumbo-wide/``) was made on a
2-core CPU machine, shadows by 2 worker processes (~18 min for 512, ~24 min for the 256
wide ones with other jobs running), meta-classifiers 2 at a time (~14 min)::

    python scripts/make_mntd_pretrained.py --which fashion-mnist --backend processes \\
        --workers 2 --meta-backend processes --meta-workers 2 \\
        --workdir benchmarks/.cache/mntd_shadows/paper --out src/trojanscan/data

Its reference models (session 10: 64 clean models trained outside the share, whose raw
outputs set the verdict's threshold and p-values; trojanscan.mntd.reference) were added to
the bundle already in ``--out`` without retraining anything else (~6 min)::

    python scripts/make_mntd_pretrained.py --which fashion-mnist --reference-only \\
        --backend processes --workers 2 --workdir benchmarks/.cache/mntd_shadows/paper

Its trigger-search probe (session 14: trojanscan.mntd.search; read against the 64
reference models, which are re-used) was added the same way (~5 min)::

    python scripts/make_mntd_pretrained.py --which fashion-mnist --search-only \\
        --backend processes --workers 2 --workdir benchmarks/.cache/mntd_shadows/paper

``--search-only`` now writes both readouts of the search (``search`` and, session 16,
``search_flow``). The shipped ``search_flow`` entry came from that command (one worker);
the shipped ``search`` entry was kept from session 14 so that earlier figures stay
exact: re-derived, its raw outputs differ by < 1e-4 (float summation order).

The digits bundle (paper's variants only) was made on one H100 machine with 16 CPU cores,
shadows by 4 worker processes sharing the GPU (about 3 minutes; meta-classifiers on one
CPU thread)::

    export CUBLAS_WORKSPACE_CONFIG=:4096:8
    python scripts/make_mntd_pretrained.py --which digits --backend processes \\
        --workers 4 --device cuda --meta-device cpu --workdir .cache/mntd --out OUT

GPU-trained shadows are not bit-identical to CPU-trained ones (an earlier Fashion-MNIST
bundle came from an H100, its qt variant measured in
benchmarks/notes/mntd_development.md beside the CPU one). The alternative measured there (softmax
responses, poison replacing samples, 128 shadows per kind of mlp and lenet)::

    python scripts/make_mntd_pretrained.py --which fashion-mnist --backend processes \\
        --workers 2 --meta-backend processes --num-shadows 128 --num-val 24 \\
        --archs mlp,lenet --meta-epochs 20 --response softmax --poisoning replace \\
        --stem mntd_fmnist_softmax --out benchmarks/.cache/mntd/local_softmax

Quick check on a laptop (smaller, not the shipped settings)::

    python scripts/make_mntd_pretrained.py --which digits --num-shadows 24 --num-val 8 \\
        --out /tmp/mntd-check --backend sequential
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from trojanscan.io.data import load_dataset
from trojanscan.mntd.pipeline import TrainSettings, defender_share, fit_bundle, train_shadow_set
from trojanscan.mntd.pretrained import save_bundle
from trojanscan.mntd.shadows import ShadowData

ROOT = Path(__file__).resolve().parents[1]

#: name -> where the defender's data come from and every training setting
PRESETS: dict[str, dict] = {
    "fashion-mnist": {
        "stem": "mntd_fmnist",
        "data": "fashion-mnist:train",  # the defender's share is drawn from here
        "share": 0.02,  # the paper's 2%: 1,200 images
        "eval": "fashion-mnist:test",  # only to report shadow accuracy / ASR
        "eval_samples": 1000,
        "settings": TrainSettings(num_shadows=256, num_val=32,
                                  archs=("small_cnn", "lenet", "mlp"), shadow_epochs=20,
                                  shadow_batch_size=64, shadow_lr=1e-3, meta_epochs=40,
                                  response="logits", shadow_poisoning="append",
                                  data_members=5, stamp_members=3, stamp_family="wide"),
        # clean models trained outside the share calibrate the verdict (session 10)
        "reference_models": 64,
    },
    "digits": {
        "stem": "mntd_digits",
        "data": "digits:train",
        "share": 0.5,  # 2% of 1,442 digits would be 29 images: too few to train on
        "eval": "digits:test",
        "eval_samples": 355,
        "settings": TrainSettings(num_shadows=256, num_val=32,
                                  archs=("small_cnn", "lenet", "mlp"), shadow_epochs=30,
                                  shadow_batch_size=64, shadow_lr=2e-3, meta_epochs=40,
                                  response="logits", shadow_poisoning="append"),
    },
}


def make(name: str, args: argparse.Namespace) -> Path:
    preset = PRESETS[name]
    settings: TrainSettings = preset["settings"]
    overrides = {k: v for k, v in (("num_shadows", args.num_shadows), ("num_val", args.num_val),
                                   ("meta_epochs", args.meta_epochs),
                                   ("shadow_epochs", args.shadow_epochs),
                                   ("response", args.response),
                                   ("query_range", args.query_range),
                                   ("shadow_poisoning", args.poisoning),
                                   ("shadow_regime", args.regime),
                                   ("jumbo_rates", args.rates),
                                   ("jumbo_family", args.family),
                                   ("data_members", args.data_members),
                                   ("stamp_members", args.stamp_members),
                                   ("stamp_family", args.stamp_family),
                                   ("query_holdout", args.query_holdout),
                                   ("archs", None if args.archs is None else
                                    tuple(args.archs.split(",")))) if v is not None}
    settings = dataclasses.replace(settings, **overrides)
    data = load_dataset(preset["data"])
    share = defender_share(data, preset["share"], seed=args.seed)
    ev = load_dataset(preset["eval"])
    ev = ev.subset(slice(0, preset["eval_samples"]))
    folder = Path(args.workdir) / name / "shadows"
    t0 = time.perf_counter()
    run = train_shadow_set(ShadowData(share, data.num_classes, ev, args.device), folder,
                           settings, seed=args.seed, backend=args.backend,
                           workers=args.workers)
    shadow_s = time.perf_counter() - t0
    print(f"{name}: {len(run.ran)} shadows trained, {len(run.skipped)} reused, "
          f"{shadow_s:.0f} s ({run.backend}, {run.workers} workers)", file=sys.stderr, flush=True)
    extra = {"produced_by": {
        "script": "scripts/make_mntd_pretrained.py", "preset": name,
        "data": preset["data"], "share": preset["share"], "eval": preset["eval"],
        "shadow_backend": run.backend, "shadow_workers": run.workers,
        "shadow_seconds": round(shadow_s, 1), "device": args.device,
        "shadow_folder": str(folder)}}
    bundle = fit_bundle(folder, settings, name=args.stem or name, data=share, seed=args.seed,
                        device=args.meta_device or args.device, extra_info=extra,
                        backend=args.meta_backend, workers=args.meta_workers,
                        threads=args.meta_threads)
    weights, sidecar = save_bundle(Path(args.out) / (args.stem or preset["stem"]), bundle)
    if num_references(preset, args):
        sidecar = add_references(name, args)
    summary = {v: {"val_auroc": round(c["val_auroc"], 4), "best_epoch": c["best_epoch"]}
               for v, c in bundle.calibration.items()}
    print(f"{name}: wrote {weights} ({weights.stat().st_size / 1e3:.0f} kB) and {sidecar}; "
          f"held-out shadows: {json.dumps(summary)}; shadows: "
          f"{json.dumps(bundle.info['training']['shadows'])}", file=sys.stderr, flush=True)
    return sidecar


def num_references(preset: dict, args: argparse.Namespace) -> int:
    return int(preset.get("reference_models", 0) if args.reference_models is None
               else args.reference_models)


def add_references(name: str, args: argparse.Namespace) -> Path:
    """Calibrate the bundle written for preset ``name`` on clean reference models trained
    outside the defender's share (trojanscan.mntd.reference); rewrites it in place."""
    from trojanscan.mntd.pipeline import share_indices
    from trojanscan.mntd.pretrained import load_bundle
    from trojanscan.mntd.reference import calibrate, outside_share

    preset = PRESETS[name]
    stem = Path(args.out) / (args.stem or preset["stem"])
    bundle = load_bundle(stem.with_suffix(".json"))
    data = load_dataset(preset["data"])
    pool = outside_share(data, share_indices(len(data), preset["share"], seed=args.seed))
    ev = load_dataset(preset["eval"]).subset(slice(0, preset["eval_samples"]))
    t0 = time.perf_counter()
    bundle, run = calibrate(bundle, pool, Path(args.workdir) / name / "references",
                            num=num_references(preset, args), seed=args.seed, eval_data=ev,
                            device=args.device, backend=args.backend, workers=args.workers,
                            data_info={"outside_share": preset["share"]})
    print(f"{name}: {len(run.ran)} reference models trained, {len(run.skipped)} reused, "
          f"{time.perf_counter() - t0:.0f} s; mean accuracy "
          f"{bundle.info['reference']['mean_accuracy']:.3f}", file=sys.stderr, flush=True)
    return save_bundle(stem, bundle)[1]


def add_search(name: str, args: argparse.Namespace) -> Path:
    """Add the trigger-search probe (trojanscan.mntd.search) to the bundle written for
    preset ``name``, read against its benign training shadows, then re-calibrate on the
    reference models (which the probe is then read against); rewrites it in place."""
    from dataclasses import replace

    from trojanscan.mntd.pipeline import fit_search_entries
    from trojanscan.mntd.pretrained import load_bundle

    preset = PRESETS[name]
    stem = Path(args.out) / (args.stem or preset["stem"])
    bundle = load_bundle(stem.with_suffix(".json"))
    data = load_dataset(preset["data"])
    share = defender_share(data, preset["share"], seed=args.seed)
    t0 = time.perf_counter()
    entries = fit_search_entries(Path(args.workdir) / name / "shadows", preset["settings"],
                                 share, data.num_classes, seed=args.seed)
    bundle = replace(bundle, variants={**bundle.variants,
                                       **{k: p for k, (p, _) in entries.items()}},
                     calibration={**bundle.calibration,
                                  **{k: c for k, (_, c) in entries.items()}})
    sidecar = save_bundle(stem, bundle)[1]
    cal = next(iter(entries.values()))[1]
    print(f"{name}: search probes ({', '.join(entries)}) on {cal['normalised_count']} + "
          f"{len(cal['benign_raw'])} benign shadows, {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return add_references(name, args) if num_references(preset, args) else sidecar


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--which", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "mntd"))
    ap.add_argument("--out", default=str(ROOT / "src" / "trojanscan" / "data"))
    ap.add_argument("--backend", default="auto",
                    choices=["auto", "sequential", "processes", "ray"])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="device training the shadows")
    ap.add_argument("--meta-device", default=None, help="device training the meta-classifiers")
    ap.add_argument("--meta-threads", type=int, default=1, help="torch threads per variant")
    ap.add_argument("--meta-workers", type=int, default=None,
                    help="with --meta-backend processes (default: all cores)")
    ap.add_argument("--data-members", type=int, default=None,
                    help="override: members of the qt_data ensemble")
    ap.add_argument("--stamp-members", type=int, default=None,
                    help="override: members of the stamp ensemble (trojanscan.mntd.stamps)")
    ap.add_argument("--stamp-family", default=None,
                    help="override: jumbo family of the stamp members' shadows (paper, wide)")
    ap.add_argument("--query-holdout", type=float, default=None,
                    help="override: share of the defender's data kept out of the shadows "
                         "for the qt_data queries to start from")
    ap.add_argument("--meta-backend", default="sequential", choices=["sequential", "processes"],
                    help="processes: train the variants side by side")
    ap.add_argument("--response", default=None, help="override (logits, softmax, zscore)")
    ap.add_argument("--query-range", default=None, help="override (free, unit)")
    ap.add_argument("--poisoning", default=None, help="override (append, replace)")
    ap.add_argument("--regime", default=None, help="override (fixed, random)")
    ap.add_argument("--rates", default=None, help="override jumbo injection ratios (paper, low)")
    ap.add_argument("--family", default=None,
                    help="override the jumbo trigger family (paper, wide)")
    ap.add_argument("--archs", default=None, help="override, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stem", default=None, help="output file stem (default: the preset's)")
    ap.add_argument("--num-shadows", type=int, default=None, help="override (per kind)")
    ap.add_argument("--num-val", type=int, default=None, help="override (per kind)")
    ap.add_argument("--meta-epochs", type=int, default=None, help="override")
    ap.add_argument("--shadow-epochs", type=int, default=None, help="override")
    ap.add_argument("--reference-models", type=int, default=None,
                    help="override: clean reference models calibrating the verdict (0: none)")
    ap.add_argument("--reference-only", action="store_true",
                    help="only (re)calibrate the bundle already in --out on reference models")
    ap.add_argument("--search-only", action="store_true",
                    help="only add the trigger-search probe to the bundle already in --out "
                         "(then re-calibrate it on the reference models)")
    args = ap.parse_args(argv)
    for name in args.which:
        if args.search_only:
            add_search(name, args)
        elif not args.reference_only:
            make(name, args)
        elif num_references(PRESETS[name], args):
            add_references(name, args)
        else:
            print(f"{name}: no reference models asked for; nothing to do", file=sys.stderr)


if __name__ == "__main__":
    main()
