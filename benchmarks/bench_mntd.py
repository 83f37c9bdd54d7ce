"""Benchmark MNTD (Xu et al., IEEE S&P 2021) on held-out Fashion-MNIST models.

Stages (run ``all`` or one at a time; trained targets are cached and reused):

``targets``  train the held-out set: ``--per-attack`` backdoored models for each attack in
             :data:`ATTACKS` (BadNets and Blend resemble the jumbo triggers; WaNet, SIG,
             all-to-all and source-specific lie outside the jumbo distribution) and as
             many clean ones, architectures taken in turn from :data:`ARCHS`. Each is
             trained on its own random 5,000 images of the Fashion-MNIST training set
             *outside* the defender's 2% share, 12 epochs (``--target-samples``,
             ``--target-epochs``). One file set per model under
             ``benchmarks/.cache/mntd/targets`` (resumable tasks). With
             ``--verify-asr 0.5`` the attacker checks the backdoor: a
             backdoored model is retrained by :data:`VERIFY_TRIES` (longer, then
             stronger poisoning) while its attack success rate stays below 0.5 (one that
             never gets there stays in the set), and each clean model is trained as long
             as its backdoored partner.
``score``    score every target with the meta-classifier bundle: its recipe (``auto``,
             the detector's default) and each of the paper's variants it holds; AUROC
             overall, per attack type and per architecture, the verdicts' TPR/FPR at the
             calibrated threshold, and the time to score one model.
``device``   the same scoring on the CPU and on a GPU side by side (``--devices``): median
             milliseconds per model, the CPU / GPU ratio, and how far raw scores and
             verdicts agree; devices that are not present are left out.
``shadows``  held-out shadows of ``--shadows`` (the last ``--num-val`` per kind) scored like
             ``score``: AUROC of benign against all-to-one and against source-specific
             jumbo shadows (``jumbo_family="wide"``).
``ray``      shadow-training throughput: the same small shadow tasks run by Ray with one
             worker and with two workers (and sequentially), in one run.

Writes ``benchmarks/results/mntd.json`` (merging stages) and prints tables.

    python benchmarks/bench_mntd.py targets --backend processes --workers 2
    python benchmarks/bench_mntd.py score
    python benchmarks/bench_mntd.py device --cache benchmarks/.cache/mntd_seed25 --seed 25 \
        --devices cpu,cuda --results benchmarks/results/mntd_device.json
    python benchmarks/bench_mntd.py ray --tasks 16 --ray-epochs 20 --with-sequential
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "mntd"
RESULTS = HERE / "results" / "mntd.json"

ARCHS = ("mlp", "lenet")
#: attack type -> (label in tables, inside the jumbo distribution?)
ATTACKS: dict[str, tuple[str, bool]] = {
    "badnets": ("BadNets patch", True),
    "blend": ("Blend (noise)", True),
    "wanet": ("WaNet", False),
    "sig": ("SIG (clean-label)", False),
    "all2all": ("all-to-all", False),
    "source": ("source-specific", False),
}
#: a backdoor counts as *effective* at an attack success rate of at least this (the
#: attacks do not always take: SIG on lenet often stays at the clean models' rate)
EFFECTIVE_ASR = (0.5, 0.8)
TARGET_SAMPLES = 5000
TARGET_EPOCHS = 12
TARGET_BATCH_SIZE = 128  # TrainConfig's default
DEFENDER_SHARE = 0.02  # as in scripts/make_mntd_pretrained.py (seed 0): excluded here


# -- the held-out set ---------------------------------------------------------------

def attack_spec(kind: str, rng: np.random.Generator) -> tuple[str, float]:
    """A randomised spec of attack ``kind`` and its poison rate."""
    target = int(rng.integers(10))
    if kind == "badnets":
        loc = ["bottom-right", "bottom-left", "top-right", "top-left"][int(rng.integers(4))]
        pat = ["white", "checkerboard", "random"][int(rng.integers(3))]
        return (f"badnets:target={target},size={int(rng.integers(3, 6))},location={loc},"
                f"pattern={pat},trigger_seed={int(rng.integers(1000))}", 0.1)
    if kind == "blend":
        return f"blend:target={target},alpha=0.2,trigger_seed={int(rng.integers(1000))}", 0.1
    if kind == "wanet":
        return f"wanet:target={target},trigger_seed={int(rng.integers(1000))}", 0.2
    if kind == "sig":
        return f"sig:target={target}", 0.08
    if kind == "all2all":
        loc = ["bottom-right", "top-left"][int(rng.integers(2))]
        return f"all2all:offset=1,size=4,location={loc}", 0.2
    if kind == "source":
        source = int((target + 1 + rng.integers(9)) % 10)
        return f"source:source={source},target={target},size=4", 0.05
    raise ValueError(kind)


#: ``--verify-asr``: an attacker who checks the backdoor before shipping the model retrains
#: it while the attack success rate stays below the floor. Each try is (epochs as a
#: multiple of the recipe's, stronger poisoning?); "stronger" is 1.5× the poison rate,
#: or for SIG (clean-label: the rate is bounded by the target class's share) 1.5× the
#: training signal ``delta``. A model whose last try still misses stays in the set,
#: labelled backdoored.
VERIFY_TRIES: tuple[tuple[int, bool], ...] = ((1, False), (2, False), (2, True), (3, True))
SIG_DELTA = 0.1  # the SIG attack's default training signal


def verify_tries(p: dict[str, Any], epochs: int) -> list[tuple[str, float, int]]:
    """The (spec, poison rate, epochs) an attacker verifying the backdoor tries in turn."""
    out = []
    for mult, stronger in VERIFY_TRIES:
        spec, rate = p["spec"], p["rate"]
        if stronger and p["kind"] == "sig":
            spec = f"{spec},delta={1.5 * SIG_DELTA:g}"
        elif stronger:
            rate = round(1.5 * rate, 4)
        out.append((spec, rate, mult * epochs))
    return out


def model_seed_base(seed: int) -> int:
    """First training seed of set ``seed``: training seeds also pick each model's data, so
    every set needs its own (seed 0: 1000 + i)."""
    return 1000 + 100_000 * int(seed)


def plan_targets(per_attack: int, seed: int = 0, archs: tuple[str, ...] = ARCHS,
                 prefix: str = "t") -> list[dict[str, Any]]:
    """``per_attack`` backdoored models per attack type and as many clean ones in total."""
    plan = []
    i = 0
    offset = 0 if prefix == "t" else 5000
    base = model_seed_base(seed)
    for kind in ATTACKS:
        for _ in range(per_attack):
            rng = np.random.default_rng([seed, offset + i])
            spec, rate = attack_spec(kind, rng)
            plan.append({"key": f"{prefix}{i:03d}-{kind}", "kind": kind, "spec": spec,
                         "rate": rate, "arch": archs[i % len(archs)],
                         "seed": base + offset + i})
            i += 1
    for j in range(per_attack * len(ATTACKS)):
        plan.append({"key": f"{prefix}{i:03d}-clean", "kind": "clean", "spec": "none",
                     "rate": 0.0, "arch": archs[j % len(archs)], "seed": base + offset + i})
        i += 1
    return plan


def full_plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The main held-out set plus, with ``--unseen-arch``, models of an architecture no
    shadow model has (reported separately)."""
    seed = int(args.seed)
    plan = plan_targets(args.per_attack, seed, tuple(args.archs.split(",")))
    if args.unseen_arch:
        plan += plan_targets(args.unseen_per_attack, seed, (args.unseen_arch,), "u")
    return plan


