"""Score trojanscan's detectors on a wild zoo, through the real command line.

``python -m benchmarks.wild.run --zoo CACHE --name NAME [--split heldout] [--levels
scan,scan-data,filter] [--pairs N] [--data-sets P,C] [--workers 2]``

For each selected pair it runs, with default settings and one thread per process
(``OMP_NUM_THREADS=1``), as a user would:

- ``python -m trojanscan scan-zoo MANIFEST --data clean.npz --out DIR --workers W --seed 0
  --quiet`` once per variant over the backdoored models and their clean partners (each
  model scanned exactly as ``scan`` would; the manifest carries the ground truth, so
  ``DIR/zoo.html`` has the ROC curve; a rerun keeps finished models' reports);
- ``python -m trojanscan scan-data train.npz --model MODEL ...`` on the backdoored model's
  regenerated poisoned training set and (for the first C pairs) on the clean partner's;
- ``python -m trojanscan filter MODEL inputs.npz --calibrate clean.npz ...`` on the
  backdoored model, with triggered and clean test inputs disjoint from ``clean.npz``.

A named alternative setting adds runs: ``--variant LEVEL:NAME:ARGS`` (e.g.
``filter:strip_max:--param blend=max``). Work folders live under ``--work`` (default
``benchmarks/.cache/wild-runs/NAME``); a job whose ``report.json`` exists is not rerun.
The ``scan`` level runs first (scan-zoo spreads it over ``--workers`` Ray workers), then
the other levels on a pool of ``--workers`` threads.
Writes ``benchmarks/results/wild/NAME.json`` and ``NAME.md`` (per family and overall)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics, zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "wild"
LEVELS = ("scan", "scan-data", "filter")
AXES = ("arch", "recipe", "trigger")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def run_cli(args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run ``python -m trojanscan ARGS --out OUT --seed 0 --quiet``; returns its facts."""
    cmd = [sys.executable, "-m", "trojanscan", *args, "--out", str(out), "--seed", "0",
           "--quiet"]
    t0 = time.perf_counter()
    r0 = os.times()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
        rc, err = proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        rc, err = 124, f"timed out after {timeout} s"
    r1 = os.times()
    return {"cmd": " ".join(shlex.quote(c) for c in cmd), "rc": rc, "stderr": err,
            "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round((r1.children_user - r0.children_user)
                           + (r1.children_system - r0.children_system), 2)}


# ----------------------------------------------------------------------------- jobs

