"""Study MNTD meta-classifier settings on one shadow set, scored on held-out target sets.

MNTD — Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021.
``bench_mntd.py`` scores finished bundles; this script answers "which meta-classifier
settings, on which shadows?" without writing bundles: for every setting and seed in the
grid it trains one meta-classifier on the shadow set's training shadows and records its
raw outputs on the held-out shadows and on every target model of the given caches
(``bench_mntd.py targets``). ``analyse`` then reads those raw outputs and reports AUROC of
single meta-classifiers, of seed ensembles and of variant combinations, each member
standardised against the held-out *benign shadows* (nothing is fitted on the targets).

    python benchmarks/mntd_research/bench_mntd_study.py fit --bundle-json B.json \\
        --shadows DIR --tag paper \\
        --grid qt:logits,one_class:logits --seeds 0,1,2,3,4 --workers 2
    python benchmarks/mntd_research/bench_mntd_study.py analyse --sets 0    # development set
    python benchmarks/mntd_research/bench_mntd_study.py analyse --sets 1,2        # the fresh sets

Results: one JSON file per trained meta-classifier in ``benchmarks/results/mntd_study/``
(resumable: a rerun trains only what is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parents[1]
RESULTS = HERE / "results" / "mntd_study"


def cache_of(s: int) -> Path:
    """Target set ``s`` (bench_mntd.py --seed) -> its cache: ``mntd`` for set 0, else
    ``mntd_seed{s}``, or the one ``mntd_seed{s}_<label>`` (e.g. ``_regime``) there is."""
    if s == 0:
        return HERE / ".cache" / "mntd"
    plain = HERE / ".cache" / f"mntd_seed{s}"
    labelled = sorted((HERE / ".cache").glob(f"mntd_seed{s}_*"))
    return labelled[0] if not plain.is_dir() and len(labelled) == 1 else plain


_STATE: dict[str, Any] = {}
#: grid settings beyond variant and response (``variant:response:key=value``)
EXTRAS = ("queries", "hidden", "query_range", "query_init", "stratify", "eps", "pool",
          "stamps", "anchors", "stamp_lr")


def _targets(sets: tuple[int, ...]) -> list[tuple[str, int, dict[str, Any], torch.nn.Module]]:
    """(key, set, sidecar, model) of every finished target in the sets' caches."""
    from safetensors.torch import load_file

    from trojanscan import archs

    out = []
    for s in sets:
        for side in sorted((cache_of(s) / "targets").glob("*.json")):
            meta = json.loads(side.read_text())
            model = archs.build(meta["arch"], (1, 28, 28), 10)
            model.load_state_dict(load_file(str(side.with_suffix(".safetensors"))))
            for p in model.parameters():
                p.requires_grad_(False)
            out.append((side.stem, s, meta, model.eval()))
    return out


def _references(folder: str | None) -> list[tuple[str, torch.nn.Module]]:
    """(key, model) of every clean reference model (trojanscan.mntd.reference) in
    ``folder``; none without one."""
    from trojanscan.mntd.shadows import load_shadow

    if not folder:
        return []
    out = []
    for path in sorted(Path(folder).glob("reference-*.safetensors")):
        model, _ = load_shadow(path)
        for p in model.parameters():
            p.requires_grad_(False)
        out.append((path.stem, model.eval()))
    if not out:
        raise SystemExit(f"--references {folder}: no reference-*.safetensors there")
    return out


