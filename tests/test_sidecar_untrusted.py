"""The JSON beside a model is as untrusted as the model: it never chooses code.

Only ``--arch`` chooses the network that ``scan-data --verify`` and Activation
Clustering's reclassification retrain; a sidecar's ``arch`` is at most quoted in an
error message. Its attack spec is parsed into the built-in attack library only, and its
training settings are used only when they are plain numbers in range — anything else is
a warning, never a crash or a run that does not end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _cli import run_cli
from _hardening_files import (  # noqa: F401  (no_work is a fixture)
    assert_one_line_error,
    make_files,
    no_work,
)
from trojanscan.commands.scan_data import (
    read_sidecar,
    sidecar_attack,
    sidecar_hint,
    sidecar_train_config,
)
from trojanscan.exceptions import TrojanscanWarning


@pytest.fixture
def f(tmp_path: Path) -> dict[str, Path]:
    return make_files(tmp_path / "in")


def _with_sidecar(f: dict[str, Path], sidecar: dict[str, object]) -> None:
    f["sidecar"].write_text(json.dumps(sidecar))


def _evil_module(root: Path) -> tuple[Path, Path]:
    """A factory file that leaves a marker when it is imported or called."""
    marker = root / "imported.marker"
    evil = root / "evil.py"
    evil.write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "def f(*args, **kwargs):\n"
        f"    Path({str(marker)!r}).write_text('called')\n"
        "    import torch\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))\n")
    return evil, marker


def _scan_data(f: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["scan-data", str(f["train"]), "--model", str(f["model"]), "--out", str(out),
            "--device", "cpu", "--quiet", *extra]


def test_sidecar_arch_never_imported(f: dict[str, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    evil, marker = _evil_module(tmp_path)
    _with_sidecar(f, {"arch": f"{evil}:f", "train_config": {"epochs": 1}})
    # --verify without --arch: refused before work, the sidecar's name only quoted
    r = run_cli(capsys, *_scan_data(f, tmp_path / "rep", "--detectors", "spectre", "--verify"))
    assert not marker.exists()
    assert_one_line_error(r, "--arch", "evil.py:f", "if you trust it")
    assert not (tmp_path / "rep").exists()
    # Activation Clustering's reclassification retrains: not with the sidecar's factory
    r = run_cli(capsys, *_scan_data(f, tmp_path / "ac", "--detectors",
                                    "activation_clustering", "--poison-rate-bound", "0.1"))
    assert r.code in (0, 1), r.err
    assert not marker.exists()
    doc = json.loads((tmp_path / "ac" / "report.json").read_text())
    assert doc["params"]["arch"] is None
    notes = doc["detectors"]["activation_clustering"]["warnings"]
    assert any("reclassification skipped" in n and "--arch" in n for n in notes), notes
    # with --arch, --arch is what is retrained
    r = run_cli(capsys, *_scan_data(f, tmp_path / "v", "--detectors", "spectre", "--verify",
                                    "--arch", "mlp"))
    assert r.code == 1, r.err
    assert not marker.exists()
    v = json.loads((tmp_path / "v" / "report.json").read_text())["verification"]
    assert v["arch"] == "mlp"


def test_sidecar_sys_exit_not_called(f: dict[str, Path], tmp_path: Path,
                                     no_work: list[str],  # noqa: F811
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A sidecar naming ``sys:exit`` once made a poisoned set exit 0 with no report."""
    _with_sidecar(f, {"arch": "sys:exit"})
    r = run_cli(capsys, *_scan_data(f, tmp_path / "rep", "--detectors", "spectre", "--verify"))
    assert_one_line_error(r, "--arch", "sys:exit")
    assert no_work == [] and not (tmp_path / "rep").exists()


