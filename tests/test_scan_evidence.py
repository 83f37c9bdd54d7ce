"""The scan's evidence: p-values beyond the reference models' range, fused scores that
order models, and target labels named from every detector's per-label p-values."""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from scipy import stats

from trojanscan.dataset import ImageDataset
from trojanscan.maths.fusion import (
    Evidence,
    fuse,
    fuse_label_p_values,
    holm,
    name_targets,
)
from trojanscan.maths.outliers import target_p_values
from trojanscan.mntd.calibration import fit_tail, p_value, tail_p_value
from trojanscan.mntd.search import target_flow_z
from trojanscan.reports.scan import write_scan_report
from trojanscan.reports.text import verdict_sentence
from trojanscan.results import ModelScanResult
from trojanscan.scan import ScanResult, scan_model
from trojanscan.training import TrainConfig, train_model

N_REF = 64
SCHEMA = json.loads(resources.files("trojanscan").joinpath("schemas/report.schema.json")
                    .read_text())


def _refs(seed: int, dist: str = "normal", n: int = N_REF) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "logistic":
        return rng.logistic(3.0, 2.0, n)
    if dist == "t5":
        return rng.standard_t(5, n) * 2.0
    return rng.normal(3.0, 2.0, n)


# -- tail-modelled p-values -----------------------------------------------------------

def test_tail_p_goes_below_the_conformal_floor_and_matches_it_inside_the_range() -> None:
    refs = _refs(0)
    floor = 1.0 / (N_REF + 1)
    top = float(refs.max())
    p_far, src = tail_p_value(top + 10.0, refs)
    assert p_far < floor / 100 and src != "empirical"
    # inside the range: exactly the conformal p-value
    for raw in (float(np.median(refs)), float(np.sort(refs)[-3]), top):
        p, src = tail_p_value(raw, refs)
        assert src == "empirical" and p == p_value(raw, refs)
    # beyond it: continuous at the largest reference and strictly decreasing
    xs = top + np.array([1e-9, 0.5, 1.0, 2.0, 4.0, 8.0])
    ps = [tail_p_value(float(x), refs)[0] for x in xs]
    assert ps[0] == pytest.approx(floor, rel=1e-6)
    assert all(a > b for a, b in itertools.pairwise(ps))


def test_tail_fit_records_its_goodness_of_fit_and_uses_a_passing_candidate() -> None:
    refs = _refs(1)
    tail = fit_tail(refs)
    assert tail is not None
    doc = tail.to_dict()
    assert set(doc["candidates"]) >= {"normal", "logistic"}
    assert all(0.0 <= c["ks_p"] <= 1.0 for c in doc["candidates"].values())
    _, src = tail_p_value(float(refs.max()) + 3.0, refs, tail)
    assert src in {c.name for c in tail.passing}
    # too few references: no tail, the conformal p-value only
    assert fit_tail(refs[:5]) is None
    assert tail_p_value(float(refs[:5].max()) + 50, refs[:5]) == (1 / 6, "empirical")


@pytest.mark.parametrize("dist", ["normal", "logistic", "t5"])
def test_clean_draws_are_flagged_at_most_alpha(dist: str) -> None:
    """A clean model's score is one more draw from the references' distribution; over
    many seeds the tail-modelled p-value is at most alpha as often as a valid p-value
    may be (binomial upper bound at 1 - 1e-3), below the conformal floor too."""
    n_seeds = 6000
    seed = {"normal": 10, "logistic": 11, "t5": 12}[dist]
    all_draws = _refs(seed, dist, n_seeds * (N_REF + 1)).reshape(n_seeds, N_REF + 1)
    count = {0.05: 0, 0.01: 0, 0.004: 0}
    for draws in all_draws:
        p, _ = tail_p_value(float(draws[-1]), draws[:-1])
        for a in count:
            count[a] += p <= a
    for a, c in count.items():
        bound = stats.binom.ppf(1 - 1e-3, n_seeds, a)
        assert c <= bound, (dist, a, c, bound)