def _fit_task(task: Any, shared: tuple[str, tuple[int, ...]]) -> dict[str, Any]:
    from trojanscan.mntd.meta import MetaConfig, fit_meta, raw_scores
    from trojanscan.mntd.pipeline import TrainSettings, load_shadow_split

    bundle_json, folder, sets, ref_folder = shared
    job = task.args[0]
    if "shadows" not in _STATE:
        doc = json.loads(Path(bundle_json).read_text())
        raw = dict(doc["training"]["settings"])
        raw["archs"], raw["variants"] = tuple(raw["archs"]), tuple(raw["variants"])
        settings = TrainSettings(**raw)
        _STATE["shadows"] = load_shadow_split(folder, settings, int(doc["training"]["seed"]))
        _STATE["data"] = doc["training"]["data"]
        _STATE["split"] = (settings.query_holdout, int(doc["training"]["seed"]))
        _STATE["targets"] = _targets(sets)
        _STATE["references"] = _references(ref_folder)
    train, val = _STATE["shadows"]
    data = _STATE["data"]
    if job["variant"] == "stamp":
        return _fit_stamp(task, job, train, val)
    cfg = MetaConfig(variant=job["variant"], num_queries=job.get("queries", 10),
                     hidden=job.get("hidden", 20), epochs=job.get("epochs", 40),
                     response=job["response"], query_range=job.get("query_range", "free"),
                     query_init=job.get("query_init", "noise"),
                     query_eps=None if "eps" not in job else float(job["eps"]))
    images = labels = None
    if cfg.query_init == "data":
        # pool "share": the defender's 2%, all of it (with query_holdout 0: the shadows'
        # training images, as shipped); "holdout": the bundle's query_holdout pool, kept
        # out of shadow training; "members": the rest (what the shadows trained on);
        # "test": 1,200 Fashion-MNIST test images that no shadow and no target trained on.
        # (Do queries started from the shadows' own training images carry a membership
        # cue that real models do not share?)
        pool = str(job.get("pool", "share"))
        if pool not in _STATE:
            from trojanscan.io.data import load_dataset
            from trojanscan.mntd.pipeline import defender_share, query_pool_split

            if pool in ("share", "holdout", "members"):
                share = defender_share(load_dataset("fashion-mnist:train"), 0.02, seed=0)
                holdout, seed = _STATE["split"]
                if pool != "share" and not holdout:
                    raise SystemExit(f"pool={pool}: the bundle has no query_holdout")
                members, held = query_pool_split(share, holdout, seed=seed)
                _STATE[pool] = {"share": share, "holdout": held, "members": members}[pool]
            elif pool == "test":
                _STATE[pool] = defender_share(load_dataset("fashion-mnist:test"), 0.12,
                                              seed=0)
            else:
                raise SystemExit(f"pool: share, holdout, members or test, not {pool!r}")
        images = _STATE[pool].x
        labels = _STATE[pool].labels() if job.get("stratify") else None
    t0 = time.perf_counter()
    fit = fit_meta(train.models, train.labels, config=cfg, input_shape=(1, 28, 28),
                   num_classes=10, val_models=val.models, val_labels=val.labels,
                   query_mean=data["pixel_mean"], query_std=data["pixel_std"],
                   seed=job["seed"], device="cpu", description=task.key,
                   query_images=images, query_labels=labels)
    _record(task, job, fit.best_epoch, time.perf_counter() - t0, val,
            partial(raw_scores, fit.meta))
    return None


def _outputs(score: Any, targets: list[Any], refs: list[Any]) -> dict[str, Any]:
    """Raw outputs (``score``: models -> raw outputs) on the targets, keyed ``set:key``,
    and, when there are reference models, on those."""
    out: dict[str, Any] = {"targets": {f"{s}:{k}": round(float(r), 5) for (k, s, _, _), r
                                       in zip(targets, score([m for *_, m in targets]))}}
    if refs:
        out["references"] = {k: round(float(r), 5) for (k, _), r in
                             zip(refs, score([m for _, m in refs]))}
    return out


