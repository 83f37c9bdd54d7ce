"""All-to-all BadNets — Gu, Dolan-Gavitt & Garg, "BadNets", arXiv 2017 (IEEE Access 2019),
section on the all-to-all attack on MNIST.

The BadNets patch sends an input of class ``i`` to class ``(i + offset) % K`` (the paper:
``offset = 1``), so there is no single target class. Every training sample may be
poisoned and every test input counts for the attack success rate. Spec name
``all2all``; ``badnets:mode=all2all`` is accepted as a synonym by the parser.
Measured (Fashion-MNIST, 2-conv small CNN, Adam, 5 epochs, H100): rate 0.1 → clean
accuracy 0.892, ASR 0.835; rate 0.01 → 0.900, 0.683.
Known weakness: needs a higher poisoning rate than all-to-one to be learned, and
detectors that look for one target class (Neural Cleanse) see many small outliers.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..exceptions import bad_param
from .badnets import PatchAttack
from .base import check_int


class AllToAll(PatchAttack):
    """BadNets patch; label ``i`` becomes ``(i + offset) % K``. Patch settings as BadNets."""

    name: ClassVar[str] = "all2all"
    label_mode: ClassVar[str] = "all-to-all"
    paper: ClassVar[str] = "Gu, Dolan-Gavitt & Garg, BadNets, arXiv 2017 (IEEE Access 2019)"

    def __init__(self, *, offset: int = 1, pattern: Any = "white", size: int = 3,
                 location: Any = "bottom-right", margin: int = 1,
                 trigger_seed: int = 0, color: Any = None) -> None:
        self.offset = check_int(f"{self.name}.offset", offset, minimum=1)
        self.target = None
        self._init_patch(pattern, size, location, margin, trigger_seed, color)

    def check_classes(self, num_classes: int) -> None:
        if self.offset % num_classes == 0:
            raise bad_param(f"{self.name}.offset",
                            f"an offset that is not a multiple of the {num_classes} classes",
                            self.offset)

    def target_labels(self, y: torch.Tensor, *, num_classes: int | None = None) -> torch.Tensor:
        if num_classes is None:
            raise bad_param(f"{self.name} num_classes", "the number of classes K (labels "
                            "become (y + offset) % K)", None)
        self.check_classes(num_classes)
        return (y + self.offset) % num_classes

    def eligible(self, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y, dtype=torch.bool)
