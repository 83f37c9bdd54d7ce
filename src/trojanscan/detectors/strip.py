"""STRIP — Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan Attacks
on Deep Neural Networks", ACSAC 2019.

Needs: the model and clean inputs (no labels, no training data). Works on any model
that maps ``N×C×H×W`` inputs in [0, 1] to logits.

Each input is superimposed with ``n_overlays`` (paper: 100) clean images drawn from a
held-out overlay pool; the score is the mean, over the overlays, of the Shannon entropy
(bits) of each perturbed prediction *over the classes* (softmax first). A trigger that
dominates the prediction survives the superimposition, so triggered inputs keep low
entropy; the reported score is the **negative entropy** (higher = more suspicious).

Superimposition (``blend``): ``"sum"`` adds the two images pixel by pixel, unclipped —
literally what the reference code does (``cv2.addWeighted(bg, 1, overlay, 1, 0)`` on its
float, mean/std-normalised CIFAR images), so values reach 2; ``"sum_clip"`` (default) is
the same sum clipped to [0, 1] — what ``cv2.addWeighted`` does on ``uint8`` images, and
the faithful reading for models whose inputs live in [0, 1] as in our contract (the
unclipped sum feeds them values they never saw: on our Fashion-MNIST BadNets model it
let 25% of triggered inputs through at 1% FRR versus 2–3% clipped, see
docs/benchmarks/runtime.md); ``"max"`` takes the pixel-wise maximum (our addition, an
occlusion-like superimposition that never saturates beyond the brighter image; best of
the four on the Fashion-MNIST BadNets model); ``"average"`` takes their mean, staying in
[0, 1] (it weakens a patch trigger to half its intensity, but suits whole-image blends).

Summary over the overlays (``statistic``): ``"mean"`` entropy as in the paper, or the
``"median"`` (our addition): a triggered input whose trigger is covered and erased by a
few bright overlays (a white corner patch under a bag or a boot) gets a few high-entropy
overlays that pull its mean up, but not its median. Measured *worse* than the mean on our
Fashion-MNIST BadNets model (FAR 4.6% vs 1.9% at FRR ≤ 1%, docs/benchmarks/runtime.md):
clean inputs have many confident overlays too, and the mean's tail separates them.
``"consistency"`` (our addition, :func:`~trojanscan.maths.runtime.consistency`): the mean
log-probability the overlays leave on the input's *own* predicted class — entropy rewards any
confident prediction, including the overlay's class, while a trigger keeps the prediction
on its target. ``"tail"`` (our addition): the mean of the highest 10% of the overlays'
entropies — a clean input is confident on most overlays as well, and what sets it apart
is the few overlays that leave the model unsure, which the mean dilutes among the
confident ones; on the Fashion-MNIST BadNets and Blend models it cut the best achievable
FAR at a 1% FRR from 0.65–0.90% (mean) to 0.05–0.25%, but on the tiny digits model of the tests (32
overlays, so a tail of 3) it was worse than the mean (docs/benchmarks/runtime.md).
:meth:`Strip.entropy` is for the entropy statistics (mean, median, tail) only.

Calibration (``fit``): the clean data are split with ``seed`` into an overlay pool
(``pool_fraction``), a fit part and a holdout part (``holdout_fraction``). The threshold
is set on the fit part at the requested false-rejection rate ``frr`` — by the paper's
rule (``threshold_method="normal"``: fit a normal distribution to the clean entropies and
take its FRR quantile) or empirically (``"empirical"``: the clean scores' quantile) —
and the FRR actually obtained is measured on the holdout part (``frr_measured_``, with a
one-sided 95% Clopper–Pearson upper bound ``frr_upper_``). Overlays are never drawn from
the inputs they perturb during calibration. ``"conservative"`` (beyond the paper,
:func:`~trojanscan.maths.runtime.conservative_threshold`) picks the order statistic whose
true FRR is at most ``frr`` with 90% confidence: the empirical quantile meets the target
only on average, so the FRR measured on new clean inputs exceeds it about half of the
time (by up to 0.55 points at 1% with 1,200 fit scores in our benchmarks).

Vectorised: the ``n_overlays`` perturbed copies of a chunk of inputs go through the model
as one batch of about ``batch_size`` images. Per-input scores do not depend on which
other inputs share the batch: with ``overlay_draw="per_input"`` (default) each input's
overlays are drawn (without replacement when the pool is large enough) by a generator
seeded from ``seed`` and a hash of the input's own pixels — a fresh random draw per input,
as in the paper, yet reproducible and independent of batch size and order; with
``"fixed"`` every input uses the same ``n_overlays`` overlays drawn once from ``seed``.

Known to fail (the paper says so, and our benchmarks measure it): triggers that do not
dominate a superimposed image — source-specific (partial) backdoors, whose trigger only
works on some classes, and input-specific or faint whole-image triggers (WaNet, SIG,
low-alpha blends) — keep a clean-like entropy and pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from ..exceptions import bad_param
from ..maths import runtime as rt
from ..maths import sequential as seq
from ..progress import progress
from .input_base import CalibratedInputDetector, check_int, logits_of

OVERLAY_DRAWS = ("per_input", "fixed")
#: single superimposition rules: the paper's and ours (see the module)
BLENDS = (*rt.BLENDS, "min")
#: the rule over several of ``blends``: flag when any of them flags (see the module)
COMBINED_BLENDS = ("any",)
#: per-input statistics; ``"confidence"`` is ours (see the module)
STATISTICS = (*rt.STATISTICS, "confidence")
#: draws that the clean inputs' typical spread is worth in the sequential rule (any-kind)
PRIOR_DRAWS = 16.0
#: statistics that are a mean over the overlays, so that sequential testing applies
MEAN_STATISTICS = ("mean", "consistency", "confidence")


def superimpose(x: torch.Tensor, overlays: torch.Tensor, blend: str) -> torch.Tensor:
    """:func:`trojanscan.maths.runtime.superimpose`, plus ``"min"``: the pixel-wise minimum,
    which keeps a bright trigger wherever the overlay is bright too (the middle of the
    object) and erases what lies on the overlay's dark background."""
    if blend == "min":
        if overlays.dim() == 4:
            overlays = overlays.unsqueeze(0)
        return torch.minimum(x.unsqueeze(1), overlays)
    return rt.superimpose(x, overlays, blend)


