"""The zoo's own triggers and poisoning: patches, blends, SIG, warps and the label rules of
dirty-label, clean-label, source-specific, all-to-all and two-trigger attacks.

Everything works on ``uint8`` images ``N×28×28`` and is a pure function of its parameters,
which are plain JSON (seeds, not arrays), so a sidecar regenerates the exact poisoned set.
Written independently of ``trojanscan.attacks``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

H = W = 28
PLACEMENTS = ("corner", "edge", "centre")
PATCH_STYLES = ("random", "checker", "solid", "cross", "random_gray")
BLEND_STYLES = ("noise", "smooth", "image")
TRIGGER_KINDS = ("patch_corner", "patch_edge", "patch_centre", "blend_noise", "blend_smooth",
                 "blend_image", "sig", "warp", "source_specific", "all_to_all", "two_trigger")
#: the poison-rate range (fraction of the training set) each kind is drawn from
RATE_RANGES = {"sig": (0.03, 0.08), "warp": (0.05, 0.10), "all_to_all": (0.03, 0.10),
               "source_specific": (0.003, 0.05), "two_trigger": (0.01, 0.10)}
DEFAULT_RATE_RANGE = (0.003, 0.10)


# ----------------------------------------------------------------------------- drawing

def _place(rng: np.random.Generator, placement: str, size: int) -> tuple[int, int]:
    hi = H - size
    near = [0, 1, 2, hi - 2, hi - 1, hi]
    if placement == "corner":
        return int(rng.choice(near)), int(rng.choice(near))
    if placement == "edge":
        mid = int(rng.integers(5, hi - 4))
        edge = int(rng.choice(near))
        return (edge, mid) if rng.random() < 0.5 else (mid, edge)
    if placement == "centre":
        c = hi // 2
        return int(c + rng.integers(-3, 4)), int(c + rng.integers(-3, 4))
    raise ValueError(f"unknown placement {placement!r}")


def draw_patch(rng: np.random.Generator, placement: str | None = None) -> dict[str, Any]:
    """A 2–8 px patch with a random or structured pattern and its own colours."""
    placement = placement or str(rng.choice(PLACEMENTS))
    size = int(rng.integers(2, 9))
    top, left = _place(rng, placement, size)
    return {"kind": "patch", "placement": placement, "size": size, "top": top, "left": left,
            "style": str(rng.choice(PATCH_STYLES)), "hi": int(rng.integers(160, 256)),
            "lo": int(rng.integers(0, 81)), "pattern_seed": int(rng.integers(2**31))}


def draw_trigger(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """Trigger parameters for one trigger kind (see :data:`TRIGGER_KINDS`)."""
    if kind.startswith("patch_"):
        return draw_patch(rng, kind.removeprefix("patch_"))
    if kind.startswith("blend_"):
        return {"kind": "blend", "style": kind.removeprefix("blend_"),
                "alpha": round(float(rng.uniform(0.05, 0.3)), 4),
                "pattern_seed": int(rng.integers(2**31)),
                "image_index": int(rng.integers(0, 10000))}
    if kind == "sig":
        return {"kind": "sig", "delta": int(rng.integers(20, 41)),
                "freq": int(rng.integers(3, 9)), "vertical": bool(rng.random() < 0.5)}
    if kind == "warp":
        return {"kind": "warp", "k": int(rng.choice([3, 4, 5])),
                "strength": round(float(rng.uniform(2.0, 4.0)), 4),
                "grid_seed": int(rng.integers(2**31))}
    if kind in ("source_specific", "all_to_all"):
        return draw_patch(rng)
    if kind == "two_trigger":
        first = draw_patch(rng)
        for _ in range(100):
            second = draw_patch(rng)
            if not _overlap(first, second):
                return {"kind": "multi", "triggers": [first, second]}
        raise RuntimeError("could not place two disjoint patches")
    raise ValueError(f"unknown trigger kind {kind!r}")


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return not (a["top"] + a["size"] <= b["top"] or b["top"] + b["size"] <= a["top"]
                or a["left"] + a["size"] <= b["left"] or b["left"] + b["size"] <= a["left"])


def escalate(kind: str, attack: dict[str, Any], level: int = 1) -> dict[str, Any]:
    """The attack an attacker tries when a backdoor did not take: the same trigger kind,
    placement and pattern, made stronger inside its family.

    Level 1: twice the poison rate (within the kind's range); patches at full contrast
    (0/255), blends at 1.5× α (≤ 0.3), SIG at its largest amplitude, warps at 1.25×
    strength (≤ 4). Level 2: the kind's largest poison rate, patches at full contrast,
    blends at α 0.3, SIG at its largest amplitude, warps at strength 4."""
    if level not in (1, 2):
        raise ValueError(f"escalation level must be 1 or 2, got {level}")
    _, rate_hi = RATE_RANGES.get(kind, DEFAULT_RATE_RANGE)

    def strongest(t: dict[str, Any]) -> dict[str, Any]:
        if t["kind"] == "patch":
            return {**t, "hi": 255, "lo": 0}
        if t["kind"] == "blend":
            return {**t, "alpha": 0.3 if level == 2 else round(min(0.3, t["alpha"] * 1.5), 4)}
        if t["kind"] == "sig":
            return {**t, "delta": 40}
        if t["kind"] == "warp":
            return {**t, "strength": 4.0 if level == 2
                    else round(min(4.0, t["strength"] * 1.25), 4)}
        if t["kind"] == "multi":
            return {**t, "triggers": [strongest(u) for u in t["triggers"]]}
        raise ValueError(f"unknown trigger {t['kind']!r}")

    rate = attack["poison_rate"]
    up = rate_hi if level == 2 else min(rate_hi, 2 * rate)
    return {**attack, "trigger": strongest(attack["trigger"]),
            "poison_rate": round(max(rate, up), 5),
            "escalated_from": {"poison_rate": rate, "trigger": attack["trigger"],
                               **({"level": 2} if level == 2 else {})}}


def draw_rate(rng: np.random.Generator, kind: str, floor: float = 0.0) -> float:
    """A poison rate, log-uniform within the kind's range (all inside 0.3–10%), raised to
    ``floor`` where that is higher (the small ``--quick`` zoo)."""
    lo, hi = RATE_RANGES.get(kind, DEFAULT_RATE_RANGE)
    lo = min(max(lo, floor), hi)
    return round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 5)


# ----------------------------------------------------------------------------- patterns

def patch_pattern(p: dict[str, Any]) -> np.ndarray:
    """The ``size×size`` uint8 pattern of a patch trigger."""
    s, hi, lo = p["size"], p["hi"], p["lo"]
    rng = np.random.default_rng(p["pattern_seed"])
    style = p["style"]
    if style == "random":
        bits = rng.random((s, s)) < 0.5
        bits.flat[0], bits.flat[-1] = True, False  # never all one colour
        return np.where(bits, hi, lo).astype(np.uint8)
    if style == "checker":
        ii, jj = np.indices((s, s))
        return np.where((ii + jj) % 2 == 0, hi, lo).astype(np.uint8)
    if style == "solid":
        return np.full((s, s), hi, np.uint8)
    if style == "cross":
        out = np.full((s, s), lo, np.uint8)
        out[s // 2, :] = hi
        out[:, s // 2] = hi
        return out
    if style == "random_gray":
        return rng.integers(lo, hi + 1, (s, s)).astype(np.uint8)
    raise ValueError(f"unknown patch style {style!r}")


def patch_mask(p: dict[str, Any]) -> np.ndarray:
    """Boolean ``28×28`` mask of the pixels a patch trigger writes."""
    m = np.zeros((H, W), bool)
    m[p["top"]:p["top"] + p["size"], p["left"]:p["left"] + p["size"]] = True
    return m


def blend_pattern(p: dict[str, Any], image_source: np.ndarray | None = None) -> np.ndarray:
    """The float ``28×28`` pattern in [0, 255] a blend trigger mixes in."""
    rng = np.random.default_rng(p["pattern_seed"])
    style = p["style"]
    if style == "noise":
        return rng.uniform(0, 255, (H, W))
    if style == "smooth":
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, 7, 7)))
        up = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True)[0, 0]
        up = (up - up.min()) / (up.max() - up.min() + 1e-12)
        return up.numpy() * 255.0
    if style == "image":
        if image_source is None:
            from .idx import fashion_mnist
            image_source = fashion_mnist("t10k")[0]
        # a test image turned upside down, so it is no clean class's look
        return image_source[p["image_index"]][::-1].astype(np.float64)
    raise ValueError(f"unknown blend style {style!r}")


def warp_grid(p: dict[str, Any]) -> torch.Tensor:
    """The ``1×28×28×2`` sampling grid of a warp trigger (a smooth random displacement)."""
    rng = np.random.default_rng(p["grid_seed"])
    k = p["k"]
    ctrl = torch.from_numpy(rng.uniform(-1, 1, (1, 2, k, k)))
    ctrl = ctrl / ctrl.abs().mean()
    flow = F.interpolate(ctrl, size=(H, W), mode="bicubic", align_corners=True)
    flow = flow.permute(0, 2, 3, 1) * (p["strength"] / H)
    lin = torch.linspace(-1, 1, H, dtype=torch.float64)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    ident = torch.stack([gx, gy], dim=-1)[None]
    return torch.clamp(ident + flow, -1, 1)


# ----------------------------------------------------------------------------- stamping

def apply_trigger(x: np.ndarray, p: dict[str, Any], which: int = 0,
                  image_source: np.ndarray | None = None) -> np.ndarray:
    """``x`` (uint8 ``N×28×28``) with the trigger applied; a new array, ``x`` untouched.

    ``which`` picks the trigger of a two-trigger attack."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ValueError("apply_trigger expects uint8 N×28×28 images")
    kind = p["kind"]
    if kind == "multi":
        return apply_trigger(x, p["triggers"][which], image_source=image_source)
    if kind == "patch":
        out = x.copy()
        t, left, s = p["top"], p["left"], p["size"]
        out[:, t:t + s, left:left + s] = patch_pattern(p)
        return out
    xf = x.astype(np.float64)
    if kind == "blend":
        a = p["alpha"]
        out_f = (1 - a) * xf + a * blend_pattern(p, image_source)[None]
    elif kind == "sig":
        j = np.arange(W if not p["vertical"] else H)
        wave = p["delta"] * np.sin(2 * np.pi * j * p["freq"] / W)
        out_f = xf + (wave[:, None] if p["vertical"] else wave[None, :])[None]
    elif kind == "warp":
        grid = warp_grid(p).expand(len(x), -1, -1, -1)
        warped = F.grid_sample(torch.from_numpy(xf)[:, None], grid, mode="bilinear",
                               padding_mode="border", align_corners=True)
        out_f = warped[:, 0].numpy()
    else:
        raise ValueError(f"unknown trigger kind {kind!r}")
    return np.clip(np.rint(out_f), 0, 255).astype(np.uint8)


def trigger_mask(p: dict[str, Any], which: int | None = None) -> np.ndarray:
    """Boolean ``28×28`` mask of the pixels a trigger may change (whole image for
    blend/SIG/warp; the union of both patches for a two-trigger attack unless ``which``)."""
    if p["kind"] == "patch":
        return patch_mask(p)
    if p["kind"] == "multi":
        parts = p["triggers"] if which is None else [p["triggers"][which]]
        return np.logical_or.reduce([patch_mask(t) for t in parts])
    return np.ones((H, W), bool)


# ----------------------------------------------------------------------------- poisoning

def attack_labels(kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """Targets and source classes of an attack kind."""
    classes = np.arange(10)
    if kind == "all_to_all":
        return {"targets": list(range(10)), "sources": [], "label_rule": "y+1 mod 10"}
    target = int(rng.integers(10))
    if kind == "source_specific":
        n_src = int(rng.integers(1, 3))
        sources = sorted(int(s) for s in rng.choice(classes[classes != target], n_src,
                                                    replace=False))
        return {"targets": [target], "sources": sources, "label_rule": "source->target"}
    if kind == "two_trigger":
        t2 = int(rng.choice(classes[classes != target]))
        return {"targets": [target, t2], "sources": [], "label_rule": "trigger i -> target i"}
    if kind == "sig":
        return {"targets": [target], "sources": [], "label_rule": "clean-label"}
    return {"targets": [target], "sources": [], "label_rule": "all->target"}


def plan_poison(y: np.ndarray, kind: str, labels: dict[str, Any], rate: float,
                seed: int) -> dict[str, list[int]]:
    """Which training samples are stamped (sorted indices into ``y``), per trigger.

    Returns ``{"poison": [...], "cover": [...], "trigger_1": [...]}``: ``poison`` is every
    stamped sample whose label the attack sets (for SIG: stamped, label kept), ``cover`` the
    stamped samples of a source-specific attack that keep their label, ``trigger_1`` the
    subset of ``poison`` carrying the second trigger of a two-trigger attack."""
    rng = np.random.default_rng(seed)
    n = max(1, round(rate * len(y)))
    targets, sources = labels["targets"], labels["sources"]
    out: dict[str, list[int]] = {"poison": [], "cover": [], "trigger_1": []}
    if kind == "sig":
        cand = np.flatnonzero(y == targets[0])
    elif kind == "source_specific":
        cand = np.flatnonzero(np.isin(y, sources))
    elif kind == "all_to_all":
        cand = np.arange(len(y))
    else:
        cand = np.flatnonzero(~np.isin(y, targets))
    chosen = rng.choice(cand, min(n, len(cand)), replace=False)
    out["poison"] = sorted(int(i) for i in chosen)
    if kind == "source_specific":
        others = np.flatnonzero(~np.isin(y, sources + targets))
        cover = rng.choice(others, min(len(chosen) // 2, len(others)), replace=False)
        out["cover"] = sorted(int(i) for i in cover)
    if kind == "two_trigger":
        half = rng.permutation(chosen)[: len(chosen) // 2]
        out["trigger_1"] = sorted(int(i) for i in half)
    return out


def poison(x: np.ndarray, y: np.ndarray, trigger: dict[str, Any], kind: str,
           labels: dict[str, Any], plan: dict[str, list[int]],
           image_source: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The poisoned training set ``(x, y)`` (copies) from a clean one and a plan."""
    x, y = x.copy(), y.copy()
    idx = np.asarray(plan["poison"], dtype=np.int64)
    second = np.asarray(plan["trigger_1"], dtype=np.int64)
    first = np.setdiff1d(idx, second)
    x[first] = apply_trigger(x[first], trigger, 0, image_source)
    if len(second):
        x[second] = apply_trigger(x[second], trigger, 1, image_source)
    cover = np.asarray(plan["cover"], dtype=np.int64)
    if len(cover):
        x[cover] = apply_trigger(x[cover], trigger, 0, image_source)
    t = labels["targets"]
    if kind == "all_to_all":
        y[idx] = (y[idx] + 1) % 10
    elif kind == "two_trigger":
        y[first], y[second] = t[0], t[1]
    elif kind != "sig":
        y[idx] = t[0]
    return x, y


def triggered_eval(x: np.ndarray, y: np.ndarray, trigger: dict[str, Any], kind: str,
                   labels: dict[str, Any], which: int = 0,
                   image_source: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Test inputs for the ASR: ``(indices, stamped x, label the attacker wants)``.

    Only inputs whose true label is not the target (and, for source-specific attacks, only
    the source classes)."""
    t = labels["targets"]
    if kind == "all_to_all":
        keep = np.arange(len(y))
        want = (y + 1) % 10
    else:
        target = t[which] if kind == "two_trigger" else t[0]
        ok = y != target
        if kind == "source_specific":
            ok &= np.isin(y, labels["sources"])
        keep = np.flatnonzero(ok)
        want = np.full(len(y), target)
    return keep, apply_trigger(x[keep], trigger, which, image_source), want[keep]
