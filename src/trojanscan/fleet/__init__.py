"""Scan a whole collection of models (a "zoo") on Ray, resumably.

``trojanscan scan-zoo`` runs :func:`trojanscan.scan.scan_model` — the same code path,
settings and seed as ``trojanscan scan`` — on every model of a folder or manifest, one
Ray task per model, and gathers one row per model into ``zoo.json``/``zoo.csv``/
``zoo.html``. The modules, one job each:

* :mod:`.sources` — which models: a folder (recursive) or a CSV/JSONL manifest, and the
  ground-truth labels file;
* :mod:`.metrics` — pure maths of the summary: rank AUROC (ties count half), ROC points,
  confusion counts;
* :mod:`.worker` — scan one model from its bytes (what a Ray task runs);
* :mod:`.runner` — the backends (in-process serial, Ray local or cluster), per-model
  timeouts, resume and the progress bar;
* :mod:`.summary` — ``zoo.json``, ``zoo.csv`` and the self-contained ``zoo.html``.
"""

from __future__ import annotations

from .metrics import auroc, confusion, roc_points
from .sources import ZooEntry, discover, read_labels

__all__ = ["ZooEntry", "auroc", "confusion", "discover", "read_labels", "roc_points"]
