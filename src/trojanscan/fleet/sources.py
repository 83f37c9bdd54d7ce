"""Which models a zoo holds: a folder of model files or a manifest, plus ground truth.

* A **folder** is searched recursively for model files by extension
  (:data:`MODEL_SUFFIXES`); hidden files and folders are skipped, and so is a
  ``.safetensors`` file beside a same-named TorchScript/ONNX file (``trojanscan train``
  writes both: the pair is one model). The format itself is recognised from the content
  when the model is loaded, as ``scan`` does.
* A **manifest** is a ``.csv`` file with a header naming a ``path`` column (optional
  ``arch`` and ``label`` columns) or a ``.jsonl`` file with one object per line
  (``{"path": ..., "arch": ..., "label": ...}``). Relative paths are relative to the
  manifest's folder. Every listed file must exist; paths may not repeat.
* **Labels** (``--labels``): a CSV with the header ``path,label``, ``path`` relative to
  SOURCE (the folder, or the manifest's folder), ``label`` ``1``/``0`` or
  ``backdoored``/``clean``.

Everything here only reads; a bad file raises :class:`ParameterError` naming the option,
the line and what was expected.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..exceptions import ParameterError

#: file name endings searched for in a SOURCE folder
MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript", ".onnx", ".safetensors",
                  ".ckpt", ".bin")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
_LABEL_WORDS = {"1": 1, "0": 0, "backdoored": 1, "clean": 0}


@dataclass(frozen=True)
class ZooEntry:
    """One model of a zoo: its report folder ``name`` (unique), where the file is,
    the path as SOURCE names it (``shown``), an optional ``arch`` and ground truth."""

    name: str
    path: Path
    shown: str
    arch: str | None = None
    label: int | None = None


def _bad(option: str, expected: str, got: Any) -> ParameterError:
    return ParameterError(f"invalid {option}: expected {expected}, got {got!r}")


def parse_label(value: Any, where: str) -> int | None:
    """``1``/``0``/``backdoored``/``clean`` (any case; booleans too) → 1/0; empty → None."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    key = str(value).strip().lower()
    if key in _LABEL_WORDS:
        return _LABEL_WORDS[key]
    raise ParameterError(f"invalid {where}: expected a label 1/0 or backdoored/clean, "
                         f"got {value!r}")


def report_name(rel: str) -> str:
    """A folder name for a model's report from its path relative to SOURCE."""
    text = rel.replace("\\", "/").strip("/")
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "__"))
    text = text.lstrip(".") or "model"
    return text[:150]


def _unique(names: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        key = n.lower()  # also unique on case-insensitive file systems
        if key in seen:
            seen[key] += 1
            n = f"{n}-{seen[key]}"
            key = n.lower()
        seen.setdefault(key, 1)
        out.append(n)
    return out


def discover(source: str | os.PathLike[str], *, arch: str | None = None) -> list[ZooEntry]:
    """The models of ``source`` (a folder or a manifest), in a stable order."""
    src = Path(source).expanduser()
    if src.is_dir():
        entries = _from_folder(src, arch)
        what = f"a folder holding model files ({', '.join(MODEL_SUFFIXES)})"
    elif src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".csv":
            entries = _from_csv(src, arch)
        elif suffix == ".jsonl":
            entries = _from_jsonl(src, arch)
        else:
            raise _bad("SOURCE", "a folder of models or a manifest (.csv, .jsonl)", str(source))
        what = "a manifest listing at least one model"
    else:
        raise _bad("SOURCE", "an existing folder of models or manifest (.csv, .jsonl)",
                   str(source))
    if not entries:
        raise _bad("SOURCE", what, str(source))
    names = _unique(e.name for e in entries)
    return [replace(e, name=n) for e, n in zip(entries, names)]


def source_root(source: str | os.PathLike[str]) -> Path:
    """The folder that relative paths (manifest rows, labels) are relative to."""
    src = Path(source).expanduser()
    return src if src.is_dir() else src.parent


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _from_folder(root: Path, arch: str | None) -> list[ZooEntry]:
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in MODEL_SUFFIXES and not _hidden(p.relative_to(root))
                   and p.is_file())
    stems = {p.with_suffix("") for p in files if p.suffix.lower() != ".safetensors"}
    out = []
    for p in files:
        if p.suffix.lower() == ".safetensors" and p.with_suffix("") in stems:
            continue  # the weights twin of a TorchScript/ONNX file: one model
        rel = p.relative_to(root).as_posix()
        out.append(ZooEntry(report_name(rel), p, str(p), arch))
    return out


def _builtin() -> list[str]:
    from ..archs import ARCHS

    return sorted(ARCHS)


