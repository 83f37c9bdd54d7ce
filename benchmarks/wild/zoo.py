"""Draw, build and regenerate the wild zoo.

A *pair* is a backdoored model and its clean partner: same architecture, recipe, training
subset and seed, one trained on the poisoned set and one on the clean set. Every pair is
drawn from a master seed alone (:func:`draw_zoo`), keyed by the hash of its spec, and built
by :func:`build_pair`, which skips models already in the cache, so a killed build resumes
without retraining. Each model is a TorchScript file with a JSON sidecar of ground truth;
everything written goes through a temporary file and ``os.replace``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import families, nets, recipes, triggers
from .idx import fashion_mnist

SCHEMA = "trojanscan-wild/1"
ASR_MIN = 0.85
#: a backdoored model must also have learnt the task (a constant predictor is no backdoor)
CLEAN_ACC_MIN = 0.6
#: tries per backdoor: the drawn attack, the same attack with a new seed, then the drawn
#: attack escalated (:func:`triggers.escalate`, level 1, then level 2), each with a new seed
MAX_TRIES = 4
#: the first try that escalates the attack
FIRST_ESCALATED = 2
#: the smallest poison rate of the small --quick zoo (few training steps)
QUICK_RATE_FLOOR = 0.05
#: test-split ranges: the defender's clean data, the attacker's verification, filter inputs
DEFENDER_CLEAN = (0, 2000)
VERIFY = (2000, 10000)
VERIFY_QUICK = (2000, 4000)
FILTER_TRIGGERED = (2000, 6000)
FILTER_CLEAN = (6000, 10000)


# ----------------------------------------------------------------------------- helpers

def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(spec).encode()).hexdigest()[:16]


def atomic_write_bytes(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    atomic_write_bytes(path, w)


def array_sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    sd = model.state_dict()
    return array_sha256(*[sd[k].detach().cpu().contiguous().numpy() for k in sorted(sd)])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- drawing

def draw_pair(seed: int, index: int, split: str, quick: bool = False) -> dict[str, Any]:
    """The spec of pair ``index`` of the zoo drawn from ``seed`` (independent of the others)."""
    rng = np.random.default_rng([seed, index])
    arch_family = families.draw_family(rng, "arch", split)
    arch = nets.draw_arch(rng, arch_family)
    macs = nets.forward_macs(nets.build(arch))
    recipe_family = families.draw_family(rng, "recipe", split)
    recipe = recipes.draw_recipe(rng, recipe_family, arch_family, macs, arch["act"], quick)
    kind = families.draw_family(rng, "trigger", split)
    trigger = triggers.draw_trigger(rng, kind)
    labels = triggers.attack_labels(kind, rng)
    return {
        "schema": SCHEMA, "zoo_seed": seed, "index": index, "split": split, "quick": quick,
        "families": {"arch": arch_family, "recipe": recipe_family, "trigger": kind},
        "arch": arch, "macs": macs, "recipe": recipe,
        "attack": {"kind": kind, "trigger": trigger, **labels,
                   "poison_rate": triggers.draw_rate(rng, kind,
                                                     QUICK_RATE_FLOOR if quick else 0.0)},
        "subset_seed": int(rng.integers(2**31)), "seed": int(rng.integers(2**31)),
    }


def draw_zoo(seed: int, n_pairs: int, heldout_fraction: float = 0.5,
             quick: bool = False) -> list[dict[str, Any]]:
    """``n_pairs`` pair specs; pair ``i``'s split is drawn from ``(seed, i)`` alone."""
    specs = []
    for i in range(n_pairs):
        split_rng = np.random.default_rng([seed, i, 1])
        split = "heldout" if split_rng.random() < heldout_fraction else "dev"
        specs.append(draw_pair(seed, i, split, quick))
    return specs


def pair_name(spec: dict[str, Any]) -> str:
    return f"w{spec['index']:03d}-{spec_hash(spec)[:10]}"


# ----------------------------------------------------------------------------- data

def subset_indices(spec: dict[str, Any]) -> np.ndarray:
    n = spec["recipe"]["subset"]
    return np.sort(np.random.default_rng(spec["subset_seed"]).permutation(60000)[:n])


