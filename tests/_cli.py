"""Run the CLI in-process and capture its exit code and output."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from trojanscan.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    code = info.value.code
    return CliResult(code if isinstance(code, int) else 2, captured.out, captured.err)
