"""A bundle's recipe: which of its entries the detector's default reads, and how.

Every bundle declares one in its JSON (``"recipe"``)::

    "recipe": {"parts": {"stamp": 1, "one_class": 1, "search": 2, "search_flow": 2},
               "calibration": "reference", "fpr": 0.05}

* ``parts`` — entry or ensemble names and their weights. An ensemble's members share its
  weight equally. One plain entry of weight 1 is scored on its own (the paper's way:
  sigmoid of a binary meta-classifier's output, rank among benign models for a one-class
  one); anything else is a weighted sum of z-scores, each part standardised by the mean
  and standard deviation of its outputs on the held-out benign shadows;
* ``calibration`` — the null distribution of the threshold, p-value and score:
  ``reference`` (the bundle's clean reference models; every part must have them) or
  ``shadows`` (the held-out benign shadows);
* ``fpr`` — the share of that null the default threshold flags.

The detector's ``variant="auto"`` scores the bundle's recipe; ``qt``, ``no_qt`` and
``one_class`` score that one entry of the paper's (:func:`single`). Pure; tested without
any model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: the nulls a recipe may be calibrated on
NULLS = ("reference", "shadows")


@dataclass(frozen=True)
class Recipe:
    """Parts (entry or ensemble name, weight), the null and the false-positive rate."""

    parts: tuple[tuple[str, float], ...]
    calibration: str = "shadows"
    fpr: float = 0.05

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a recipe needs at least one part")
        names = [n for n, _ in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"a recipe names a part twice: {names}")
        for name, w in self.parts:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a recipe part must be an entry name, got {name!r}")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise ValueError(f"part {name!r} must weigh a finite number > 0, got {w!r}")
        if self.calibration not in NULLS:
            raise ValueError(f"calibration must be one of {', '.join(NULLS)}, got "
                             f"{self.calibration!r}")
        if not 0 < float(self.fpr) < 1:
            raise ValueError(f"fpr must lie in (0, 1), got {self.fpr!r}")

    @classmethod
    def from_dict(cls, doc: Any) -> Recipe:
        """Read the JSON form (a ValueError when malformed)."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("parts"), Mapping):
            raise ValueError(f"'recipe' must hold a 'parts' mapping, got {doc!r}")
        unknown = set(doc) - {"parts", "calibration", "fpr"}
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}")
        return cls(tuple((str(n), float(w)) for n, w in doc["parts"].items()),
                   str(doc.get("calibration", "shadows")), float(doc.get("fpr", 0.05)))

    def to_dict(self) -> dict[str, Any]:
        return {"parts": dict(self.parts), "calibration": self.calibration,
                "fpr": self.fpr}

    def entries(self, ensembles: Mapping[str, tuple[str, ...]],
                ) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """The bundle entries the recipe reads, in order, and their weights (an
        ensemble's members share its weight)."""
        names: list[str] = []
        weights: list[float] = []
        for part, w in self.parts:
            members = ensembles.get(part, (part,))
            names += members
            weights += [float(w) / len(members)] * len(members)
        return tuple(names), tuple(weights)

    def summed(self, ensembles: Mapping[str, tuple[str, ...]]) -> bool:
        """Whether the recipe sums z-scores (anything but one plain entry of weight 1)."""
        (name, w), *rest = self.parts
        return bool(rest) or name in ensembles or w != 1.0


def single(name: str, has_reference: bool, fpr: float = 0.05) -> Recipe:
    """The recipe that scores one entry on its own: on the reference models when it has
    them, else on the held-out benign shadows."""
    return Recipe(((name, 1.0),), "reference" if has_reference else "shadows", fpr)


#: what ``variant="auto"`` scored for bundles written before bundles declared a recipe:
#: the first whose parts the bundle holds (``qt`` last; a bundle without any of them:
#: its first entry alone)
LEGACY_RECIPES: tuple[dict[str, float], ...] = (
    {"stamp": 1, "one_class": 1, "search": 2, "search_flow": 2},
    {"stamp": 1, "one_class": 1, "search": 2},
    {"stamp": 1, "qt_data": 1, "one_class": 1},
    {"stamp": 1, "qt_data": 1},
    {"stamp": 1, "one_class": 1},
    {"qt_data": 1},
    {"qt": 1},
)


def legacy_recipe(ensembles: dict[str, int], entries: set[str], with_reference: set[str],
                  fpr: float) -> Recipe:
    """The recipe of a bundle written before recipes: ``ensembles`` — its ensembles'
    sizes; ``entries`` — its entry names; ``with_reference`` — the names (entries and
    ensembles) with reference outputs (every part must have them for the recipe to be
    calibrated on the reference models). An ensemble scored alone summed its members
    with weight 1 each."""
    held = set(entries) | set(ensembles)
    fallback = {"qt" if "qt" in held or not entries else sorted(entries)[0]: 1}
    parts = dict(next((p for p in LEGACY_RECIPES if set(p) <= held), fallback))
    if len(parts) == 1 and (name := next(iter(parts))) in ensembles:
        parts[name] = ensembles[name]
    null = "reference" if set(parts) <= with_reference else "shadows"
    return Recipe(tuple((n, float(w)) for n, w in parts.items()), null, fpr)


#: the parts beyond the paper a trained bundle's recipe sums, in order, with their weights
#: (``one_class`` joins them when trained)
TRAINED_PARTS = (("stamp", 1.0), ("qt_data", 1.0), ("one_class", 1.0), ("search", 2.0),
                 ("search_flow", 2.0))


def trained_recipe(held: set[str], paper: tuple[str, ...]) -> Recipe:
    """The recipe ``trojanscan mntd train`` writes: of :data:`TRAINED_PARTS`, those it
    trained (the stamps, the data-started members, the one-class meta-classifier, and the
    search's two readouts weighed twice); with none beyond the paper's, the first of the
    paper's variants it trained (``paper``: ``qt`` when among them). Calibrated on the
    shadows until reference models are added."""
    parts = tuple((n, w) for n, w in TRAINED_PARTS if n in held)
    if not any(n != "one_class" for n, _ in parts):
        parts = (("qt" if "qt" in paper else paper[0], 1.0),)
    return Recipe(parts, "shadows")
