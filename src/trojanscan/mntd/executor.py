"""Run independent tasks sequentially, in local processes or on Ray; resumable.

MNTD needs hundreds of shadow models, each an independent training run, and scanning a
folder of models is the same shape of work: many independent tasks, one file (or one
small result) each. :func:`run_tasks` runs ``fn(task, shared)`` for every task:

* ``backend="sequential"`` — in this process, one after the other (no dependency);
* ``backend="processes"`` — a local process pool (``workers`` processes, stdlib only;
  processes are *spawned*, so a calling script needs the ``if __name__ == "__main__":``
  guard);
* ``backend="ray"`` — Ray tasks (optional extra ``trojanscan[ray]``, imported lazily):
  a local Ray started in-process with ``workers`` CPUs, or an existing cluster with
  ``address="auto"`` / ``"ray://host:port"``. ``shared`` (e.g. the training data) is put
  into the object store once, not shipped with every task;
* ``backend="auto"`` — Ray when it is installed, else sequential.

Resumable: a task whose ``output`` file exists is skipped (its result is ``None``);
outputs must be written atomically (:func:`trojanscan.utils.atomic_path`), so a killed
run leaves only complete files and a rerun continues where it stopped. Each task runs
with ``threads`` torch threads (default 1) in every backend, so results do not depend
on the backend. A progress bar counts tasks. The first failing task's error is raised
once the tasks already running have finished (their files are kept).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import DependencyError, bad_param
from ..progress import progress

BACKENDS = ("auto", "sequential", "processes", "ray")

TaskFn = Callable[["Task", Any], Any]


@dataclass(frozen=True)
class Task:
    """One unit of work: a unique ``key``, the file it produces (if any) and arguments."""

    key: str
    output: Path | None = None
    args: tuple[Any, ...] = ()

    def done(self) -> bool:
        return self.output is not None and Path(self.output).is_file()


@dataclass(frozen=True)
class RunSummary:
    """What :func:`run_tasks` did: results by key (``None`` for skipped tasks)."""

    backend: str
    workers: int
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``n`` torch intra-op threads (``None``: leave as is)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence nested progress bars (only the task bar is shown)."""
    before = os.environ.get("TROJANSCAN_NO_PROGRESS")
    os.environ["TROJANSCAN_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TROJANSCAN_NO_PROGRESS", None)
        else:
            os.environ["TROJANSCAN_NO_PROGRESS"] = before


def call_task(fn: TaskFn, task: Task, shared: Any, threads: int | None) -> Any:
    """Run one task with the thread count fixed and nested progress bars silenced."""
    with torch_threads(threads), quiet_progress():
        return fn(task, shared)


def resolve_backend(backend: str, address: str | None = None) -> str:
    """``auto`` → ``ray`` when importable (or an address is given), else ``sequential``."""
    if backend not in BACKENDS:
        raise bad_param("backend", BACKENDS, backend)
    if backend != "auto":
        return backend
    if address is not None:
        return "ray"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "sequential"
    return "ray"


def run_tasks(fn: TaskFn, tasks: Sequence[Task], *, shared: Any = None,
              backend: str = "auto", workers: int | None = None, address: str | None = None,
              threads: int | None = 1, description: str = "tasks") -> RunSummary:
    """Run ``fn(task, shared)`` for each task not yet done; see the module docstring.

    ``fn`` must be a module-level function (it is pickled for processes and Ray).
    """
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise bad_param("tasks", "tasks with unique keys", f"{len(keys) - len(set(keys))} "
                        "duplicate key(s)")
    if workers is not None and workers < 1:
        raise bad_param("workers", "an integer >= 1", workers)
    name = resolve_backend(backend, address)
    todo = [t for t in tasks if not t.done()]
    skipped = tuple(t.key for t in tasks if t.done())
    results: dict[str, Any] = dict.fromkeys(skipped)
    n_workers = workers or (os.cpu_count() or 1)
    t0 = time.perf_counter()
    with progress(description, len(tasks)) as bar:
        bar.advance(len(skipped))
        if not todo:
            pass
        elif name == "sequential":
            n_workers = 1
            for t in todo:
                results[t.key] = call_task(fn, t, shared, threads)
                bar.advance()
        elif name == "processes":
            results.update(_run_processes(fn, todo, shared, n_workers, threads, bar))
        else:
            results.update(_run_ray(fn, todo, shared, workers, address, threads, bar))
    return RunSummary(name, n_workers, tuple(t.key for t in todo), skipped,
                      {k: results[k] for k in keys}, time.perf_counter() - t0)


# -- local processes ----------------------------------------------------------------

_SHARED: Any = None


def _init_worker(shared: Any) -> None:
    global _SHARED
    _SHARED = shared


def _process_call(fn: TaskFn, task: Task, threads: int | None) -> Any:
    return call_task(fn, task, _SHARED, threads)


def _run_processes(fn: TaskFn, todo: Sequence[Task], shared: Any, workers: int,
                   threads: int | None, bar: Any) -> dict[str, Any]:
    import concurrent.futures as cf
    import multiprocessing as mp

    out: dict[str, Any] = {}
    error: BaseException | None = None
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(shared,)) as pool:
        futures = {pool.submit(_process_call, fn, t, threads): t.key for t in todo}
        for fut in cf.as_completed(futures):
            exc = None if fut.cancelled() else fut.exception()
            if exc is None and not fut.cancelled():
                out[futures[fut]] = fut.result()
            elif error is None and exc is not None:  # keep the others' files, raise later
                error = exc
                for f in futures:
                    f.cancel()
            bar.advance()
    if error is not None:
        raise error
    return out


# -- Ray -------------------------------------------------------------------------------

def _ray_module() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DependencyError("ray is required for backend='ray' / --ray-address: pip install "
                              f"'trojanscan[ray]' (or use --no-ray) ({exc})") from exc
    return ray


def _ray_call(fn: TaskFn, task: Task, shared: Any, threads: int | None) -> Any:
    return call_task(fn, task, shared, threads)


def _run_ray(fn: TaskFn, todo: Sequence[Task], shared: Any, workers: int | None,
             address: str | None, threads: int | None, bar: Any) -> dict[str, Any]:
    ray = _ray_module()
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address is None:
            kwargs["num_cpus"] = workers or (os.cpu_count() or 1)
            # A local Ray starts its workers at niceness 15; on a busy machine they then get
            # almost no CPU while they are the whole job. Unless the user says otherwise,
            # the workers of a Ray we start run at normal priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(_ray_call)
        shared_ref = ray.put(shared)
        pending = {remote.remote(fn, t, shared_ref, threads): t.key for t in todo}
        out: dict[str, Any] = {}
        error: BaseException | None = None
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                key = pending.pop(ref)
                try:
                    out[key] = ray.get(ref)
                except BaseException as exc:
                    if error is None:
                        error = exc
                        for r in pending:
                            ray.cancel(r)
                bar.advance()
        if error is not None:
            cause = getattr(error, "cause", None)
            raise cause if isinstance(cause, BaseException) else error
        return out
    finally:
        if started:
            ray.shutdown()
