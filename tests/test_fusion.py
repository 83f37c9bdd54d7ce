"""The fusion rule on hand-made evidence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trojanscan.maths.fusion import Evidence, effective_p, fuse


def test_no_detector_is_clean() -> None:
    f = fuse([])
    assert not f.backdoored and f.p_value == 1.0 and f.score == 0.0


def test_bonferroni_min_p() -> None:
    ev = [Evidence("a", True, 0.01, (3,)), Evidence("b", False, 0.5)]
    f = fuse(ev, alpha=0.05)
    assert f.backdoored and f.p_value == pytest.approx(0.02) and f.suspected_targets == (3,)
    assert f.decisive == "a"
    # the same evidence among more detectors is weaker
    f3 = fuse([*ev, Evidence("c", False, 0.9)], alpha=0.05)
    assert f3.p_value == pytest.approx(0.03)
    assert not fuse([Evidence("a", True, 0.03), Evidence("b", False, 0.5)]).backdoored


def test_verdict_only_detectors_carry_their_verdict() -> None:
    assert effective_p(Evidence("x", True, None)) == 0.0
    assert effective_p(Evidence("x", False, None)) == 1.0
    assert effective_p(Evidence("x", False, float("nan"))) == 1.0
    f = fuse([Evidence("x", True, None, (1, 2)), Evidence("y", False, 0.2)])
    assert f.backdoored and f.suspected_targets == (1, 2)


def test_targets_union_of_significant_detectors() -> None:
    f = fuse([Evidence("a", True, 0.001, (1,)), Evidence("b", True, 0.004, (2, 1)),
              Evidence("c", True, 0.4, (7,))], alpha=0.05)
    assert f.suspected_targets == (1, 2)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=6), st.floats(0.001, 0.5))
def test_fused_p_is_monotone_and_bounded(ps: list[float], alpha: float) -> None:
    ev = [Evidence(str(i), p < 0.01, p) for i, p in enumerate(ps)]
    f = fuse(ev, alpha=alpha)
    assert 0.0 <= f.p_value <= 1.0 and f.score == pytest.approx(1 - f.p_value)
    assert f.p_value >= min(ps) - 1e-12
    # lowering any p-value never raises the fused p-value
    lowered = [Evidence(e.name, e.backdoored, (e.p_value or 0) / 2) for e in ev]
    assert fuse(lowered, alpha=alpha).p_value <= f.p_value + 1e-12


def test_alpha_validated() -> None:
    with pytest.raises(ValueError, match="alpha"):
        fuse([Evidence("a", True, 0.1)], alpha=1.5)