def test_fused_verdict_keeps_its_false_alarm_rate_on_clean_evidence() -> None:
    """Two detectors on clean models: one with a uniform p-value, one with the
    tail-modelled p-value of a clean score; flagged at most alpha (binomial bound)."""
    n_seeds, alpha = 4000, 0.01
    rng = np.random.default_rng(7)
    all_draws = _refs(8, "logistic", n_seeds * (N_REF + 1)).reshape(n_seeds, N_REF + 1)
    flagged = 0
    for draws in all_draws:
        p_mntd, _ = tail_p_value(float(draws[-1]), draws[:-1])
        ev = [Evidence("nc", False, float(rng.uniform())), Evidence("mntd", False, p_mntd)]
        flagged += fuse(ev, alpha=alpha).backdoored
    assert flagged <= stats.binom.ppf(1 - 1e-3, n_seeds, alpha)


def test_fused_score_orders_clean_weak_and_strong_backdoors() -> None:
    """Planted evidence: a clean model (inside the references), a weak backdoor (just
    beyond every reference) and a strong one (far beyond) — the fused scores order them;
    with the conformal p-value alone the two backdoors tie."""
    refs = _refs(3)
    top = float(refs.max())
    planted = {"clean": (float(np.median(refs)), 0.6), "weak": (top + 0.5, 0.3),
               "strong": (top + 8.0, 0.2)}
    scores, conformal = {}, {}
    for name, (raw, p_nc) in planted.items():
        p_mntd, _ = tail_p_value(raw, refs)
        scores[name] = fuse([Evidence("nc", False, p_nc), Evidence("mntd", True, p_mntd)]).score
        conformal[name] = fuse([Evidence("nc", False, p_nc),
                                Evidence("mntd", True, p_value(raw, refs))]).score
    assert scores["clean"] < scores["weak"] < scores["strong"]
    assert conformal["weak"] == conformal["strong"]


# -- per-label evidence ---------------------------------------------------------------

def test_neural_cleanse_target_p_values_single_out_small_norms() -> None:
    norms = np.array([100.0, 95, 105, 20, 98, 102, 97, 25, 101, 99])
    p = target_p_values(norms)
    assert p.shape == (10,) and np.all((p >= 0) & (p <= 1))
    assert set(np.flatnonzero(p < 0.05 / 10)) == {3, 7}
    assert p[0] > 0.2  # a typical label
    # a label whose search never reached the attack success is never evidence
    reached = np.ones(10, dtype=bool)
    reached[3] = False
    assert target_p_values(norms, reached=reached)[3] == 1.0
    # against reference models where label 7 is small in every clean model: only 3 stands out
    rng = np.random.default_rng(0)
    base = np.full(10, 100.0)
    base[7] = 25.0
    ref = base * np.exp(rng.normal(0, 0.1, (8, 10)))
    p_ref = target_p_values(norms, ref)
    assert p_ref[3] < 1e-3 and p_ref[7] > 0.05


def test_target_flow_z_takes_each_target_column_without_the_diagonal() -> None:
    k = 4
    flows = torch.zeros(k, k)
    flows[2, 1] = 0.9  # class 2's stamped anchors go to 1
    flows[3, 3] = 0.99  # staying is not read
    z = target_flow_z(flows.flatten(), torch.zeros(k * k), torch.full((k * k,), 0.1))
    assert z.tolist() == pytest.approx([0.0, 9.0, 0.0, 0.0])


def test_holm_and_label_fusion() -> None:
    # 0.001·4, 0.004·3 and 0.02·2 are below 0.05; 0.5·1 is not
    assert holm([0.001, 0.02, 0.004, 0.5], alpha=0.05) == [0, 2, 1]
    assert holm([0.02, 0.5, 0.5], alpha=0.05) == []
    q = fuse_label_p_values([[0.01, 0.5, 0.9], None, [0.4, 0.002, 0.9]])
    assert q is not None and q.tolist() == pytest.approx([0.02, 0.004, 1.0])
    assert fuse_label_p_values([None, None]) is None
    with pytest.raises(ValueError):
        fuse_label_p_values([[0.1, 0.2], [0.1, 0.2, 0.3]])
    # the verdict already says some label is a target: the best-supported one is named
    assert name_targets([0.3, 0.04, 0.6], alpha=0.05) == [1]
    assert name_targets([1.0, 1.0], alpha=0.05) == []