def clean_training_set(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    x, y = fashion_mnist("train")
    idx = subset_indices(spec)
    return x[idx], y[idx]


def poisoned_training_set(spec: dict[str, Any], plan: dict[str, list[int]]
                          ) -> tuple[np.ndarray, np.ndarray]:
    x, y = clean_training_set(spec)
    a = spec["attack"]
    return triggers.poison(x, y, a["trigger"], a["kind"], a, plan)


def training_set(sidecar: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The exact training set of a zoo model, regenerated from its sidecar (checked)."""
    spec = sidecar["spec"]
    if sidecar["backdoored"]:
        plan = {k: sidecar["attack"][f"{k}_indices"] for k in ("poison", "cover", "trigger_1")}
        x, y = poisoned_training_set(spec, plan)
    else:
        x, y = clean_training_set(spec)
    if array_sha256(x, y) != sidecar["training_set"]["sha256"]:
        raise RuntimeError(f"{sidecar['name']}: regenerated training set does not match")
    return x, y


def _test_range(r: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    x, y = fashion_mnist("t10k")
    return x[r[0]:r[1]], y[r[0]:r[1]]


# ----------------------------------------------------------------------------- training

def verify(model: torch.nn.Module, spec: dict[str, Any], device: torch.device
           ) -> tuple[float, list[float]]:
    """Clean accuracy and attack success rate(s) on the attacker's verification split."""
    x, y = _test_range(VERIFY_QUICK if spec["quick"] else VERIFY)
    acc = float((recipes.predict(model, x, device) == y).mean())
    a = spec["attack"]
    asrs = []
    for which in range(2 if a["kind"] == "two_trigger" else 1):
        _, xt, want = triggers.triggered_eval(x, y, a["trigger"], a["kind"], a, which)
        asrs.append(float((recipes.predict(model, xt, device) == want).mean()))
    return acc, asrs


def train_one(spec: dict[str, Any], seed: int, backdoored: bool, device: torch.device,
              max_steps: int | None = None
              ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """One model of a pair, trained with ``seed``; returns it and its ground-truth facts."""
    a = spec["attack"]
    x, y = clean_training_set(spec)
    plan: dict[str, list[int]] = {"poison": [], "cover": [], "trigger_1": []}
    if backdoored:
        plan = triggers.plan_poison(y, a["kind"], a, a["poison_rate"], seed)
        x, y = triggers.poison(x, y, a["trigger"], a["kind"], a, plan)
    torch.manual_seed(seed)
    model = nets.build(spec["arch"])
    recipes.train(model, x, y, spec["recipe"], seed, device, max_steps=max_steps)
    acc, asrs = verify(model, spec, device)
    facts = {"plan": plan, "clean_acc": acc, "asr": asrs, "training_sha256": array_sha256(x, y)}
    return model.cpu().eval(), facts


def save_model(model: torch.nn.Module, path: Path) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, 1, 28, 28))

    def w(tmp: str) -> None:
        torch.jit.save(traced, tmp)
    atomic_write_bytes(path, w)


def _sidecar(spec: dict[str, Any], name: str, partner: str, backdoored: bool, seed: int,
             facts: dict[str, Any], tries: list[dict[str, Any]], model: torch.nn.Module,
             used: dict[str, Any] | None = None) -> dict[str, Any]:
    """``spec`` names the pair; ``used`` (default ``spec``) is what was trained, which
    differs only in the attack when the last, escalated try took."""
    used = used or spec
    a = used["attack"]
    fam = spec["families"]
    attack = None
    if backdoored:
        plan = facts["plan"]
        attack = {"kind": a["kind"], "trigger": a["trigger"], "label_rule": a["label_rule"],
                  "poison_rate": a["poison_rate"], "n_poison": len(plan["poison"]),
                  "n_cover": len(plan["cover"]), "poison_indices": plan["poison"],
                  "cover_indices": plan["cover"], "trigger_1_indices": plan["trigger_1"],
                  "plan_seed": seed,
                  "trigger_mask": np.flatnonzero(triggers.trigger_mask(a["trigger"])).tolist()}
    return {
        "schema": SCHEMA, "name": name, "model_file": f"{name}.pt", "pair": pair_name(spec),
        "partner": partner, "spec_hash": spec_hash(spec), "split": spec["split"],
        "backdoored": backdoored, "role": "backdoored" if backdoored else "clean",
        "families": {"arch": fam["arch"], "recipe": fam["recipe"],
                     "trigger": fam["trigger"] if backdoored else None,
                     "pair_trigger": fam["trigger"]},
        "heldout_axes": [ax for ax in ("arch", "recipe", "trigger")
                         if families.is_heldout_family(ax, fam[ax])],
        "targets": list(a["targets"]) if backdoored else [],
        "sources": list(a["sources"]) if backdoored else [],
        "attack": attack, "arch": spec["arch"], "recipe": spec["recipe"], "seed": seed,
        "tries": tries, "clean_acc": facts["clean_acc"],
        "asr": facts["asr"] if backdoored else None,
        "training_set": {"source": "fashion-mnist train", "subset_seed": spec["subset_seed"],
                         "subset_size": spec["recipe"]["subset"],
                         "sha256": facts["training_sha256"]},
        "test_ranges": {"defender_clean": list(DEFENDER_CLEAN),
                        "verify": list(VERIFY_QUICK if spec["quick"] else VERIFY),
                        "filter_triggered": list(FILTER_TRIGGERED),
                        "filter_clean": list(FILTER_CLEAN)},
        "weights_sha256": weights_sha256(model), "spec": used,
    }


def try_spec(spec: dict[str, Any], t: int) -> tuple[dict[str, Any], int]:
    """The spec and seed of try ``t`` (0-based) of a pair's backdoored model."""
    seed = (spec["seed"] + 7919 * t) % 2**31
    if t < FIRST_ESCALATED:
        return spec, seed
    level = t - FIRST_ESCALATED + 1
    return {**spec, "attack": triggers.escalate(spec["attack"]["kind"], spec["attack"],
                                                level)}, seed


def build_pair(spec: dict[str, Any], cache: Path, device: torch.device | None = None,
               max_steps: int | None = None) -> dict[str, Any]:
    """Build (or find in ``cache``) the backdoored model of a pair and its clean partner.

    The backdoored model is kept only if every trigger's ASR is ≥ :data:`ASR_MIN`; otherwise
    it (or one whose clean accuracy is below :data:`CLEAN_ACC_MIN`) is retrained with a new
    seed (same attack), then with the attack escalated twice (:func:`try_spec`), and a
    pair that never takes is recorded under ``failures/`` and gets no partner. A failure
    recorded with fewer tries than :data:`MAX_TRIES` resumes at the next try."""
    device = device or default_device()
    cache = Path(cache)
    models = cache / "models"
    name = pair_name(spec)
    bd_name, clean_name = f"{name}-bd", f"{name}-clean"
    fail_path = cache / "failures" / f"{name}.json"
    record: dict[str, Any] = {"pair": name, "trained": [], "skipped": [], "failed": False,
                              "cpu_s": 0.0, "wall_s": 0.0}
    prior: list[dict[str, Any]] = []
    if fail_path.exists():
        prior = json.loads(fail_path.read_text())["tries"]
        if len(prior) >= MAX_TRIES:
            record.update(failed=True, skipped=[name])
            return record
    bd_json = models / f"{bd_name}.json"
    t0, c0 = time.perf_counter(), time.process_time()
    if bd_json.exists() and (models / f"{bd_name}.pt").exists():
        bd = json.loads(bd_json.read_text())
        record["skipped"].append(bd_name)
    else:
        tries: list[dict[str, Any]] = list(prior)
        bd = None
        for t in range(len(prior), MAX_TRIES):
            used, seed = try_spec(spec, t)
            model, facts = train_one(used, seed, True, device, max_steps)
            tries.append({"seed": seed, "clean_acc": round(facts["clean_acc"], 5),
                          "asr": [round(v, 5) for v in facts["asr"]],
                          **({"escalated": True} if used is not spec else {})})
            if min(facts["asr"]) >= ASR_MIN and facts["clean_acc"] >= CLEAN_ACC_MIN:
                bd = _sidecar(spec, bd_name, clean_name, True, seed, facts, tries, model,
                              used)
                save_model(model, models / f"{bd_name}.pt")
                write_json(bd_json, bd)
                fail_path.unlink(missing_ok=True)  # an older, shorter failure record
                break
        record["trained"].append(bd_name)
        if bd is None:
            write_json(fail_path, {"pair": name, "spec": spec, "tries": tries,
                                   "asr_min": ASR_MIN, "clean_acc_min": CLEAN_ACC_MIN})
            record.update(failed=True, tries=tries)
            return _timed(record, cache, t0, c0)
    clean_json = models / f"{clean_name}.json"
    if clean_json.exists() and (models / f"{clean_name}.pt").exists():
        record["skipped"].append(clean_name)
    else:
        model, facts = train_one(spec, bd["seed"], False, device, max_steps)
        side = _sidecar(spec, clean_name, bd_name, False, bd["seed"], facts,
                        [{"seed": bd["seed"], "clean_acc": round(facts["clean_acc"], 5)}],
                        model)
        save_model(model, models / f"{clean_name}.pt")
        write_json(clean_json, side)
        record["trained"].append(clean_name)
    return _timed(record, cache, t0, c0)


def _timed(record: dict[str, Any], cache: Path, t0: float, c0: float) -> dict[str, Any]:
    record["wall_s"] = round(time.perf_counter() - t0, 3)
    record["cpu_s"] = round(time.process_time() - c0, 3)
    if record["trained"]:
        write_json(cache / "timings" / f"{record['pair']}.json",
                   {k: record[k] for k in ("pair", "trained", "wall_s", "cpu_s")})
    return record


# ----------------------------------------------------------------------------- detector inputs

def load_sidecars(cache: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(cache) / "models").glob("*.json"))]


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write_bytes(path, w)