_DATA: dict[str, Any] = {}


def _data() -> dict[str, Any]:
    """Fashion-MNIST, the attacker's pool (outside the defender's share), loaded once."""
    if not _DATA:
        from trojanscan.io.data import load_dataset
        from trojanscan.mntd.pipeline import share_indices

        train = load_dataset("fashion-mnist:train")
        test = load_dataset("fashion-mnist:test")
        mask = torch.ones(len(train), dtype=torch.bool)
        mask[share_indices(len(train), DEFENDER_SHARE, seed=0)] = False
        _DATA.update(train=train, test=test, pool=torch.nonzero(mask).flatten())
    return _DATA


def target_task(task: Any, shared: tuple[str | None, int, int, int, float | None],
                ) -> dict[str, Any]:
    """Executor task: train one held-out target and save it (zoo format). With a floor
    (``--verify-asr``), a backdoored model is retrained by :func:`verify_tries` until its
    attack success rate reaches it; a clean one is trained for ``p["epochs"]`` (its
    backdoored partner's), so training length says nothing of the label."""
    from trojanscan.attacks import attack_success_rate, parse_attack
    from trojanscan.training import TrainConfig, evaluate, train_model
    from trojanscan.zoo import TrainedModel, save_model

    (p,) = task.args
    device, n_samples, epochs, batch_size, floor = shared
    d = _data()
    g = torch.Generator().manual_seed(p["seed"])
    pool = d["pool"]
    idx = pool[torch.randperm(len(pool), generator=g)[:n_samples]].sort().values
    train = d["train"].subset(idx)
    dev = torch.device(device or "cpu")
    tries = ([(p["spec"], p["rate"], int(p.get("epochs", epochs)))]
             if floor is None or p["kind"] == "clean" else verify_tries(p, epochs))
    history: dict[str, float] = {}
    for n, (spec, rate, ep) in enumerate(tries, 1):
        attack = parse_attack(spec)
        poisoned = None
        data = train
        if attack is not None:
            poisoned = attack.poison(train, rate, seed=p["seed"])
            data = poisoned.dataset
        cfg = TrainConfig(epochs=ep, batch_size=batch_size)
        t0 = time.perf_counter()
        model = train_model(p["arch"], data, config=cfg, seed=p["seed"], device=device,
                            num_classes=10, description=p["key"])
        seconds = time.perf_counter() - t0
        model = model.to(dev)
        acc = evaluate(model, d["test"], device=dev)
        asr = None if attack is None else float(attack_success_rate(model, attack, d["test"],
                                                                      device=dev))
        if floor is not None and asr is not None:
            history[f"try_{n}"] = round(asr, 4)
            if asr >= floor:
                break
    model = model.cpu()
    trained = TrainedModel(model, p["arch"], (1, 28, 28), 10, attack, poisoned, acc, asr,
                           history, seconds, p["seed"], cfg, rate)
    save_model(trained, Path(task.output).with_suffix(".pt"))
    return {"key": p["key"], "accuracy": acc, "asr": asr, "seconds": seconds,
            "epochs": cfg.epochs, "tries": len(history) or 1}


