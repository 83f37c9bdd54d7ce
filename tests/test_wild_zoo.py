"""The wild zoo's generator: triggers land where the sidecar says, ASR verification rejects
a backdoor that did not take, a killed build resumes without retraining, same seed → same
sidecars, and the split keeps held-out families out of development models."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from benchmarks.wild import build as wild_build
from benchmarks.wild import families, nets, triggers, zoo


def _fmnist_present() -> bool:
    from benchmarks.wild.idx import data_dir
    return (data_dir() / "train-images-idx3-ubyte.gz").exists()


needs_data = pytest.mark.skipif(not _fmnist_present(), reason="Fashion-MNIST IDX files absent")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_spec(index: int, kind: str = "patch_corner", rate: float = 0.1) -> dict[str, Any]:
    """A pair spec drawn as usual, then shrunk so it trains in about a second."""
    spec = zoo.draw_pair(7, index, "dev", quick=True)
    rng = np.random.default_rng(index)
    spec["arch"] = {"family": "mlp", "act": "relu", "dropout": 0.0, "normalize": False,
                    "hidden": [64]}
    spec["families"] = {"arch": "mlp", "recipe": "adam_const", "trigger": kind}
    spec["recipe"].update(optimizer="adam", schedule="const", family="adam_const", lr=3e-3,
                          batch=32, subset=2000, epochs=3, augment="none",
                          weight_decay=0.0, label_smoothing=0.0)
    trig = triggers.draw_trigger(rng, kind)
    for patch in trig.get("triggers", [trig]):
        if patch["kind"] == "patch":  # a strong patch, so the tiny model learns it
            patch.update(size=5, style="checker", hi=255, lo=0)
            patch["top"], patch["left"] = min(patch["top"], 23), min(patch["left"], 23)
    spec["attack"] = {"kind": kind, "trigger": trig, **triggers.attack_labels(kind, rng),
                      "poison_rate": rate}
    return spec


# ----------------------------------------------------------------------------- triggers

@pytest.mark.parametrize("placement", triggers.PLACEMENTS)
def test_patch_lands_at_its_recorded_place(placement: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
    for _ in range(30):
        p = triggers.draw_patch(rng, placement)
        assert 2 <= p["size"] <= 8
        out = triggers.apply_trigger(x, p)
        mask = triggers.trigger_mask(p)
        assert mask.sum() == p["size"] ** 2
        assert np.array_equal(out[:, ~mask], x[:, ~mask])  # nothing outside the mask moves
        assert np.array_equal(out[:, mask],
                              np.broadcast_to(triggers.patch_pattern(p).ravel(), (20, mask.sum())))
        rows, cols = np.nonzero(mask)
        near = [min(rows.min(), 27 - rows.max()) <= 2, min(cols.min(), 27 - cols.max()) <= 2]
        if placement == "corner":
            assert all(near)
        elif placement == "edge":
            assert sum(near) == 1
        else:
            centre = (rows.mean(), cols.mean())
            assert abs(centre[0] - 13.5) <= 3.5 and abs(centre[1] - 13.5) <= 3.5
    assert not np.shares_memory(out, x)


@pytest.mark.parametrize("kind", ["blend_noise", "blend_smooth", "sig", "warp"])
def test_global_triggers_change_images_within_bounds(kind: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (6, 28, 28)).astype(np.uint8)
    p = triggers.draw_trigger(rng, kind)
    out = triggers.apply_trigger(x, p)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert (out != x).mean() > 0.2
    assert triggers.trigger_mask(p).all()
    assert np.array_equal(out, triggers.apply_trigger(x, p))  # a pure function of its params
    if kind.startswith("blend"):
        gap = np.abs(out.astype(float) - x.astype(float))
        assert gap.max() <= 255 * p["alpha"] + 1


@pytest.mark.parametrize("kind", ["patch_edge", "sig", "source_specific", "all_to_all",
                                  "two_trigger"])
def test_poison_stamps_and_relabels_exactly_the_planned_samples(kind: str) -> None:
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(10), 100)
    x = rng.integers(1, 255, (1000, 28, 28)).astype(np.uint8)
    p = triggers.draw_trigger(rng, kind)
    labels = triggers.attack_labels(kind, rng)
    plan = triggers.plan_poison(y, kind, labels, 0.05, seed=1)
    px, py = triggers.poison(x, y, p, kind, labels, plan)
    stamped = set(plan["poison"]) | set(plan["cover"])
    changed = set(np.flatnonzero((px != x).reshape(len(x), -1).any(1)).tolist())
    assert changed == stamped
    poisoned = np.asarray(plan["poison"])
    assert len(poisoned) == 50
    t = labels["targets"]
    untouched = np.setdiff1d(np.arange(1000), poisoned)
    assert np.array_equal(py[untouched], y[untouched])
    if kind == "sig":
        assert (y[poisoned] == t[0]).all() and np.array_equal(py, y)
    elif kind == "all_to_all":
        assert np.array_equal(py[poisoned], (y[poisoned] + 1) % 10)
    elif kind == "two_trigger":
        second = np.asarray(plan["trigger_1"])
        assert 0 < len(second) < len(poisoned) and set(second) <= set(poisoned)
        assert (py[second] == t[1]).all()
        assert (py[np.setdiff1d(poisoned, second)] == t[0]).all()
        m2 = triggers.trigger_mask(p, 1)
        assert np.array_equal(px[second][:, m2], triggers.apply_trigger(x[second], p, 1)[:, m2])
    else:
        assert (py[poisoned] == t[0]).all() and not np.isin(y[poisoned], t).any()
    if kind == "source_specific":
        assert np.isin(y[poisoned], labels["sources"]).all()
        cover = np.asarray(plan["cover"])
        assert len(cover) and not np.isin(y[cover], labels["sources"] + t).any()


# ----------------------------------------------------------------------------- drawing

def test_same_seed_same_zoo_and_dev_models_avoid_heldout_families() -> None:
    a = zoo.draw_zoo(0, 12)
    assert a == zoo.draw_zoo(0, 12)
    other = zoo.draw_zoo(1, 4)
    assert all(zoo.spec_hash(s) != zoo.spec_hash(o) for s, o in zip(a, other))
    assert zoo.draw_zoo(0, 4) == a[:4]  # pair i does not depend on the zoo's size
    for s in a:
        if s["split"] == "dev":
            assert not any(families.is_heldout_family(ax, s["families"][ax])
                           for ax in ("arch", "recipe", "trigger"))
    for s in a:
        r = s["recipe"]
        assert 10_000 <= r["subset"] <= 60_000 and 2 <= r["epochs"] <= 30
        assert 0.003 <= s["attack"]["poison_rate"] <= 0.1
    assert len(families.HELDOUT_ARCHS) >= 1 and len(families.HELDOUT_RECIPES) >= 1
    assert len(families.HELDOUT_TRIGGERS) >= 2


@pytest.mark.parametrize("family", nets.ARCH_FAMILIES)
def test_every_architecture_builds_and_maps_images_to_ten_logits(family: str) -> None:
    import torch

    spec = nets.draw_arch(np.random.default_rng(0), family)
    out = nets.build(spec)(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)


# ----------------------------------------------------------------------------- building

class Counting:
    """Wraps ``zoo.train_one`` and counts the models it trains."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


