"""Checking where a command will write, before it does any work.

Every command that writes calls :func:`check_outputs` first, with every path it will
write (report folders, model files and their siblings, exported data) and every input it
reads (models, data sets, calibration data, references, the files beside a model). A
bad output is a :class:`~trojanscan.exceptions.ParameterError` naming the option — one
line and exit code 2 at the command line — raised before anything is loaded, so a
mistake costs nothing and never replaces a user's file:

* an output that *is* an input (same path once ``~``, ``.``/``..`` and symbolic links
  are resolved, or the same file through a hard link) is refused; so is a folder output
  that would write one of its files over an input, and an output inside an input folder
  (an image folder gains a class, a reference folder a report); a data set named
  ``FOLDER:split`` counts as its folder, and an IDX images file brings its labels file;
* two outputs of one command that are the same file are refused;
* a folder output that exists as a file, or a file output that exists as a folder, is
  refused;
* the nearest existing folder of every output must be a folder this process can create
  files in: checked with ``os.access`` and by opening an anonymous temporary file there
  (``O_TMPFILE`` where the system has it, else a named one removed at once), which also
  answers for a superuser, whom permission bits do not stop but read-only or virtual
  file systems do.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..exceptions import ParameterError
from . import idx as idx_io

#: what a report folder receives (relative paths; ``*`` patterns; a trailing ``/`` is a
#: sub-folder and everything in it)
REPORT_FILES: tuple[str, ...] = ("report.json", "report.html", "*.npy", "images/")


@dataclass(frozen=True)
class Output:
    """One place a command writes: a file, or a folder it writes ``files`` into."""

    option: str                       # how the user named it, e.g. "--out"
    path: Path
    folder: bool = False
    files: tuple[str, ...] = ()       # for a folder: what it writes there (REPORT_FILES)


@dataclass(frozen=True)
class Input:
    """One thing a command reads (a file or a folder); names that are not paths, such
    as built-in data sets, are skipped."""

    option: str                       # e.g. "MODEL", "--data"
    path: str | os.PathLike[str] | None


def report_folder(option: str, path: str | os.PathLike[str]) -> Output:
    """A report folder (``report.json``, ``report.html``, arrays and images)."""
    return Output(option, Path(path), folder=True, files=REPORT_FILES)


def sidecar_of(model: str | os.PathLike[str]) -> Path:
    """The JSON file beside a model (``MODEL.json``), written by ``trojanscan train``."""
    return Path(model).with_suffix(".json")


def check_outputs(outputs: Iterable[Output], inputs: Iterable[Input]) -> None:
    """Raise :class:`ParameterError` (naming the option) unless every output can be
    written without touching an input or another output (module docstring)."""
    outs = [o for o in outputs if o.path is not None]
    ins = [(i.option, p) for i in inputs for p in _input_paths(i)]
    for out in outs:
        for option, src in ins:
            _check_against_input(out, option, src)
    for i, a in enumerate(outs):
        for b in outs[i + 1:]:
            _check_pair(a, b)
    for out in outs:
        _check_kind(out)
        _check_writable(out)


# ----------------------------------------------------------------------------- paths


def _input_paths(inp: Input) -> list[Path]:
    """The existing files and folders an input reads: the path itself; for a data set
    named ``FOLDER:split`` (a split of a folder of IDX files) the folder; for an IDX
    images file also the labels file read with it. Built-in names give none."""
    if inp.path is None or os.fspath(inp.path) == "":
        return []
    path = Path(inp.path)
    if not _exists(path):
        base, sep, selector = os.fspath(inp.path).rpartition(":")
        folder = Path(base).expanduser()
        if sep and base and selector and folder.is_dir():
            return [Path(base)]
        return []
    found = [path]
    if idx_io.is_idx_images_name(path.name) and path.expanduser().is_file():
        try:
            pair = idx_io.find_idx_pairs(path.expanduser().parent).get(
                idx_io.split_name(path.name) or "")
        except OSError:
            pair = None
        if pair is not None and pair.labels is not None:
            found.append(pair.labels)
    return found


def _exists(p: Path) -> bool:
    try:
        return p.expanduser().exists()
    except OSError:
        return False


def canonical(p: str | os.PathLike[str]) -> Path:
    """Absolute path with ``~``, ``.``, ``..`` and symbolic links resolved (the path
    need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name the same file: equal canonical paths, or the same
    inode where both exist (hard links)."""
    if canonical(a) == canonical(b):
        return True
    try:
        return os.path.samefile(os.path.expanduser(os.fspath(a)),
                                os.path.expanduser(os.fspath(b)))
    except OSError:
        return False


def _inside(child: Path, folder: Path) -> str | None:
    """``child``'s path relative to ``folder`` (posix), when it lies inside it: by path,
    else by identity of an existing ancestor of ``child`` with ``folder`` (a folder named
    in another letter case on a case-insensitive file system, or through a bind mount)."""
    c, f = canonical(child), canonical(folder)
    if c == f:
        return ""
    try:
        return c.relative_to(f).as_posix()
    except ValueError:
        pass
    try:
        target = os.stat(f)
    except OSError:
        return None
    for anc in (c, *c.parents):
        try:
            st = os.stat(anc)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return c.relative_to(anc).as_posix()
    return None


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    """Whether a folder output writing ``patterns`` writes ``rel``; letter case is
    ignored, since on a case-insensitive file system ``Images/`` is ``images/``."""
    rel = rel.lower()
    for pat in patterns:
        pat = pat.lower()
        if pat.endswith("/"):
            head = pat.rstrip("/")
            if rel == head or rel.startswith(head + "/"):
                return True
        elif fnmatch.fnmatchcase(rel, pat):
            return True
    return False


def _written_files(out: Output) -> list[Path]:
    """Existing files in a folder output that its patterns would replace (for the
    hard-link check)."""
    root = out.path.expanduser()
    if not root.is_dir():
        return []
    found: list[Path] = []
    for pat in out.files:
        if pat.endswith("/"):
            sub = root / pat.rstrip("/")
            if sub.is_dir():
                found += [p for p in sub.rglob("*") if p.is_file()]
        else:
            found += [p for p in root.glob(pat) if p.is_file()]
    return found


def _refuse(out: Output, expected: str) -> ParameterError:
    return ParameterError(f"invalid {out.option}: expected {expected}, got {str(out.path)!r}")


# ----------------------------------------------------------------------------- checks


def _check_against_input(out: Output, option: str, src: Path) -> None:
    never = "inputs are never overwritten"
    if same_file(out.path, src):
        raise _refuse(out, f"a path other than the {option} input ({never})")
    src_is_dir = src.expanduser().is_dir()
    if src_is_dir and _inside(out.path, src) is not None:
        raise _refuse(out, f"a path outside the {option} input folder {str(src)!r} "
                           "(inputs are never modified)")
    if out.folder:
        rel = _inside(src, out.path)
        if rel and _matches(rel, out.files):
            raise _refuse(out, f"a folder where the report does not replace the {option} "
                               f"input {str(src)!r} ({never})")
        for pat in out.files:  # a sub-folder it writes may be a symbolic link elsewhere
            sub = out.path.expanduser() / pat.rstrip("/")
            if not pat.endswith("/") or not os.path.lexists(sub):
                continue
            if _inside(src, sub) is not None or (src_is_dir and _inside(sub, src) is not None):
                raise _refuse(out, f"a folder whose {pat} does not lead into the {option} "
                                   f"input {str(src)!r} ({never})")
        if not src_is_dir and any(same_file(p, src) for p in _written_files(out)):
            raise _refuse(out, f"a folder where the report does not replace the {option} "
                               f"input {str(src)!r} (a hard link to it; {never})")


def _check_pair(a: Output, b: Output) -> None:
    if same_file(a.path, b.path):
        raise ParameterError(f"invalid {b.option}: expected a path other than "
                             f"{a.option} {str(a.path)!r}, got {str(b.path)!r}")
    for folder, other in ((a, b), (b, a)):
        if not folder.folder:
            continue
        rel = _inside(other.path, folder.path)
        if rel and _matches(rel, folder.files):
            raise ParameterError(f"invalid {other.option}: expected a path that "
                                 f"{folder.option} {str(folder.path)!r} does not write, "
                                 f"got {str(other.path)!r}")


def _check_kind(out: Output) -> None:
    p = out.path.expanduser()
    if os.path.lexists(p) and not p.exists():
        raise _refuse(out, "a path that is not a broken symbolic link")
    if out.folder and p.exists() and not p.is_dir():
        raise _refuse(out, "a folder (it is an existing file)")
    if not out.folder and p.is_dir():
        raise _refuse(out, "a file path (it is an existing folder)")
    if out.folder and p.is_dir():
        for pat in out.files:
            if pat.endswith("/"):
                sub = p / pat.rstrip("/")
                if sub.exists() and not sub.is_dir():
                    raise _refuse(out, f"a folder whose {pat} is a folder (it is a file)")
            elif "*" not in pat and (p / pat).is_dir():
                raise _refuse(out, f"a folder whose {pat} is a file (it is a folder)")


def _check_writable(out: Output) -> None:
    p = out.path.expanduser()
    start = p if out.folder else p.parent
    start = start if str(start) else Path(".")
    nearest = start
    while not nearest.exists():
        if os.path.lexists(nearest):
            raise _refuse(out, f"a path without broken symbolic links ({str(nearest)!r} "
                               "is one)")
        parent = nearest.parent
        if parent == nearest:
            break
        nearest = parent
    if not nearest.is_dir():
        raise _refuse(out, f"a path whose folders are folders ({str(nearest)!r} is a file)")
    reason = _cannot_write(nearest)
    if reason:
        raise _refuse(out, f"a place this process can write to (cannot create files in "
                           f"{str(nearest)!r}: {reason})")


def _cannot_write(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None when one can)."""
    effective = os.access in os.supports_effective_ids
    if not os.access(folder, os.W_OK | os.X_OK, effective_ids=effective):
        return "permission denied"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None
