"""Bad options get one line on stderr and exit code 2, before any work starts.

Seeds, devices, every float and integer option of every command (``mntd train``
included), detector ``--param`` values, and Click's usage errors (which print three
lines of their own).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests._cli import CliResult, run_cli
from trojanscan import archs
from trojanscan.commands._options import SEED_MAX, check_device, check_seed
from trojanscan.exceptions import ParameterError

Cap = pytest.CaptureFixture[str]
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated:DeprecationWarning")


def assert_one_line(r: CliResult, *needles: str) -> str:
    """Exit 2, exactly one non-empty line on stderr, no traceback or catch-all."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.code == 2, (r.code, r.err)
    assert len(lines) == 1, r.err
    assert "internal error" not in r.err and "Traceback" not in r.err, r.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("m") / "m.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(archs.build("mlp", (1, 8, 8), 10).eval()), str(path))
    return path


def _commands(model: Path, tmp: Path) -> dict[str, list[str]]:
    """A valid invocation of each command that takes --seed and --device."""
    out = str(tmp / "out")
    return {
        "scan": ["scan", str(model), "--data", "digits", "--out", out],
        "scan-data": ["scan-data", "digits", "--model", str(model), "--out", out],
        "filter": ["filter", str(model), "digits", "--calibrate", "digits", "--out", out],
        "guard": ["guard", str(model), "--calibrate", "digits", "--port", "0"],
        "train": ["train", "--dataset", "digits", "--out", str(tmp / "t.pt")],
        "mitigate": ["mitigate", str(model), "--data", "digits", "--out", str(tmp / "r.pt"),
                     "--report", out],
        "demo": ["demo", "--out", out],
        "scan-zoo": ["scan-zoo", str(model.parent), "--data", "digits", "--out", out],
        "mntd train": ["mntd", "train", "--data", "digits", "--out", out],
    }


COMMANDS = ("scan", "scan-data", "filter", "guard", "train", "mitigate", "demo", "scan-zoo",
            "mntd train")


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("command", COMMANDS)
def test_seed_beyond_64_bits_one_line(capsys: Cap, tmp_path: Path, model_file: Path,
                                      command: str) -> None:
    args = _commands(model_file, tmp_path)[command]
    r = run_cli(capsys, *args, "--seed", str(2**70))
    assert_one_line(r, "--seed", str(2**70), str(SEED_MAX))
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.pt").exists()


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64 - 1, 2**64])
def test_seed_outside_documented_range_one_line(capsys: Cap, tmp_path: Path,
                                                model_file: Path, seed: int) -> None:
    args = _commands(model_file, tmp_path)["scan"]
    assert_one_line(run_cli(capsys, *args, "--seed", str(seed)), "--seed", str(seed))


def test_seed_range_is_exactly_0_to_2_32_minus_1() -> None:
    assert check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX == 2**32 - 1
    for bad in (-1, SEED_MAX + 1, True, 1.0, "3"):
        with pytest.raises(ParameterError, match="--seed"):
            check_seed(bad)


def test_largest_seed_runs_end_to_end(capsys: Cap, tmp_path: Path, model_file: Path) -> None:
    """The top of the range is usable: seeds are derived (seed + k) without overflow."""
    r = run_cli(capsys, "filter", str(model_file), "digits", "--calibrate", "digits",
                "--out", str(tmp_path / "f"), "--seed", str(SEED_MAX), "--param",
                "n_overlays=4", "--param", "max_samples=200", "-q")
    assert r.code in (0, 1), r.err
    r = run_cli(capsys, "train", "--dataset", "digits:train", "--test-data", "digits:test",
                "--arch", "mlp", "--epochs", "1", "--seed", str(SEED_MAX),
                "--out", str(tmp_path / "t.pt"), "-q")
    assert r.code == 0, r.err


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("command", COMMANDS)
def test_device_bogus_one_line(capsys: Cap, tmp_path: Path, model_file: Path,
                               command: str) -> None:
    args = _commands(model_file, tmp_path)[command]
    assert_one_line(run_cli(capsys, *args, "--device", "bogus"), "--device", "'bogus'",
                    "cuda:N")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:7"])
def test_device_cuda_without_cuda_one_line(capsys: Cap, tmp_path: Path, model_file: Path,
                                           monkeypatch: pytest.MonkeyPatch, device: str
                                           ) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("scan", "filter", "mntd train"):
        args = _commands(model_file, tmp_path)[command]
        assert_one_line(run_cli(capsys, *args, "--device", device), "--device",
                        "CUDA is not available", device)


