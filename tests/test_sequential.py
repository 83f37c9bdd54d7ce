"""The early-stopping rule of :mod:`trojanscan.maths.sequential` on synthetic score streams.

Its stated bound: an input's early answer differs from the fixed-N answer on the same
draws with probability at most ``delta``; so the false-rejection (and false-acceptance)
rate moves by at most ``delta`` — while inputs far from the threshold stop at the first
look.
"""

from __future__ import annotations

import numpy as np
import pytest

from trojanscan.exceptions import ParameterError
from trojanscan.maths import sequential as seq


def _binomial_slack(p: float, n: int) -> float:
    return 4.0 * float(np.sqrt(p * (1 - p) / n)) + 1.0 / n


def test_look_schedule() -> None:
    assert seq.look_schedule(8, 32) == (8, 16, 32)
    assert seq.look_schedule(8, 100) == (8, 16, 32, 64, 100)
    assert seq.look_schedule(8, 8) == (8,)
    for bad in (1, 2.5, True):
        with pytest.raises(ParameterError, match="n_first"):
            seq.look_schedule(bad, 32)  # type: ignore[arg-type]
    for bad_delta in (0.0, 0.5, float("nan"), "0.1"):
        with pytest.raises(ParameterError, match="delta"):
            seq.check_delta(bad_delta)  # type: ignore[arg-type]


def test_last_look_is_the_fixed_n_test() -> None:
    mean = np.array([0.1, 0.5, 0.50001, np.nan])
    dec = seq.curtailed_decisions(mean, np.zeros(4), 32, 32, 0.5, 10.0)
    assert dec.tolist() == [seq.PASS, seq.PASS, seq.FLAG, seq.FLAG]
    # before the last look, only clear inputs are decided
    dec = seq.curtailed_decisions(np.array([0.1, 0.49, 0.9]), np.full(3, 0.2), 8, 32, 0.5, 3.0)
    assert dec.tolist() == [seq.PASS, seq.CONTINUE, seq.FLAG]


@pytest.mark.parametrize("prior_df", [0.0, 16.0])
@pytest.mark.parametrize("kind", ["normal", "bounded"])
@pytest.mark.parametrize("delta", [0.01, 0.05])
def test_disagreement_with_fixed_n_within_delta(kind: str, delta: float, prior_df: float
                                                ) -> None:
    """Inputs whose means crowd the threshold (the hard case): the share whose early
    answer differs from the fixed-N answer stays within delta."""
    rng = np.random.default_rng(0)
    b, n_total, tau = 20000, 64, 0.5
    if kind == "normal":
        sigma = rng.uniform(0.05, 0.3, b)
        mu = tau + rng.normal(0, 1, b) * sigma / np.sqrt(n_total) * 3
        values = rng.normal(mu[:, None], sigma[:, None], (b, n_total))
    else:  # values in [0, 1], e.g. a probability per overlay
        mu = np.clip(tau + rng.normal(0, 0.1, b), 0.02, 0.98)
        conc = rng.uniform(2, 20, b)
        values = rng.beta((mu * conc)[:, None], ((1 - mu) * conc)[:, None], (b, n_total))
    # the moderated variant borrows the typical spread, as STRIP borrows its clean inputs'
    prior_var = float(np.median(values[:2000].var(1, ddof=1)))
    flags, used, score = seq.replay(values, tau, n_first=8, delta=delta,
                                    prior_var=prior_var, prior_df=prior_df)
    fixed = values.mean(1) > tau
    disagree = float((flags != fixed).mean())
    assert disagree <= delta + _binomial_slack(delta, b), (disagree, delta)
    # the score is the mean at the stop, and the answer is its side of the threshold
    assert np.array_equal(flags, score > tau)
    assert used.min() >= 8 and used.max() <= n_total


def test_false_rejections_move_by_at_most_delta_and_clear_inputs_stop_early() -> None:
    """Clean-like streams (the threshold at their 1% quantile) and triggered-like ones."""
    rng = np.random.default_rng(1)
    b, n_total, delta = 20000, 96, 0.002
    mu = rng.beta(2, 5, b)  # per-input mean confidence, as clean inputs under overlays
    conc = 6.0
    clean = rng.beta((mu * conc)[:, None], ((1 - mu) * conc)[:, None], (b, n_total))
    tau = float(np.quantile(clean.mean(1), 0.99))
    flags, used, _ = seq.replay(clean, tau, n_first=8, delta=delta)
    frr_fixed = float((clean.mean(1) > tau).mean())
    frr_seq = float(flags.mean())
    assert abs(frr_seq - frr_fixed) <= delta + _binomial_slack(delta, b)
    assert used.mean() < n_total / 4, used.mean()  # most clean inputs stop at 8 or 16
    trig = rng.beta(40, 1.5, (2000, n_total))  # a surviving trigger: confidence near 1
    tflags, tused, _ = seq.replay(trig, tau, n_first=8, delta=delta)
    assert tflags.mean() == (trig.mean(1) > tau).mean() and (tused == 8).mean() > 0.95


def test_moderated_sd_shrinks_toward_the_prior() -> None:
    sd = seq.moderated_sd(np.array([0.0, 0.04, 1.0]), 8, 0.04, 16.0)
    assert 0.0 < sd[0] < 0.2 and sd[1] == pytest.approx(0.2) and 0.2 < sd[2] < 1.0
    assert seq.moderated_sd(np.array([0.09]), 8, 0.5, 0.0)[0] == pytest.approx(0.3)


def test_a_too_eager_rule_breaks_the_bound() -> None:
    """The check above can fail: stopping with a normal quantile at 1 − delta and no
    variance guard disagrees with the fixed-N answer far more often than delta."""
    rng = np.random.default_rng(2)
    b, n_total, tau, delta = 20000, 64, 0.5, 0.01
    sigma = rng.uniform(0.05, 0.3, b)
    mu = tau + rng.normal(0, 1, b) * sigma / np.sqrt(n_total) * 3
    values = rng.normal(mu[:, None], sigma[:, None], (b, n_total))
    head = values[:, :8]
    dec = seq.curtailed_decisions(head.mean(1), head.std(1, ddof=1), 8, n_total, tau, 1.0)
    early = dec != seq.CONTINUE
    disagree = float(((dec == seq.FLAG) != (values.mean(1) > tau))[early].sum() / b)
    assert disagree > 3 * delta


def test_sd_floor_keeps_constant_draws_from_stopping_on_noise() -> None:
    # eight identical draws just above the threshold: with no floor the rule would stop
    mean, sd = np.array([0.52]), np.array([0.0])
    assert seq.curtailed_decisions(mean, sd, 8, 64, 0.5, 3.0, 0.0)[0] == seq.FLAG
    assert seq.curtailed_decisions(mean, sd, 8, 64, 0.5, 3.0, 0.1)[0] == seq.CONTINUE
