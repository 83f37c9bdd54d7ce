"""Attack library: backdoor attacks for red-teaming and benchmarks.

Each attack is one module with one class (the trigger, the labelling rule and the
poisoning procedure, see :mod:`trojanscan.attacks.base`); :func:`parse_attack` builds one
from a spec string such as ``badnets:size=4,target=0`` (see :mod:`trojanscan.attacks.spec`),
:mod:`trojanscan.attacks.metrics` measures clean accuracy and attack success rate.

| spec name | class | paper |
| --- | --- | --- |
| ``badnets`` | :class:`BadNets` | Gu et al., arXiv 2017 |
| ``all2all`` | :class:`AllToAll` | Gu et al., arXiv 2017 (all-to-all) |
| ``blend`` | :class:`Blend` | Chen et al., arXiv 2017 |
| ``sig`` | :class:`SIG` | Barni et al., ICIP 2019 (clean-label) |
| ``wanet`` | :class:`WaNet` | Nguyen & Tran, ICLR 2021 |
| ``source`` | :class:`SourceSpecific` | Tang et al., USENIX Security 2021 |
| ``multi`` | :class:`Multi` | several triggers and targets |
"""

from __future__ import annotations

from .all_to_all import AllToAll
from .badnets import BadNets
from .base import Attack, PoisonedData
from .blend import Blend
from .metrics import attack_success_rate, attack_success_rates, clean_accuracy
from .multi import Multi
from .sig import SIG
from .source_specific import SourceSpecific
from .spec import ATTACKS, available_attacks, format_attack, parse_attack
from .wanet import WaNet

__all__ = [
    "ATTACKS",
    "SIG",
    "AllToAll",
    "Attack",
    "BadNets",
    "Blend",
    "Multi",
    "PoisonedData",
    "SourceSpecific",
    "WaNet",
    "attack_success_rate",
    "attack_success_rates",
    "available_attacks",
    "clean_accuracy",
    "format_attack",
    "parse_attack",
]
