"""Run a zoo's scans: in this process (``workers=0``) or as Ray tasks, local or cluster.

* **Serial** (``workers=0``): one model after another in this process — for debugging
  and tests; no Ray needed. ``timeout`` is enforced with ``SIGALRM`` where the platform
  has it (main thread only).
* **Ray** (``workers >= 1``, the optional extra ``trojanscan[ray]``, imported lazily):
  ``ray.init(num_cpus=workers)`` starts a local Ray, or ``address`` joins a running
  cluster. The shared part (clean data, loaded references, settings) is ``ray.put`` once;
  each model's bytes are ``ray.put`` when its task is submitted and dropped when it ends,
  so no worker needs the driver's file system. At most ``window`` tasks are in flight (the
  CPUs Ray was given), so a task starts when it is submitted and ``timeout`` counts from
  then (worker start-up included); a task past it is cancelled with
  ``ray.cancel(force=True)`` and recorded as timed out.

Every finished model is handed to ``on_outcome`` at once (the caller writes its report),
so a run killed at any point keeps every report finished so far. A progress bar with an
ETA counts models (silent with ``--quiet`` or off a terminal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..exceptions import DependencyError
from ..progress import enabled as progress_enabled
from .worker import Job, Outcome, Shared, scan_one

OnOutcome = Callable[[Job, Outcome], None]
ReadBytes = Callable[[Job], bytes]


class _Bar:
    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._p, self._t = progress, task

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)


@contextlib.contextmanager
def progress_bar(total: int, done: int = 0) -> Iterator[_Bar]:
    """A bar over models with elapsed time and ETA on stderr (quiet off a terminal)."""
    if not progress_enabled():
        yield _Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("scanning models"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as p:
        yield _Bar(p, p.add_task("models", total=total, completed=done))


def run_jobs(jobs: Sequence[Job], read: ReadBytes, shared: Shared, *, workers: int,
             address: str | None, timeout: float | None, on_outcome: OnOutcome,
             done: int = 0) -> dict[str, Any]:
    """Scan every job; return what ran where (``backend``, ``workers``)."""
    with progress_bar(len(jobs) + done, done) as bar:
        if workers == 0 and address is None:
            _run_serial(jobs, read, shared, timeout, on_outcome, bar)
            return {"backend": "serial", "workers": 0}
        return _run_ray(jobs, read, shared, workers, address, timeout, on_outcome, bar)


# -- serial ----------------------------------------------------------------------------

class _Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the
    scanning code can swallow it."""


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    usable = (seconds is not None and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return
    assert seconds is not None

    def fire(signum: int, frame: Any) -> None:
        raise _Timeout

    before = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def timed_out(job: Job, timeout: float, seconds: float) -> Outcome:
    return Outcome(job.name, error=f"timed out after {timeout:g} s (--model-timeout)",
                   seconds=seconds)


def _run_serial(jobs: Sequence[Job], read: ReadBytes, shared: Shared, timeout: float | None,
                on_outcome: OnOutcome, bar: _Bar) -> None:
    for job in jobs:
        t0 = time.perf_counter()
        try:
            with _alarm(timeout):
                outcome = scan_one(job, read(job), shared)
        except _Timeout:
            assert timeout is not None
            outcome = timed_out(job, timeout, time.perf_counter() - t0)
        on_outcome(job, outcome)
        bar.advance()


# -- Ray -------------------------------------------------------------------------------

def ray_module() -> Any:
    """``ray``, or a DependencyError naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise DependencyError("ray is required for scan-zoo with --workers >= 1 or "
                              "--address: pip install 'trojanscan[ray]' (or --workers 0 "
                              "to scan in this process)") from exc
    return ray


def _ray_scan(job: Job, blob: bytes, shared: Shared) -> Outcome:
    return scan_one(job, blob, shared)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _run_ray(jobs: Sequence[Job], read: ReadBytes, shared: Shared, workers: int,
             address: str | None, timeout: float | None, on_outcome: OnOutcome,
             bar: _Bar) -> dict[str, Any]:
    ray = ray_module()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address is None:
            kwargs["num_cpus"] = workers
            # A local Ray starts its workers at niceness 15; on a busy machine they then get
            # almost no CPU while they are the whole job. Unless the user says otherwise,
            # the workers of a Ray we start run at normal priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        window = workers if workers >= 1 else max(1, int(ray.cluster_resources()
                                                         .get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_scan)
        shared_ref = ray.put(shared)
        queue = list(jobs)
        pending: dict[Any, tuple[Job, float]] = {}
        while queue or pending:
            while queue and len(pending) < window:
                job = queue.pop(0)
                ref = remote.remote(job, ray.put(read(job)), shared_ref)
                pending[ref] = (job, time.perf_counter())
            wait_for = None
            if timeout is not None:
                first = min(t for _, t in pending.values())
                wait_for = max(0.05, min(1.0, first + timeout - time.perf_counter()))
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_for)
            for ref in ready:
                job, t0 = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:  # a crashed or cancelled worker: that model's error
                    outcome = Outcome(job.name, error=f"worker failed: {type(exc).__name__}: "
                                      f"{_first_line(exc)}", seconds=time.perf_counter() - t0)
                on_outcome(job, outcome)
                bar.advance()
            if timeout is not None:
                now = time.perf_counter()
                for ref, (job, t0) in list(pending.items()):
                    if now - t0 > timeout:
                        ray.cancel(ref, force=True)
                        del pending[ref]
                        on_outcome(job, timed_out(job, timeout, now - t0))
                        bar.advance()
        return {"backend": "ray", "workers": window,
                "address": address if address is not None else "local"}
    finally:
        if started:
            ray.shutdown()


def default_workers() -> int:
    """Local Ray workers by default: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