def stage_targets(args: argparse.Namespace) -> dict[str, Any]:
    from trojanscan.mntd.executor import Task, run_tasks

    folder = Path(args.cache) / "targets"
    folder.mkdir(parents=True, exist_ok=True)
    plan = full_plan(args)
    shared = (args.device, args.target_samples, args.target_epochs, args.target_batch_size,
              args.verify_asr)
    # with --verify-asr the clean models wait for their backdoored partners' epochs
    backdoored = [p for p in plan if p["kind"] != "clean"]
    phases = [backdoored, [p for p in plan if p["kind"] == "clean"]] \
        if args.verify_asr is not None else [plan]
    seconds, ran, skipped = 0.0, 0, 0
    for i, phase in enumerate(phases):
        if i == 1:
            set_partner_epochs(folder, backdoored, phase)
        # the sidecar JSON is written last by save_model: its presence means "done"
        tasks = [Task(p["key"], folder / f"{p['key']}.json", (p,)) for p in phase]
        run = run_tasks(target_task, tasks, shared=shared, backend=args.backend,
                        workers=args.workers, threads=args.threads, description="targets")
        seconds += run.seconds
        ran, skipped = ran + len(run.ran), skipped + len(run.skipped)
    print(f"targets: {ran} trained, {skipped} cached, {seconds:.0f} s "
          f"({run.backend}, {run.workers} workers)", file=sys.stderr)
    return {"targets_machine": machine(), "targets_plan": plan,
            "targets_recipe": {"samples": args.target_samples, "epochs": args.target_epochs,
                               "batch_size": args.target_batch_size,
                               "verify_asr": args.verify_asr,
                               "verify_tries": None if args.verify_asr is None
                               else [list(t) for t in VERIFY_TRIES]},
            "targets_seconds": round(seconds, 1),
            "targets_backend": run.backend, "targets_workers": run.workers}


def set_partner_epochs(folder: Path, backdoored: list[dict[str, Any]],
                       clean: list[dict[str, Any]]) -> None:
    """Give each clean model the epochs of its backdoored partner: the j-th clean model of
    a set (key prefix) with the j-th backdoored one, the same architecture by construction."""
    for prefix in dict.fromkeys(p["key"][0] for p in clean):
        pairs = zip([p for p in backdoored if p["key"][0] == prefix],
                    [p for p in clean if p["key"][0] == prefix], strict=True)
        for partner, p in pairs:
            if partner["arch"] != p["arch"]:
                raise RuntimeError(f"{p['key']} and {partner['key']} differ in architecture")
            meta = json.loads((folder / f"{partner['key']}.json").read_text())
            p["epochs"] = int(meta["train_config"]["epochs"])


# -- scoring --------------------------------------------------------------------------

def load_targets(cache: Path, plan: list[dict[str, Any]],
                 ) -> list[tuple[dict[str, Any], torch.nn.Module]]:
    from safetensors.torch import load_file

    from trojanscan import archs

    out = []
    for p in plan:
        side = cache / "targets" / f"{p['key']}.json"
        meta = json.loads(side.read_text())
        model = archs.build(meta["arch"], (1, 28, 28), 10)  # type: ignore[arg-type]
        model.load_state_dict(load_file(str(side.with_suffix(".safetensors"))))
        out.append(({**p, "accuracy": meta["clean_accuracy"], "asr": meta["asr"],
                     "epochs": meta["train_config"]["epochs"],
                     "poison_rate": meta["poison_rate"],
                     "tries": meta.get("asr_detail") or None}, model.eval()))
    return out