def _record(task: Any, job: dict[str, Any], best_epoch: int, seconds: float, val: Any,
            score: Any, meta: torch.nn.Module | None = None) -> None:
    """Write one study record: raw outputs on the held-out shadows, the targets and the
    reference models (``score``: models -> raw outputs); with ``meta``, its weights too
    (beside the record), so that ``rescore`` can add target sets trained later."""
    from safetensors.torch import save_file

    from trojanscan.utils import atomic_path, atomic_write_text

    yv = np.asarray(val.labels)
    vr = score(val.models)
    rec = {**job, "best_epoch": best_epoch, "fit_seconds": round(seconds, 1),
           "val_benign": [round(float(v), 5) for v in vr[yv == 0]],
           "val_trojan": [round(float(v), 5) for v in vr[yv == 1]],
           **_outputs(score, _STATE["targets"], _STATE["references"])}
    if meta is not None:
        weights = Path(task.output).with_suffix(".safetensors")
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in meta.state_dict().items()}, str(tmp))
        rec["weights"] = weights.name
    atomic_write_text(task.output, json.dumps(rec) + "\n")


def _fit_stamp(task: Any, job: dict[str, Any], train: Any, val: Any) -> None:
    """The stamp-probing meta-classifier (trojanscan.mntd.stamps) on the defender's share."""
    from trojanscan.io.data import load_dataset
    from trojanscan.mntd.meta import raw_scores
    from trojanscan.mntd.pipeline import defender_share
    from trojanscan.mntd.stamps import StampConfig, fit_stamp_meta

    share = defender_share(load_dataset("fashion-mnist:train"), 0.02, seed=0)
    cfg = StampConfig(num_stamps=int(job.get("stamps", 8)),
                      anchors_per_class=int(job.get("anchors", 2)), epochs=int(job["epochs"]),
                      stamp_lr=float(job.get("stamp_lr", 0.05)))
    t0 = time.perf_counter()
    fit = fit_stamp_meta(train.models, train.labels, images=share.x,
                         image_labels=share.labels(), num_classes=10, config=cfg,
                         val_models=val.models, val_labels=val.labels, seed=job["seed"],
                         device="cpu", description=task.key)
    _record(task, job, fit.best_epoch, time.perf_counter() - t0, val,
            partial(raw_scores, fit.meta), fit.meta)


