"""Score every RGB benchmark model with each command's default settings (resumable).

    python -m benchmarks.rgb.run [--cache benchmarks/.cache/rgb] [--levels scan,free,...]
                                 [--workers 2] [--threads 1] [--only NAMES] [--rescore|--reparse]
                                 [--out benchmarks/results/rgb]

Levels, each through the real CLI in a subprocess (wall and CPU seconds and peak RSS by
``/usr/bin/time``):
``scan`` — ``scan MODEL --data defender.npz`` (default detectors); ``free`` — ``scan MODEL
--input-shape 3,32,32`` (no data: the data-free detectors); ``data`` — ``scan-data`` on
the model's own training set (``poison_mask`` is the truth); ``filter`` — ``filter`` on
200 clean evaluation images and, for backdoored models, 200 evaluation images of other
classes carrying the trigger, calibrated on the first 500 of the defender's clean images;
``teco`` — the same with ``--detector teco``; ``mntd`` — ``scan --detectors mntd`` with the
bundle ``mntd train`` wrote to ``CACHE/mntd`` (``BUNDLE``); ``bundle`` — ``scan`` with the
default detectors and that bundle. Writes ``OUT/rgb.json`` (every row) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

LEVELS = ("scan", "free", "data", "filter", "teco", "mntd", "bundle")
#: the MNTD bundle ``mntd train`` writes for the ``bundle`` level (see the README)
BUNDLE = Path("mntd") / "mntd_3x32x32_10.json"


def _run(cmd: list[str], threads: int) -> tuple[int, float, float, float, str]:
    """Exit code, wall seconds, peak RSS (MiB), CPU seconds (user + system), stderr tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", sys.executable, "-m",
                           "trojanscan", *cmd], capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    try:
        kib, user, system = lines[-1].split()
        rss, cpu = int(kib) / 1024, float(user) + float(system)
        err = "\n".join(lines[:-1])
    except (ValueError, IndexError):
        rss, cpu, err = float("nan"), float("nan"), proc.stderr
    return proc.returncode, secs, rss, cpu, err.strip()[-500:]


def filter_inputs(cache: Path, row: dict[str, Any], n: int = 200) -> Path:
    """Clean evaluation images, then (backdoored) the same number triggered."""
    path = cache / "work" / "inputs" / f"{row['name']}.npz"
    if path.exists():
        return path
    import torch

    from trojanscan.attacks.spec import parse_attack

    ev = np.load(cache / "data" / "eval.npz")
    x, y = ev["x"], ev["y"]
    clean = x[:n]
    parts, truth = [clean], [np.zeros(len(clean), bool)]
    if row["backdoored"]:
        attack = parse_attack(row["attack"])
        assert attack is not None
        targets = set(getattr(attack, "targets", None) or [attack.target])  # type: ignore[attr-defined]
        pool = x[n:][~np.isin(y[n:], list(targets))][:n]
        xt = torch.from_numpy(pool).float() / 255
        trig = (attack.apply(xt).numpy() * 255).round().astype(np.uint8)
        parts.append(trig)
        truth.append(np.ones(len(trig), bool))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.concatenate(parts), triggered=np.concatenate(truth))
    return path


