"""Run an ONNX image classifier as a differentiable PyTorch module.

``onnx2torch`` and ``onnx2pytorch`` import torchvision, which is often missing or
broken; this module is a small interpreter instead. :class:`OnnxModule` keeps the
graph's initializers as parameters/buffers and executes the nodes in topological
order with torch operations, so gradients reach the input (Neural Cleanse needs
them) and every intermediate value can be captured by name (feature extraction).

Covered: the operators image classifiers exported from PyTorch, Keras (tf2onnx) and
similar tools use, in their attribute and input forms for opsets 7–21 (see
:data:`SUPPORTED_OPS`). Control flow (``If``, ``Loop``), custom domains and sparse
initializers are not supported and raise :class:`ModelError` naming the operators.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..exceptions import ModelError, require

__all__ = ["SUPPORTED_OPS", "OnnxModule", "UnsupportedOnnxError", "convert_onnx",
           "parse_onnx_bytes"]


class UnsupportedOnnxError(ModelError):
    """The graph uses operators (or features) the built-in converter does not cover."""


# ONNX TensorProto.DataType -> torch dtype
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    16: torch.bfloat16,
}

_Value = torch.Tensor | None
_OpFn = Callable[["_Node", list[_Value]], "torch.Tensor | Sequence[torch.Tensor]"]
_OPS: dict[str, _OpFn] = {}


@dataclass(frozen=True)
class _Node:
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(hash=False)
    opset: int = 13
    scopes: tuple[str, ...] = ()  # PyTorch module paths the node belongs to

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def fail(self, why: str) -> ModelError:
        return ModelError(f"ONNX node {self.name or self.op_type!r} ({self.op_type}): {why}")


def _op(*names: str) -> Callable[[_OpFn], _OpFn]:
    def register(fn: _OpFn) -> _OpFn:
        for n in names:
            _OPS[n] = fn
        return fn

    return register


def _dtype(code: int) -> torch.dtype:
    try:
        return _DTYPES[int(code)]
    except KeyError:
        raise ModelError(f"ONNX data type {code} is not supported") from None


def _ints(t: torch.Tensor | None) -> list[int]:
    if t is None:
        return []
    return [int(v) for v in t.detach().cpu().reshape(-1).tolist()]


def _scalar(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().cpu().reshape(-1)[0])


def _opt(ins: list[_Value], i: int) -> _Value:
    return ins[i] if len(ins) > i else None


def _need(node: _Node, ins: list[_Value], i: int) -> torch.Tensor:
    t = _opt(ins, i)
    if t is None:
        raise node.fail(f"input {i} is required")
    return t


# ----------------------------------------------------------------------------- helpers


def _torch_pad(pads: Sequence[int], k: int) -> list[int]:
    """ONNX ``[b1..bk, e1..ek]`` for the last k dims → ``F.pad`` order (last dim first)."""
    out: list[int] = []
    for i in reversed(range(k)):
        out += [int(pads[i]), int(pads[i + k])]
    return out


def _spatial_pads(node: _Node, sizes: Sequence[int], kernel: Sequence[int],
                  strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    k = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(node.attr("pads", [0] * 2 * k))
        if len(pads) != 2 * k:
            raise node.fail(f"pads has {len(pads)} values, expected {2 * k}")
        return pads
    if auto == "VALID":
        return [0] * 2 * k
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise node.fail(f"auto_pad {auto!r} is not supported")
    begins, ends = [], []
    for n, kk, s, d in zip(sizes, kernel, strides, dilations, strict=False):
        out = -(-int(n) // s)
        total = max((out - 1) * s + (kk - 1) * d + 1 - int(n), 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _symmetric(pads: Sequence[int], kernel: Sequence[int]) -> bool:
    k = len(kernel)
    return list(pads[:k]) == list(pads[k:]) and all(
        0 <= p <= kk // 2 for p, kk in zip(pads[:k], kernel, strict=True))


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


#: most elements a tensor whose size the graph itself chooses (ConstantOfShape, Expand,
#: Range, Pad) may have: 2**31 (8 GiB of float32), far above any image classifier's
#: activations, far below what would exhaust the machine's memory
MAX_CREATED_ELEMENTS = 1 << 31


def _check_created(node: _Node, shape: Sequence[int]) -> None:
    """Refuse, before allocating, a tensor of ``shape`` the graph asks for when it is
    negative or larger than :data:`MAX_CREATED_ELEMENTS` (a hostile file's memory bomb)."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise node.fail(f"negative dimension in shape {dims}")
    n = math.prod(dims)
    if n > MAX_CREATED_ELEMENTS:
        raise node.fail(f"asks for a tensor of shape {dims} ({n} elements, more than the "
                        f"{MAX_CREATED_ELEMENTS} allowed)")


# ----------------------------------------------------------------------------- operators


@_op("Conv")
def _conv(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x, w, b = _need(node, ins, 0), _need(node, ins, 1), _opt(ins, 2)
    k = w.dim() - 2
    if k not in (1, 2, 3):
        raise node.fail(f"{k}-d convolution is not supported")
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * k))
    dil = list(node.attr("dilations", [1] * k))
    group = int(node.attr("group", 1))
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dil)
    conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    if pads[:k] == pads[k:]:
        return conv(x, w, b, strides, pads[:k], dil, group)
    return conv(F.pad(x, _torch_pad(pads, k)), w, b, strides, 0, dil, group)