def test_sidecar_os_abort_not_called(f: dict[str, Path], tmp_path: Path) -> None:
    """A sidecar naming ``os:abort`` once killed the process (checked in a child)."""
    _with_sidecar(f, {"arch": "os:abort"})
    proc = subprocess.run([sys.executable, "-m", "trojanscan",
                           *_scan_data(f, tmp_path / "rep", "--detectors", "spectre",
                                       "--verify")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "os:abort" in proc.stderr and "--arch" in proc.stderr


def test_sidecar_builtin_arch_needs_the_flag(f: dict[str, Path], tmp_path: Path,
                                             no_work: list[str],  # noqa: F811
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Even a built-in name from the sidecar is not taken: --arch says what runs."""
    _with_sidecar(f, {"arch": "mlp"})
    r = run_cli(capsys, *_scan_data(f, tmp_path / "rep", "--detectors", "spectre", "--verify"))
    assert_one_line_error(r, "pass --arch mlp if you trust it")
    assert no_work == [] and not (tmp_path / "rep").exists()


def test_sidecar_malicious_attack_spec_is_a_warning(f: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A spec that would exhaust the parser's recursion is a warning, not a crash; the
    verification runs without an attack success rate."""
    _with_sidecar(f, {"attack": {"spec": "badnets:location=" + "(" * 1500 + "1"},
                      "train_config": {"epochs": 1}})
    r = run_cli(capsys, *_scan_data(f, tmp_path / "rep", "--detectors", "spectre", "--verify",
                                    "--arch", "mlp"))
    assert r.code == 1, r.err
    assert "warning: cannot use the sidecar's attack spec" in r.err
    assert "internal error" not in r.err
    v = json.loads((tmp_path / "rep" / "report.json").read_text())["verification"]
    assert v["asr_before"] is None and v["attack"] is None and v["epochs"] == 1


def test_sidecar_train_config_must_be_plain_and_in_range(f: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """Settings of the wrong type once crashed after the scan; a billion epochs would
    never end: such settings keep their defaults, with a warning naming them."""
    _with_sidecar(f, {"train_config": {"epochs": 1, "batch_size": "64"}})
    r = run_cli(capsys, *_scan_data(f, tmp_path / "rep", "--detectors", "spectre", "--verify",
                                    "--arch", "mlp"))
    assert r.code == 1, r.err
    assert "warning: the sidecar's train_config settings 'batch_size'" in r.err
    assert "internal error" not in r.err
    v = json.loads((tmp_path / "rep" / "report.json").read_text())["verification"]
    assert v["epochs"] == 1
    defaults = sidecar_train_config({"train_config": {}})
    for bad in ({"epochs": 10**9}, {"epochs": True}, {"lr": float("nan")},
                {"batch_size": 0}, {"optimizer": "x"}, {"epochs": 2.5}, {"lr": 1e300}):
        with pytest.warns(TrojanscanWarning, match="train_config"):
            assert sidecar_train_config({"train_config": bad}) == defaults
    cfg = sidecar_train_config({"train_config": {"epochs": 2, "batch_size": 64, "lr": 3e-3,
                                                 "weight_decay": 0, "lr_decay": False}})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.lr_decay) == (
        2, 64, 3e-3, 0.0, False)
    assert sidecar_train_config({"train_config": [1]}) is None


def test_sidecar_hint_and_reading_are_defensive(tmp_path: Path) -> None:
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    for text in ("not json", "[1, 2]", "{" * 100000, '"just a string"'):
        model.with_suffix(".json").write_text(text)
        assert read_sidecar(model) == {}
    hint = sidecar_hint({"arch": "\x1b[31mred\x07" + "x" * 200})
    assert "\x1b" not in hint and "\x07" not in hint and "?[31mred?" in hint
    assert sidecar_hint({"arch": 3}) == sidecar_hint({}) == ""
    assert "pass --arch 'x; rm -rf ~' if" in sidecar_hint({"arch": "x; rm -rf ~"})
    with pytest.warns(TrojanscanWarning, match="attack spec"):
        assert sidecar_attack({"attack": {"spec": "evil.py:f"}}) is None
    assert sidecar_attack({"attack": {"spec": "badnets:target=1"}}).target == 1
