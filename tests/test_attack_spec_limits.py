"""Attack specs are typed by people and read from untrusted sidecars: a hostile spec is a
one-line error naming the problem, never an internal error."""

from __future__ import annotations

import pytest

from tests._cli import run_cli
from trojanscan.attacks.spec import MAX_DEPTH, MAX_SPEC_CHARS, parse_attack
from trojanscan.exceptions import ParameterError


@pytest.mark.parametrize("spec", [
    "badnets:pattern=" + "(" * 1500 + "1" + ")" * 1500,   # was RecursionError
    "badnets:pattern=" + "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1),
    "badnets:pattern=(1,(2,3))",                          # was an internal ValueError
    "badnets:target=" + "9" * (MAX_SPEC_CHARS + 1),
])
def test_hostile_attack_spec_is_a_parameter_error(spec: str) -> None:
    with pytest.raises(ParameterError) as info:
        parse_attack(spec)
    assert "\n" not in str(info.value)


def test_nesting_within_the_limit_still_parses() -> None:
    attack = parse_attack("source:source=(1,2),target=0")
    assert attack is not None and tuple(attack.source) == (1, 2)


def test_train_with_a_deeply_nested_spec_exits_2_one_line(capsys, tmp_path) -> None:
    spec = "badnets:pattern=" + "(" * 1500 + "1" + ")" * 1500
    res = run_cli(capsys, "train", "--dataset", "digits:train", "--attack", spec,
                  "--out", str(tmp_path / "m.pt"), "--quiet")
    assert res.code == 2
    lines = [line for line in res.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "internal error" not in res.err, res.err
    assert not (tmp_path / "m.pt").exists()


def test_pattern_file_never_tries_the_eps_decoder(tmp_path) -> None:
    # an EPS document named .png: Pillow would pick its EPS decoder from the bytes and try
    # to start Ghostscript; a pattern file is decoded only as a plain raster image
    fake = tmp_path / "trigger.png"
    fake.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n")
    with pytest.raises(ParameterError) as info:
        parse_attack(f"badnets:pattern={fake}")
    assert "readable" in str(info.value) and "Ghostscript" not in str(info.value)