def test_two_target_evidence_names_both_targets_and_clean_names_none() -> None:
    k = 10
    nc = [0.5] * k
    nc[3] = 1e-6  # Neural Cleanse sees label 3
    mntd = [0.9] * k
    mntd[7] = 1e-4  # the search's flows point to label 7
    ev = [Evidence("neural_cleanse", True, 1e-5, (3,), tuple(nc)),
          Evidence("mntd", True, 2e-4, (), tuple(mntd))]
    fused = fuse(ev, alpha=0.05)
    assert fused.backdoored and set(fused.suspected_targets) == {3, 7}
    assert fused.target_p_values is not None and len(fused.target_p_values) == k
    assert fused.target_p_values[3] == pytest.approx(2e-6)
    clean = fuse([Evidence("neural_cleanse", False, 0.4, (), tuple(nc)),
                  Evidence("mntd", False, 0.3, (), tuple(mntd))], alpha=0.05)
    assert not clean.backdoored and clean.suspected_targets == ()
    # no per-label evidence anywhere: the significant detectors' own targets, as before
    old = fuse([Evidence("neural_cleanse", True, 1e-4, (3, 5)), Evidence("mntd", False, 0.5)])
    assert old.suspected_targets == (3, 5) and old.target_p_values is None


def _two_target_model() -> tuple[torch.nn.Module, ImageDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    tr, te = perm[:1400], perm[1400:]
    xp, yp = x[tr].clone(), y[tr].clone()
    rng = np.random.default_rng(0)
    for target, rows, cols in ((0, slice(-2, None), slice(-2, None)),
                               (7, slice(0, 2), slice(0, 2))):
        cand = np.flatnonzero(yp.numpy() != target)
        pick = torch.from_numpy(rng.choice(cand, 140, replace=False))
        xp[pick, :, rows, cols] = 1.0
        yp[pick] = target
    train = ImageDataset(xp, yp, source="digits[two-target]", format="builtin")
    model = train_model("small_cnn", train, config=TrainConfig(epochs=8, batch_size=64,
                                                                lr=2e-3), seed=0, device="cpu")
    return model, ImageDataset(x[te], y[te], source="digits[test]", format="builtin")


def test_scan_names_both_targets_of_a_two_target_backdoor() -> None:
    """A digits CNN with two triggers (corner patches to labels 0 and 7): the scan's
    fused verdict names both, and reports fused per-label p-values. Neural Cleanse as the
    paper runs it (every label optimised to the end), so each label's norm is measured."""
    model, clean = _two_target_model()
    result = scan_model(model, clean, detectors="neural_cleanse", seed=0,
                        detector_params={"neural_cleanse": {"mode": "faithful",
                                                           "n_samples": 200,
                                                           "images": False}})
    assert result.verdict == "backdoored"
    assert {0, 7} <= set(result.suspected_targets)
    tp = result.fused.target_p_values
    assert tp is not None and len(tp) == 10
    assert max(tp[0], tp[7]) < min(p for i, p in enumerate(tp) if i not in (0, 7))


def test_scan_report_carries_fused_target_p_values(tmp_path: Path) -> None:
    """``target_p_values`` sits beside ``suspected_targets`` in report.json (valid against
    the schema), the HTML shows the per-label table and the verdict sentence the p-value."""
    k = 4
    nc = ModelScanResult("neural_cleanse", "backdoored", 0.999, (2,), 1.0, 0, {},
                         p_value=1e-3, evidence={"l1_norms": [9.0, 8.0, 1.0, 10.0]},
                         label_p_values=(0.6, 0.7, 1e-4, 0.9))
    mntd = ModelScanResult("mntd", "clean", 0.5, (), 1.0, 0, {}, p_value=0.4,
                           label_p_values=(0.9, 0.02, 0.03, 1.0))
    fused = fuse([Evidence(n, r.verdict == "backdoored", r.p_value, r.suspected_targets,
                           r.label_p_values) for n, r in (("neural_cleanse", nc),
                                                          ("mntd", mntd))])
    result = ScanResult("backdoored", fused.score, fused.p_value, fused.suspected_targets,
                        {"neural_cleanse": nc, "mntd": mntd}, {}, fused, 2.0, 0, 0.05)
    path = write_scan_report(result, out=tmp_path / "r", model_path=tmp_path / "m.pt",
                             loaded=None, data="clean.npz", clean_sha=None,
                             clean_format="npz", seed=0, params={}, seconds=2.0)
    doc = json.loads(path.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["suspected_targets"] == [2]
    assert doc["target_p_values"] == pytest.approx([1.0, 0.04, 2e-4, 1.0])
    assert doc["detectors"]["mntd"]["label_p_values"] == pytest.approx([0.9, 0.02, 0.03, 1.0])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Target labels" in html and "0.0002" in html
    assert "target p-value 0.0002" in verdict_sentence(doc)
    assert len(doc["target_p_values"]) == k
