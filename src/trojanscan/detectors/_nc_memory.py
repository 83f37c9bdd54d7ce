"""How many stamped inputs one forward/backward pass of Neural Cleanse may hold.

Neural Cleanse's optimisation runs ``labels × batch`` stamped inputs through the model
and back each mini-batch. A full-width residual network keeps tens of megabytes of
activations per input for the backward pass, so a fixed size either runs out of memory
(a GPU) or swaps (a small machine). The pass is split into chunks whose gradients are
accumulated before the optimiser step — the same maths as one pass — and the chunk size
(the *pass batch*) comes from the model's measured activation memory per input and a
memory budget:

* :func:`per_sample_bytes` — bytes autograd keeps per input for the backward pass
  (saved tensors, counted through ``torch.autograd.graph.saved_tensors_hooks``; on CUDA
  also the allocator's peak), from two small probe passes so the weights cancel out;
* :func:`memory_budget` — CUDA: a fraction of the free device memory; CPU: a fraction of
  the available RAM (``/proc/meminfo``), capped;
* :func:`plan_pass_batch` — the pure rule tying them together.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

#: a backward pass holds gradients and temporaries beyond the saved activations
OVERHEAD = 2.0
#: share of the free CUDA memory / available RAM the optimisation may use
CUDA_FRACTION = 0.7
CPU_FRACTION = 0.25
#: on a CPU, larger passes gain no throughput (measured on a full-width PreAct-ResNet18,
#: one thread: 32 inputs per pass 31.9 img/s, 128 inputs 29.1 img/s), only memory
CPU_CAP_BYTES = 2**30


def plan_pass_batch(per_sample: float, budget: float, wanted: int, *,
                    overhead: float = OVERHEAD) -> int:
    """Largest number of inputs per pass (1 … ``wanted``) whose memory fits ``budget``.

    ``per_sample`` is the measured bytes per input, ``overhead`` the factor for the
    backward pass's own buffers. At least 1 (a single input is always tried).
    """
    if wanted < 1:
        raise ValueError(f"wanted must be >= 1, got {wanted}")
    if not (math.isfinite(per_sample) and per_sample > 0):
        return wanted
    fits = int(budget // (per_sample * overhead)) if budget > 0 else 0
    return max(1, min(wanted, fits))


def _cpu_available_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float(8 * 2**30)


def memory_budget(device: torch.device) -> float:
    """Bytes the optimisation's passes may use on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return CUDA_FRACTION * float(free)
    return min(CPU_CAP_BYTES, CPU_FRACTION * _cpu_available_bytes())


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(bytes of tensors saved for backward, CUDA peak bytes or 0) of one pass on ``x``."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            total += t.numel() * t.element_size()
        return t

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    probe = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(probe)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out.float().logsumexp(1).sum().backward()
    peak = 0.0
    if cuda:
        torch.cuda.synchronize(x.device)
        peak = float(torch.cuda.max_memory_allocated(x.device) - base)
    return float(total), peak


def per_sample_bytes(model: nn.Module, x: torch.Tensor, *, small: int = 2,
                     large: int = 6) -> float:
    """Activation bytes per input of one forward/backward pass of ``model`` on ``x``.

    Two probe passes (``small`` and ``large`` inputs, repeated from ``x``); the
    difference divided by the extra inputs removes what does not grow with the batch
    (weights, their gradients). On CUDA the larger of the saved-tensor count and the
    allocator's peak. Falls back to 64 × the input size when nothing could be measured.
    """
    reps = (large + len(x) - 1) // len(x)
    pool = x.repeat(reps, *([1] * (x.dim() - 1)))
    s_saved, s_peak = _saved_bytes(model, pool[:small])
    l_saved, l_peak = _saved_bytes(model, pool[:large])
    per = max(l_saved - s_saved, l_peak - s_peak) / float(large - small)
    if not (math.isfinite(per) and per > 0):
        per = 64.0 * x[0].numel() * x.element_size()
    return per


__all__ = ["CPU_CAP_BYTES", "CPU_FRACTION", "CUDA_FRACTION", "OVERHEAD", "memory_budget",
           "per_sample_bytes", "plan_pass_batch"]
