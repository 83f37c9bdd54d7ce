"""Tiny input files for the output-check and input-integrity tests, one-line-error
checks, and a guard that fails a test as soon as a command starts real work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import CliResult
from _data_poisoning_fixtures import PassThrough, planted_images
from trojanscan.io.data import save_npz

SIDECAR = {"arch": "mlp", "attack": {"spec": "badnets:target=0,size=2,margin=0"},
           "train_config": {"epochs": 2, "batch_size": 64, "lr": 0.003,
                            "weight_decay": 0.0, "lr_decay": True}}


def make_files(root: Path) -> dict[str, Path]:
    """A 1×4×4 TorchScript model with its sidecar, a poisoned training set, clean data,
    unlabelled inputs, an image-folder data set and a reference folder."""
    root.mkdir(parents=True, exist_ok=True)
    model = root / "model.pt"
    torch.jit.save(torch.jit.script(PassThrough().eval()), str(model))
    (root / "model.json").write_text(json.dumps(SIDECAR))
    train = save_npz(root / "train.npz", planted_images(poison=30).data)
    clean = save_npz(root / "clean.npz", planted_images(poison=0, seed=1).data)
    inputs = root / "inputs.npz"
    x = planted_images(poison=0, seed=2).data.x[:40].numpy()
    np.savez(inputs, x=np.rint(x * 255).astype(np.uint8))
    imgs = root / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (imgs / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8)).save(
                imgs / c / f"{i}.png")
    refs = root / "refs" / "clean-1"
    refs.mkdir(parents=True)
    (refs / "report.json").write_text('{"command": "scan"}\n')
    return {"root": root, "model": model, "sidecar": root / "model.json", "train": train,
            "clean": clean, "inputs": inputs, "imgs": imgs, "refs": refs.parent,
            "ref_report": refs / "report.json"}


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (by relative path)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def digests(paths: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in paths:
        out.update(digest(p))
    return out


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (to see that nothing appeared)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line_error(r: CliResult, *needles: str) -> None:
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2, (r.code, r.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    for n in needles:
        assert n in r.err, (n, r.err)


class WorkStarted(BaseException):
    """Raised by the guards below: a BaseException, so no command can swallow it."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every loading/training/scanning entry point of the commands with one that
    fails the test: outputs must be refused before any of them runs."""
    started: list[str] = []

    def guard(name: str):  # type: ignore[no-untyped-def]
        def fn(*args: object, **kwargs: object) -> None:
            started.append(name)
            raise WorkStarted(name)
        return fn

    for target in ("trojanscan.commands.scan.load_inputs",
                   "trojanscan.commands.filter.load_inputs",
                   "trojanscan.commands.mitigate.load_inputs",
                   "trojanscan.io.data.load_dataset",
                   "trojanscan.io.models.load_model",
                   "trojanscan.zoo.make_model",
                   "trojanscan.commands.demo._plan"):
        monkeypatch.setattr(target, guard(target))
    return started


def files_fixture(name: str):  # type: ignore[no-untyped-def]
    """A module-scoped fixture ``f``: :func:`make_files` under a fresh folder ``name``,
    made once for the test module that assigns it (``f = files_fixture("inputs")``)."""

    @pytest.fixture(scope="module")
    def f(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        return make_files(tmp_path_factory.mktemp(name))

    return f
