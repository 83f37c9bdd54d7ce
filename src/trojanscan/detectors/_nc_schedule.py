"""The λ (cost) schedule of Neural Cleanse's reference code, as a pure state machine.

Wang et al., "Neural Cleanse", IEEE S&P 2019; reference implementation
``bolunwang/backdoor`` (``visualizer.py``). After each optimisation step (a pass over
``mini_batches`` mini-batches) the caller reports the step's mean attack success rate
(ASR) and mean mask L1 norm; the machine says whether this step's mask is the new best
and whether to stop, and moves λ:

* λ starts at 0; once the attack succeeds (ASR ≥ threshold) for ``patience`` consecutive
  steps while λ is 0, λ becomes ``init_cost`` and the up/down counters and flags reset;
* then ``patience`` consecutive successful steps multiply λ by ``multiplier_up`` (2);
  ``patience`` consecutive failing steps divide it by ``multiplier_down`` (2**1.5 —
  the reference's comment says "square root" but the code raises to 1.5);
* the best mask is the lowest-L1 one among steps with ASR ≥ threshold;
* early stop: once a best mask exists, a step that does not improve the best L1 below
  ``early_stop_threshold ×`` the best so far counts towards ``early_stop_patience``
  (reset on improvement); stop when the count is reached *and* λ has moved both up
  and down;
* stall stop (``stall_patience``, not in the reference; None turns it off): also stop
  once λ has gone up and the count reaches ``stall_patience`` even if λ never came
  down — the step ASR hovering around the threshold (e.g. 0.97/1.0 on small
  mini-batches) keeps λ from moving either way while the norm no longer shrinks.

No torch, no randomness: tested on scripted ASR sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class CostSchedule:
    """Mutable schedule state for one label (see the module docstring)."""

    init_cost: float = 1e-3
    threshold: float = 0.99
    patience: int = 5
    multiplier_up: float = 2.0
    multiplier_down: float = 2.0 ** 1.5
    early_stop: bool = True
    early_stop_threshold: float = 1.0
    early_stop_patience: int = 25
    stall_patience: int | None = None

    # state
    cost: float = 0.0
    best_l1: float = math.inf
    steps: int = 0
    cost_set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    early_stop_counter: int = 0
    early_stop_best: float = math.inf
    stopped: bool = False

    @property
    def reached(self) -> bool:
        """Whether some step reached the ASR threshold (a best mask exists)."""
        return self.best_l1 < math.inf

    def update(self, asr: float, l1: float) -> bool:
        """Record one step's mean ASR and mask L1; return True when it is the new best.

        Order as in the reference: best mask, early-stop bookkeeping, then λ.
        """
        if self.stopped:
            raise RuntimeError("update() after the schedule stopped")
        self.steps += 1
        success = asr >= self.threshold
        improved = success and l1 < self.best_l1
        if improved:
            self.best_l1 = l1

        if self.early_stop:
            if self.best_l1 < math.inf:
                if self.best_l1 >= self.early_stop_threshold * self.early_stop_best:
                    self.early_stop_counter += 1
                else:
                    self.early_stop_counter = 0
            self.early_stop_best = min(self.best_l1, self.early_stop_best)
            if (self.up_flag and self.down_flag
                    and self.early_stop_counter >= self.early_stop_patience):
                self.stopped = True
                return improved
            if (self.stall_patience is not None and self.up_flag
                    and self.early_stop_counter >= self.stall_patience):
                self.stopped = True
                return improved

        if self.cost == 0 and success:
            self.cost_set_counter += 1
            if self.cost_set_counter >= self.patience:
                self.cost = self.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.cost_set_counter = 0

        if success:
            self.up_counter += 1
            self.down_counter = 0
        else:
            self.up_counter = 0
            self.down_counter += 1
        if self.up_counter >= self.patience:
            self.up_counter = 0
            self.cost *= self.multiplier_up
            self.up_flag = True
        elif self.down_counter >= self.patience:
            self.down_counter = 0
            self.cost /= self.multiplier_down
            self.down_flag = True
        return improved