class Job:
    """One detector run on one model: prepares its inputs, runs the CLI, scores the report."""

    def __init__(self, level: str, variant: str, extra: list[str], side: dict[str, Any],
                 zoo_dir: Path, work: Path, clean_npz: Path, timeout: float) -> None:
        self.level, self.variant, self.extra, self.side = level, variant, extra, side
        self.model = zoo_dir / "models" / side["model_file"]
        self.dir = work / f"{level}.{variant}" / side["name"]
        self.clean_npz, self.timeout = clean_npz, timeout
        #: what ``scan-zoo`` said of this model (scan level only; see :func:`run_scan_zoo`)
        self.zoo_facts: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return f"{self.level}.{self.variant}/{self.side['name']}"

    def run(self) -> dict[str, Any]:
        report = self.dir / "report.json"
        facts: dict[str, Any] = {"reused": report.exists()}
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        if self.level == "scan":
            facts.update(self.zoo_facts)
        elif self.level == "scan-data":
            train = self.dir.parent / f".{self.side['name']}.train.npz"
            if not report.exists():
                zoo.write_training_npz(self.side, train)
                try:
                    facts.update(run_cli(["scan-data", str(train), "--model", str(self.model),
                                          *self.extra], self.dir, self.timeout))
                finally:
                    train.unlink(missing_ok=True)  # regenerable from the sidecar
        else:
            inputs = self.dir.parent / f".{self.side['name']}.inputs.npz"
            truth = self.dir.parent / f"{self.side['name']}.triggered.npy"
            if not report.exists():
                is_trig = zoo.write_filter_inputs(self.side, inputs)
                np.save(truth, is_trig)
                try:
                    facts.update(run_cli(["filter", str(self.model), str(inputs),
                                          "--calibrate", str(self.clean_npz), *self.extra],
                                         self.dir, self.timeout))
                finally:
                    inputs.unlink(missing_ok=True)
            facts["truth"] = str(truth)
        return self.score(facts)

    def score(self, facts: dict[str, Any]) -> dict[str, Any]:
        s = self.side
        row: dict[str, Any] = {
            "level": self.level, "variant": self.variant, "model": s["name"], "pair": s["pair"],
            "split": s["split"], "backdoored": s["backdoored"],
            "arch": s["families"]["arch"], "recipe": s["families"]["recipe"],
            "trigger": s["families"]["pair_trigger"], "targets": s["targets"],
            "rc": facts.get("rc"), "cli_wall_s": facts.get("wall_s"),
            "cli_cpu_s": facts.get("cpu_s"), "cmd": facts.get("cmd"),
        }
        path = self.dir / "report.json"
        if not path.exists():
            row["error"] = facts.get("stderr", "no report")
            return row
        rep = json.loads(path.read_text())
        row["seconds"] = rep.get("seconds")
        row["verdict"] = rep.get("verdict")
        if self.level == "scan":
            sus = [int(t) for t in rep.get("suspected_targets", [])]
            row.update(score=rep.get("score"), suspected_targets=sus,
                       flagged=rep.get("verdict") == "backdoored",
                       target_named=bool(set(sus) & set(s["targets"])),
                       target_exact=bool(sus) and set(sus) == set(s["targets"]),
                       detectors={n: {k: d.get(k) for k in ("verdict", "score",
                                                            "suspected_targets")}
                                  for n, d in rep.get("detectors", {}).items()})
        elif self.level == "scan-data":
            flagged = rep.get("flagged_indices", [])
            row.update(flagged=rep.get("verdict") == "poisoned", num_flagged=len(flagged),
                       num_samples=rep.get("num_samples"))
            if s["backdoored"]:
                a = s["attack"]
                stamped = sorted(set(a["poison_indices"]) | set(a["cover_indices"]))
                rec, prec = metrics.recall_precision(flagged, stamped)
                row.update(recall=rec, precision=prec, n_poison=len(stamped))
        else:
            truth = np.load(facts["truth"])
            far, frr = metrics.filter_rates(rep["flagged"], truth)
            row.update(far=far, frr=frr, frr_measured_calibration=rep.get("frr_measured"),
                       n_triggered=int(truth.sum()), n_clean=int((~truth).sum()))
        return row


def run_scan_zoo(jobs: list[Job], work: Path, clean_npz: Path, workers: int,
                 timeout: float) -> None:
    """The scan level, one ``trojanscan scan-zoo`` run per variant over its models.

    Writes ``WORK/scan.VARIANT.manifest.csv`` (absolute model path, label), runs scan-zoo
    into ``WORK/scan.VARIANT`` and points each job at its model's report there."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        if j.level == "scan":
            groups[j.variant].append(j)
    for variant, js in groups.items():
        out = work / f"scan.{variant}"
        manifest = work / f"scan.{variant}.manifest.csv"
        work.mkdir(parents=True, exist_ok=True)
        manifest.write_text("path,label\n" + "".join(
            f"{j.model.resolve()},{int(j.side['backdoored'])}\n" for j in js))
        facts = run_cli(["scan-zoo", str(manifest), "--data", str(clean_npz), "--workers",
                         str(workers), "--model-timeout", str(timeout), *js[0].extra],
                        out, timeout * len(js))
        zoo_json = out / "zoo.json"
        rows = json.loads(zoo_json.read_text())["models"] if zoo_json.exists() else []
        by_path = {str(Path(r["path"]).resolve()): r for r in rows}
        for j in js:
            r = by_path.get(str(j.model.resolve()))
            if r is None:
                j.zoo_facts = {"rc": facts["rc"], "cmd": facts["cmd"],
                               "stderr": facts["stderr"] or "not in zoo.json"}
                continue
            j.dir = out / "models" / r["name"]
            j.zoo_facts = {"rc": facts["rc"], "cmd": facts["cmd"], "wall_s": r["seconds"],
                           "reused": bool(r.get("resumed")),
                           "stderr": r.get("error") or "no report"}


def select(sides: list[dict[str, Any]], split: str, pairs: int | None, *, skip: int = 0,
           only: str | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Complete pairs ``(backdoored, clean)`` of ``split``, in pair order: the first ``skip``
    left out, then only the comma-separated pair ids of ``only`` (if given), at most
    ``pairs``."""
    by_name = {s["name"]: s for s in sides}
    out = []
    for s in sorted(sides, key=lambda s: s["pair"]):
        if s["backdoored"] and (split == "all" or s["split"] == split) \
                and s["partner"] in by_name:
            out.append((s, by_name[s["partner"]]))
    out = out[skip:]
    if only:
        wanted = set(only.split(","))
        out = [c for c in out if c[0]["pair"] in wanted]
    return out[:pairs] if pairs else out