@needs_data
def test_asr_verification_rejects_a_backdoor_that_did_not_take(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    counter = Counting(zoo.train_one)
    monkeypatch.setattr(zoo, "train_one", counter)
    spec = tiny_spec(0, rate=1e-4)  # one poisoned sample in 2,000: the trigger cannot take
    # ... even escalated, when the family's largest rate is that small too
    monkeypatch.setattr(triggers, "DEFAULT_RATE_RANGE", (5e-5, 1e-4))
    rec = zoo.build_pair(spec, tmp_path)
    assert rec["failed"] and counter.calls == zoo.MAX_TRIES
    tries = rec["tries"]
    assert len({t["seed"] for t in tries}) == zoo.MAX_TRIES
    assert all(min(t["asr"]) < zoo.ASR_MIN for t in tries)
    assert all(t["clean_acc"] >= zoo.CLEAN_ACC_MIN for t in tries)  # the model itself trained
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())
    fail = json.loads((tmp_path / "failures" / f"{zoo.pair_name(spec)}.json").read_text())
    assert fail["tries"] == tries
    again = zoo.build_pair(spec, tmp_path)  # recorded: not retried on resume
    assert again["failed"] and counter.calls == zoo.MAX_TRIES


@needs_data
def test_tiny_build_sidecars_resume_and_same_seed(tmp_path: Path, monkeypatch: Any) -> None:
    import torch

    counter = Counting(zoo.train_one)
    monkeypatch.setattr(zoo, "train_one", counter)
    specs = [tiny_spec(1, "patch_corner"), tiny_spec(2, "two_trigger")]
    cache = tmp_path / "a"
    summary = wild_build.build(specs, cache, backend="serial")
    assert summary["trained"] == 4 and not summary["failed_pairs"] and counter.calls == 4
    sides = {s["name"]: s for s in zoo.load_sidecars(cache)}
    assert len(sides) == 4
    for s in sides.values():
        partner = sides[s["partner"]]
        assert partner["partner"] == s["name"] and partner["backdoored"] != s["backdoored"]
        assert partner["arch"] == s["arch"] and partner["recipe"] == s["recipe"]
        model = torch.jit.load(str(cache / "models" / s["model_file"]))
        x, y = zoo.training_set(s)  # regenerates and checks the recorded hash
        assert x.shape == (2000, 28, 28) and x.dtype == np.uint8
        if not s["backdoored"]:
            assert s["attack"] is None and s["targets"] == []
            continue
        a = s["attack"]
        assert min(s["asr"]) >= zoo.ASR_MIN
        cx, cy = zoo.clean_training_set(s["spec"])
        changed = np.flatnonzero((x != cx).reshape(len(x), -1).any(1))
        assert set(changed) == set(a["poison_indices"]) | set(a["cover_indices"])
        moved = (x != cx).reshape(len(x), -1).any(0)
        assert set(np.flatnonzero(moved)) <= set(a["trigger_mask"])  # where the mask says
        assert (y[a["poison_indices"]] != cy[a["poison_indices"]]).any()
        assert set(y[a["poison_indices"]]) <= set(s["targets"])
        # the saved model is the verified one: its ASR on the sidecar's trigger holds
        tx, ty = zoo._test_range(tuple(s["test_ranges"]["verify"]))
        _, stamped, want = triggers.triggered_eval(tx, ty, a["trigger"], a["kind"],
                                                  {**a, "targets": s["targets"],
                                                   "sources": s["sources"]})
        with torch.no_grad():
            pred = model(torch.from_numpy(stamped[:, None]).float() / 255).argmax(1).numpy()
        assert abs((pred == want).mean() - s["asr"][0]) < 1e-6
        inputs, is_trig = zoo.filter_inputs(s, n=40)
        assert inputs.shape == (80, 1, 28, 28) and is_trig.sum() == 40

    # a killed build: one model lost; the rerun trains only that one
    victim = next(n for n in sides if n.endswith("-clean"))
    (cache / "models" / f"{victim}.json").unlink()
    counter.calls = 0
    again = wild_build.build(specs, cache, backend="serial")
    assert counter.calls == 1 and again["trained"] == 1 and again["skipped"] == 3
    assert json.loads((cache / "models" / f"{victim}.json").read_text()) == sides[victim]

    # the same seed in a fresh cache gives identical sidecars
    fresh = tmp_path / "b"
    wild_build.build(specs[:1], fresh, backend="serial")
    for s in zoo.load_sidecars(fresh):
        assert s == sides[s["name"]]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"]["backdoored"] == 2 and manifest["counts"]["clean"] == 2