def _row_entry(manifest: Path, where: str, row: dict[str, Any], arch: str | None,
               seen: dict[Path, str]) -> ZooEntry:
    raw = row.get("path")
    if not isinstance(raw, str) or not raw.strip():
        raise _bad(f"SOURCE manifest ({where})", "a non-empty 'path'", raw)
    p = Path(raw.strip()).expanduser()
    full = p if p.is_absolute() else manifest.parent / p
    if not full.is_file():
        raise _bad(f"SOURCE manifest ({where})", "a path to an existing model file",
                   raw.strip())
    key = Path(os.path.realpath(full))
    if key in seen:
        raise _bad(f"SOURCE manifest ({where})", f"each model once ({seen[key]} lists it "
                   "already)", raw.strip())
    seen[key] = where
    row_arch = row.get("arch")
    if row_arch is not None and not isinstance(row_arch, str):
        raise _bad(f"SOURCE manifest ({where})", "'arch' as text", row_arch)
    if isinstance(row_arch, str) and row_arch.strip() and row_arch.strip() not in _builtin():
        # a manifest travels with the models it lists: like a sidecar it never chooses code
        raise _bad(f"SOURCE manifest ({where}) arch",
                   f"a built-in architecture ({', '.join(_builtin())}); a "
                   "package.module:factory is taken only from --arch", row_arch.strip()[:80])
    label = parse_label(row.get("label"), f"SOURCE manifest ({where}) label")
    rel = raw.strip() if not p.is_absolute() else p.name
    return ZooEntry(report_name(rel), full, str(full), (row_arch or "").strip() or arch, label)


def _from_csv(manifest: Path, arch: str | None) -> list[ZooEntry]:
    rows = _read_csv(manifest, "SOURCE manifest", required=("path",),
                     allowed=("path", "arch", "label"))
    seen: dict[Path, str] = {}
    return [_row_entry(manifest, f"line {line}", row, arch, seen) for line, row in rows]


def _from_jsonl(manifest: Path, arch: str | None) -> list[ZooEntry]:
    text = _read_text(manifest, "SOURCE manifest")
    seen: dict[Path, str] = {}
    out = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError:
            raise _bad(f"SOURCE manifest (line {line})", "a JSON object per line",
                       raw[:60]) from None
        if not isinstance(row, dict):
            raise _bad(f"SOURCE manifest (line {line})", "a JSON object per line", raw[:60])
        extra = sorted(set(row) - {"path", "arch", "label"})
        if extra:
            raise _bad(f"SOURCE manifest (line {line})", "only the keys path, arch, label",
                       extra)
        out.append(_row_entry(manifest, f"line {line}", row, arch, seen))
    return out


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _bad(option, "a UTF-8 text file", str(path)) from None
    except OSError as exc:
        raise _bad(option, "a readable file", f"{path} ({exc.strerror})") from None


def _read_csv(path: Path, option: str, *, required: tuple[str, ...],
              allowed: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    text = _read_text(path, option)
    try:
        reader = csv.reader(text.splitlines())
        header = next(reader, None)
        if header is None:
            raise _bad(option, f"a CSV file with a header ({','.join(allowed)})", "an empty file")
        cols = [h.strip().lower() for h in header]
        missing = [c for c in required if c not in cols]
        unknown = [c for c in cols if c not in allowed]
        if missing or unknown or len(set(cols)) != len(cols):
            raise _bad(option, f"a CSV header with the columns {', '.join(required)} "
                       f"(allowed: {', '.join(allowed)}; each once)", ",".join(header))
        rows = []
        for line, values in enumerate(reader, 2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(cols):
                raise _bad(f"{option} (line {line})", f"{len(cols)} fields", len(values))
            rows.append((line, dict(zip(cols, values))))
    except csv.Error as exc:
        raise _bad(option, "a valid CSV file", str(exc)) from None
    return rows


def read_labels(path: str | os.PathLike[str], entries: list[ZooEntry],
                root: Path) -> list[ZooEntry]:
    """``entries`` with their ``label`` from a ``path,label`` CSV (paths relative to
    ``root``). A path that names no model of the zoo, or a model named twice, is an
    error; models the file does not name keep their label (or none)."""
    rows = _read_csv(Path(path), "--labels", required=("path", "label"),
                     allowed=("path", "label"))
    by_path = {os.path.realpath(e.path): i for i, e in enumerate(entries)}
    out = list(entries)
    seen: set[int] = set()
    for line, row in rows:
        rel = row["path"].strip()
        i = by_path.get(os.path.realpath(root / rel)) if rel else None
        if i is None:
            raise _bad(f"--labels (line {line})", "a path of a model in SOURCE (relative to "
                       f"{str(root)!r})", rel)
        if i in seen:
            raise _bad(f"--labels (line {line})", "each model once", rel)
        seen.add(i)
        out[i] = replace(out[i], label=parse_label(row["label"], f"--labels (line {line})"))
    return out