def plan_jobs(chosen: list[tuple[dict[str, Any], dict[str, Any]]], levels: list[str],
              variants: list[tuple[str, str, list[str]]], data_sets: tuple[int, int],
              make: Callable[[str, str, list[str], dict[str, Any]], Job]) -> list[Job]:
    """Jobs interleaved pair by pair, so a run cut short covers whole pairs at every level."""
    jobs = []
    for i, (bd, clean) in enumerate(chosen):
        for level, name, extra in variants:
            if level not in levels:
                continue
            if level == "scan":
                jobs += [make(level, name, extra, bd), make(level, name, extra, clean)]
            elif level == "scan-data":
                if i < data_sets[0]:
                    jobs.append(make(level, name, extra, bd))
                if i < data_sets[1]:
                    jobs.append(make(level, name, extra, clean))
            else:
                jobs.append(make(level, name, extra, bd))
    return jobs


# ----------------------------------------------------------------------------- tables

def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    g: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        g["overall"].append(r)
        for ax in AXES:
            g[f"{ax}={r[ax]}"].append(r)
    return g


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant, split and family: the figures of the wild table."""
    out: dict[str, Any] = {}
    ok = [r for r in rows if "error" not in r]
    keyed: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        keyed[(r["level"], r["variant"], r["split"])].append(r)
    for (level, variant, split), rs in sorted(keyed.items()):
        for group, gr in _groups(rs).items():
            bd = [r for r in gr if r["backdoored"]]
            cl = [r for r in gr if not r["backdoored"]]
            secs = metrics.median([r.get("seconds") for r in gr])
            if level == "scan":
                fig = {"n_backdoored": len(bd), "n_clean": len(cl),
                       "auroc": metrics.auroc([r["score"] for r in bd],
                                              [r["score"] for r in cl]),
                       "tpr": metrics.mean([float(r["flagged"]) for r in bd]),
                       "fpr": metrics.mean([float(r["flagged"]) for r in cl]),
                       "target_named": metrics.mean([float(r["target_named"]) for r in bd]),
                       "target_exact": metrics.mean([float(r["target_exact"]) for r in bd]),
                       "median_s": secs}
                for det in ("neural_cleanse", "mntd"):
                    fig[f"auroc_{det}"] = metrics.auroc(
                        [r["detectors"][det]["score"] for r in bd if det in r["detectors"]],
                        [r["detectors"][det]["score"] for r in cl if det in r["detectors"]])
            elif level == "scan-data":
                fig = {"n_poisoned_sets": len(bd), "n_clean_sets": len(cl),
                       "recall": metrics.mean([r["recall"] for r in bd]),
                       "precision": metrics.mean([r["precision"] for r in bd]),
                       "poisoned_called_poisoned": metrics.mean([float(r["flagged"])
                                                                 for r in bd]),
                       "clean_called_poisoned": metrics.mean([float(r["flagged"])
                                                              for r in cl]),
                       "clean_fraction_flagged": metrics.mean(
                           [r["num_flagged"] / r["num_samples"] for r in cl]),
                       "median_s": secs}
            else:
                fig = {"n_models": len(bd), "far": metrics.mean([r["far"] for r in bd]),
                       "far_median": metrics.median([r["far"] for r in bd]),
                       "frr": metrics.mean([r["frr"] for r in bd]),
                       "models_far_below_0.5": metrics.mean([float(r["far"] < 0.5)
                                                             for r in bd]),
                       "median_s": secs}
            out.setdefault(level, {}).setdefault(variant, {}).setdefault(split, {})[group] = fig
    return out


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _order(groups: dict[str, Any]) -> list[str]:
    rest = sorted(k for k in groups if k != "overall")
    return ["overall", *sorted(rest, key=lambda k: (AXES.index(k.split("=")[0]), k))]


def markdown(summary: dict[str, Any], heldout_families: dict[str, tuple[str, ...]]) -> str:
    """The wild tables: model level, data level, input level; held-out families starred."""

    def label(g: str) -> str:
        if g == "overall":
            return "**all**"
        ax, fam = g.split("=")
        return f"{ax}: {fam}{' *' if fam in heldout_families[ax] else ''}"

    lines: list[str] = []
    for variant, splits in summary.get("scan", {}).items():
        for split, groups in splits.items():
            lines += [f"**Model level — `scan` ({variant}), {split} models**", "",
                      "| group | backdoored / clean | AUROC (fused) | AUROC NC / MNTD | TPR | "
                      "FPR (clean) | target named (exact) | median s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for g in _order(groups):
                f = groups[g]
                lines.append(
                    f"| {label(g)} | {f['n_backdoored']} / {f['n_clean']} | {_f(f['auroc'])} | "
                    f"{_f(f['auroc_neural_cleanse'])} / {_f(f['auroc_mntd'])} | {_f(f['tpr'])} "
                    f"| {_f(f['fpr'])} | {_f(f['target_named'])} ({_f(f['target_exact'])}) | "
                    f"{_f(f['median_s'])} |")
            lines.append("")
    for variant, splits in summary.get("scan-data", {}).items():
        for split, groups in splits.items():
            lines += [f"**Data level — `scan-data` ({variant}), {split} training sets**", "",
                      "| group | poisoned / clean sets | recall | precision | poisoned sets "
                      "called poisoned | clean sets called poisoned (share flagged) | median s |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for g in _order(groups):
                f = groups[g]
                if g != "overall" and not g.startswith("trigger="):
                    continue
                lines.append(
                    f"| {label(g)} | {f['n_poisoned_sets']} / {f['n_clean_sets']} | "
                    f"{_f(f['recall'])} | {_f(f['precision'])} | "
                    f"{_f(f['poisoned_called_poisoned'])} | {_f(f['clean_called_poisoned'])} "
                    f"({_f(f['clean_fraction_flagged'])}) | {_f(f['median_s'])} |")
            lines.append("")
    for variant, splits in summary.get("filter", {}).items():
        for split, groups in splits.items():
            lines += [f"**Input level — `filter` ({variant}), {split} backdoored models**", "",
                      "| group | models | FAR (mean / median) | FRR measured | models with "
                      "FAR < 0.5 | median s |", "| --- | --- | --- | --- | --- | --- |"]
            for g in _order(groups):
                f = groups[g]
                if g != "overall" and not g.startswith("trigger="):
                    continue
                lines.append(
                    f"| {label(g)} | {f['n_models']} | {_f(f['far'])} / {_f(f['far_median'])} "
                    f"| {_f(f['frr'])} | {_f(f['models_far_below_0.5'])} | "
                    f"{_f(f['median_s'])} |")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def code_state() -> dict[str, Any]:
    """The commit the detectors ran from, and whether ``src/`` differed from it."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT.parent, capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"),
            "src_files_modified": len(git("status", "--short", "src").splitlines())}