def test_device_cuda_index_beyond_gpus_one_line(capsys: Cap, tmp_path: Path,
                                                model_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = _commands(model_file, tmp_path)["scan"]
    assert_one_line(run_cli(capsys, *args, "--device", "cuda:7"), "'cuda:7'", "cuda:0",
                    "1 GPU visible")
    assert check_device("cuda:0") == "cuda:0" and check_device(" CUDA ") == "cuda"


@pytest.mark.parametrize("device", ["cpu:0", "gpu", "cuda:-1", "cuda:x", "", "mps:0"])
def test_device_malformed_refused(device: str) -> None:
    with pytest.raises(ParameterError, match="--device"):
        check_device(device)
    assert check_device("auto") == "auto" and check_device("CPU") == "cpu"


# ----------------------------------------------------------------------------- floats


def test_lr_inf_refused(capsys: Cap, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    for lr in ("inf", "nan", "-inf", "0", "-0.1"):
        r = run_cli(capsys, "train", "--dataset", "digits:train", "--test-data", "digits:test",
                    "--arch", "mlp", "--epochs", "1", "--lr", lr, "--out", str(out))
        assert_one_line(r, "--lr", "finite number > 0")
        assert not out.exists() and not out.with_suffix(".safetensors").exists()


FLOAT_CASES = [
    ("filter", "--frr", "nan"), ("filter", "--frr", "inf"), ("filter", "--frr", "0"),
    ("filter", "--frr", "1"), ("guard", "--frr", "nan"), ("guard", "--frr", "-inf"),
    ("scan-data", "--poison-rate-bound", "nan"), ("scan-data", "--poison-rate-bound", "0.9"),
    ("train", "--poison-rate", "nan"), ("train", "--poison-rate", "inf"),
    ("train", "--poison-rate", "1"),
    ("mitigate", "--stamp-fraction", "nan"), ("mitigate", "--dilate", "inf"),
    ("mitigate", "--distill", "nan"), ("mitigate", "--distill", "1.5"),
    ("mntd train", "--share", "nan"), ("mntd train", "--share", "0"),
    ("mntd train", "--data-query-eps", "inf"), ("mntd train", "--query-holdout", "nan"),
]


@pytest.mark.parametrize(("command", "flag", "value"), FLOAT_CASES)
def test_float_options_must_be_finite_and_in_range(capsys: Cap, tmp_path: Path,
                                                   model_file: Path, command: str, flag: str,
                                                   value: str) -> None:
    args = _commands(model_file, tmp_path)[command]
    line = assert_one_line(run_cli(capsys, *args, flag, value), flag, "finite number")
    assert line.endswith(f"got {float(value)!r}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.pt").exists()


# ----------------------------------------------------------------------------- integers


def test_mntd_max_samples_negative_refused(capsys: Cap, tmp_path: Path, model_file: Path
                                           ) -> None:
    args = _commands(model_file, tmp_path)["mntd train"]
    for value in ("-1", "0"):
        assert_one_line(run_cli(capsys, *args, "--max-samples", value, "--no-ray"),
                        "--max-samples", "an integer >= 1", f"got {value}")
    assert not (tmp_path / "out").exists()


INT_CASES = [
    ("scan", "--max-samples", "0"), ("scan", "--max-samples", "-1"),
    ("train", "--epochs", "0"), ("train", "--batch-size", "0"),
    ("demo", "--jobs", "0"), ("guard", "--port", "70000"), ("guard", "--port", "-1"),
    ("guard", "--max-batch", "0"), ("mitigate", "--refresh", "-1"),
    ("mitigate", "--unlearn-epochs", "0"),
    ("mntd train", "--num-shadows", "1"), ("mntd train", "--num-val", "0"),
    ("mntd train", "--shadow-epochs", "0"), ("mntd train", "--meta-epochs", "-3"),
    ("mntd train", "--queries", "0"), ("mntd train", "--data-members", "-1"),
    ("mntd train", "--stamp-members", "65"), ("mntd train", "--workers", "0"),
    ("mntd train", "--reference-models", "-2"),
]


@pytest.mark.parametrize(("command", "flag", "value"), INT_CASES)
def test_integer_options_in_range(capsys: Cap, tmp_path: Path, model_file: Path,
                                  command: str, flag: str, value: str) -> None:
    args = _commands(model_file, tmp_path)[command]
    assert_one_line(run_cli(capsys, *args, flag, value), flag, f"got {value}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.pt").exists()


# ----------------------------------------------------------------------------- --param


def test_param_nan_refused(capsys: Cap, tmp_path: Path, model_file: Path) -> None:
    cmds = _commands(model_file, tmp_path)
    for value in ("nan", "NaN", "inf", "-Infinity", "1e999"):
        r = run_cli(capsys, *cmds["scan"], "--param", f"mntd.threshold={value}")
        assert_one_line(r, "mntd.threshold", "finite number", repr(value))
        r = run_cli(capsys, *cmds["filter"], "--param", f"frr={value}")
        assert_one_line(r, "frr", "finite number")
    r = run_cli(capsys, *cmds["filter"], "--param", "n_overlays=[4, NaN]")
    assert_one_line(r, "n_overlays", "finite number")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "param", "needles"), [
    ("scan", "mntd.threshold=abc", ("invalid mntd.threshold", "finite number or null",
                                    "'abc'")),
    ("scan", "neural_cleanse.n_samples=1.5", ("neural_cleanse.n_samples", "an integer",
                                              "1.5")),
    ("scan", "neural_cleanse.images=3", ("neural_cleanse.images", "true or false", "3")),
    ("filter", "n_overlays=many", ("strip.n_overlays", "an integer", "'many'")),
    ("filter", "blend=3", ("strip.blend", "a string", "3")),
    ("guard", "n_overlays=true", ("strip.n_overlays", "an integer", "True")),
])
def test_param_of_wrong_type_names_parameter_allowed_and_received(
        capsys: Cap, tmp_path: Path, model_file: Path, command: str, param: str,
        needles: tuple[str, ...]) -> None:
    args = _commands(model_file, tmp_path)[command]
    assert_one_line(run_cli(capsys, *args, "--param", param), *needles)