@_op("ConvTranspose")
def _conv_transpose(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x, w, b = _need(node, ins, 0), _need(node, ins, 1), _opt(ins, 2)
    k = w.dim() - 2
    if k not in (1, 2, 3):
        raise node.fail(f"{k}-d transposed convolution is not supported")
    kernel = list(node.attr("kernel_shape", w.shape[2:]))
    strides = list(node.attr("strides", [1] * k))
    dil = list(node.attr("dilations", [1] * k))
    group = int(node.attr("group", 1))
    out_pad = list(node.attr("output_padding", [0] * k))
    sizes = [int(s) for s in x.shape[2:]]
    auto = node.attr("auto_pad", "NOTSET")
    out_shape = node.attr("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = (list(out_shape)[-k:] if out_shape is not None
                  else [n * s for n, s in zip(sizes, strides, strict=False)])
        begins, ends = [], []
        for n, kk, s, d, op, t in zip(sizes, kernel, strides, dil, out_pad, target,
                                     strict=False):
            total = s * (n - 1) + op + (kk - 1) * d + 1 - t
            half = total // 2
            if auto == "SAME_UPPER":
                begins.append(half)
                ends.append(total - half)
            else:
                begins.append(total - half)
                ends.append(half)
        pads = begins + ends
    elif auto == "VALID":
        pads = [0] * 2 * k
    else:
        pads = list(node.attr("pads", [0] * 2 * k))
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[k - 1]
    y = conv(x, w, b, strides, 0, out_pad, group, dil)
    index: list[slice] = [slice(None), slice(None)]
    for i in range(k):
        size = y.shape[2 + i]
        index.append(slice(pads[i], size - pads[k + i]))
    return y[tuple(index)]


@_op("Gemm")
def _gemm(node: _Node, ins: list[_Value]) -> torch.Tensor:
    a, b, c = _need(node, ins, 0), _need(node, ins, 1), _opt(ins, 2)
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    trans_a, trans_b = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    if trans_a:
        a = a.transpose(0, 1)
    if trans_b and alpha == 1.0 and beta == 1.0 and (c is None or c.dim() <= 1):
        return F.linear(a, b, c)  # the very computation of nn.Linear
    if trans_b:
        b = b.transpose(0, 1)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@_op("MatMul")
def _matmul(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return torch.matmul(_need(node, ins, 0), _need(node, ins, 1))


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> _OpFn:
    def run(node: _Node, ins: list[_Value]) -> torch.Tensor:
        return fn(_need(node, ins, 0), _need(node, ins, 1))

    return run


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.pow(a, b).to(a.dtype)


_OPS["Add"] = _binary(torch.add)
_OPS["Sub"] = _binary(torch.sub)
_OPS["Mul"] = _binary(torch.mul)
_OPS["Div"] = _binary(_div)
_OPS["Pow"] = _binary(_pow)
_OPS["Equal"] = _binary(torch.eq)
_OPS["Less"] = _binary(torch.lt)
_OPS["LessOrEqual"] = _binary(torch.le)
_OPS["Greater"] = _binary(torch.gt)
_OPS["GreaterOrEqual"] = _binary(torch.ge)
_OPS["And"] = _binary(torch.logical_and)
_OPS["Or"] = _binary(torch.logical_or)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> _OpFn:
    def run(node: _Node, ins: list[_Value]) -> torch.Tensor:
        return fn(_need(node, ins, 0))

    return run


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Neg": torch.neg,
    "Abs": torch.abs, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Not": torch.logical_not, "Softsign": F.softsign,
    "HardSwish": F.hardswish, "Sign": torch.sign,
    "Identity": lambda t: t,
}.items():
    _OPS[_name] = _unary(_fn)


@_op("LeakyRelu")
def _leaky_relu(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return F.leaky_relu(_need(node, ins, 0), float(node.attr("alpha", 0.01)))


@_op("Elu")
def _elu(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return F.elu(_need(node, ins, 0), float(node.attr("alpha", 1.0)))


@_op("Selu")
def _selu(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@_op("Gelu")
def _gelu(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return F.gelu(_need(node, ins, 0), approximate=str(node.attr("approximate", "none")))


@_op("PRelu")
def _prelu(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x, slope = _need(node, ins, 0), _need(node, ins, 1)
    return torch.where(x >= 0, x, x * slope)


@_op("HardSigmoid")
def _hard_sigmoid(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@_op("Softplus")
def _softplus(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return F.softplus(_need(node, ins, 0))


def _softmax_like(fn: Callable[..., torch.Tensor]) -> _OpFn:
    def run(node: _Node, ins: list[_Value]) -> torch.Tensor:
        x = _need(node, ins, 0)
        if node.opset >= 13:
            return fn(x, dim=int(node.attr("axis", -1)))
        # opsets < 13 coerce the input to 2-D at ``axis`` and normalise rows.
        ax = _axis(int(node.attr("axis", 1)), x.dim())
        lead = math.prod(int(s) for s in x.shape[:ax])
        return fn(x.reshape(lead, -1), dim=1).reshape(x.shape)

    return run


_OPS["Softmax"] = _softmax_like(torch.softmax)
_OPS["LogSoftmax"] = _softmax_like(torch.log_softmax)


@_op("Clip")
def _clip(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    if node.opset < 11:
        lo = node.attr("min")
        hi = node.attr("max")
    else:
        lo, hi = _opt(ins, 1), _opt(ins, 2)
    if lo is None and hi is None:
        return x
    return torch.clamp(x, min=lo, max=hi)


def _pool_params(node: _Node, x: torch.Tensor) -> tuple[list[int], list[int], list[int],
                                                         list[int], bool]:
    kernel = list(node.attr("kernel_shape", []))
    k = len(kernel)
    if k not in (1, 2, 3):
        raise node.fail(f"kernel_shape {kernel} is not supported")
    strides = list(node.attr("strides", [1] * k))
    dil = list(node.attr("dilations", [1] * k))
    pads = _spatial_pads(node, x.shape[2:], kernel, strides, dil)
    return kernel, strides, dil, pads, bool(node.attr("ceil_mode", 0))


@_op("MaxPool")
def _max_pool(node: _Node, ins: list[_Value]) -> torch.Tensor:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise node.fail("the Indices output of MaxPool is not supported")
    x = _need(node, ins, 0)
    kernel, strides, dil, pads, ceil = _pool_params(node, x)
    k = len(kernel)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1]
    if _symmetric(pads, kernel):
        return pool(x, kernel, strides, pads[:k], dil, ceil_mode=ceil)
    x = F.pad(x, _torch_pad(pads, k), value=float("-inf"))
    return pool(x, kernel, strides, 0, dil, ceil_mode=ceil)


@_op("AveragePool")
def _avg_pool(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    kernel, strides, dil, pads, ceil = _pool_params(node, x)
    if any(d != 1 for d in dil):
        raise node.fail("dilated average pooling is not supported")
    k = len(kernel)
    include = bool(node.attr("count_include_pad", 0))
    pool: Callable[..., torch.Tensor] = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
    if _symmetric(pads, kernel):
        return pool(x, kernel, strides, pads[:k], ceil_mode=ceil, count_include_pad=include)
    tp = _torch_pad(pads, k)
    summed = pool(F.pad(x, tp), kernel, strides, 0, ceil_mode=ceil)
    if include:
        return summed
    ones = F.pad(torch.ones_like(x[:1, :1]), tp)
    return summed / pool(ones, kernel, strides, 0, ceil_mode=ceil)


@_op("GlobalAveragePool")
def _gap(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _gmp(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("BatchNormalization")
def _batch_norm(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x, scale, bias = _need(node, ins, 0), _need(node, ins, 1), _need(node, ins, 2)
    mean, var = _need(node, ins, 3), _need(node, ins, 4)
    eps = float(node.attr("epsilon", 1e-5))
    if int(node.attr("training_mode", 0)):
        return F.batch_norm(x, None, None, scale, bias, True, 0.0, eps)
    # running statistics are constants (they may be trainable parameters here)
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, False, 0.0, eps)


@_op("InstanceNormalization")
def _instance_norm(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return F.instance_norm(_need(node, ins, 0), weight=_need(node, ins, 1),
                           bias=_need(node, ins, 2), eps=float(node.attr("epsilon", 1e-5)))


@_op("LayerNormalization")
def _layer_norm(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    ax = _axis(int(node.attr("axis", -1)), x.dim())
    return F.layer_norm(x, tuple(x.shape[ax:]), _opt(ins, 1), _opt(ins, 2),
                        float(node.attr("epsilon", 1e-5)))


@_op("Flatten")
def _flatten(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    ax = _axis(int(node.attr("axis", 1)), x.dim())
    # torch.flatten rather than sizes read here: a trace of this module (the repaired
    # model ``mitigate`` writes) then keeps the batch dimension free
    if ax == 0:
        return x.reshape(1, -1)
    if ax == x.dim():
        return x.flatten().reshape(-1, 1) if ax == 1 else x.flatten(0, ax - 1).unsqueeze(1)
    out = x.flatten(ax) if ax < x.dim() - 1 else x
    return out.flatten(0, ax - 1) if ax > 1 else out


@_op("Reshape")
def _reshape(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    shape = list(node.attr("shape", [])) if node.opset < 5 else _ints(_need(node, ins, 1))
    if not int(node.attr("allowzero", 0)):
        shape = [int(x.shape[i]) if s == 0 else s for i, s in enumerate(shape)]
    if shape and x.dim() and shape[0] == int(x.shape[0]):
        # the same leading size as the input's: written as the input's own, so that a
        # trace of this module keeps the batch dimension free (same values here)
        return x.reshape(x.shape[0], *shape[1:])
    return x.reshape(shape)


@_op("Transpose")
def _transpose(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    perm = node.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


@_op("Concat")
def _concat(node: _Node, ins: list[_Value]) -> torch.Tensor:
    parts = [t for t in ins if t is not None]
    return torch.cat(parts, dim=int(node.attr("axis", 0)))


@_op("Dropout")
def _dropout(node: _Node, ins: list[_Value]) -> tuple[torch.Tensor, torch.Tensor]:
    x = _need(node, ins, 0)
    return x, torch.ones_like(x, dtype=torch.bool)


@_op("Cast")
def _cast(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return _need(node, ins, 0).to(_dtype(node.attr("to")))


@_op("CastLike")
def _cast_like(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return _need(node, ins, 0).to(_need(node, ins, 1).dtype)


@_op("Shape")
def _shape(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    dims = list(x.shape)
    start, end = node.attr("start", 0), node.attr("end")
    dims = dims[start:end] if end is not None else dims[start:]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@_op("Size")
def _size(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@_op("Gather")
def _gather(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x, idx = _need(node, ins, 0), _need(node, ins, 1).long()
    ax = _axis(int(node.attr("axis", 0)), x.dim())
    idx = torch.where(idx < 0, idx + x.shape[ax], idx)
    out = torch.index_select(x, ax, idx.reshape(-1).to(x.device))
    return out.reshape((*x.shape[:ax], *idx.shape, *x.shape[ax + 1:]))


def _axes(node: _Node, ins: list[_Value], first_input_opset: int, i: int = 1) -> list[int] | None:
    if node.opset < first_input_opset:
        axes = node.attr("axes")
        return None if axes is None else list(axes)
    t = _opt(ins, i)
    return None if t is None else _ints(t)


@_op("Unsqueeze")
def _unsqueeze(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    axes = _axes(node, ins, 13) or []
    rank = x.dim() + len(axes)
    for a in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(a)
    return x


@_op("Squeeze")
def _squeeze(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    axes = _axes(node, ins, 13)
    if not axes:
        return x.squeeze()
    for a in sorted((_axis(a, x.dim()) for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


@_op("Slice")
def _slice(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    if node.opset < 10:
        starts, ends = list(node.attr("starts")), list(node.attr("ends"))
        axes = node.attr("axes")
        steps = None
    else:
        starts, ends = _ints(_need(node, ins, 1)), _ints(_need(node, ins, 2))
        axes = _ints(_opt(ins, 3)) or None
        steps = _ints(_opt(ins, 4)) or None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=False):
        ax = _axis(ax, x.dim())
        d = int(x.shape[ax])
        if sp == 0:
            raise node.fail("slice step 0")
        st = st + d if st < 0 else st
        en = en + d if en < 0 else en
        if sp > 0:
            index: list[slice] = [slice(None)] * x.dim()
            index[ax] = slice(min(max(st, 0), d), min(max(en, 0), d), sp)
            x = x[tuple(index)]
        else:
            st, en = min(max(st, 0), d - 1), min(max(en, -1), d - 1)
            x = x.index_select(ax, torch.arange(st, en, sp, device=x.device))
    return x


def _reduce(kind: str, first_input_opset: int) -> _OpFn:
    def run(node: _Node, ins: list[_Value]) -> torch.Tensor:
        x = _need(node, ins, 0)
        axes = _axes(node, ins, first_input_opset)
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if int(node.attr("noop_with_empty_axes", 0)):
                return x
            axes = list(range(x.dim()))
        dims = tuple(_axis(a, x.dim()) for a in axes)
        if kind == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if kind == "max":
            return x.amax(dim=dims, keepdim=keep)
        if kind == "min":
            return x.amin(dim=dims, keepdim=keep)
        if kind == "l2":
            return torch.sqrt((x * x).sum(dim=dims, keepdim=keep))
        raise node.fail(f"reduction {kind}")  # pragma: no cover

    return run


_OPS["ReduceMean"] = _reduce("mean", 18)
_OPS["ReduceSum"] = _reduce("sum", 13)
_OPS["ReduceMax"] = _reduce("max", 18)
_OPS["ReduceMin"] = _reduce("min", 18)
_OPS["ReduceL2"] = _reduce("l2", 18)


@_op("Pad")
def _pad(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    mode = str(node.attr("mode", "constant"))
    if node.opset < 11:
        pads = list(node.attr("pads", []))
        value = float(node.attr("value", 0.0))
        axes = None
    else:
        pads = _ints(_need(node, ins, 1))
        value = _scalar(_opt(ins, 2)) or 0.0
        axes = _ints(_opt(ins, 3)) or None
    rank = x.dim()
    axes = [_axis(a, rank) for a in axes] if axes is not None else list(range(rank))
    n = len(axes)
    if len(pads) != 2 * n:
        raise node.fail(f"pads has {len(pads)} values, expected {2 * n}")
    begin, end = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + n]
    tp: list[int] = []
    for a in reversed(range(rank)):
        tp += [begin[a], end[a]]
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    _check_created(node, [max(0, int(x.shape[a]) + begin[a] + end[a]) for a in range(rank)])
    if mode == "constant":
        return F.pad(x, tp, value=value)
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise node.fail(f"pad mode {mode!r} is not supported")
    return F.pad(x, tp, mode=torch_mode)


@_op("ConstantOfShape")
def _constant_of_shape(node: _Node, ins: list[_Value]) -> torch.Tensor:
    shape_t = _need(node, ins, 0)
    value = node.attr("value")
    if value is None:
        value = torch.zeros(1, dtype=torch.float32)
    _check_created(node, _ints(shape_t))
    return torch.full(_ints(shape_t), value.reshape(-1)[0].item(), dtype=value.dtype,
                      device=shape_t.device)


@_op("Expand")
def _expand(node: _Node, ins: list[_Value]) -> torch.Tensor:
    x = _need(node, ins, 0)
    target = _ints(_need(node, ins, 1))
    _check_created(node, target)
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(target))
    _check_created(node, shape)
    return x.expand(shape)


@_op("Where")
def _where(node: _Node, ins: list[_Value]) -> torch.Tensor:
    return torch.where(_need(node, ins, 0).bool(), _need(node, ins, 1), _need(node, ins, 2))


@_op("Range")
def _range(node: _Node, ins: list[_Value]) -> torch.Tensor:
    start, limit, delta = (_need(node, ins, i) for i in range(3))
    step = float(delta.item())
    if step == 0 or not all(math.isfinite(float(t.item())) for t in (start, limit, delta)):
        raise node.fail("Range needs finite bounds and a non-zero delta")
    _check_created(node, [max(0, math.ceil((float(limit.item()) - float(start.item())) / step))])
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype,
                        device=start.device)


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: bool = False
              ) -> _OpFn:
    def run(node: _Node, ins: list[_Value]) -> torch.Tensor:
        parts = [t for t in ins if t is not None]
        out = parts[0]
        for t in parts[1:]:
            out = fn(out, t)
        return out / len(parts) if mean else out

    return run


_OPS["Max"] = _variadic(torch.maximum)
_OPS["Min"] = _variadic(torch.minimum)
_OPS["Sum"] = _variadic(torch.add)
_OPS["Mean"] = _variadic(torch.add, mean=True)


@_op("Split")
def _split(node: _Node, ins: list[_Value]) -> tuple[torch.Tensor, ...]:
    x = _need(node, ins, 0)
    ax = _axis(int(node.attr("axis", 0)), x.dim())
    sizes = (list(node.attr("split", [])) if node.opset < 13 else _ints(_opt(ins, 1)))
    if not sizes:
        n = len(node.outputs)
        sizes_or_chunk: int | list[int] = -(-int(x.shape[ax]) // n)
    else:
        sizes_or_chunk = sizes
    return tuple(torch.split(x, sizes_or_chunk, dim=ax))


SUPPORTED_OPS: frozenset[str] = frozenset({*_OPS, "Constant"})


# ----------------------------------------------------------------------------- model


def _tensor_of(proto: Any, what: str) -> torch.Tensor:
    """An ONNX ``TensorProto`` as a torch tensor; a ModelError when the file's tensor is
    inconsistent (data that does not fill its dims, an undefined or text element type)."""
    from onnx import numpy_helper

    try:
        return torch.from_numpy(numpy_helper.to_array(proto).copy())
    except Exception as exc:  # ValueError, TypeError from numpy/onnx on forged tensors
        text = str(exc).strip().splitlines()
        raise ModelError(f"ONNX {what} is malformed ({type(exc).__name__}: "
                         f"{text[0][:200] if text else ''})") from exc


def _attr_value(attr: Any, onnx: Any) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return _tensor_of(value, f"attribute {attr.name!r}")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
    return value


def _constant_value(node: Any, onnx: Any) -> torch.Tensor:
    for attr in node.attribute:
        if attr.name == "value":
            return _tensor_of(attr.t, f"constant {node.name!r}")
        if attr.name == "value_float":
            return torch.tensor(attr.f, dtype=torch.float32)
        if attr.name == "value_floats":
            return torch.tensor(list(attr.floats), dtype=torch.float32)
        if attr.name == "value_int":
            return torch.tensor(attr.i, dtype=torch.int64)
        if attr.name == "value_ints":
            return torch.tensor(list(attr.ints), dtype=torch.int64)
    kinds = ", ".join(a.name for a in node.attribute) or "none"
    raise ModelError(f"ONNX Constant node {node.name!r}: unsupported value kind ({kinds})")


def _topological(nodes: list[_Node], known: Iterable[str]) -> list[_Node]:
    """Order nodes so that each runs after the producers of its inputs (Kahn)."""
    available = set(known) | {""}
    if all(_ready(n, available) for n in nodes):  # already ordered (as ONNX requires)
        return list(nodes)
    available = set(known) | {""}
    pending = list(nodes)
    ordered: list[_Node] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.inputs)]
        if not ready:
            missing = sorted({i for n in pending for i in n.inputs if i not in available
                              and not any(i in m.outputs for m in pending)})
            raise ModelError("ONNX graph is not a DAG or uses undefined values"
                             + (f": {', '.join(missing[:10])}" if missing else ""))
        ready_ids = {id(n) for n in ready}
        for n in ready:
            ordered.append(n)
            available.update(n.outputs)
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered


def _ready(node: _Node, available: set[str]) -> bool:
    ok = all(i in available for i in node.inputs)
    available.update(node.outputs)
    return ok


def _qualified(segments: Iterable[str]) -> tuple[str, ...]:
    """Scope segments as the full ``named_modules()`` paths of the modules they name.

    The TorchScript-based exporter writes, per level, the module's name relative to its
    parent, except that the children of a container carry the container's segment as a
    prefix: ``/layer/layer.0/down/down.1/Conv`` is ``layer`` → ``layer.0`` →
    ``layer.0.down`` → ``layer.0.down.1``. The dynamo exporter writes full paths
    (``block``, ``block.conv``); a segment that extends the previous one by ``.name`` is
    read as the child ``name`` in both cases.
    """
    out: list[str] = []
    prev = ""
    for seg in segments:
        if not seg:
            continue
        path = out[-1] if out else ""
        rel = seg[len(prev) + 1:] if prev and seg.startswith(prev + ".") else seg
        out.append(f"{path}.{rel}" if path else rel)
        prev = seg
    return tuple(out)


def _module_scopes(node: Any) -> tuple[str, ...]:
    """The PyTorch module paths a node was exported from, outermost first.

    The TorchScript-based exporter names nodes ``/features/features.3/conv1/Conv``; the
    dynamo exporter stores ``['', 'features', 'features.3', 'features.3.conv1', 'conv2d']``
    in the ``pkg.torch.onnx.name_scopes`` metadata. Both give ``('features',
    'features.3', 'features.3.conv1')`` (see :func:`_qualified`).
    """
    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                break
            if isinstance(scopes, list):
                return _qualified(str(s) for s in scopes[:-1] if s)
    name = str(node.name)
    if not name.startswith("/"):
        return ()
    return _qualified(p for p in name.strip("/").split("/")[:-1] if p)


class OnnxModule(nn.Module):
    """An ONNX graph executed node by node with torch operations.

    ``forward(x)`` returns the graph's output (a tuple when it has several);
    :meth:`run` also returns any intermediate values asked for by name.
    Floating-point initializers become (trainable) parameters, the rest buffers, so
    ``.to(device)``, ``state_dict()`` and gradients work as for any module.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        onnx = require("onnx", "onnx")
        graph = model.graph
        opset = 0
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                opset = int(imp.version)
        if opset == 0:
            raise ModelError("ONNX model declares no default-domain opset")
        self.opset = opset
        if len(graph.sparse_initializer):
            raise UnsupportedOnnxError("ONNX sparse initializers are not supported")

        unsupported = sorted({
            (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
            for n in graph.node
            if n.domain not in ("", "ai.onnx") or n.op_type not in SUPPORTED_OPS
        })
        if unsupported:
            raise UnsupportedOnnxError(
                "the ONNX model uses operators the built-in converter does not support: "
                + ", ".join(unsupported)
                + f" (supported: {', '.join(sorted(SUPPORTED_OPS))})"
            )

        self._attr_of: dict[str, str] = {}  # ONNX value name -> attribute name on self
        for i, init in enumerate(graph.initializer):
            tensor = _tensor_of(init, f"initializer {init.name!r}")
            self._add_constant(i, init.name, tensor)

        nodes: list[_Node] = []
        for j, n in enumerate(graph.node):
            if n.op_type == "Constant":
                self._add_constant(len(self._attr_of) + j, n.output[0], _constant_value(n, onnx))
                continue
            attrs = {a.name: _attr_value(a, onnx) for a in n.attribute}
            nodes.append(_Node(n.op_type, n.name, tuple(n.input), tuple(n.output), attrs,
                               opset, _module_scopes(n)))

        inputs = [i for i in graph.input if i.name not in self._attr_of]
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs) or "none"
            raise ModelError(f"the ONNX model must take exactly one input (the images), "
                             f"it takes {len(inputs)}: {names}")
        self.input_name: str = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_dims: tuple[int | None, ...] = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in dims)
        elem = inputs[0].type.tensor_type.elem_type
        self.input_dtype: torch.dtype = _DTYPES.get(elem, torch.float32)
        self.output_names: tuple[str, ...] = tuple(o.name for o in graph.output)
        out_dims = graph.output[0].type.tensor_type.shape.dim if graph.output else []
        self.output_dims: tuple[int | None, ...] = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in out_dims)
        if not self.output_names:
            raise ModelError("the ONNX model has no outputs")

        self._nodes: list[_Node] = _topological(nodes, [self.input_name, *self._attr_of])
        self.value_names: tuple[str, ...] = tuple(o for n in self._nodes for o in n.outputs if o)
        produced = set(self.value_names) | set(self._attr_of) | {self.input_name}
        missing = [o for o in self.output_names if o not in produced]
        if missing:
            raise ModelError(f"ONNX outputs are never computed: {', '.join(missing)}")
        # values that can be freed after each node (unless captured or an output)
        last_use: dict[str, int] = {}
        for k, n in enumerate(self._nodes):
            for used in n.inputs:
                if used and used not in self._attr_of:
                    last_use[used] = k
        keep = set(self.output_names)
        self._free_after: list[tuple[str, ...]] = [() for _ in self._nodes]
        frees: dict[int, list[str]] = {}
        for name, k in last_use.items():
            if name not in keep:
                frees.setdefault(k, []).append(name)
        for k, freed in frees.items():
            self._free_after[k] = tuple(freed)

    def _add_constant(self, i: int, name: str, tensor: torch.Tensor) -> None:
        attr = f"c{i}_" + "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
        if tensor.is_floating_point():
            self.register_parameter(attr, nn.Parameter(tensor))
        else:
            self.register_buffer(attr, tensor)
        self._attr_of[name] = attr

    # -- introspection ----------------------------------------------------------------

    @property
    def nodes(self) -> tuple[_Node, ...]:
        return tuple(self._nodes)

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` when the graph's input is ``N×C×H×W`` with static C, H, W."""
        dims = self.input_dims
        if len(dims) == 4 and all(d is not None for d in dims[1:]):
            return int(dims[1]), int(dims[2]), int(dims[3])  # type: ignore[arg-type]
        return None

    @property
    def num_outputs(self) -> int | None:
        """Static number of logits K of an ``N×K`` output, else None."""
        if len(self.output_dims) == 2 and self.output_dims[1] is not None:
            return int(self.output_dims[1])
        return None

    def penultimate_value(self) -> str | None:
        """Name of the value entering the last Gemm/MatMul (the classifier's input)."""
        for n in reversed(self._nodes):
            if n.op_type in ("Gemm", "MatMul"):
                a = n.inputs[0]
                if a in self._attr_of and len(n.inputs) > 1:
                    a = n.inputs[1]
                return a
        return None

    def layer_names(self) -> list[str]:
        """Names accepted by :meth:`resolve_layer`: module scopes, then value names."""
        scopes: dict[str, None] = {}
        for n in self._nodes:
            for s in n.scopes:
                scopes[s] = None
        return [*scopes, *self.value_names]

    def resolve_layer(self, layer: str) -> str | None:
        """Map a layer name to a value name.

        Accepts a value name (a node output), a node name (its first output) or a
        PyTorch module path such as ``features.3`` (the exporter's scope
        ``/features/features.3/``: the last node inside it).
        """
        if layer in self.value_names or layer == self.input_name:
            return layer
        for n in self._nodes:
            if n.name == layer and n.outputs:
                return n.outputs[0]
        inside = [n for n in self._nodes if layer in n.scopes and n.outputs]
        if not inside:
            return None
        # the module's output: the last value it computes that is used outside it
        produced = {o for n in inside for o in n.outputs}
        used_outside = {i for n in self._nodes if layer not in n.scopes for i in n.inputs}
        used_outside |= set(self.output_names)
        for n in reversed(inside):
            for o in n.outputs:
                if o in produced and o in used_outside:
                    return o
        return inside[-1].outputs[0]

    # -- execution ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> Any:
        out, _ = self.run(x)
        return out

    def run(self, x: torch.Tensor, capture: Collection[str] = ()) -> tuple[Any, dict[str, Any]]:
        """Execute the graph; return its output(s) and the captured values by name."""
        batch = self.input_dims[0] if self.input_dims else None
        n = int(x.shape[0]) if x.dim() else 0
        if batch is None or n == batch or n == 0:
            return self._run_once(x, capture)
        # a graph exported with a fixed batch size: run it chunk by chunk
        outs: list[Any] = []
        caps: list[dict[str, Any]] = []
        for start in range(0, n, batch):
            chunk = x[start:start + batch]
            m = int(chunk.shape[0])
            if m < batch:
                pad = chunk.new_zeros((batch - m, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            o, c = self._run_once(chunk, capture)
            outs.append(_trim(o, m))
            caps.append({k: _trim(v, m) for k, v in c.items()})
        merged = _cat(outs)
        return merged, {k: _cat([c[k] for c in caps]) for k in capture}

    def _run_once(self, x: torch.Tensor, capture: Collection[str]) -> tuple[Any, dict[str, Any]]:
        if x.is_floating_point() and x.dtype != self.input_dtype:
            x = x.to(self.input_dtype)
        env: dict[str, Any] = {name: getattr(self, attr) for name, attr in self._attr_of.items()}
        env[self.input_name] = x
        keep = set(capture)
        for k, node in enumerate(self._nodes):
            try:
                ins = [env[i] if i else None for i in node.inputs]
            except KeyError as exc:
                raise node.fail(f"input {exc.args[0]!r} is undefined") from None
            try:
                result = _OPS[node.op_type](node, ins)
            except ModelError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                raise node.fail(f"failed: {exc}") from exc
            outs = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            for name, value in zip(node.outputs, outs, strict=False):
                if name:
                    env[name] = value
            for name in self._free_after[k]:
                if name not in keep:
                    env.pop(name, None)
        outputs = tuple(env[o] for o in self.output_names)
        captured = {name: env[name] for name in capture}
        return (outputs[0] if len(outputs) == 1 else outputs), captured


def _trim(value: Any, m: int) -> Any:
    if isinstance(value, tuple):
        return tuple(_trim(v, m) for v in value)
    return value[:m] if isinstance(value, torch.Tensor) and value.dim() else value


def _cat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, tuple):
        return tuple(_cat([v[i] for v in values]) for i in range(len(first)))
    if isinstance(first, torch.Tensor) and first.dim():
        return torch.cat(values)
    return first


def parse_onnx_bytes(data: bytes, *, source: str = "<bytes>") -> Any:
    """Parse a serialized ONNX ``ModelProto`` or raise :class:`ModelError`."""
    onnx = require("onnx", "onnx")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{source}: not a valid ONNX model ({exc})") from exc
    if not model.HasField("graph") or len(model.graph.node) == 0 or model.ir_version <= 0:
        raise ModelError(f"{source}: not a valid ONNX model (no graph)")
    return model


def convert_onnx(model: Any) -> OnnxModule:
    """Build an :class:`OnnxModule` from an ``onnx.ModelProto``."""
    return OnnxModule(model)