def per_overlay_values(logits: torch.Tensor, preds: torch.Tensor, statistic: str
                       ) -> torch.Tensor:
    """``B×N`` values whose mean over the overlays is the statistic (higher = more
    suspicious): the negative entropy in bits, the input's own-class log-probability
    (``"consistency"``) or its probability (``"confidence"``)."""
    if statistic == "mean":
        return -rt.entropy_from_logits(logits)
    logp = torch.log_softmax(logits.double(), dim=-1)
    own = logp.gather(2, preds.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(2)
    return own.exp() if statistic == "confidence" else own


def statistic_ceiling(statistic: str) -> float:
    """The score of an input whose trigger survives every overlay untouched (certain
    prediction): 0 for the entropy statistics and ``consistency``, 1 for ``confidence``."""
    return 1.0 if statistic == "confidence" else 0.0


def select_kinds(per_kind: np.ndarray, frr: float, ceiling: float, min_headroom: float
                 ) -> np.ndarray:
    """Which superimposition kinds can flag anything on this model: those whose clean
    means, at their ``1 − frr`` quantile, stay at least ``min_headroom`` below the
    ``ceiling`` a fully surviving trigger reaches (a kind under which clean inputs keep
    their own class as firmly as a trigger would separates nothing and only spends the
    false-rejection budget). The kind with the most headroom is always kept."""
    head = ceiling - np.quantile(np.asarray(per_kind, dtype=np.float64), 1.0 - frr, axis=0)
    keep = head >= min_headroom
    keep[int(np.argmax(head))] = True
    return np.asarray(keep, dtype=bool)


def any_kind_thresholds(per_kind: np.ndarray, frr: float, method: str
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-kind thresholds for the rule "flag when any kind's mean exceeds its threshold",
    from clean means ``M×kinds``, at a joint false-rejection rate ``frr``.

    Each clean input's most extreme kind, as a rank (the share of clean means of that
    kind it reaches), is thresholded by ``method`` at ``frr``; each kind's threshold is
    its clean quantile at that rank. Returns the thresholds, the kinds' clean standard
    deviations (the scales of :func:`margins`) and the rank."""
    m = np.asarray(per_kind, dtype=np.float64)
    ranks = np.stack([np.searchsorted(np.sort(col), col, side="right") / len(col)
                      for col in m.T], axis=1)
    level = float(np.clip(rt.fit_threshold(ranks.max(1), frr, method), 0.0, 1.0))
    thresholds = np.array([np.quantile(col, level, method="inverted_cdf") if level < 1
                           else col.max() for col in m.T])
    scales = np.maximum(m.std(0), 1e-12)
    return thresholds, scales, level


def margins(per_kind: np.ndarray, thresholds: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The score of the any-kind rule: the largest margin ``(mean − threshold) / scale``
    over the kinds; positive exactly when some kind is above its threshold."""
    m = np.asarray(per_kind, dtype=np.float64)
    return np.asarray(((m - thresholds) / scales).max(axis=1), dtype=np.float64)


class Strip(CalibratedInputDetector):
    """STRIP (Gao et al., ACSAC 2019): predictions under superimposition; see the module.

    Defaults are ours (triggers anywhere, sequential); :meth:`paper` gives the paper's
    settings.
    """

    name: ClassVar[str] = "strip"

    def __init__(self, *, n_overlays: int = 32, blend: str = "any",
                 blends: tuple[str, ...] = ("sum_clip", "average", "max", "min"),
                 min_headroom: float = 0.0,
                 statistic: str = "confidence", sequential: bool = True, delta: float = 0.002,
                 first_look: int = 4, frr: float = 0.01,
                 threshold_method: str = "conservative", pool_fraction: float = 0.2,
                 holdout_fraction: float = 0.2, max_samples: int | None = 2000,
                 overlay_draw: str = "per_input", batch_size: int = 4096, seed: int = 0,
                 device: str | None = None) -> None:
        self.n_overlays = n_overlays
        self.blend = blend
        self.blends = blends
        self.min_headroom = min_headroom
        self.statistic = statistic
        self.sequential = sequential
        self.delta = delta
        self.first_look = first_look
        self.frr = frr
        self.threshold_method = threshold_method
        self.pool_fraction = pool_fraction
        self.holdout_fraction = holdout_fraction
        self.max_samples = max_samples
        self.overlay_draw = overlay_draw
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    @classmethod
    def paper(cls, **overrides: Any) -> Strip:
        """The paper's settings: 100 overlays, pixel-sum superimposition (clipped to the
        model's [0, 1] input range), mean entropy, a normal fit to the clean entropies
        for the threshold, every overlay evaluated."""
        params: dict[str, Any] = dict(n_overlays=100, blend="sum_clip", statistic="mean",
                                      sequential=False, threshold_method="normal")
        return cls(**(params | overrides))

    def _validate(self) -> None:
        self._validate_common()
        check_int("n_overlays", self.n_overlays, 1)
        if self.blend not in (*BLENDS, *COMBINED_BLENDS):
            raise bad_param("blend", (*COMBINED_BLENDS, *BLENDS), self.blend)
        if (isinstance(self.blends, str) or not isinstance(self.blends, (tuple, list))
                or not self.blends or any(b not in BLENDS for b in self.blends)):
            raise bad_param("blends", f"a non-empty list of {', '.join(BLENDS)}", self.blends)
        if self.statistic not in STATISTICS:
            raise bad_param("statistic", STATISTICS, self.statistic)
        if self.blend in COMBINED_BLENDS and self.statistic not in MEAN_STATISTICS:
            raise bad_param("statistic", f"one of {MEAN_STATISTICS} with blend={self.blend!r}",
                            self.statistic)
        if not isinstance(self.sequential, (bool, np.bool_)):
            raise bad_param("sequential", "true or false", self.sequential)
        seq.check_delta(self.delta)
        mh = self.min_headroom
        if isinstance(mh, bool) or not isinstance(mh, (int, float)) or not 0.0 <= mh < 1.0:
            raise bad_param("min_headroom", "a number in [0, 1)", mh)
        check_int("first_look", self.first_look, 2)
        if self.overlay_draw not in OVERLAY_DRAWS:
            raise bad_param("overlay_draw", OVERLAY_DRAWS, self.overlay_draw)
        pf = self.pool_fraction
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0.0 < pf < 0.9:
            raise bad_param("pool_fraction", "a float in (0, 0.9)", pf)
        self._pool_fraction = float(pf)
        self.forwards_per_input = int(self.n_overlays) * len(self._kinds())
        self._sequential = (bool(self.sequential) and self.statistic in MEAN_STATISTICS
                            and self.n_overlays > self.first_look)

    # -- calibration ---------------------------------------------------------------
    def _kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.blends)) if self.blend == "any" else (self.blend,)

    def _prepare(self, pool: torch.Tensor, fit: torch.Tensor) -> None:
        self.pool_ = pool.to(self.device_)
        n_pool = len(pool)
        self._replace = n_pool < self.n_overlays
        rng = np.random.default_rng([self.seed, 0x5712])
        self._fixed_idx = rng.choice(n_pool, self.n_overlays, replace=self._replace)
        self.kinds_ = self._kinds()
        self.kind_thresholds_ = np.zeros(len(self.kinds_))
        self.kind_scales_ = np.ones(len(self.kinds_))
        self.kind_headroom_: dict[str, float] = {}
        self.kind_prior_var_ = np.zeros(len(self.kinds_))

    def _fit_scores(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.blend != "any":
            return super()._fit_scores(x)
        per_kind, preds = self._kind_means(x, "calibrating")
        keep = select_kinds(per_kind, self.frr, statistic_ceiling(self.statistic),
                            self.min_headroom)
        self.kind_headroom_ = {k: float(h) for k, h in zip(
            self.kinds_, statistic_ceiling(self.statistic)
            - np.quantile(per_kind, 1.0 - self.frr, axis=0), strict=True)}
        self.kinds_ = tuple(k for k, kept in zip(self.kinds_, keep, strict=True) if kept)
        self.kind_prior_var_ = self._clean_var[keep]
        self.forwards_per_input = self.n_overlays * len(self.kinds_)
        per_kind = per_kind[:, keep]
        thresholds, scales, _ = any_kind_thresholds(per_kind, self.frr, self.threshold_method)
        self.kind_thresholds_, self.kind_scales_ = thresholds, scales
        self.kind_fit_means_ = per_kind
        return margins(per_kind, thresholds, scales), preds

    def _threshold(self, fit_scores: np.ndarray) -> float:
        return 0.0 if self.blend == "any" else super()._threshold(fit_scores)

    def _after_threshold(self, fit_scores: np.ndarray) -> None:
        if self.statistic == "confidence":
            span = 1.0
        elif self.blend == "any":
            span = float(np.ptp(self.kind_fit_means_)) or 1.0
        else:
            span = float(np.ptp(fit_scores)) or 1.0
        self.sd_floor_ = 0.05 * span

    # -- overlays ------------------------------------------------------------------
    def _indices(self, x: torch.Tensor) -> np.ndarray:
        b = len(x)
        if self.overlay_draw == "fixed":
            return np.broadcast_to(self._fixed_idx, (b, self.n_overlays))
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        n_pool = len(self.pool_)
        out = np.empty((b, self.n_overlays), dtype=np.int64)
        for i in range(b):
            digest = hashlib.blake2b(arr[i].tobytes(), digest_size=8).digest()
            rng = np.random.default_rng([self.seed, int.from_bytes(digest, "little")])
            out[i] = rng.choice(n_pool, self.n_overlays, replace=self._replace)
        return out

    def overlay_indices(self, x: torch.Tensor) -> np.ndarray:
        """Indices into the overlay pool, ``B×n_overlays``, for inputs ``x`` (see module)."""
        self._check_fitted()
        return self._indices(x)

    def _logits(self, x: torch.Tensor, idx: np.ndarray, kind: str) -> torch.Tensor:
        b, n = idx.shape
        t = torch.from_numpy(np.ascontiguousarray(idx)).to(x.device)
        perturbed = superimpose(x, self.pool_[t], kind)
        return logits_of(self._runner, perturbed.reshape(b * n, *x.shape[1:])).view(b, n, -1)

    def _values(self, x: torch.Tensor, idx: np.ndarray, kinds: tuple[str, ...],
                preds: torch.Tensor) -> np.ndarray:
        """Per-overlay values ``len(kinds)×B×n`` (see :func:`per_overlay_values`)."""
        return np.stack([per_overlay_values(self._logits(x, idx, k), preds, self.statistic)
                         .double().cpu().numpy() for k in kinds])

    def _kind_means(self, x: torch.Tensor, what: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean per kind over every overlay, ``B×kinds``, and predictions, of clean inputs;
        keeps each kind's median within-input variance (the sequential rule's prior)."""
        out = np.empty((len(x), len(self.kinds_)))
        var = np.empty((len(x), len(self.kinds_)))
        preds = np.empty(len(x), dtype=np.int64)
        chunks = list(self._chunks(len(x)))
        with self._borrowed(), torch.inference_mode(), \
                progress(f"{self.name}: {what}", len(chunks)) as bar:
            for sl in chunks:
                xb = x[sl].to(self.device_)
                p = logits_of(self._runner, xb).argmax(1)
                v = self._values(xb, self._indices(xb), self.kinds_, p)
                out[sl], var[sl] = v.mean(2).T, v.var(2, ddof=1).T if v.shape[2] > 1 else 0.0
                preds[sl] = p.cpu().numpy()
                bar.advance()
        self._clean_var = np.median(var, axis=0)
        return out, preds

    def _chunks(self, n: int) -> Iterator[slice]:
        step = max(1, self.batch_size // max(1, self.n_overlays * len(self._kinds())))
        for start in range(0, n, step):
            yield slice(start, min(start + step, n))

    def _score_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._indices(x)
        preds = logits_of(self._runner, x).argmax(1)
        if self.statistic not in MEAN_STATISTICS:
            logits = self._logits(x, idx, self.kinds_[0])
            return rt.strip_scores(logits, self.statistic, preds).double(), preds
        means = self._values(x, idx, self.kinds_, preds).mean(2).T
        if self.blend == "any":
            means = margins(means, self.kind_thresholds_, self.kind_scales_)
        else:
            means = means[:, 0]
        return torch.from_numpy(np.ascontiguousarray(means)).to(x.device), preds

    def _decide_chunk(self, x: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        if not self._sequential:
            return super()._decide_chunk(x)
        b, n_total, kinds = len(x), self.n_overlays, self.kinds_
        any_rule = self.blend == "any"
        thresholds = self.kind_thresholds_ if any_rule else np.array([self.threshold_])
        idx = self._indices(x)
        preds = logits_of(self._runner, x).argmax(1)
        looks = seq.look_schedule(self.first_look, n_total)
        nk = len(kinds)
        total = np.zeros((nk, b))
        total_sq = np.zeros((nk, b))
        drawn = np.zeros((nk, b), dtype=np.int64)  # overlays evaluated, per kind and input
        passed = np.zeros((nk, b), dtype=bool)  # kinds whose early answer is PASS
        used = np.zeros(b, dtype=np.int64)
        score = np.zeros(b)
        flags = np.zeros(b, dtype=bool)
        open_ = np.ones(b, dtype=bool)
        prior_df = PRIOR_DRAWS if any_rule else 0.0
        done_n = 0
        for n in looks:
            # each kind's early answer may differ from its fixed-N one with at most
            # delta / kinds, so the input's with at most delta; a kind that has answered
            # PASS is not drawn again (its answer stands), so an input stops drawing a
            # kind as soon as that kind is clear
            q = seq.stop_quantile(n, self.delta / nk, len(looks) - 1, prior_df)
            flag_now = np.zeros(b, dtype=bool)
            for k in range(nk):
                sel = np.flatnonzero(open_ & ~passed[k])
                if not sel.size:
                    continue
                v = self._values(x[sel], idx[sel, done_n:n], (kinds[k],), preds[sel])[0]
                total[k, sel] += v.sum(1)
                total_sq[k, sel] += (v * v).sum(1)
                drawn[k, sel] = n
                mean = total[k, sel] / n
                var = np.maximum(total_sq[k, sel] / n - mean * mean, 0.0) * n / max(1, n - 1)
                dec = seq.curtailed_decisions(
                    mean, seq.moderated_sd(var, n, float(self.kind_prior_var_[k]), prior_df),
                    n, n_total, float(thresholds[k]), q, self.sd_floor_)
                passed[k, sel[dec == seq.PASS]] = True
                flag_now[sel[dec == seq.FLAG]] = True
            done = open_ & (flag_now | passed.all(0))
            ids = np.flatnonzero(done)
            flags[ids] = flag_now[ids]
            used[ids] = drawn[:, ids].sum(0)
            means = total[:, ids] / np.maximum(drawn[:, ids], 1)
            if any_rule:
                score[ids] = margins(means.T, self.kind_thresholds_, self.kind_scales_)
            else:
                score[ids] = means[0]
            open_ &= ~done
            done_n = n
            if not open_.any():
                break
        dev = x.device
        return (torch.from_numpy(score).to(dev), preds, torch.from_numpy(flags).to(dev),
                torch.from_numpy(1.0 + used).to(dev))

    def entropy(self, x: torch.Tensor) -> np.ndarray:
        """The paper's quantity: mean (or median, or tail) entropy (bits) per input
        (``= -score``), every overlay evaluated."""
        if self.statistic not in rt.ENTROPY_STATISTICS:
            raise bad_param("statistic", f"one of {rt.ENTROPY_STATISTICS} for entropy()",
                            self.statistic)
        self._check_fitted()
        from .input_base import check_inputs

        scores, _ = self._score_and_predict(check_inputs(x, self.input_shape_))
        return -scores

    def calibration_info(self) -> dict[str, Any]:
        score = {"confidence": "mean probability of the input's own prediction over the "
                               "overlays",
                 "consistency": "mean log-probability of the input's own prediction over "
                                "the overlays"}.get(
            self.statistic, f"negative {self.statistic} entropy (bits) over the overlays")
        return super().calibration_info() | {
            "n_overlays": self.n_overlays, "blend": self.blend,
            "kinds": list(self.kinds_), "kind_headroom": self.kind_headroom_,
            "kind_thresholds": [float(t) for t in self.kind_thresholds_]
            if self.blend == "any" else None,
            "overlay_draw": self.overlay_draw, "statistic": self.statistic,
            "sequential": self._sequential, "delta": self.delta if self._sequential else None,
            "score": score,
        }