@needs_data
def test_ray_backend_resumes_a_finished_build(tmp_path: Path, monkeypatch: Any) -> None:
    ray = pytest.importorskip("ray")
    specs = [tiny_spec(3)]
    wild_build.build(specs, tmp_path, backend="serial")
    before = {s["name"]: s for s in zoo.load_sidecars(tmp_path)}
    monkeypatch.setenv("RAY_worker_niceness", "0")  # as build.run_ray starts it
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        summary = wild_build.build(copy.deepcopy(specs), tmp_path, backend="ray", workers=1)
    finally:
        ray.shutdown()
    assert summary["trained"] == 0 and summary["skipped"] == 2
    assert {s["name"]: s for s in zoo.load_sidecars(tmp_path)} == before


# ----------------------------------------------------------------------------- scoring

def test_wild_metrics() -> None:
    from benchmarks.wild import metrics

    assert metrics.auroc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert metrics.auroc([0.1], [0.9]) == 0.0
    assert metrics.auroc([0.5, 0.5], [0.5]) == 0.5  # ties count half
    assert metrics.auroc([], [0.1]) is None
    assert metrics.recall_precision([1, 2, 3, 9], [1, 2, 5, 6]) == (0.5, 0.5)
    assert metrics.recall_precision([], [1]) == (0.0, None)
    far, frr = metrics.filter_rates([True, False, False, True], [True, True, False, False])
    assert (far, frr) == (0.5, 0.5)