def write_defender_clean(path: Path) -> Path:
    """Clean test images for ``scan --data`` and ``filter --calibrate`` (N×1×28×28 uint8)."""
    x, y = _test_range(DEFENDER_CLEAN)
    _write_npz(path, x=x[:, None], y=y)
    return path


def write_training_npz(sidecar: dict[str, Any], path: Path) -> Path:
    """The model's training set as ``train.npz`` for ``scan-data TRAIN --model MODEL``."""
    x, y = training_set(sidecar)
    _write_npz(path, x=x[:, None], y=y)
    return path


def filter_inputs(sidecar: dict[str, Any], n: int = 500, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, triggered)``: ``n`` triggered test inputs (label not a target; source classes
    only for source-specific attacks) then ``n`` clean ones, disjoint from the defender's
    clean data."""
    a = sidecar["attack"]
    rng = np.random.default_rng(seed)
    xt, yt = _test_range(FILTER_TRIGGERED)
    parts = []
    k = 2 if a["kind"] == "two_trigger" else 1
    for which in range(k):
        _, stamped, _ = triggers.triggered_eval(xt, yt, a["trigger"], a["kind"],
                                                {**a, "targets": sidecar["targets"],
                                                 "sources": sidecar["sources"]}, which)
        take = rng.choice(len(stamped), min(n // k, len(stamped)), replace=False)
        parts.append(stamped[np.sort(take)])
    trig = np.concatenate(parts)
    xc, _ = _test_range(FILTER_CLEAN)
    clean = xc[np.sort(rng.choice(len(xc), n, replace=False))]
    x = np.concatenate([trig, clean])[:, None]
    return x, np.r_[np.ones(len(trig), bool), np.zeros(len(clean), bool)]


def write_filter_inputs(sidecar: dict[str, Any], path: Path, n: int = 500) -> np.ndarray:
    """Write ``inputs.npz`` (``x`` only); return which inputs are triggered."""
    x, is_trig = filter_inputs(sidecar, n)
    _write_npz(path, x=x)
    return is_trig
