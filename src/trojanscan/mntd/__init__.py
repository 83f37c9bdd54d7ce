"""Meta Neural Trojan Detection (MNTD) — Xu, Wang, Li, Borisov, Gunter & Li, "Detecting AI
Trojans Using Meta Neural Analysis", IEEE S&P 2021.

The detector itself is :class:`trojanscan.detectors.mntd.MNTD`; this package holds the
pieces behind it, one job per module:

* :mod:`.jumbo` — the jumbo distribution of random triggers (pure);
* :mod:`.shadows` — benign and jumbo shadow models as independent tasks, one file each;
* :mod:`.executor` — runs independent tasks sequentially, in processes or on Ray;
  resumable (a task whose output file exists is skipped);
* :mod:`.meta` — the meta-classifier: query tuning, without it, one-class;
* :mod:`.calibration` — raw outputs → scores, p-values, thresholds (pure);
* :mod:`.recipe` — what a bundle's default reads: parts, weights, calibration (pure);
* :mod:`.pretrained` — bundle files (safetensors + JSON) and the shipped ones;
* :mod:`.stamps`, :mod:`.search` — stamp-probing meta-classifiers and the per-class
  trigger search (beyond the paper);
* :mod:`.reference` — clean reference models that calibrate the verdict;
* :mod:`.pipeline` — share → shadows → meta-classifiers → bundle.

Nothing heavy is imported here; import the submodule you need.
"""