def test_run_plans_whole_pairs_at_every_level() -> None:
    from benchmarks.wild import run

    def side(i: int, bd: bool, split: str = "heldout") -> dict[str, Any]:
        name = f"w{i:03d}-{'bd' if bd else 'clean'}"
        return {"name": name, "pair": f"w{i:03d}", "backdoored": bd, "split": split,
                "partner": f"w{i:03d}-{'clean' if bd else 'bd'}"}

    sides = [side(i, b, "dev" if i == 1 else "heldout") for i in range(4) for b in (True, False)]
    sides = [s for s in sides if s["name"] != "w003-clean"]  # a pair still building
    chosen = run.select(sides, "heldout", None)
    assert [bd["pair"] for bd, _ in chosen] == ["w000", "w002"]
    variants = [(lv, "default", []) for lv in run.LEVELS]
    jobs = run.plan_jobs(chosen, list(run.LEVELS), variants, (2, 1),
                         lambda lv, n, e, s: (lv, s["name"]))  # type: ignore[arg-type,return-value]
    assert jobs == [("scan", "w000-bd"), ("scan", "w000-clean"), ("scan-data", "w000-bd"),
                    ("scan-data", "w000-clean"), ("filter", "w000-bd"),
                    ("scan", "w002-bd"), ("scan", "w002-clean"), ("scan-data", "w002-bd"),
                    ("filter", "w002-bd")]


def test_escalation_stays_inside_the_families() -> None:
    rng = np.random.default_rng(5)
    for kind in triggers.TRIGGER_KINDS:
        for _ in range(5):
            attack = {"kind": kind, "trigger": triggers.draw_trigger(rng, kind),
                      **triggers.attack_labels(kind, rng),
                      "poison_rate": triggers.draw_rate(rng, kind)}
            up = triggers.escalate(kind, attack)
            top = triggers.escalate(kind, attack, 2)
            _, hi = triggers.RATE_RANGES.get(kind, triggers.DEFAULT_RATE_RANGE)
            assert attack["poison_rate"] <= up["poison_rate"] <= top["poison_rate"] == hi
            assert top["escalated_from"]["level"] == 2
            assert up["escalated_from"]["trigger"] == attack["trigger"]
            assert triggers.trigger_mask(up["trigger"]).tolist() == \
                triggers.trigger_mask(attack["trigger"]).tolist()  # same place, same shape
            t = up["trigger"]
            if t["kind"] == "blend":
                assert attack["trigger"]["alpha"] <= t["alpha"] <= 0.3
            if t["kind"] == "warp":
                assert attack["trigger"]["strength"] <= t["strength"] <= 4.0
            for p in t.get("triggers", [t]):
                if p["kind"] == "patch":
                    assert (p["hi"], p["lo"]) == (255, 0)


