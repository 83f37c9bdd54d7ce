"""What the atheris fuzzers of trojanscan's loaders have in common: recording findings,
the acceptable outcomes of one input, the fuzzing child process, coverage of a corpus
replay and the ``summary.json`` beside it.

trojanscan is imported only inside functions, so that a fuzzer can import it under
``atheris.instrument_imports`` after importing this module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_PROGRESS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def parse_args(doc: str, seconds: int, out: str) -> argparse.Namespace:
    """The fuzzers' command line: ``--seconds``, ``--out``, ``--replay`` (and the hidden
    ``--child`` of the libFuzzer process); the folder ``--out`` is created."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=seconds)
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--replay", action="store_true", help="measure coverage of the corpus")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


class Findings:
    """Unexpected outcomes, each kept once per (kind, exception type, place in trojanscan):
    printed, and — once ``folder`` is set — written there with the input that caused it."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._seen: set[str] = set()

    def record(self, kind: str, exc: BaseException | None, data: bytes, detail: str) -> None:
        tb = traceback.extract_tb(exc.__traceback__) if exc is not None else []
        frames = [f for f in tb if "trojanscan" in f.filename] or tb
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        key = f"{kind}:{type(exc).__name__ if exc else ''}:{where}"
        if key in self._seen:
            return
        self._seen.add(key)
        print(f"\n=== FINDING {key}: {detail[:300]}", file=sys.stderr, flush=True)
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1(data).hexdigest()[:12]
            (self.folder / f"{digest}.bin").write_bytes(data)
            with open(self.folder / "findings.jsonl", "a") as fh:
                fh.write(json.dumps({"key": key, "detail": detail[:2000],
                                     "input": f"{digest}.bin",
                                     "traceback": "".join(traceback.format_tb(exc.__traceback__))
                                     if exc else ""}) + "\n")


def guarded(findings: Findings, data: bytes, call: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, call())``, or ``(False, None)`` when it raised. Our own error with a one-line
    message is acceptable; any other exception, or a message of several lines, is recorded."""
    from trojanscan.exceptions import TrojanscanError

    try:
        return True, call()
    except TrojanscanError as exc:
        msg = str(exc)
        if not msg.strip() or "\n" in msg or "\r" in msg:
            findings.record("multiline-message", exc, data, repr(msg))
    except MemoryError as exc:
        findings.record("memory", exc, data, repr(exc))
    except Exception as exc:
        findings.record("exception", exc, data, f"{type(exc).__name__}: {exc}")
    return False, None


def run_child(script: str, out: Path, seconds: int, log: Path) -> str:
    """Run ``script --child`` (the libFuzzer process), its output appended to ``log``;
    return the whole log."""
    with open(log, "a") as fh:
        subprocess.run([sys.executable, script, "--child", "--seconds", str(seconds),
                        "--out", str(out)], stdout=fh, stderr=subprocess.STDOUT, check=False)
    return log.read_text(errors="replace")


def libfuzzer_progress(log: str) -> dict[str, int | None]:
    """Edges, features and corpus size from libFuzzer's last progress line."""
    last = _PROGRESS.findall(log)
    return {"libfuzzer_cov_edges": int(last[-1][1]) if last else None,
            "libfuzzer_features": int(last[-1][2]) if last else None,
            "corpus_size": int(last[-1][3]) if last else None}


def replay(corpus: Path, one_input: Callable[[bytes], None], include: Iterable[Path],
           omit: Iterable[Path] = ()) -> dict[str, Any]:
    """Run every file of ``corpus`` once under coverage.py; line and branch coverage of the
    ``include`` files, per file and in total."""
    import coverage

    cov = coverage.Coverage(branch=True, include=[str(p) for p in include],
                            omit=[str(p) for p in omit] or None, data_file=None)
    cov.start()
    files = sorted(corpus.iterdir())
    for f in files:
        one_input(f.read_bytes())
    cov.stop()
    per_file: dict[str, Any] = {}
    totals = {"statements": 0, "missing": 0, "branches": 0, "missing_branches": 0}
    for name in cov.get_data().measured_files():
        n = cov._analyze(name).numbers
        per_file[Path(name).name] = {
            "lines": n.n_statements, "lines_hit": n.n_statements - n.n_missing,
            "branches": n.n_branches, "branches_hit": n.n_branches - n.n_missing_branches}
        totals["statements"] += n.n_statements
        totals["missing"] += n.n_missing
        totals["branches"] += n.n_branches
        totals["missing_branches"] += n.n_missing_branches
    return {"corpus_files": len(files), "per_file": per_file,
            "lines": totals["statements"], "lines_hit": totals["statements"] - totals["missing"],
            "branches": totals["branches"],
            "branches_hit": totals["branches"] - totals["missing_branches"]}


def write_summary(out: Path, coverage: dict[str, Any], what: str) -> None:
    """``summary.json``: the fuzzing run (``run.json``), the replay's coverage and the
    findings of the run (without tracebacks); one line with the figures on stdout."""
    run_file = out / "run.json"
    findings = out / "findings" / "findings.jsonl"
    summary: dict[str, Any] = {
        "run": json.loads(run_file.read_text()) if run_file.exists() else None,
        "coverage": coverage,
        "findings": ([json.loads(line) for line in findings.read_text().splitlines()]
                     if findings.exists() else [])}
    for item in summary["findings"]:
        item.pop("traceback", None)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"coverage of {what}: lines {coverage['lines_hit']}/{coverage['lines']}, "
          f"branches {coverage['branches_hit']}/{coverage['branches']}; "
          f"findings: {len(summary['findings'])}")