def score(cache: Path, row: dict[str, Any], level: str, threads: int) -> dict[str, Any]:
    name = row["name"]
    model = cache / "models" / f"{name}.pt"
    out = cache / "work" / level / name
    data = cache / "data" / "defender.npz"
    res: dict[str, Any] = {"name": name, "level": level}
    if level == "scan":
        cmd = ["scan", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    elif level in ("bundle", "mntd"):
        cmd = ["scan", str(model), "--data", str(data), "--out", str(out), "--quiet",
               "--param", f"mntd.meta_classifier={cache / BUNDLE}"]
        if level == "mntd":
            cmd += ["--detectors", "mntd"]
    elif level == "free":
        cmd = ["scan", str(model), "--input-shape", "3,32,32", "--out", str(out), "--quiet"]
    elif level == "data":
        cmd = ["scan-data", str(cache / "models" / f"{name}.train.npz"), "--model", str(model),
               "--out", str(out), "--quiet"]
    else:
        inputs = filter_inputs(cache, row)
        calib = cache / "data" / "calibrate500.npz"
        if not calib.exists():
            z = np.load(data)
            np.savez(calib, x=z["x"][:500], y=z["y"][:500])
        cmd = ["filter", str(model), str(inputs), "--calibrate", str(calib), "--out", str(out),
               "--quiet"]
        if level == "teco":
            cmd += ["--detector", "teco"]
    rc, secs, rss, cpu, err = _run([*cmd, "--seed", "0"], threads)
    res.update(rc=rc, seconds=round(secs, 1), cpu_seconds=round(cpu, 1), threads=threads,
               peak_rss_mib=round(rss, 1))
    if rc not in (0, 1):
        res["error"] = err
        return res
    return parse(cache, row, level, res)


def parse(cache: Path, row: dict[str, Any], level: str, res: dict[str, Any]
          ) -> dict[str, Any]:
    """Add what the level's report says (against the truth) to ``res``."""
    name = row["name"]
    out = cache / "work" / level / name
    rep = json.loads((out / "report.json").read_text())
    res["verdict"] = rep["verdict"]
    if level in ("scan", "free", "bundle", "mntd"):
        res["score"] = rep.get("score")
        res["targets"] = rep.get("suspected_targets", [])
        res["detectors"] = {k: {"verdict": v.get("verdict"), "score": v.get("score"),
                                "targets": v.get("suspected_targets", []),
                                "seconds": v.get("seconds")}
                            for k, v in rep.get("detectors", {}).items()}
    elif level == "data":
        mask = np.load(cache / "models" / f"{name}.train.npz")["poison_mask"].astype(bool)
        flagged = np.zeros(len(mask), bool)
        flagged[np.asarray(rep.get("flagged_indices", []), dtype=int)] = True
        tp = int((flagged & mask).sum())
        res.update(num_poison=int(mask.sum()), flagged=int(flagged.sum()), true_pos=tp,
                   recall=tp / mask.sum() if mask.any() else None,
                   precision=tp / flagged.sum() if flagged.any() else None,
                   carried_by=rep.get("carried_by"))
        per: dict[str, Any] = {}
        for det, d in rep.get("detectors", {}).items():
            mine = np.zeros(len(mask), bool)
            mine[np.asarray(d.get("flagged_indices", []), dtype=int)] = True
            hit = int((mine & mask).sum())
            per[det] = {"verdict": d.get("verdict"), "flagged": int(mine.sum()),
                        "recall": hit / mask.sum() if mask.any() else None,
                        "precision": hit / mine.sum() if mine.any() else None}
        res["detectors"] = per
    else:
        truth = np.load(filter_inputs(cache, row))["triggered"]
        flags = np.asarray(rep["flagged"], bool)
        res.update(frr=float(flags[~truth].mean()),
                   far=float((~flags[truth]).mean()) if truth.any() else None,
                   mean_passes=rep.get("mean_forwards_per_input"))
    return res


def table(rows: list[dict[str, Any]], index: dict[str, Any]) -> str:
    lines = ["| model | truth | scan (data) | targets | NC | s | CPU s | MiB | data-free | "
             "scan + RGB bundle | MNTD (RGB bundle) | scan-data R/P | filter FAR/FRR |",
             "|" + "---|" * 13]
    by: dict[tuple[str, str], dict[str, Any]] = {(r["name"], r["level"]): r for r in rows}
    for name, m in index.items():
        truth = (f"bd→{m['attack'].split('target=')[1].split(',')[0]}" if m["backdoored"]
                 else "clean")
        s, f = by.get((name, "scan"), {}), by.get((name, "free"), {})
        d, fl = by.get((name, "data"), {}), by.get((name, "filter"), {})
        b = by.get((name, "bundle"), {})
        det = s.get("detectors", {})

        def v(x: dict[str, Any]) -> str:
            return str(x.get("verdict", x.get("error", "-")))[:12]

        rp = (f"{d['recall']:.2f}/{d['precision']:.2f}" if d.get("recall") is not None
              and d.get("precision") is not None else v(d))
        ff = (f"{fl['far']:.2f}/{fl['frr']:.3f}" if fl.get("far") is not None
              else (f"-/{fl['frr']:.3f}" if "frr" in fl else "-"))
        lines.append(f"| {name} | {truth} | {v(s)} | {s.get('targets', '-')} | "
                     f"{v(det.get('neural_cleanse', {}))} | {s.get('seconds', '-')} | "
                     f"{s.get('cpu_seconds', '-')} | {s.get('peak_rss_mib', '-')} | {v(f)} | "
                     f"{v(b)} | {v(by.get((name, 'mntd'), {}))} | {rp} | {ff} |")
    return "\n".join(lines)


def _auroc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


def summarise(rows: list[dict[str, Any]], index: dict[str, Any]) -> dict[str, Any]:
    """Per level and detector: detections, false alarms, AUROC, median time and memory."""
    out: dict[str, Any] = {}
    for level in LEVELS:
        rs = [r for r in rows if r["level"] == level and r.get("rc") in (0, 1)]
        if not rs:
            continue
        bd = [r for r in rs if index[r["name"]]["backdoored"]]
        cl = [r for r in rs if not index[r["name"]]["backdoored"]]
        bad = {"scan": "backdoored", "free": "backdoored", "data": "poisoned",
               "filter": "triggered", "teco": "triggered", "bundle": "backdoored",
               "mntd": "backdoored"}[level]
        secs = sorted(r["seconds"] for r in rs)
        rss = sorted(r["peak_rss_mib"] for r in rs)
        entry: dict[str, Any] = {
            "models": len(rs), "detected": sum(r["verdict"] == bad for r in bd),
            "backdoored": len(bd), "false_alarms": sum(r["verdict"] == bad for r in cl),
            "clean": len(cl),
            "right": sum(r["verdict"] == bad for r in bd) + sum(r["verdict"] != bad for r in cl),
            "median_seconds": secs[len(secs) // 2], "max_peak_rss_mib": rss[-1]}
        for arch in sorted({index[r["name"]]["arch"] for r in rs}):
            mine = [r for r in rs if index[r["name"]]["arch"] == arch]
            wall = sorted(r["seconds"] for r in mine)
            cpu = sorted(r["cpu_seconds"] for r in mine if "cpu_seconds" in r)
            entry.setdefault("by_arch", {})[arch] = {
                "models": len(mine), "median_seconds": wall[len(wall) // 2],
                "median_cpu_seconds": cpu[len(cpu) // 2] if cpu else None,
                "threads": sorted({r.get("threads") for r in mine if r.get("threads")}),
                "max_peak_rss_mib": max(r["peak_rss_mib"] for r in mine)}
        if level in ("scan", "free", "bundle", "mntd"):
            entry["auroc"] = _auroc([r["score"] for r in bd], [r["score"] for r in cl])
            named = [r for r in bd if r["verdict"] == bad]
            entry["target_named"] = sum(
                int(index[r["name"]]["attack"].split("target=")[1].split(",")[0])
                in r.get("targets", []) for r in named)
            per: dict[str, Any] = {}
            for r in rs:
                for det, d in r.get("detectors", {}).items():
                    e = per.setdefault(det, {"detected": 0, "false_alarms": 0, "ran": 0})
                    if d.get("verdict") in ("backdoored", "clean"):
                        e["ran"] += 1
                        if d["verdict"] == "backdoored":
                            key = ("detected" if index[r["name"]]["backdoored"]
                                   else "false_alarms")
                            e[key] += 1
                    else:
                        e["not_applicable"] = e.get("not_applicable", 0) + 1
            entry["detectors"] = per
        if level == "data":
            pois = [r for r in bd if r.get("recall") is not None]
            entry["mean_recall"] = (round(float(np.mean([r["recall"] for r in pois])), 3)
                                    if pois else None)
            prec = [r["precision"] for r in pois if r.get("precision") is not None]
            entry["mean_precision"] = round(float(np.mean(prec)), 3) if prec else None
            dets: dict[str, Any] = {}
            for r in rs:
                for det, d in r.get("detectors", {}).items():
                    e = dets.setdefault(det, {"detected": 0, "false_alarms": 0,
                                              "recall": [], "precision": []})
                    bd_set = index[r["name"]]["backdoored"]
                    if d.get("verdict") == "poisoned":
                        e["detected" if bd_set else "false_alarms"] += 1
                    if bd_set:
                        e["recall"].append(d.get("recall") or 0.0)
                        if d.get("precision") is not None:
                            e["precision"].append(d["precision"])
            for e in dets.values():
                for k in ("recall", "precision"):
                    vals = e.pop(k)
                    e["mean_" + k] = round(float(np.mean(vals)), 3) if vals else None
            entry["detectors"] = dets
        if level in ("filter", "teco"):
            entry["far"] = {r["name"]: r.get("far") for r in bd}
            entry["max_frr"] = max(r["frr"] for r in rs)
        out[level] = entry
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/.cache/rgb"))
    ap.add_argument("--levels", default="scan,free,data,filter,teco",
                    help="comma-separated; mntd and bundle need a trained bundle (see module)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/rgb"))
    ap.add_argument("--only", default=None)
    ap.add_argument("--reparse", action="store_true",
                    help="read the stored rows' reports again (no scoring)")
    ap.add_argument("--rescore", action="store_true",
                    help="score the chosen levels and models anew")
    args = ap.parse_args(argv)
    index = json.loads((args.cache / "models.json").read_text())
    levels = [x for x in args.levels.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    res_path = args.out / "rgb.json"
    stored = json.loads(res_path.read_text())["rows"] if res_path.exists() else []
    only = set(args.only.split(",")) if args.only else None
    done = {(r["name"], r["level"]): r for r in stored if r.get("rc") in (0, 1)
            and not (args.rescore and r["level"] in levels
                     and (only is None or r["name"] in only))}
    jobs = [(m, lv) for lv in levels for n, m in index.items()
            if (n, lv) not in done and (only is None or n in only)]
    threads = args.threads or max(1, 2 // args.workers)
    rows = dict(done)
    if args.reparse:
        for key, r in rows.items():
            if key[1] in levels:
                rows[key] = parse(args.cache, index[key[0]], key[1], r)

    def one(job: tuple[dict[str, Any], str]) -> dict[str, Any]:
        return score(args.cache, job[0], job[1], threads)

    with ThreadPoolExecutor(args.workers) as pool:
        for r in pool.map(one, jobs):
            rows[(r["name"], r["level"])] = r
            print(json.dumps(r)[:300], flush=True)
            tmp = res_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"models": index, "rows": list(rows.values())},
                                      indent=1))
            tmp.replace(res_path)
    summary = summarise(list(rows.values()), index)
    res_path.write_text(json.dumps({"models": index, "rows": list(rows.values()),
                                    "summary": summary}, indent=1))
    text = table(list(rows.values()), index)
    (args.out / "rgb.md").write_text(text + "\n")
    print(text)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
