"""The trigger-search probe (trojanscan.mntd.search): maths, bundle round trip, quality.

The quality test trains tiny 8×8-digits MLPs in seconds: clean ones to read the costs
against, then clean and backdoored ones (an all-to-one corner patch, and a patch that
flips one source class only) that the probe must rank apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trojanscan.dataset import ImageDataset
from trojanscan.detectors.mntd import MNTD
from trojanscan.exceptions import ModelError, ParameterError
from trojanscan.io.data import load_dataset
from trojanscan.mntd import calibration, executor
from trojanscan.mntd.pretrained import MetaBundle, load_bundle, save_bundle
from trojanscan.mntd.search import (
    SEARCH,
    SearchConfig,
    SearchProbe,
    fit_search_probe,
    low_z,
    source_costs,
    with_reference_models,
)
from trojanscan.training import TrainConfig, train_model

CFG = SearchConfig(anchors_per_class=4, steps=60)


def test_low_z_reads_each_class_against_its_own_spread_and_skips_missing() -> None:
    mean, std = torch.tensor([0.5, 0.2, 0.5]), torch.tensor([0.1, 0.1, 0.01])
    # class 1 is cheap but usual for class 1; class 2 is only a little cheaper, but
    # class 2 never is on clean models: it stands out
    costs = torch.tensor([[0.5, 0.15, 0.45], [0.5, float("nan"), 0.5]])
    assert low_z(costs, mean, std).tolist() == pytest.approx([5.0, 0.0])


def test_config_round_trips_through_its_tensor_and_validates() -> None:
    cfg = SearchConfig(anchors_per_class=3, steps=7, lr=0.2, mask_cost=0.02, seed=5)
    assert SearchConfig.from_tensor(cfg.as_tensor()) == cfg
    with pytest.raises(ParameterError, match="steps"):
        SearchConfig(steps=0).validate()
    with pytest.raises(ParameterError, match="seed"):  # would not survive float32
        SearchConfig(seed=2**24 + 1).validate()
    with pytest.raises(ParameterError, match="mask_cost"):
        SearchProbe(torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), 2,
                    SearchConfig(mask_cost=0.0))


def test_search_leaves_the_model_alone_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    a = source_costs(model, x, y, 3, SearchConfig(steps=5))
    b = source_costs(model, x, y, 3, SearchConfig(steps=5))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    missing = source_costs(model, x[:4], y[:4], 3, SearchConfig(steps=2))
    assert torch.isnan(missing[2]) and torch.isfinite(missing[:2]).all()
    with pytest.raises(ModelError, match="shape"):
        source_costs(nn.Sequential(nn.Flatten(), nn.Linear(16, 5)), x, y, 3, CFG)


def test_reference_outputs_leave_each_model_out() -> None:
    probe = SearchProbe(torch.rand(4, 1, 4, 4), torch.tensor([0, 0, 1, 1]), 2)
    costs = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.4, 0.25], [0.55, 0.35]])
    loo = probe.fit_reference(costs)
    assert probe.ref_mean.tolist() == pytest.approx(costs.mean(0).tolist())
    rest = costs[1:]
    want = low_z(costs[:1], rest.mean(0), rest.std(0))
    assert loo[0] == pytest.approx(float(want[0]), rel=1e-5)
    with pytest.raises(ParameterError, match="R×2"):
        probe.fit_reference(costs[:2])


# -- quality on tiny models ------------------------------------------------------------------

def _patched(ds: ImageDataset, target: int, seed: int, source: int | None) -> ImageDataset:
    """A 2×2 white patch in the bottom-right corner sends 15% of the images (of ``source``
    only, when given; the rest of that class keeps its label) to ``target``."""
    rng = np.random.default_rng(seed)
    y = ds.labels()
    pool = np.arange(len(ds)) if source is None else np.flatnonzero(y.numpy() == source)
    k = int(0.15 * len(ds)) if source is None else len(pool) // 2
    idx = torch.from_numpy(np.sort(rng.choice(pool, k, replace=False)))
    x, y = ds.x.clone(), y.clone()
    x[idx, :, 6:8, 6:8] = 1.0
    y[idx] = target
    return ds.with_data(x, y)


@pytest.fixture(scope="module")
def tiny() -> dict:
    with executor.torch_threads(1):
        digits = load_dataset("digits")
        half = len(digits) // 2
        share, attacker = digits.subset(slice(0, half)), digits.subset(slice(half, None))
        cfg = TrainConfig(epochs=15, batch_size=64, lr=3e-3)

        def train(data: ImageDataset, seed: int) -> nn.Module:
            return train_model("mlp", data, config=cfg, seed=seed, device="cpu")

        refs = [train(share, 10 + i) for i in range(6)]
        models, labels, kinds = [], [], []
        for i in range(8):
            kind = ("clean", "all-to-one", "clean", "source")[i % 4]
            data = attacker if kind == "clean" else _patched(
                attacker, (3 * i) % 10, i, None if kind == "all-to-one" else (3 * i + 5) % 10)
            models.append(train(data, 100 + i))
            labels.append(int(kind != "clean"))
            kinds.append(kind)
        probe, cal = fit_search_probe(share.x, share.labels(), 10, normalise_on=refs[:4],
                                      held_out_benign=refs[4:], config=CFG, seed=0)
        return {"digits": digits, "share": share, "refs": refs, "models": models,
                "labels": labels, "kinds": kinds, "probe": probe, "cal": cal}


def test_tiny_probe_ranks_backdoored_models_above_clean_ones(tiny: dict) -> None:
    """Four clean MLPs against two all-to-one and two source-specific ones, all trained on
    data the probe never saw; chance is 0.5 (measured 1.0 with this fixture)."""
    with executor.torch_threads(1):
        scores = tiny["probe"](tiny["models"]).numpy()
    assert calibration.auroc(tiny["labels"], scores) >= 0.8
    source = [s for s, k in zip(scores, tiny["kinds"]) if k == "source"]
    clean = [s for s, k in zip(scores, tiny["kinds"]) if k == "clean"]
    assert np.mean(source) > np.mean(clean)


def test_bundle_entry_round_trips_and_reference_models_take_over(tiny: dict,
                                                                  tmp_path: Path) -> None:
    probe, cal = tiny["probe"], tiny["cal"]
    assert cal["normalised_on"] == "benign_shadows" and len(cal["benign_raw"]) == 2
    bundle = MetaBundle("tiny-search", (1, 8, 8), 10, {SEARCH: probe}, {SEARCH: cal})
    _, sidecar = save_bundle(tmp_path / "s", bundle)
    back = load_bundle(sidecar)
    assert back.variants[SEARCH].config == CFG
    m = tiny["models"][1]
    with executor.torch_threads(1):
        assert float(back.variants[SEARCH]([m])[0]) == pytest.approx(float(probe([m])[0]))
        new, cal2 = with_reference_models(probe, dict(cal), tiny["refs"])
    assert cal2["normalised_on"] == "reference_models" and len(cal2["reference_raw"]) == 6
    assert not torch.equal(new.ref_mean, probe.ref_mean)  # a copy moved; the input did not
    # the detector's search variant: a verdict calibrated on the reference models
    bundle2 = MetaBundle("tiny-search", (1, 8, 8), 10, {SEARCH: new}, {SEARCH: cal2})
    _, sidecar2 = save_bundle(tmp_path / "s2", bundle2)
    with executor.torch_threads(1):
        r = MNTD(meta_classifier=str(sidecar2), variant=SEARCH).fit(m, tiny["digits"])
    assert r.evidence["calibration"]["source"] == "reference_models"
    assert 0 < r.p_value <= 1 and r.evidence["variant"] == SEARCH


@pytest.mark.parametrize("variant", ["stamp_qt_data_one_class_search",
                                     "stamp_one_class_search", "stamp_one_class_search_x2"])
def test_shipped_search_mixes_sum_each_named_part_once(variant: str) -> None:
    """Each named part weighs 1 in the sum (an ensemble's members 1/n each; in ``_x2`` the
    search weighs 2), every part standardised against the held-out benign shadows, as for
    the other mixes."""
    from trojanscan.archs import build
    from trojanscan.detectors.mntd import MIXES
    from trojanscan.mntd.pretrained import builtin_path

    bundle = load_bundle(builtin_path("fashion-mnist"))
    model = build("mlp", (1, 28, 28), 10)
    shape_only = ImageDataset(torch.zeros(2, 1, 28, 28), torch.arange(2))
    with executor.torch_threads(1):
        r = MNTD(variant=variant).fit(model, shape_only)
    got = r.evidence["component_raw_scores"]
    want = 0.0
    for piece in MIXES[variant]:
        names = bundle.ensembles.get(piece, (piece,))
        for n in names:
            b = np.asarray(bundle.calibration[n]["benign_raw"])
            weight = 2.0 if variant.endswith("_x2") and piece == SEARCH else 1.0
            want += weight * (got[n] - b.mean()) / b.std() / len(names)
    assert set(got) == {n for p in MIXES[variant] for n in bundle.ensembles.get(p, (p,))}
    assert r.evidence["raw_score"] == pytest.approx(want, rel=1e-5)
    assert r.evidence["calibration"]["source"] == "reference_models"


def test_a_bundle_without_the_probe_says_how_to_get_one() -> None:
    from trojanscan.archs import build

    digits = ImageDataset(torch.zeros(2, 1, 8, 8), torch.arange(2))
    with pytest.raises(ModelError, match=r"no trigger-search probe.*--search-only"):
        MNTD(meta_classifier="digits", variant=SEARCH).fit(build("mlp", (1, 8, 8), 10), digits)