def _auroc(y: list[int], s: list[float]) -> float:
    from trojanscan.mntd.calibration import auroc

    return round(auroc(np.asarray(y), np.asarray(s)), 4)


def score_bundle(meta: str, targets: list[tuple[dict[str, Any], torch.nn.Module]],
                 rows: list[dict[str, Any]], unseen_arch: str | None,
                 only: str | None = None) -> dict[str, Any]:
    """AUROC (overall, per attack, per architecture), verdict rates and timing of the
    bundle's recipe (``auto``) and of each of the paper's variants it holds (``only``: of
    those named, comma-separated) on the targets; raw scores go into ``rows``."""
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.mntd.pretrained import resolve

    bundle = resolve(meta)
    assert bundle is not None
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    y = [int(p["kind"] != "clean") for p, _ in targets]
    main = [i for i, (p, _) in enumerate(targets) if p["key"].startswith("t")]
    unseen = [i for i, (p, _) in enumerate(targets) if p["key"].startswith("u")]
    clean = [i for i in main if y[i] == 0]
    settings = bundle.info.get("training", {}).get("settings", {})
    out: dict[str, Any] = {"name": bundle.name, "response": settings.get("response"),
                           "query_range": settings.get("query_range", "free"),
                           "num_shadows_per_kind": settings.get("num_shadows"),
                           "variants": {}}
    from trojanscan.mntd.meta import VARIANTS

    variants = ["auto", *(v for v in VARIANTS if v in bundle.variants)]
    if only:
        variants = [v for v in variants if v in only.split(",")]
    has_refs = all("reference_raw" in c for c in bundle.calibration.values())
    calibrations = ("shadows", "reference") if has_refs else ("shadows",)
    for variant in variants:
        det = MNTD(meta_classifier=meta, variant=variant)
        raws, verdicts, secs = [], [], []
        for (_p, model), row in zip(targets, rows):
            r = det.fit(model, shape_only)
            raws.append(r.evidence["raw_score"])
            verdicts.append(r.verdict == "backdoored")
            secs.append(r.seconds)
            row[f"{meta}:{variant}"] = round(r.evidence["raw_score"], 4)
        res: dict[str, Any] = {"auroc": _auroc([y[i] for i in main], [raws[i] for i in main]),
                               "per_attack": {}, "per_arch": {}}
        for floor in EFFECTIVE_ASR:
            strong = [i for i in main if y[i] == 0 or (targets[i][0]["asr"] or 0) >= floor]
            res[f"auroc_asr_at_least_{floor}"] = _auroc([y[i] for i in strong],
                                                        [raws[i] for i in strong])
            res[f"per_attack_asr_at_least_{floor}"] = {
                kind: _auroc([y[i] for i in strong if targets[i][0]["kind"] in (kind, "clean")],
                             [raws[i] for i in strong if targets[i][0]["kind"] in (kind, "clean")])
                for kind in ATTACKS}
        if len({targets[i][0]["epochs"] for i in main}) > 1:  # --verify-asr sets
            base = min(targets[i][0]["epochs"] for i in main)
            idx = [i for i in main if targets[i][0]["epochs"] == base]
            res["auroc_recipe_epochs_only"] = _auroc([y[i] for i in idx],
                                                     [raws[i] for i in idx])
        if unseen:
            res["unseen_arch_auroc"] = _auroc([y[i] for i in unseen], [raws[i] for i in unseen])
        for kind in ATTACKS:
            idx = [i for i in main if targets[i][0]["kind"] == kind] + clean
            res["per_attack"][kind] = _auroc([y[i] for i in idx], [raws[i] for i in idx])
        for arch in dict.fromkeys(targets[i][0]["arch"] for i in main):
            idx = [i for i in main if targets[i][0]["arch"] == arch]
            res["per_arch"][arch] = _auroc([y[i] for i in idx], [raws[i] for i in idx])
        res["tpr_at_shipped_threshold"] = round(float(np.mean(
            [verdicts[i] for i in main if y[i]])), 4)
        res["fpr_at_shipped_threshold"] = round(float(np.mean(
            [verdicts[i] for i in main if not y[i]])), 4)
        res["calibrations"] = {}
        for cal in calibrations:  # the verdict's null distribution, side by side
            cdet = MNTD(meta_classifier=meta, variant=variant, calibration=cal)
            rs = [cdet.fit(targets[i][1], shape_only) for i in main]
            flagged = [r.verdict == "backdoored" for r in rs]
            pos = [f for i, f in zip(main, flagged) if y[i]]
            neg = [(f, r.p_value) for i, f, r in zip(main, flagged, rs) if not y[i]]
            res["calibrations"][cal] = {
                "threshold": round(float(rs[0].evidence["threshold"]), 4),
                "null_models": (rs[0].evidence["calibration"]["reference_models"]
                                or rs[0].evidence["calibration"]["benign_shadows"]),
                "tpr": round(float(np.mean(pos)), 4), "fpr": round(float(np.mean(
                    [f for f, _ in neg])), 4),
                "clean_p_at_most_0.05": round(float(np.mean(
                    [p is not None and p <= 0.05 for _, p in neg])), 4),
                "auroc": _auroc([y[i] for i in main],
                                [r.evidence["raw_score"] for r in rs])}
        res["seconds_per_model"] = {"median": round(float(np.median(secs)), 4),
                                    "max": round(float(np.max(secs)), 4)}
        res["val_auroc_shadows"] = bundle.calibration.get(variant, {}).get("val_auroc")
        out["variants"][variant] = res
    return out


