"""Self-references: clean models of the suspect's own architecture, as the detectors' null.

A model trained elsewhere is judged against references that do not fit it: MNTD's
reference models are of other architectures (a clean model of an unlike architecture
out-scores them), and Neural Cleanse's reference decision needs clean models of the same
task. A *self-reference* is a copy of the suspect with every parameter re-drawn
(:func:`reinitialise`) and trained briefly on the defender's labelled clean data
(:func:`train_self_references`): the same architecture, known to be clean.

:func:`scan_with_self_references` splits the clean data in two (seeded): the first half
trains the self-references, the second (held out) measures their accuracy and is the
data every detector reads, on the self-references and on the suspect alike. Neural Cleanse
then takes the self-references' per-label norms as its ``reference``. MNTD's raw outputs on
them are computed and reported but, by default, not applied (``apply_to_mntd``): briefly
trained copies are not a representative null for MNTD (on 8×8 digits ``bn_cnn`` they
out-scored a fully trained clean model, and shifting MNTD's null to them hid a backdoor).
Applied, they become MNTD's ``architecture_null`` (its null shifted up to their median,
never down: :class:`trojanscan.detectors.mntd.MNTD`). A self-reference that cannot be trained (no
parameters, no gradient reaching them, accuracy under 0.85 × the suspect's) is dropped with
its reason; with fewer than two left the scan runs without them and says so.

Self-references are cached under a key made of the architecture (parameter and buffer
names, shapes and dtypes, module types, TorchScript code — no weights), the clean data's
sha256, the seed, the count and the training budget: a second model of the same
architecture reuses them. An architecture whose copies could not be trained (each dropped
with its reason) is cached as such, so a second model of it is not trained again. Cache
files are safetensors (weights) and JSON (everything else), never pickles; the detectors'
outputs on the self-references are cached too, keyed by the detector settings.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .classifier import check_classifier, known_classifier
from .dataset import ImageDataset
from .exceptions import DetectorNotApplicable, ParameterError
from .training import TrainConfig, evaluate, train_model
from .utils import atomic_write_bytes, atomic_write_text

#: self-references built by default
DEFAULT_COUNT = 3
#: sample passes (samples × epochs) each self-reference is trained for by default
DEFAULT_BUDGET = 20_000
#: a self-reference must reach this share of the suspect's held-out accuracy. On 8×8
#: digits (self-references trained on ~180 samples), LeNet self-references at 0.82-0.84 of
#: the suspect's accuracy made Neural Cleanse flag a label of two clean LeNets, while
#: small_cnn ones at 0.89-0.91 cleared a label the paper's rule flagged on a clean model;
#: set from those few tiny models only
MIN_ACCURACY_RATIO = 0.85
#: environment variable naming the cache folder
CACHE_ENV = "TROJANSCAN_SELF_REFERENCE_CACHE"
#: bump when the cache's contents change meaning
CACHE_VERSION = 1
#: detectors whose null the self-references provide
USES = ("neural_cleanse", "mntd")


def default_cache_dir() -> Path:
    """``$TROJANSCAN_SELF_REFERENCE_CACHE``, else ``~/.cache/trojanscan/self-references``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "trojanscan" / "self-references"


# -- re-initialisation ------------------------------------------------------------------


