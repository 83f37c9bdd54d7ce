"""Progress bars that stay quiet when stderr is not a terminal (or when asked)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) progress bars process-wide (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def enabled() -> bool:
    if _QUIET or os.environ.get("TROJANSCAN_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **kwargs: Any) -> None:
        pass


class _RichTask:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        self._p.advance(self._id, n)

    def update(self, **kwargs: Any) -> None:
        self._p.update(self._id, **kwargs)


@contextlib.contextmanager
def progress(description: str, total: float | None) -> Iterator[_NullTask | _RichTask]:
    """A single progress bar (rich) on stderr; a no-op when not on a terminal."""
    if not enabled():
        yield _NullTask()
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as p:
        yield _RichTask(p, p.add_task(description, total=total))