def stage_score(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    seeds, caches = str(args.seed).split(","), args.cache.split(",")
    if len(seeds) != len(caches):
        sys.exit("score: give one --cache per --seed (comma-separated, in the same order)")
    targets = []
    for s, cache in zip(seeds, caches):
        plan = full_plan(argparse.Namespace(**{**vars(args), "seed": int(s)}))
        targets += [({**p, "set": int(s)}, m) for p, m in load_targets(Path(cache), plan)]
    rows = [{"set": p["set"], "key": p["key"], "kind": p["kind"], "arch": p["arch"],
             "spec": p["spec"],
             "rate": p["rate"], "accuracy": round(p["accuracy"], 4),
             "epochs": p["epochs"], "poison_rate": p["poison_rate"], "tries": p["tries"],
             "asr": None if p["asr"] is None else round(p["asr"], 4)} for p, _ in targets]
    main = [p for p, _ in targets if p["key"].startswith("t")]
    out: dict[str, Any] = {
        "sets": [int(s) for s in seeds], "num_models": len(main),
        "num_backdoored": sum(p["kind"] != "clean" for p in main),
        "unseen_arch": args.unseen_arch if len(main) < len(targets) else None,
        "bundles": {}, "models": rows, "machine": machine()}
    for meta in args.meta.split(","):
        res = score_bundle(meta, targets, rows, out["unseen_arch"], args.variants)
        label = meta if not meta.endswith(".json") else Path(meta).stem
        res["meta"] = meta
        out["bundles"][label] = res
        print_score_table(out, res)
    asr = [p["asr"] for p in main if p["asr"] is not None]
    out["backdoored_asr"] = {"median": round(float(np.median(asr)), 4),
                             "min": round(float(np.min(asr)), 4),
                             "below_0.8": int(sum(a < 0.8 for a in asr)),
                             "below_0.5": int(sum(a < 0.5 for a in asr)),
                             "per_attack_median": {
                                 k: round(float(np.median([p["asr"] for p in main
                                                           if p["kind"] == k])), 3)
                                 for k in ATTACKS}}
    tried = [p for p in main if p["tries"]]
    if tried:  # a --verify-asr set: how many tries each backdoored model took
        kept = [len(p["tries"]) for p in tried]
        out["verification"] = {
            "kept_try_counts": {str(n): kept.count(n) for n in sorted(set(kept))},
            # below the --verify-asr floor the sets were built with (0.5, the lower
            # EFFECTIVE_ASR) after the last try
            "never_took": sorted(f"{p['set']}:{p['key']}" for p in tried
                                 if p["asr"] < min(EFFECTIVE_ASR)),
            "epochs_counts": {str(e): sum(p["epochs"] == e for p in main)
                              for e in sorted({p["epochs"] for p in main})}}
        print(f"verification: {out['verification']}")
    acc = [p["accuracy"] for p in main]
    out["clean_accuracy"] = {"median": round(float(np.median(acc)), 4),
                             "min": round(float(np.min(acc)), 4)}
    print(f"backdoored models' ASR: {out['backdoored_asr']}; clean accuracy: "
          f"{out['clean_accuracy']}")
    return {"score": out}


def print_score_table(out: dict[str, Any], res: dict[str, Any]) -> None:
    variants = list(res["variants"])
    v0 = res["variants"][variants[0]]
    print(f"\nMNTD on {out['num_models']} held-out Fashion-MNIST models "
          f"({out['num_backdoored']} backdoored), meta-classifier {res['name']} "
          f"(responses: {res['response']}, queries: {res['query_range']})")
    print("| attack | in jumbo? | " + " | ".join(f"AUROC {v}" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))

    def line(label: str, note: str, get: Any, fmt: str = "{:.3f}") -> None:
        cells = " | ".join(fmt.format(get(res["variants"][v])) for v in variants)
        print(f"| {label} | {note} | {cells} |")

    for kind, (label, inside) in ATTACKS.items():
        line(label, "yes" if inside else "no", lambda r, k=kind: r["per_attack"][k])
    line("**all**", "", lambda r: r["auroc"], "**{:.3f}**")
    for floor in EFFECTIVE_ASR:
        line(f"all, backdoors with ASR ≥ {floor} only", "",
             lambda r, f=floor: r[f"auroc_asr_at_least_{f}"])
    if "auroc_recipe_epochs_only" in v0:
        line("models trained the recipe's epochs only", "",
             lambda r: r["auroc_recipe_epochs_only"])
    for arch in v0["per_arch"]:
        line(f"arch {arch}", "", lambda r, a=arch: r["per_arch"][a])
    if "unseen_arch_auroc" in v0:
        line(f"unseen arch {out['unseen_arch']} (separate set)", "",
             lambda r: r["unseen_arch_auroc"])
    line("TPR at shipped threshold", "", lambda r: r["tpr_at_shipped_threshold"])
    line("FPR at shipped threshold", "", lambda r: r["fpr_at_shipped_threshold"])
    for cal in v0.get("calibrations", {}):
        line(f"TPR / FPR / clean p ≤ 0.05, {cal} calibration", "",
             lambda r, c=cal: "{tpr:.3f} / {fpr:.3f} / {p:.3f}".format(
                 p=r["calibrations"][c]["clean_p_at_most_0.05"], **r["calibrations"][c]),
             "{}")
    line("AUROC on held-out shadows", "", lambda r: float("nan") if r["val_auroc_shadows"]
         is None else r["val_auroc_shadows"])
    line("scoring time (median)", "", lambda r: r["seconds_per_model"]["median"] * 1000,
         "{:.1f} ms")


# -- Ray throughput ---------------------------------------------------------------------

def stage_shadows(args: argparse.Namespace) -> dict[str, Any]:
    """Held-out shadows, split by the jumbo trigger's label mode, per variant."""
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD
    from trojanscan.mntd.pretrained import resolve
    from trojanscan.mntd.shadows import list_shadows, load_shadow

    if not args.shadows:
        sys.exit("shadows: give --shadows FOLDER (the bundle's shadow models)")
    models = [load_shadow(p) for kind in ("benign", "jumbo")
              for p in list_shadows(args.shadows, kind)[-args.num_val:]]
    group = ["benign" if m["trigger"] is None else
             "source-specific" if m["trigger"].get("sources") else "all-to-one"
             for _, m in models]
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    out: dict[str, Any] = {"shadows": args.shadows, "meta": args.meta,
                           "counts": {g: group.count(g) for g in dict.fromkeys(group)},
                           "auroc": {}}
    from trojanscan.mntd.meta import VARIANTS

    bundle = resolve(args.meta)
    assert bundle is not None
    for variant in ["auto", *(v for v in VARIANTS if v in bundle.variants)]:
        det = MNTD(meta_classifier=args.meta, variant=variant)
        raw = [det.fit(m, shape_only).evidence["raw_score"] for m, _ in models]
        benign = [r for r, g in zip(raw, group) if g == "benign"]
        out["auroc"][variant] = {
            g: _auroc([0] * len(benign) + [1] * group.count(g),
                      benign + [r for r, gg in zip(raw, group) if gg == g])
            for g in ("all-to-one", "source-specific") if g in group}
        print(f"{variant}: {out['auroc'][variant]}")
    print(f"held-out shadows: {out['counts']}")
    return {"shadows": out}


def _warm(_: int) -> int:
    """Ray warm-up task: start a worker and import what the shadow tasks import."""
    import trojanscan.mntd.shadows  # noqa: F401

    return 0


def stage_ray(args: argparse.Namespace) -> dict[str, Any]:
    import os

    import ray

    from trojanscan.io.data import load_dataset
    from trojanscan.mntd.executor import run_tasks
    from trojanscan.mntd.pipeline import defender_share
    from trojanscan.mntd.shadows import ShadowData, plan_shadows, shadow_task, shadow_tasks

    data = load_dataset("fashion-mnist:train")
    share = defender_share(data, DEFENDER_SHARE, seed=0)
    shared = ShadowData(share, 10, None, "cpu")
    specs = plan_shadows(args.tasks // 2, ("mlp",), seed=7, epochs=args.ray_epochs)
    res: dict[str, Any] = {"tasks": len(specs), "arch": "mlp", "epochs": args.ray_epochs,
                           "train_samples": len(share), "runs": {},
                           "load_average_before": list(np.round(os.getloadavg(), 2))}
    for workers in (1, 2):
        label = f"ray-{workers}"
        tmp = Path(tempfile.mkdtemp(prefix=f"mntd-{label}-"))
        try:
            t_init = time.perf_counter()
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            warm = ray.remote(num_cpus=1)(_warm)
            ray.get([warm.remote(i) for i in range(workers)])
            t0 = time.perf_counter()
            run_tasks(shadow_task, shadow_tasks(specs, tmp), shared=shared, backend="ray",
                      description=label)
            t1 = time.perf_counter()
            res["runs"][label] = {"tasks_seconds": round(t1 - t0, 2),
                                  "startup_seconds": round(t0 - t_init, 2)}
        finally:
            ray.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{label}: {res['runs'][label]}", file=sys.stderr, flush=True)
    if args.with_sequential:
        tmp = Path(tempfile.mkdtemp(prefix="mntd-seq-"))
        try:
            t0 = time.perf_counter()
            run_tasks(shadow_task, shadow_tasks(specs, tmp), shared=shared,
                      backend="sequential", description="sequential")
            res["runs"]["sequential"] = {"tasks_seconds": round(time.perf_counter() - t0, 2),
                                         "startup_seconds": 0.0}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    r1, r2 = res["runs"]["ray-1"], res["runs"]["ray-2"]
    res["speedup_ray2_over_ray1"] = round(r1["tasks_seconds"] / r2["tasks_seconds"], 3)
    res["speedup_including_startup"] = round(
        (r1["tasks_seconds"] + r1["startup_seconds"])
        / (r2["tasks_seconds"] + r2["startup_seconds"]), 3)
    res["load_average_after"] = list(np.round(os.getloadavg(), 2))
    res["machine"] = machine()
    print("\n| run | tasks (s) | startup (s) | shadows/min |\n|---|---|---|---|")
    for label, r in res["runs"].items():
        print(f"| {label} | {r['tasks_seconds']:.1f} | {r['startup_seconds']:.1f} | "
              f"{60 * len(specs) / r['tasks_seconds']:.1f} |")
    print(f"speed-up Ray 2 workers / 1 worker: {res['speedup_ray2_over_ray1']:.2f}x "
          f"({res['speedup_including_startup']:.2f}x including Ray start-up)")
    return {"ray": res}


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def stage_device(args: argparse.Namespace) -> dict[str, Any]:
    """The same targets scored on each device of ``--devices`` (``--variants``, default
    ``auto``): time per model (after one warm-up fit per device and variant) and how far
    the devices agree. The CPU runs on ``--threads`` torch threads."""
    from trojanscan.dataset import ImageDataset
    from trojanscan.detectors.mntd import MNTD

    torch.set_num_threads(args.threads)
    seed = int(str(args.seed).split(",")[0])
    plan = plan_targets(args.per_attack, seed, tuple(args.archs.split(",")))
    folder = Path(args.cache) / "targets"
    plan = [p for p in plan if (folder / f"{p['key']}.json").exists()]
    if not plan:
        sys.exit(f"no target models under {folder}")
    targets = load_targets(Path(args.cache), plan)
    devices = [d for d in args.devices.split(",")
               if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    out: dict[str, Any] = {"models": len(targets), "machine": machine(),
                           "threads": args.threads, "devices": devices, "variants": {}}
    for variant in (args.variants or "auto").split(","):
        per: dict[str, dict[str, Any]] = {}
        for dev in devices:
            det = MNTD(meta_classifier=args.meta, variant=variant, device=dev)
            det.fit(targets[0][1], shape_only)  # warm-up (CUDA context, kernels)
            raws, secs, flags = [], [], []
            for _, model in targets:
                r = det.fit(model, shape_only)
                raws.append(float(r.evidence["raw_score"]))
                secs.append(r.seconds)
                flags.append(r.verdict == "backdoored")
            per[dev] = {"raw": raws, "ms_median": round(1000 * float(np.median(secs)), 2),
                        "ms_max": round(1000 * float(np.max(secs)), 2), "flags": flags}
        row: dict[str, Any] = {d: {"ms_median": v["ms_median"], "ms_max": v["ms_max"]}
                               for d, v in per.items()}
        for dev in devices[1:]:
            a, b = per[devices[0]], per[dev]
            row[f"{devices[0]}_over_{dev}"] = round(a["ms_median"] / b["ms_median"], 2)
            row[f"max_abs_raw_diff_{dev}"] = round(float(np.max(np.abs(
                np.subtract(a["raw"], b["raw"])))), 5)
            row[f"spearman_{dev}"] = round(spearman(a["raw"], b["raw"]), 5)
            row[f"verdict_agreement_{dev}"] = round(float(np.mean(
                np.equal(a["flags"], b["flags"]))), 4)
        out["variants"][variant] = row
    print(f"\nMNTD scoring, {len(targets)} models of set {seed}, CPU on "
          f"{args.threads} thread(s); {out['machine']['cuda'] or 'no GPU'}")
    cols = [f"{d} ms" for d in devices] + [f"{devices[0]}/{d}" for d in devices[1:]] + [
        f"{d}: max |Δraw|, rank corr, same verdict" for d in devices[1:]]
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for variant, row in out["variants"].items():
        cells = [f"{row[d]['ms_median']:.1f}" for d in devices]
        cells += [f"{row[f'{devices[0]}_over_{d}']:.1f}×" for d in devices[1:]]
        cells += [f"{row[f'max_abs_raw_diff_{d}']:.4f}, {row[f'spearman_{d}']:.4f}, "
                  f"{row[f'verdict_agreement_{d}']:.3f}" for d in devices[1:]]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return {"device": out}


def machine() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["targets", "score", "device", "shadows", "ray", "all"])
    ap.add_argument("--per-attack", type=int, default=4,
                    help="backdoored models per attack type (as many clean ones in total)")
    ap.add_argument("--seed", default="0",
                    help="target set; score: several, comma-separated, with one --cache each")
    ap.add_argument("--archs", default=",".join(ARCHS), help="target architectures")
    ap.add_argument("--unseen-arch", default=None,
                    help="also models of this architecture (not among the shadows')")
    ap.add_argument("--unseen-per-attack", type=int, default=1)
    ap.add_argument("--variants", default=None,
                    help="score, device: only these variants (auto: the bundle's recipe; "
                         "qt, no_qt, one_class; comma-separated)")
    ap.add_argument("--devices", default="cpu,cuda", help="device stage: devices compared")
    ap.add_argument("--meta", default="fashion-mnist",
                    help="meta-classifier name(s) or path(s), comma-separated")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per target task")
    ap.add_argument("--device", default="cpu", help="device training the targets")
    ap.add_argument("--target-samples", type=int, default=TARGET_SAMPLES)
    ap.add_argument("--target-epochs", type=int, default=TARGET_EPOCHS)
    ap.add_argument("--verify-asr", type=float, default=None,
                    help="targets: retrain a backdoored model (VERIFY_TRIES) until its attack "
                         "success rate reaches this; clean models take their partners' "
                         "epochs")
    ap.add_argument("--target-batch-size", type=int, default=TARGET_BATCH_SIZE,
                    help="targets: batch size (64 with --target-samples 1200 --target-epochs "
                         "20 trains them the way the shadows are)")
    ap.add_argument("--cache", default=str(CACHE), help="where targets are cached")
    ap.add_argument("--shadows", default=None, help="shadows stage: the shadow folder")
    ap.add_argument("--num-val", type=int, default=32, help="shadows stage: held out per kind")
    ap.add_argument("--tasks", type=int, default=8, help="ray stage: shadow tasks")
    ap.add_argument("--ray-epochs", type=int, default=10, help="ray stage: epochs per shadow")
    ap.add_argument("--with-sequential", action="store_true")
    ap.add_argument("--results", default=None,
                    help=f"JSON the stage's figures are merged into (default: {RESULTS.name} "
                         "in benchmarks/results/; for the targets stage alone the cache's "
                         "targets_run.json, so training a new set does not touch a recorded "
                         "result)")
    args = ap.parse_args(argv)
    if args.results is not None:
        results_path = Path(args.results)
    elif args.stage == "targets":
        results_path = Path(args.cache) / "targets_run.json"
    else:
        results_path = RESULTS
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    stages = ["targets", "score", "ray"] if args.stage == "all" else [args.stage]
    for stage in stages:
        results.update({"targets": stage_targets, "score": stage_score,
                        "device": stage_device, "shadows": stage_shadows,
                        "ray": stage_ray}[stage](args))
    from trojanscan.utils import atomic_write_text

    atomic_write_text(results_path, json.dumps(results, indent=1) + "\n")
    print(f"wrote {results_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