def _fan_in(shape: Sequence[int]) -> int:
    return int(shape[1]) * int(np.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


def reinitialise(module: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``module`` (eager, TorchScript or the ONNX-converted module) with
    every parameter re-drawn from ``seed``; ``module`` itself is not touched.

    As torch's layer defaults: a weight of two or more dimensions (convolution, linear)
    is uniform in ±1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5)), the bias beside it
    uniform in ±1/sqrt(that fan_in); a one-dimensional weight (a norm layer's scale) is
    1 and its bias 0. BatchNorm running statistics are reset (mean 0, variance 1, count
    0). Parameters are drawn in ``named_parameters`` order from one seeded generator.
    """
    twin = _copy(module)
    gen = torch.Generator().manual_seed(int(seed))
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            prefix, _, leaf = name.rpartition(".")
            sibling = params.get(f"{prefix}.weight" if prefix else "weight")
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(max(1, _fan_in(p.shape)))
            elif sibling is not None and sibling is not p and sibling.dim() >= 2:
                bound = 1.0 / math.sqrt(max(1, _fan_in(sibling.shape)))
            elif leaf == "weight" or (sibling is None and "weight" in leaf):
                p.fill_(1.0)
                continue
            elif sibling is not None and sibling.dim() == 1:
                p.zero_()
                continue
            else:
                bound = 1.0 / math.sqrt(max(1, p.numel()))
            draw = torch.rand(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(((draw * 2.0 - 1.0) * bound).to(p.dtype))
        for name, b in twin.named_buffers():
            leaf = name.rpartition(".")[2]
            if leaf == "running_mean":
                b.zero_()
            elif leaf == "running_var":
                b.fill_(1.0)
            elif leaf == "num_batches_tracked":
                b.zero_()
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters are leaves (a deep-copied ScriptModule's are not, so
    an optimiser refuses them: a TorchScript module is copied through its own format)."""
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        dev = next((t.device for t in module.parameters()), torch.device("cpu"))
        return torch.jit.load(buf, map_location=dev)
    return copy.deepcopy(module)


def architecture_signature(module: nn.Module) -> str:
    """sha256 of the architecture without its weights: parameter and buffer names,
    shapes and dtypes, module types (TorchScript: original names and code)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"P {name} {tuple(p.shape)} {p.dtype}\n".encode())
    for name, b in module.named_buffers():
        h.update(f"B {name} {tuple(b.shape)} {b.dtype}\n".encode())
    for name, m in module.named_modules():
        kind = getattr(m, "original_name", None) or type(m).__name__
        h.update(f"M {name} {kind}\n".encode())
        code = _script_code(m)
        if code:
            h.update(code.encode())
    return h.hexdigest()


def _script_code(m: nn.Module) -> str:
    if not isinstance(m, torch.jit.ScriptModule):
        return ""
    try:
        return str(m.code)
    except Exception:  # a module without a forward of its own
        return ""


# -- training ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfReferences:
    """Trained self-references and how they came about."""

    models: list[nn.Module]
    accuracies: list[float]
    dropped: dict[int, str]
    suspect_accuracy: float
    train_size: int
    held_out_size: int
    budget: int
    seed: int
    seconds: float
    cached: bool
    key: str
    detector_outputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return len(self.models) >= 2


def split_clean(clean: ImageDataset, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Seeded halves of ``clean``: (training part for the self-references, held-out part
    for their accuracy and for every detector)."""
    if clean.y is None:
        raise ParameterError("self-references need labelled clean data (they are trained "
                             "on it)")
    n = len(clean)
    if n < 20:
        raise ParameterError(f"self-references need at least 20 labelled clean samples, "
                             f"got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 7919))
    half = n // 2
    return (clean.subset(perm[:half].sort().values),
            clean.subset(perm[half:].sort().values))


def train_self_references(module: nn.Module, clean: ImageDataset, n: int = DEFAULT_COUNT,
                          seed: int = 0, budget: int = DEFAULT_BUDGET, *,
                          held_out: ImageDataset | None = None,
                          device: str | torch.device | None = None) -> SelfReferences:
    """``n`` re-initialised copies of ``module`` trained on labelled ``clean`` data (Adam,
    the project trainer, ``budget`` sample passes each, copy ``i`` from seed
    ``seed + i``), with their accuracy on ``held_out`` (default: ``clean``). A copy that
    cannot be trained, or reaches less than :data:`MIN_ACCURACY_RATIO` of the suspect's
    accuracy (and at least twice chance), is dropped with its reason."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 32:
        raise ParameterError(f"invalid self-reference count: expected an integer in [1, 32], "
                             f"got {n!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ParameterError(f"invalid self-reference budget: expected a positive number "
                             f"of sample passes, got {budget!r}")
    if clean.y is None:
        raise ParameterError("self-references need labelled clean data")
    t0 = time.perf_counter()
    test = held_out if held_out is not None else clean
    k = clean.num_classes
    blocked = _untrainable(module)
    if blocked is not None:
        return SelfReferences([], [], dict.fromkeys(range(n), blocked), float("nan"),
                              len(clean), len(test), budget, seed, 0.0, False, "")
    suspect_acc = evaluate(module, test, device=device)
    floor = max(MIN_ACCURACY_RATIO * suspect_acc, 2.0 / max(k, 2))
    epochs = max(1, math.ceil(budget / max(1, len(clean))))
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3)
    models: list[nn.Module] = []
    accs: list[float] = []
    dropped: dict[int, str] = {}
    for i in range(n):
        twin = reinitialise(module, seed + i)
        reason = _untrainable(twin)
        if reason is None:
            before = [p.detach().clone() for p in twin.parameters()]
            try:
                twin = train_model(twin, clean, config=cfg, seed=seed + i, device=device,
                                   num_classes=k, description=f"self-reference {i + 1}/{n}")
            except RuntimeError as exc:
                reason = f"training failed ({str(exc).splitlines()[0] if str(exc) else exc})"
            else:
                if all(torch.equal(b, p.detach().cpu()) for b, p in
                       zip(before, twin.parameters())):
                    reason = "no gradient reached its parameters"
        if reason is None:
            acc = evaluate(twin, test, device=device)
            if acc < floor:
                reason = (f"accuracy {acc:.3f} below the floor {floor:.3f} "
                          f"({MIN_ACCURACY_RATIO:g} × the model's {suspect_acc:.3f}): "
                          "under-trained references are no null for it")
            else:
                models.append(twin)
                accs.append(acc)
                continue
        dropped[i] = reason
    return SelfReferences(models, accs, dropped, suspect_acc, len(clean), len(test), budget,
                          seed, time.perf_counter() - t0, False, "")


def _untrainable(module: nn.Module) -> str | None:
    params = list(module.parameters())
    if not params:
        return "it has no parameters (a frozen graph); it cannot be re-trained"
    if not any(p.is_floating_point() for p in params):
        return "it has no floating-point parameters"
    return None


# -- cache ------------------------------------------------------------------------------


def cache_key(module: nn.Module, data_sha: str, seed: int, n: int, budget: int) -> str:
    text = json.dumps({"v": CACHE_VERSION, "arch": architecture_signature(module),
                       "data": data_sha, "seed": seed, "n": n, "budget": budget},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _data_sha(clean: ImageDataset) -> str:
    """sha256 of the samples and labels (for data sets that carry no sha of their own)."""
    h = hashlib.sha256(clean.x.detach().cpu().contiguous().numpy().tobytes())
    h.update(clean.labels().cpu().numpy().tobytes())
    return h.hexdigest()


def _save(folder: Path, refs: SelfReferences) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(refs.models):
        state = {k: v.detach().cpu().contiguous().clone() for k, v in m.state_dict().items()}
        atomic_write_bytes(folder / f"ref{i}.safetensors", save(state))
    _write_meta(folder, refs)


def _write_meta(folder: Path, refs: SelfReferences) -> None:
    meta = {"version": CACHE_VERSION, "key": refs.key, "count": len(refs.models),
            "accuracies": refs.accuracies, "dropped": {str(k): v for k, v in
                                                       refs.dropped.items()},
            "suspect_accuracy": refs.suspect_accuracy, "train_size": refs.train_size,
            "held_out_size": refs.held_out_size, "budget": refs.budget, "seed": refs.seed,
            "training_seconds": refs.seconds, "detector_outputs": refs.detector_outputs}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))


def _load(folder: Path, module: nn.Module, key: str) -> SelfReferences | None:
    """The cached self-references under ``folder`` (None when absent or unreadable)."""
    from safetensors.torch import load

    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            return None
        models = []
        for i in range(int(meta["count"])):
            state = load((folder / f"ref{i}.safetensors").read_bytes())
            twin = reinitialise(module, int(meta["seed"]) + i)
            twin.load_state_dict(state)
            models.append(twin.eval())
        return SelfReferences(models, [float(a) for a in meta["accuracies"]],
                              {int(k): str(v) for k, v in meta["dropped"].items()},
                              float(meta["suspect_accuracy"]), int(meta["train_size"]),
                              int(meta["held_out_size"]), int(meta["budget"]),
                              int(meta["seed"]), float(meta["training_seconds"]), True, key,
                              dict(meta.get("detector_outputs") or {}))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def build_self_references(module: nn.Module, clean: ImageDataset, *, n: int = DEFAULT_COUNT,
                          seed: int = 0, budget: int = DEFAULT_BUDGET,
                          cache_dir: Path | None = None,
                          device: str | torch.device | None = None,
                          ) -> tuple[SelfReferences, ImageDataset]:
    """Self-references for ``module`` from ``clean`` (cached), and the held-out part of
    ``clean`` the detectors read (:func:`split_clean`). ``cache_dir`` None: no cache."""
    train, held = split_clean(clean, seed)
    key = cache_key(module, _data_sha(clean), seed, n, budget)
    folder = None if cache_dir is None else Path(cache_dir) / key
    if folder is not None:
        hit = _load(folder, module, key)
        if hit is not None:
            return hit, held
    refs = train_self_references(module, train, n, seed, budget, held_out=held, device=device)
    refs = SelfReferences(refs.models, refs.accuracies, refs.dropped, refs.suspect_accuracy,
                          refs.train_size, refs.held_out_size, refs.budget, refs.seed,
                          refs.seconds, False, key)
    if folder is not None and (refs.models or refs.dropped):
        _save(folder, refs)  # a failure too: the next model of this architecture reuses it
    return refs, held


# -- scanning ---------------------------------------------------------------------------


def _settings_key(name: str, params: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in params.items() if k not in ("reference", "architecture_null")}
    return f"{name}:" + hashlib.sha256(json.dumps(shown, sort_keys=True, default=str)
                                       .encode()).hexdigest()[:16]


def reference_outputs(refs: SelfReferences, held: ImageDataset, names: Sequence[str], *,
                      seed: int, device: str | torch.device | None,
                      detector_params: Mapping[str, Mapping[str, Any]],
                      cache_dir: Path | None = None) -> dict[str, Any]:
    """Run the detectors that take a null (:data:`USES`) on every self-reference:
    Neural Cleanse's per-label L1 norms (R×K) and MNTD's raw outputs (R), cached beside
    the self-references by detector settings. A detector that does not apply to them is
    left out with its reason."""
    from . import detectors as registry

    out: dict[str, Any] = {}
    changed = False
    for name in names:
        if name not in USES:
            continue
        params: dict[str, Any] = {"seed": seed, "device": None if device is None
                                  else str(device)}
        params.update({k: v for k, v in (detector_params.get(name) or {}).items()
                       if k not in ("reference", "architecture_null")})
        skey = _settings_key(name, params)
        cached = refs.detector_outputs.get(skey)
        if cached is not None:
            out[name] = cached
            continue
        values: list[Any] = []
        reason = None
        for m in refs.models:
            det = registry.create(name, **params)
            k = check_classifier(m, held.x[:2], what="clean data")
            try:
                with known_classifier(m, held.input_shape, k):
                    res = det.fit(m, held)
            except DetectorNotApplicable as exc:
                reason = str(exc)
                break
            ev = res.evidence
            values.append([float(v) for v in ev["l1_norms"]] if name == "neural_cleanse"
                          else float(ev["raw_score"]))
        entry = {"values": values, "not_applicable": reason}
        out[name] = entry
        refs.detector_outputs[skey] = entry
        changed = True
    if changed and cache_dir is not None and refs.key and refs.models:
        folder = Path(cache_dir) / refs.key
        if folder.is_dir():
            _write_meta(folder, refs)
    return out


@dataclass(frozen=True)
class SelfReferenceScan:
    """What :func:`scan_with_self_references` adds to a scan: the clean data the
    detectors read, their settings with the self-references' null, and the summary."""

    clean: ImageDataset
    detector_params: dict[str, dict[str, Any]]
    summary: dict[str, Any]


def prepare_self_references(module: nn.Module, clean: ImageDataset, names: Sequence[str], *,
                            n: int = DEFAULT_COUNT, seed: int = 0,
                            budget: int = DEFAULT_BUDGET, cache_dir: Path | None = None,
                            device: str | torch.device | None = None,
                            detector_params: Mapping[str, Mapping[str, Any]] | None = None,
                            apply_to_mntd: bool = False) -> SelfReferenceScan:
    """Build (or load) the self-references, run the null-taking detectors on them and
    return the settings a scan of ``module`` uses: Neural Cleanse's ``reference``, MNTD's
    ``architecture_null``, on the held-out clean data. Falls back to the plain settings,
    saying why, when fewer than two self-references could be trained."""
    t0 = time.perf_counter()
    params = {k: dict(v) for k, v in (detector_params or {}).items()}
    if "reference" in params.get("neural_cleanse", {}):
        raise ParameterError("give Neural Cleanse's references either by self-references "
                             "(--references auto) or by --nc-reference/--param, not both")
    refs, held = build_self_references(module, clean, n=n, seed=seed, budget=budget,
                                       cache_dir=cache_dir, device=device)
    summary: dict[str, Any] = {
        "requested": n, "used": len(refs.models), "accuracies": refs.accuracies,
        "suspect_accuracy": refs.suspect_accuracy, "dropped": {str(k): v for k, v in
                                                              refs.dropped.items()},
        "from_cache": refs.cached, "cache_key": refs.key,
        "training_budget_sample_passes": refs.budget, "train_size": refs.train_size,
        "held_out_size": refs.held_out_size,
        "training_seconds": refs.seconds, "seed": seed,
    }
    if not refs.usable:
        summary.update(active=False, seconds=time.perf_counter() - t0,
                       note=(f"self-references not used: {len(refs.models)} of {n} could be "
                             f"trained ({'; '.join(refs.dropped.values()) or 'none asked'})"
                             "; the detectors ran on their usual references"))
        return SelfReferenceScan(clean, params, summary)
    outs = reference_outputs(refs, held, names, seed=seed, device=device,
                             detector_params=params, cache_dir=cache_dir)
    applied: list[str] = []
    for name, entry in outs.items():
        if entry.get("not_applicable") or len(entry.get("values") or []) < 2:
            continue
        if name == "mntd" and not apply_to_mntd:
            continue
        key = "reference" if name == "neural_cleanse" else "architecture_null"
        params.setdefault(name, {})[key] = entry["values"]
        applied.append(name)
    if "mntd" in outs and "mntd" not in applied:
        summary["mntd_null"] = ("reported, not applied: briefly trained self-references "
                                "are not a representative null for MNTD")
    summary.update(active=True, applied_to=applied, detector_outputs=outs,
                   seconds=time.perf_counter() - t0,
                   note=(f"{len(refs.models)} self-references (the model's own architecture, "
                         f"re-initialised and trained on half the clean data, held-out "
                         f"accuracy {', '.join(f'{a:.3f}' for a in refs.accuracies)}) were "
                         f"the null of {', '.join(applied) or 'no detector'}"
                         f"{' (from the cache)' if refs.cached else ''}; the detectors read "
                         f"the other {refs.held_out_size} clean samples"))
    return SelfReferenceScan(held, params, summary)


__all__ = ["CACHE_ENV", "DEFAULT_BUDGET", "DEFAULT_COUNT", "SelfReferenceScan",
           "SelfReferences", "architecture_signature", "build_self_references",
           "default_cache_dir", "prepare_self_references", "reinitialise",
           "train_self_references"]
