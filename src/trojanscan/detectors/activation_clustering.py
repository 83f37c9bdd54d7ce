"""Activation Clustering — Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy &
Srivastava, "Detecting Backdoor Attacks on Deep Neural Networks by Activation
Clustering", SafeAI@AAAI 2019 (arXiv 2018).

Needs: the training set (with labels) and a model trained on it; for exclusionary
reclassification also the model's architecture (it retrains). Per class, the
last-hidden-layer activations are reduced to 10 dimensions and split by seeded 2-means.
The paper reduces with ICA (``reduction="ica"``); the default here is PCA, which keeps
the components' variances: on the Fashion-MNIST benchmark the silhouette of poisoned
classes was 0.47–0.54 with PCA against at most 0.38 for clean classes, while ICA (unit
variance components) gave 0.22–0.41 for poisoned and up to 0.49 for clean classes. A
class is suspected when the smaller cluster holds less than ``size_threshold`` (0.35)
of it *and* the clustering is good (silhouette ≥ ``silhouette_threshold``, by default
0.42 for PCA and 0.25 for ICA) — never "always flag the smaller cluster", which throws
away up to half of every clean class.

Exclusionary reclassification (``reclassify=True``): a network of the same
architecture is retrained (on at most ``reclassify_max_samples`` samples) without every
suspect cluster, then classifies them. A cluster still classified as its own label
(share ≥ ``min_own_share``, or more often than any other class) is a legitimate
sub-population of the class and is released; a cluster classified as another class is
confirmed poisonous (the most frequent prediction is its likely source class). The
network retrained is ``arch`` (a built-in name, ``package.module:factory`` or a callable:
the user's ``--arch``, never anything read from beside the model), else a reset copy of
a plain ``nn.Module``; TorchScript and ONNX models without ``arch`` skip this step. A
distinct style of a class that resembles another class (a kind of sneaker next to
ankle boots) is also classified as that class once excluded — reclassification does
not release those, which is why the silhouette bar matters.

Scores: per sample, the distance to the centre of its class's larger cluster in the
reduced space, in units of that cluster's median distance (higher = further from the
class's main mode).

Known failures: a poison that is a third of its class or more fails the relative-size
rule; at half of it, retraining without either cluster misclassifies both, so
reclassification cannot tell them apart. Clean-label poison clusters keep their
label under reclassification.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from ..dataset import ImageDataset
from ..exceptions import DetectorNotApplicable, bad_param
from ..maths.robust import cluster_decision, reclassification_verdict, silhouette_sampled
from ..maths.spectral import check_rate, class_groups
from .data_base import (
    FeatureDataDetector,
    annotate_classes,
    apply_budget,
    budget,
    fresh_model,
    seeded_subset,
)

REDUCTIONS = ("pca", "ica")
#: silhouette needed per reduction when ``silhouette_threshold`` is None (calibrated on the
#: Fashion-MNIST benchmark: poisoned classes 0.47–0.54 with PCA, 0.22–0.41 with ICA; clean
#: classes whose smaller cluster is under 0.35 of the class up to 0.38 with PCA and 0.49
#: with ICA)
SILHOUETTE_DEFAULTS = {"pca": 0.42, "ica": 0.25}


def fit_reduction(fit: np.ndarray, *, method: str, n_components: int,
                  seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the reduction of one class's activations on ``fit`` (rows × D); returns the
    transform (rows × D → rows × k), to be applied chunk by chunk.

    PCA: projections on the top principal directions (variances kept). ICA: those
    components scaled to unit variance (dead ReLU units make the raw activations
    rank-deficient, so whitening happens in the PCA subspace, as FastICA itself does)
    and rotated to independent components (FastICA, seeded).
    """
    from sklearn.decomposition import FastICA

    from ..maths.spectral import top_eigen

    fit = np.asarray(fit, dtype=np.float64)
    mean = fit.mean(axis=0)
    cov = np.cov(fit - mean, rowvar=False, bias=True).reshape(fit.shape[1], fit.shape[1])
    vals, vecs = top_eigen(cov, min(n_components, fit.shape[1], max(1, len(fit) - 1)))
    keep = vals > max(float(vals.max()), 1e-30) * 1e-9
    vals, vecs = vals[keep], vecs[:, keep]
    if method == "pca" or vecs.shape[1] < 2:
        scale = np.ones_like(vals) if method == "pca" else np.sqrt(vals)
        return lambda x: ((np.asarray(x, dtype=np.float64) - mean) @ vecs) / scale
    ica = FastICA(n_components=vecs.shape[1], random_state=seed, whiten=False, max_iter=400,
                  tol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the rotation is still usable
        ica.fit(((fit - mean) @ vecs) / np.sqrt(vals))
    unmix = np.asarray(ica.components_, dtype=np.float64).T
    return lambda x: (((np.asarray(x, dtype=np.float64) - mean) @ vecs) / np.sqrt(vals)) @ unmix


def reduce_class(x: np.ndarray, *, method: str, n_components: int, seed: int,
                 fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Reduce one class's activations (all in memory) with :func:`fit_reduction`."""
    transform = fit_reduction(x if fit_rows is None else x[fit_rows], method=method,
                              n_components=n_components, seed=seed)
    return transform(x)


def reduce_streamed(f: np.ndarray, index: np.ndarray, *, method: str, n_components: int,
                    seed: int, max_fit: int, chunk: int = 8192) -> np.ndarray:
    """Reduced activations of ``f[index]``: fitted on at most ``max_fit`` seeded rows,
    applied in chunks (never the whole class as float64 at once)."""
    rows = seeded_subset(len(index), max_fit, seed)
    fit_index = index if rows is None else index[rows]
    transform = fit_reduction(f[fit_index], method=method, n_components=n_components,
                              seed=seed)
    parts = [transform(f[index[s:s + chunk]]) for s in range(0, len(index), chunk)]
    return np.concatenate(parts)


def two_means(z: np.ndarray, *, seed: int, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Seeded 2-means labels (0/1) of the rows of ``z``."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, n_init=10, random_state=seed)
    km.fit(z if fit_rows is None else z[fit_rows])
    return np.asarray(km.predict(z), dtype=np.int64)


class ActivationClustering(FeatureDataDetector):
    """Per-class 2-means on reduced activations + exclusionary reclassification."""

    name: ClassVar[str] = "activation_clustering"

    def __init__(self, *, poison_rate_bound: float | None = None, reduction: str = "pca",
                 n_components: int = 10, size_threshold: float = 0.35,
                 silhouette_threshold: float | None = None, reclassify: bool = True,
                 min_own_share: float = 0.5, reclassify_max_samples: int = 20000,
                 reclassify_epochs: int | None = None, arch: Any = None,
                 max_fit_samples: int = 20000, layer: str = "penultimate",
                 batch_size: int = 256, seed: int = 0, device: str | None = None) -> None:
        self.poison_rate_bound = poison_rate_bound
        self.reduction = reduction
        self.n_components = n_components
        self.size_threshold = size_threshold
        self.silhouette_threshold = silhouette_threshold
        self.reclassify = reclassify
        self.min_own_share = min_own_share
        self.reclassify_max_samples = reclassify_max_samples
        self.reclassify_epochs = reclassify_epochs
        self.arch = arch
        self.max_fit_samples = max_fit_samples
        self.layer = layer
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    def _check_params(self) -> None:
        check_rate("poison_rate_bound", self.poison_rate_bound)
        if self.reduction not in REDUCTIONS:
            raise bad_param("reduction", REDUCTIONS, self.reduction)
        if (isinstance(self.n_components, bool) or not isinstance(self.n_components, int)
                or self.n_components < 1):
            raise bad_param("n_components", "an integer >= 1", self.n_components)
        if not isinstance(self.size_threshold, (int, float)) or not (
                0 < self.size_threshold <= 0.5):
            raise bad_param("size_threshold", "a float in (0, 0.5]", self.size_threshold)
        if self.silhouette_threshold is not None and (
                not isinstance(self.silhouette_threshold, (int, float))
                or not -1 <= self.silhouette_threshold <= 1):
            raise bad_param("silhouette_threshold", "a float in [-1, 1] or None",
                            self.silhouette_threshold)
        if not isinstance(self.min_own_share, (int, float)) or not (
                0 < self.min_own_share <= 1):
            raise bad_param("min_own_share", "a float in (0, 1]", self.min_own_share)
        for name in ("reclassify_max_samples", "max_fit_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 100:
                raise bad_param(name, "an integer >= 100", v)
        if self.arch is not None and not isinstance(self.arch, str) and not callable(
                self.arch):
            raise bad_param("arch", "None, an architecture name, package.module:factory or "
                            "a callable", type(self.arch).__name__)
        if self.reclassify_epochs is not None and (
                isinstance(self.reclassify_epochs, bool)
                or not isinstance(self.reclassify_epochs, int) or self.reclassify_epochs < 1):
            raise bad_param("reclassify_epochs", "an integer >= 1 or None",
                            self.reclassify_epochs)

    # -- clustering --------------------------------------------------------------------
    def _score(self, f: np.ndarray, y: np.ndarray, *, model: Any,
               train: ImageDataset | None, runner_up: np.ndarray | None = None
               ) -> dict[str, Any]:
        n = len(y)
        scores = np.zeros(n, dtype=np.float64)
        suspect = np.zeros(n, dtype=bool)
        per_class: dict[str, Any] = {}
        clusters: dict[int, np.ndarray] = {}
        sil_needed = float(SILHOUETTE_DEFAULTS[self.reduction]
                           if self.silhouette_threshold is None else self.silhouette_threshold)
        projections: dict[str, np.ndarray] = {}
        for label, index in class_groups(y).items():
            z = reduce_streamed(f, index, method=self.reduction,
                                n_components=self.n_components, seed=self.seed,
                                max_fit=self.max_fit_samples)
            rows = seeded_subset(len(index), self.max_fit_samples, self.seed + label)
            assign = two_means(z, seed=self.seed, fit_rows=rows)
            sil = silhouette_sampled(z, assign, seed=self.seed + label)
            dec = cluster_decision(assign, sil, size_threshold=float(self.size_threshold),
                                   silhouette_threshold=sil_needed)
            big = int(np.argmax(np.bincount(assign, minlength=2)))
            centre = z[assign == big].mean(axis=0)
            dist = np.linalg.norm(z - centre, axis=1)
            scale = float(np.median(dist[assign == big])) or 1.0
            scores[index] = dist / scale
            if dec.detected:
                suspect[index[dec.suspect]] = True
                clusters[label] = index[dec.suspect]
            per_class[str(label)] = {"num_samples": len(index), **dec.to_dict()}
            projections[f"projection_{label}"] = _projection(z, assign, self.seed + label)
        notes: list[str] = []
        reclass: dict[str, Any] = {}
        flagged = suspect.copy()
        if clusters and self.reclassify:
            try:
                reclass = self._reclassify(clusters, model, train)
            except DetectorNotApplicable as exc:
                notes.append(f"exclusionary reclassification skipped: {exc}")
            for key, info in reclass.items():
                per_class[key]["reclassification"] = info
                if not info["poisonous"]:
                    flagged[clusters[int(key)]] = False
                    per_class[key]["detected"] = False
                    per_class[key]["reason"] += "; released by exclusionary reclassification"
        annotate_classes(per_class, "silhouette", (
            f"within the class: the smaller 2-means cluster's share with "
            f"{self.size_threshold:g} and the silhouette with {sil_needed:g}"))
        limit = budget(self.poison_rate_bound, n)
        flagged = apply_budget(flagged, scores, limit)
        for label, index in class_groups(y).items():
            per_class[str(label)]["num_flagged"] = int(flagged[index].sum())
        evidence = {
            "reduction": self.reduction,
            "silhouette_threshold": sil_needed,
            "budget": limit,
            "classes_with_outliers": [int(c) for c, e in per_class.items() if e["detected"]],
            "num_suspect_before_reclassification": int(suspect.sum()),
            "reclassified": bool(reclass),
        }
        return {"scores": scores, "flagged": flagged, "per_class": per_class,
                "evidence": evidence, "warnings": notes, "images": projections}

    # -- exclusionary reclassification ---------------------------------------------------
    def _reclassify(self, clusters: dict[int, np.ndarray], model: Any,
                    train: ImageDataset | None) -> dict[str, Any]:
        from ..training import TrainConfig, predict, train_model
        from ..zoo import default_epochs

        if train is None or model is None:
            raise DetectorNotApplicable("it needs the model and the training images")
        excluded = np.zeros(len(train), dtype=bool)
        for idx in clusters.values():
            excluded[idx] = True
        keep = np.flatnonzero(~excluded)
        sub = seeded_subset(len(keep), self.reclassify_max_samples, self.seed)
        if sub is not None:
            keep = keep[sub]
        data = train.subset(torch.from_numpy(keep))
        if int(torch.unique(data.labels()).numel()) < 2:
            raise DetectorNotApplicable("fewer than 2 classes remain without the suspects")
        k = train.num_classes
        net = fresh_model(model, arch=self.arch, input_shape=train.input_shape,
                          num_classes=k, seed=self.seed)
        epochs = self.reclassify_epochs or default_epochs(len(data))
        net = train_model(net, data, config=TrainConfig(epochs=epochs), seed=self.seed,
                          device=self.device, num_classes=k,
                          description="exclusionary reclassification")
        out: dict[str, Any] = {}
        for label, idx in clusters.items():
            pred = predict(net, train.x[torch.from_numpy(idx)], device="cpu").numpy()
            poisonous, info = reclassification_verdict(pred, label,
                                                       min_own_share=float(self.min_own_share))
            out[str(label)] = {"poisonous": poisonous, **info, "num_samples": len(idx)}
        return out


def _projection(z: np.ndarray, assign: np.ndarray, seed: int, limit: int = 600) -> np.ndarray:
    """A bounded 2-D view of a class's reduced activations: rows ``(c1, c2, cluster)``
    for at most ``limit`` samples (kept out of the JSON; the report plots them)."""
    rows = seeded_subset(len(z), limit, seed)
    sel = np.arange(len(z)) if rows is None else rows
    second = z[sel, 1] if z.shape[1] > 1 else np.zeros(len(sel))
    return np.stack([z[sel, 0], second, assign[sel]], axis=1).astype(np.float32)