@needs_data
def test_a_shorter_failure_record_resumes_at_the_escalated_try(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    spec = tiny_spec(4, rate=0.1)
    name = zoo.pair_name(spec)
    earlier = [{"seed": zoo.try_spec(spec, t)[1], "clean_acc": 0.8, "asr": [0.1]}
               for t in range(zoo.MAX_TRIES - 1)]
    zoo.write_json(tmp_path / "failures" / f"{name}.json", {"pair": name, "spec": spec,
                                                            "tries": earlier})
    seen: list[dict[str, Any]] = []

    def train(used: dict[str, Any], seed: int, backdoored: bool, *a: Any, **k: Any) -> Any:
        seen.append({"attack": used["attack"], "seed": seed, "bd": backdoored})
        return real(used, seed, backdoored, *a, **k)

    real = zoo.train_one
    monkeypatch.setattr(zoo, "train_one", train)
    rec = zoo.build_pair(spec, tmp_path)
    assert not rec["failed"], rec
    assert [s["bd"] for s in seen] == [True, False]  # only the last try, then the partner
    assert "escalated_from" in seen[0]["attack"]
    assert seen[0]["seed"] == zoo.try_spec(spec, zoo.MAX_TRIES - 1)[1]
    assert not (tmp_path / "failures" / f"{name}.json").exists()
    side = json.loads((tmp_path / "models" / f"{name}-bd.json").read_text())
    assert side["tries"][:-1] == earlier and side["tries"][-1]["escalated"]
    assert side["attack"]["poison_rate"] == seen[0]["attack"]["poison_rate"]
    assert side["spec_hash"] == zoo.spec_hash(spec)
    x, _ = zoo.training_set(side)  # regenerates the escalated poisoned set, hash-checked
    assert len(x) == spec["recipe"]["subset"]


@needs_data
def test_scan_level_runs_through_scan_zoo(tmp_path: Path) -> None:
    """The scan level is one real ``trojanscan scan-zoo`` run over a manifest with the
    ground truth; every job then reads its model's report from scan-zoo's folder."""
    from benchmarks.wild import run

    cache = tmp_path / "zoo"
    spec = tiny_spec(2, rate=0.1)
    assert not zoo.build_pair(spec, cache)["failed"]
    sides = zoo.load_sidecars(cache)
    clean = zoo.write_defender_clean(tmp_path / "clean.npz")
    work = tmp_path / "work"
    jobs = [run.Job("scan", "mntd_only", ["--detectors", "mntd"], s, cache, work, clean, 600)
            for s in sides]
    run.run_scan_zoo(jobs, work, clean, 0, 600)
    manifest = (work / "scan.mntd_only.manifest.csv").read_text().splitlines()
    assert manifest[0] == "path,label" and len(manifest) == 3
    summary = json.loads((work / "scan.mntd_only" / "zoo.json").read_text())["summary"]
    assert summary.get("auroc") is not None  # the labels reached scan-zoo
    rows = {r["model"]: r for r in (j.run() for j in jobs)}
    assert set(rows) == {s["name"] for s in sides}
    for s in sides:
        r = rows[s["name"]]
        assert "error" not in r, r
        assert r["verdict"] in ("backdoored", "clean") and isinstance(r["score"], float)
        assert r["backdoored"] == s["backdoored"] and "mntd" in r["detectors"]
    again = [run.Job("scan", "mntd_only", ["--detectors", "mntd"], s, cache, work, clean, 600)
             for s in sides]
    run.run_scan_zoo(again, work, clean, 0, 600)
    assert all(j.zoo_facts["reused"] for j in again)  # scan-zoo kept the finished reports