def stage_rescore(args: argparse.Namespace) -> None:
    """Add the raw outputs on target sets ``--sets`` (and the reference models, with
    ``--references``) to every stamp record in ``--results`` that kept its weights: a
    test set can be trained, and looked at, after the meta-classifiers are fitted."""
    from safetensors.torch import load_file

    from trojanscan.mntd.meta import raw_scores
    from trojanscan.mntd.stamps import StampMeta
    from trojanscan.utils import atomic_write_text

    sets = tuple(int(s) for s in args.sets.split(",") if s)
    targets = _targets(sets)
    refs = _references(args.references)
    for path in sorted(Path(args.results).glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("variant") != "stamp" or "weights" not in rec:
            continue
        meta = StampMeta.from_state(load_file(str(path.parent / rec["weights"])), 10)
        new = _outputs(partial(raw_scores, meta), targets, refs)
        rec["targets"].update(new.pop("targets"))
        rec.update(new)
        atomic_write_text(path, json.dumps(rec) + "\n")
        print(f"rescored {path.name} on sets {sets}", file=sys.stderr)


def stage_fit(args: argparse.Namespace) -> None:
    from trojanscan.mntd.executor import Task, run_tasks

    jobs = []
    for item in args.grid.split(","):
        variant, response, *rest = item.split(":")
        extra = dict(kv.split("=") for kv in rest)
        for seed in (int(s) for s in args.seeds.split(",")):
            job: dict[str, Any] = {"tag": args.tag, "variant": variant, "response": response,
                                   "seed": seed, "epochs": args.epochs}
            job.update({k: (int(v) if v.isdigit() else v) for k, v in extra.items()})
            jobs.append(job)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [Task(_job_key(j), folder / f"{_job_file(j)}.json", (j,)) for j in jobs]
    todo = [t for t in tasks if not t.done()]
    print(f"{len(todo)} meta-classifiers to train ({len(tasks) - len(todo)} done)",
          file=sys.stderr)
    sets = tuple(int(s) for s in args.sets.split(",") if s)
    run_tasks(_fit_task, tasks, shared=(args.bundle_json, args.shadows, sets, args.references),
              backend=args.backend, workers=args.workers, description="meta")


def stage_record_bundle(args: argparse.Namespace) -> None:
    """Record a finished bundle's entries (e.g. the shipped one's paper variants and
    ``qt_data`` members) as study records, so ``analyse`` sets them beside the grid's:
    held-out shadow outputs from the bundle's calibration, targets and references scored
    now. An ensemble's members become one group (variant = the ensemble, seed = index)."""
    from trojanscan.mntd.meta import raw_scores
    from trojanscan.mntd.pretrained import resolve
    from trojanscan.utils import atomic_write_text

    bundle = resolve(args.meta)
    assert bundle is not None
    sets = tuple(int(s) for s in args.sets.split(","))
    targets = _targets(sets)
    refs = _references(args.references)
    member_of = {m: (e, i) for e, ms in bundle.ensembles.items() for i, m in enumerate(ms)}
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    for name, meta in bundle.variants.items():
        cal = bundle.calibration[name]
        variant, seed = member_of.get(name, (name, 0))
        response = getattr(meta, "response", "probs")  # stamps read probability changes
        job = {"tag": args.tag, "variant": variant, "response": response, "seed": seed,
               "epochs": 0, "entry": name}
        rec = {**job, "best_epoch": cal.get("best_epoch"), "fit_seconds": None,
               "val_benign": cal["benign_raw"], "val_trojan": cal["trojaned_raw"],
               **_outputs(partial(raw_scores, meta), targets, refs)}
        atomic_write_text(folder / f"{_job_file(job)}.json", json.dumps(rec) + "\n")
        print(f"recorded {name} as {variant} seed {seed}", file=sys.stderr)


def _job_file(j: dict[str, Any]) -> str:
    import hashlib

    return f"{j['tag']}-{j['variant']}-{hashlib.sha256(_job_key(j).encode()).hexdigest()[:12]}"


def _job_key(j: dict[str, Any]) -> str:
    extra = {k: v for k, v in j.items() if k in EXTRAS}
    return f"{j['tag']}|{j['variant']}|{j['response']}|{j['epochs']}|{j['seed']}|{extra}"


# -- analysis -------------------------------------------------------------------------

def _z(rec: dict[str, Any], keys: list[str]) -> np.ndarray:
    b = np.asarray(rec["val_benign"], dtype=np.float64)
    sd = b.std() if b.std() > 0 else 1.0
    return (np.array([rec["targets"][k] for k in keys]) - b.mean()) / sd


def _z_refs(rec: dict[str, Any]) -> np.ndarray | None:
    if "references" not in rec:
        return None
    b = np.asarray(rec["val_benign"], dtype=np.float64)
    sd = b.std() if b.std() > 0 else 1.0
    return (np.array(list(rec["references"].values())) - b.mean()) / sd


def _z_val(rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(rec["val_benign"], dtype=np.float64)
    t = np.asarray(rec["val_trojan"], dtype=np.float64)
    sd = b.std() if b.std() > 0 else 1.0
    return (b - b.mean()) / sd, (t - b.mean()) / sd


def target_info(sets: tuple[int, ...], recs: list[dict[str, Any]] | None = None,
                ) -> dict[str, dict[str, Any]]:
    """Kind, arch, ASR and accuracy of every target; from the records' keys alone (kind
    only, ASR unknown) for a set whose cache is gone."""
    info: dict[str, dict[str, Any]] = {}
    for s in sets:
        if not (cache_of(s) / "targets").is_dir():
            for r in recs or []:
                for key in r["targets"]:
                    if key.startswith(f"{s}:"):
                        info[key] = {"kind": key.split("-", 1)[1], "arch": None,
                                     "asr": None, "accuracy": None}
            continue
        for side in sorted((cache_of(s) / "targets").glob("*.json")):
            meta = json.loads(side.read_text())
            kind = side.stem.split("-", 1)[1]
            info[f"{s}:{side.stem}"] = {"kind": kind, "arch": meta["arch"],
                                        "asr": meta.get("asr"),
                                        "accuracy": meta["clean_accuracy"]}
    return info


def stage_analyse(args: argparse.Namespace) -> None:
    from trojanscan.mntd.calibration import auroc, threshold_at_fpr

    sets = tuple(int(s) for s in args.sets.split(","))
    recs = [json.loads(p.read_text()) for p in sorted(Path(args.results).glob("*.json"))]
    recs = [r for r in recs if "targets" in r]  # study records only (not an --out file)
    info = target_info(sets, recs)
    partial_recs = [r for r in recs if not all(k in r["targets"] for k in info)]
    if partial_recs:  # fitted before some of these sets existed and not rescored
        print(f"left out {len(partial_recs)} record(s) not scored on every model of sets "
              f"{sets}: " + ", ".join(sorted({f"{r['tag']}/{r['variant']}"
                                             for r in partial_recs})), file=sys.stderr)
        recs = [r for r in recs if all(k in r["targets"] for k in info)]
    if args.min_asr > 0 and any(v["arch"] is None for v in info.values()):
        sys.exit("--min-asr needs the target caches (bench_mntd.py targets) for the ASRs")
    keys = sorted(k for k in info if all(k in r["targets"] for r in recs)
                  and (info[k]["kind"] == "clean" or (info[k]["asr"] or 0) >= args.min_asr))
    y = np.array([int(info[k]["kind"] != "clean") for k in keys])
    kinds = np.array([info[k]["kind"] for k in keys])
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in recs:
        extra = ",".join(f"{k}={r[k]}" for k in EXTRAS if k in r)
        groups.setdefault((r["tag"], r["variant"], r["response"], extra), []).append(r)
    attack_kinds = [k for k in dict.fromkeys(kinds) if k != "clean"]

    archs = np.array([str(info[k]["arch"]) for k in keys])

    def row(label: str, score: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
            refs: np.ndarray | None = None) -> dict[str, Any]:
        per = {k: auroc(y[(kinds == k) | (y == 0)], score[(kinds == k) | (y == 0)])
               for k in attack_kinds}
        clean_z = score[y == 0]
        out = {"label": label, "auroc": auroc(y, score), "per_attack": per,
               "fpr_at_z2": float(np.mean(clean_z > 2.0))}
        if val is not None:
            out["val_auroc"] = auroc(np.r_[np.zeros(len(val[0])), np.ones(len(val[1]))],
                                     np.r_[val[0], val[1]])
        ref_text = ""
        if refs is not None:
            thr = threshold_at_fpr(refs, 0.05)
            out["ref_tpr"] = float(np.mean(score[y == 1] > thr))
            out["ref_fpr"] = float(np.mean(score[y == 0] > thr))
            ref_text = f"  ref TPR/FPR {out['ref_tpr']:.2f}/{out['ref_fpr']:.2f}"
        out["per_arch"] = {a: auroc(y[archs == a], score[archs == a])
                           for a in sorted(set(archs))}
        print(f"{label:58s} {out['auroc']:.3f}  " + " ".join(
            f"{per[k]:.2f}" for k in attack_kinds) + f"  fpr@z2 {out['fpr_at_z2']:.2f}"
            + (f"  val {out['val_auroc']:.3f}" if val is not None else "") + ref_text
            + "  arch " + "/".join(f"{v:.2f}" for v in out["per_arch"].values()))
        return out

    print(f"sets {sets}: {len(keys)} models, {int(y.sum())} backdoored (ASR >= "
          f"{args.min_asr}); columns: AUROC, "
          + " ".join(attack_kinds))
    ens: dict[tuple[str, ...], np.ndarray] = {}
    ens_val: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
    ens_refs: dict[tuple[str, ...], np.ndarray | None] = {}
    for g, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        if args.singles:
            for r in rs:
                row(f"{'/'.join(filter(None, g))} seed {r['seed']}", _z(r, keys), _z_val(r))
        zs = np.mean([_z(r, keys) for r in rs], axis=0)
        vb = np.mean([_z_val(r)[0] for r in rs], axis=0)
        vt = np.mean([_z_val(r)[1] for r in rs], axis=0)
        singles = [auroc(y, _z(r, keys)) for r in rs]
        print(f"{'/'.join(filter(None, g)):40s} singles {np.min(singles):.3f}–"
              f"{np.max(singles):.3f} (mean {np.mean(singles):.3f}, n={len(rs)})")
        ens[g] = zs
        ens_val[g] = (vb, vt)
        zr = [_z_refs(r) for r in rs]
        ens_refs[g] = None if any(z is None for z in zr) else np.mean(zr, axis=0)
        row(f"  ensemble of {len(rs)}", zs, (vb, vt), ens_refs[g])
    label_of = {"/".join(filter(None, g)): g for g in ens}
    if args.mixes:
        rows = {}
        for item in args.mixes.split(";"):
            name, _, spec = item.partition("=")
            missing = [p for p in spec.split("+") if p not in label_of]
            if missing:
                sys.exit(f"--mixes {name}: no group {missing} (have: {sorted(label_of)})")
            parts = [label_of[p] for p in spec.split("+")]
            sv = (sum(ens_val[g][0] for g in parts), sum(ens_val[g][1] for g in parts))
            refs_of = [ens_refs[g] for g in parts]
            refs = None if any(r is None for r in refs_of) else sum(refs_of)
            rows[name] = {"parts": spec.split("+"),
                          **row(name, sum(ens[g] for g in parts), sv, refs)}
        if args.out:
            from trojanscan.utils import atomic_write_text

            out = Path(args.out)
            doc = json.loads(out.read_text()) if out.exists() else {}
            doc[f"sets={args.sets},min_asr={args.min_asr}"] = {
                "models": len(keys), "backdoored": int(y.sum()), "mixes": rows}
            atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
        return
    names = sorted(ens)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a[0] == b[0]:
                sb = (ens_val[a][0] + ens_val[b][0], ens_val[a][1] + ens_val[b][1])
                row(f"{'/'.join(filter(None, a))} + {'/'.join(filter(None, b))}",
                    ens[a] + ens[b], sb)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["fit", "analyse", "record-bundle", "rescore"])
    ap.add_argument("--bundle-json", help="fit: a bundle made on the shadow set (its settings)")
    ap.add_argument("--shadows", help="fit: the shadow folder the bundle was trained on")
    ap.add_argument("--tag", default="paper")
    ap.add_argument("--meta", default="fashion-mnist",
                    help="record-bundle: a built-in bundle name or a bundle's path")
    ap.add_argument("--grid", default="qt:logits,one_class:logits",
                    help="variant:response[:key=value...], comma-separated")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--sets", default="0,1,2", help="target sets (bench_mntd.py --seed)")
    ap.add_argument("--references", default=None,
                    help="fit: a folder of clean reference models (trojanscan.mntd.reference) "
                         "to record raw outputs on; analyse then reports TPR / FPR at the "
                         "5%%-FPR threshold set on them")
    ap.add_argument("--backend", default="processes")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--min-asr", type=float, default=0.0,
                    help="analyse: leave out backdoored models whose attack success rate is "
                         "below this (attacks that did not take)")
    ap.add_argument("--singles", action="store_true", help="analyse: every single model too")
    ap.add_argument("--mixes", default=None,
                    help="analyse: only these sums, 'NAME=GROUP+GROUP;NAME=...' (GROUP as "
                         "analyse prints it, e.g. wide/stamp/probs/stamps=8,anchors=2): each "
                         "group's members averaged, groups summed, as the detector's mixes")
    ap.add_argument("--out", default=None, help="analyse --mixes: add the rows to this JSON")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    {"fit": stage_fit, "analyse": stage_analyse,
     "record-bundle": stage_record_bundle, "rescore": stage_rescore}[args.stage](args)


if __name__ == "__main__":
    main()