# ----------------------------------------------------------------------------- usage


@pytest.mark.parametrize(("args", "path", "needle"), [
    (["scan"], "trojanscan scan", "Missing argument"),
    (["scan", "m.pt", "--bogus"], "trojanscan scan", "No such option: --bogus"),
    (["filter", "m.pt", "x"], "trojanscan filter", "Missing option '--calibrate'"),
    (["train", "--dataset", "digits", "--out", "x.pt", "--bogus"], "trojanscan train",
     "No such option: --bogus"),
    (["scan", "m.pt", "--data", "digits", "--seed", "abc"], "trojanscan scan", "--seed"),
    (["nosuchcommand"], "trojanscan", "No such command"),
    (["mntd", "train"], "trojanscan mntd train", "Missing option '--data'"),
    (["mntd", "train", "--data", "digits", "--out", "o", "--bogus"], "trojanscan mntd train",
     "No such option: --bogus"),
    (["mntd", "nope"], "trojanscan mntd", "No such command"),
])
def test_usage_error_one_line(capsys: Cap, args: list[str], path: str, needle: str) -> None:
    line = assert_one_line(run_cli(capsys, *args), needle)
    assert line.startswith(f"{path}: error: ")
    assert line.endswith(f"(see {path} --help)")


def test_help_output_is_unchanged(capsys: Cap) -> None:
    for args in (["--help"], ["scan", "--help"], ["mntd", "train", "--help"]):
        r = run_cli(capsys, *args)
        assert r.code == 0 and "Usage:" in r.out and r.err == ""


def test_scan_zoo_numbers_checked_before_any_work(capsys: Cap, tmp_path: Path) -> None:
    base = ["scan-zoo", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "z")]
    for flag, value, needle in (("--model-timeout", "nan", "finite number > 0"),
                                ("--model-timeout", "0", "finite number > 0"),
                                ("--workers", "-1", "integer >= 0"),
                                ("--max-samples", "0", "integer >= 1")):
        assert_one_line(run_cli(capsys, *base, flag, value), flag, needle)
    assert not (tmp_path / "z").exists()


def test_every_numeric_option_has_a_rule() -> None:
    """A new int or float option (or a seed/device) of any command is checked too."""
    import typing

    from trojanscan import cli
    from trojanscan.commands import mntd_cli
    from trojanscan.commands._options import FLOAT_RULES, INT_RULES

    functions = [cli.demo, cli.scan, cli.scan_data, cli.scan_zoo, cli.filter_, cli.guard,
                 cli.train, cli.mitigate, mntd_cli.train]
    unchecked = []
    for f in functions:
        for name, hint in typing.get_type_hints(f).items():
            args = set(typing.get_args(hint)) | {hint}
            if (args & {int, float}) and name not in {*FLOAT_RULES, *INT_RULES, "seed"}:
                unchecked.append(f"{f.__name__}: {name}")
    assert not unchecked