def main(argv: list[str] | None = None) -> int:
    from . import families

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, required=True, help="the zoo's cache folder")
    ap.add_argument("--name", required=True, help="results name (results/wild/NAME.json)")
    ap.add_argument("--split", choices=("heldout", "dev", "all"), default="heldout")
    ap.add_argument("--levels", default=",".join(LEVELS))
    ap.add_argument("--pairs", type=int, default=None, help="at most this many pairs")
    ap.add_argument("--skip-pairs", type=int, default=0,
                    help="skip the first N pairs of the split (scored by an earlier rule)")
    ap.add_argument("--only-pairs", default=None,
                    help="comma-separated pair ids (e.g. w003-...,w011-...): score just these")
    ap.add_argument("--data-sets", default="20,10",
                    help="P,C: scan-data on the first P poisoned and C clean training sets")
    ap.add_argument("--variant", action="append", default=[],
                    help="LEVEL:NAME:ARGS, a named alternative setting (repeatable)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per CLI run")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS]
    if bad or not (args.zoo / "models").is_dir():
        print(f"error: --levels must be among {LEVELS} and --zoo a built zoo "
              f"(got {bad or args.zoo})", file=sys.stderr)
        return 2
    try:
        p, c = (int(v) for v in args.data_sets.split(","))
        variants = [(lv, "default", []) for lv in LEVELS]
        for v in args.variant:
            lv, name, rest = v.split(":", 2)
            if lv not in LEVELS or not name or name == "default":
                raise ValueError(v)
            variants.append((lv, name, shlex.split(rest)))
    except ValueError as e:
        print(f"error: bad --data-sets or --variant: {e}", file=sys.stderr)
        return 2
    work = args.work or ROOT / ".cache" / "wild-runs" / args.name
    work.mkdir(parents=True, exist_ok=True)
    clean_npz = work / "clean.npz"
    if not clean_npz.exists():
        zoo.write_defender_clean(clean_npz)
    chosen = select(zoo.load_sidecars(args.zoo), args.split, args.pairs,
                    skip=args.skip_pairs, only=args.only_pairs)

    def make(level: str, name: str, extra: list[str], side: dict[str, Any]) -> Job:
        return Job(level, name, extra, side, args.zoo, work, clean_npz, args.timeout)

    jobs = plan_jobs(chosen, levels, variants, (p, c), make)
    print(f"{len(chosen)} pairs, {len(jobs)} jobs, {args.workers} workers", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    run_scan_zoo(jobs, work, clean_npz, args.workers, args.timeout)
    with ThreadPoolExecutor(args.workers) as pool:
        futs = {pool.submit(j.run): j for j in jobs}
        for fut in as_completed(futs):
            job = futs[fut]
            try:
                row = fut.result()
            except Exception as e:  # a broken job is reported, not fatal
                row = {"level": job.level, "variant": job.variant, "model": job.side["name"],
                       "error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            status = row.get("verdict", row.get("error", "?"))
            print(f"[{len(rows)}/{len(jobs)}] {job.key}: {status} "
                  f"({row.get('cli_wall_s') or 'reused'} s)", flush=True)
    held = {"arch": families.HELDOUT_ARCHS, "recipe": families.HELDOUT_RECIPES,
            "trigger": families.HELDOUT_TRIGGERS}
    summary = summarise(rows)
    cmd = "python -m benchmarks.wild.run " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result = {"command": cmd, "zoo": str(args.zoo), "split": args.split,
              "code": code_state(),
              "pairs": len(chosen), "levels": levels, "wall_s": round(time.perf_counter() - t0, 1),
              "errors": [r for r in rows if "error" in r], "summary": summary,
              "rows": sorted(rows, key=lambda r: (r["level"], r["variant"], r["model"]))}
    args.results.mkdir(parents=True, exist_ok=True)
    zoo.write_json(args.results / f"{args.name}.json", result)
    md = (f"Command: `{cmd}` — {len(chosen)} pairs; families marked * are held-out "
          f"only.\n\n" + markdown(summary, held))
    (args.results / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
