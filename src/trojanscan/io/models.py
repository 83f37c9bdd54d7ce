"""Loading users' models: TorchScript, ONNX, safetensors/state_dict + ``--arch``, pickles.

The format is recognised from the file's content, not its name:

* a ZIP with TorchScript's layout (``constants.pkl``, ``code/``) → ``torch.jit.load``;
* a safetensors header → weights, built into the ``--arch`` network;
* a ``torch.save`` file → ``torch.load(weights_only=True)``; a state_dict needs
  ``--arch``; a whole pickled module is refused (:class:`UnsafeModelError`) unless
  ``trust_pickle=True``, because unpickling runs code from the file;
* ONNX (``.onnx``, or a protobuf that parses as a model) → a differentiable
  :class:`~trojanscan.io.onnx_torch.OnnxModule`.

Nothing is ever written to the user's file. :func:`check_compatible` runs the model
on a few samples of a data set and fills in the input shape and number of classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..classifier import borrow_model, check_logits
from ..dataset import ImageDataset
from ..exceptions import (
    IncompatibleError,
    ModelError,
    NotAClassifierError,
    TrojanscanError,
    TrojanscanWarning,
    UnknownFormatError,
    UnsafeModelError,
    bad_param,
    printable_errors,
    require,
)
from ..utils import pick_device, sha256_file
from .onnx_torch import OnnxModule

__all__ = [
    "FORMATS",
    "LoadedModel",
    "build_arch",
    "check_compatible",
    "detect_format",
    "load_model",
]

FORMATS = ("torchscript", "onnx", "safetensors", "state_dict", "pickle")
_SUPPORTED = ("TorchScript (torch.jit.save), ONNX (.onnx), safetensors or a state_dict "
              "with --arch, a whole pickled module with --trust-pickle")
# input shapes tried when a model's shape cannot be read from the file
_PROBE_SIZES = (28, 32, 8, 16, 64)
Shape = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A user's model ready to run.

    ``module`` is in eval mode on ``device``. ``input_shape`` is ``(C, H, W)`` and
    ``num_classes`` the number of logits, each ``None`` until known (from the file,
    the caller or :func:`check_compatible`). ``converter`` names the ONNX converter
    (``"builtin"`` or ``"onnx2torch"``), ``arch`` the architecture used for weights.
    """

    module: nn.Module
    format: str
    path: str
    sha256: str
    input_shape: Shape | None
    num_classes: int | None
    device: torch.device
    converter: str | None = None
    arch: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report's ``inputs`` entry."""
        out: dict[str, Any] = {"path": self.path, "sha256": self.sha256, "format": self.format,
                               "input_shape": list(self.input_shape) if self.input_shape
                               else None, "num_classes": self.num_classes}
        if self.converter:
            out["converter"] = self.converter
        if self.arch:
            out["arch"] = self.arch
        return out


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "…"


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "unknown" if shape is None else "×".join(str(s) for s in shape)


# ----------------------------------------------------------------------------- format


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"torchscript"``, ``"onnx"``, ``"safetensors"`` or ``"torch"`` (a torch.save pickle).

    Raises :class:`ModelError` for missing, empty or corrupt files and
    :class:`UnknownFormatError` when no format matches.
    """
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"{p} is not a file; expected a model file ({_SUPPORTED})")
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: the model file is empty")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return _zip_format(p)
    if size >= 10:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch"
    if p.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and _parses_as_onnx(p)):
        return "onnx"
    raise UnknownFormatError(f"{p}: unknown model format; supported: {_SUPPORTED}")


def _zip_format(p: Path) -> str:
    """``"torchscript"`` or ``"torch"`` for a PyTorch ZIP whose members all check out."""
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if any(n.endswith("constants.pkl") or "/code/" in n or n.startswith("code/")
                   for n in names):
                kind = "torchscript"
            elif any(n.endswith("data.pkl") for n in names):
                kind = "torch"
            else:
                raise UnknownFormatError(f"{p}: a ZIP archive but not a PyTorch model (no "
                                         f"data.pkl); supported: {_SUPPORTED}")
            _verify_zip(p, z)
    except TrojanscanError:
        raise
    except Exception as exc:  # BadZipFile, OSError, and what malformed headers raise
        raise ModelError(f"{p}: corrupt ZIP archive, cannot read it as a PyTorch model "
                         f"({_first_line(exc)})") from exc
    return kind


#: a PyTorch ZIP stores its tensors uncompressed, so its members together hold about
#: the file's size; more than this many times it plus ``_ZIP_SLACK`` is refused
_ZIP_RATIO = 4
_ZIP_SLACK = 256 << 20
_ZIP_CHUNK = 1 << 20


def _verify_zip(p: Path, z: zipfile.ZipFile) -> None:
    """Check every member of the model ZIP ``z`` (read from ``p``) against its CRC-32.

    ``torch.jit.load`` and ``torch.load`` do not check CRCs: a flipped byte in a weight
    record loads silently as a different model. Each member is streamed in 1 MiB
    chunks (memory stays bounded) and the total uncompressed size, declared and read,
    is bounded by ``_ZIP_RATIO`` times the file's size plus ``_ZIP_SLACK`` (a ZIP bomb
    is refused before it is inflated). Raises :class:`ModelError` naming the member.
    """
    infos = z.infolist()
    limit = _ZIP_RATIO * p.stat().st_size + _ZIP_SLACK
    declared = sum(max(0, i.file_size) for i in infos)
    if declared > limit:
        raise ModelError(f"{p}: model file is corrupt: its members declare {declared} bytes "
                         f"uncompressed, more than the {limit} allowed for a file of "
                         f"{p.stat().st_size} bytes")
    total = 0
    for info in infos:
        try:
            with z.open(info) as member:
                while chunk := member.read(_ZIP_CHUNK):
                    total += len(chunk)
                    if total > limit:
                        raise ModelError(f"{p}: model file is corrupt: its members inflate "
                                         f"to more than {limit} bytes")
        except TrojanscanError:
            raise
        except zipfile.BadZipFile as exc:
            if "CRC" in str(exc):
                raise ModelError(f"{p}: model file is corrupt: CRC mismatch in member "
                                 f"{info.filename}") from exc
            raise ModelError(f"{p}: model file is corrupt: cannot read member "
                             f"{info.filename} ({_first_line(exc)})") from exc
        except Exception as exc:  # truncated data, encrypted or unknown compression, ...
            raise ModelError(f"{p}: model file is corrupt: cannot read member "
                             f"{info.filename} ({type(exc).__name__}: {_first_line(exc)})"
                             ) from exc
    for info in infos:
        if info.filename.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl
            problem = _pickle_problem(z.read(info))
            if problem is not None:
                raise ModelError(f"{p}: model file is corrupt: malformed pickle in member "
                                 f"{info.filename} ({problem})")


def _pickle_problem(data: bytes) -> str | None:
    """Why ``data`` is not a well-formed pickle (None if it is), read opcode by opcode
    without executing anything. PyTorch's C++ unpickler trusts the lengths in a pickle:
    a string claiming 4 GiB makes it allocate 4 GiB before noticing the data is short."""
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception as exc:  # ValueError for truncated arguments, unknown opcodes, ...
        return _first_line(exc)
    return None


def _parses_as_onnx(p: Path) -> bool:
    try:
        import onnx
    except Exception:
        return False
    try:
        model = onnx.load_model_from_string(p.read_bytes())
    except Exception:
        return False
    return model.ir_version > 0 and model.HasField("graph") and len(model.graph.node) > 0


# ----------------------------------------------------------------------------- loaders


def _load_torchscript(p: Path, device: torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates jit
            module = torch.jit.load(str(p), map_location=device)
    except Exception as exc:
        raise ModelError(f"{p}: cannot load the TorchScript model ({_first_line(exc)})") from exc
    return module


def _onnx2torch() -> Any | None:
    try:
        import onnx2torch
    except Exception:  # ImportError, or torchvision failing inside it
        return None
    return onnx2torch


def _non_utf8_field(message: Any, where: str = "model") -> str | None:
    """The first string field of a protobuf ``message`` that is not valid UTF-8 (protobuf
    hands those over as ``bytes``), as ``graph.node.op_type``; None when all are text."""
    for field, value in message.ListFields():
        name = f"{where}.{field.name}"
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:  # older protobuf
            repeated = field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        if field.type == field.TYPE_STRING:
            if any(not isinstance(v, str) for v in values):
                return name
        elif field.type == field.TYPE_MESSAGE:
            for v in values:
                if hasattr(v, "ListFields"):  # map entries arrive as plain values
                    found = _non_utf8_field(v, name)
                    if found is not None:
                        return found
    return None


def _load_onnx(p: Path) -> tuple[nn.Module, str]:
    onnx = require("onnx", "onnx")
    from .onnx_torch import UnsupportedOnnxError

    try:
        proto = onnx.load(str(p))  # also reads external data stored beside the file
    except Exception as exc:
        raise ModelError(f"{p}: not a valid ONNX model ({_first_line(exc)})") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise ModelError(f"{p}: not a valid ONNX model (no graph)")
    bad_text = _non_utf8_field(proto)
    if bad_text is not None:
        raise ModelError(f"{p}: not a valid ONNX model ({bad_text} is not valid UTF-8)")
    try:
        return OnnxModule(proto), "builtin"
    except UnsupportedOnnxError as exc:
        o2t = _onnx2torch()
        if o2t is None:
            raise ModelError(f"{p}: {exc}") from exc
        try:  # pragma: no cover - onnx2torch is not installed in CI
            return o2t.convert(proto), "onnx2torch"
        except Exception as exc2:  # pragma: no cover
            raise ModelError(f"{p}: {exc}; onnx2torch failed too ({_first_line(exc2)})"
                             ) from exc2
    except ModelError as exc:
        raise ModelError(f"{p}: {exc}") from exc


_CODE_OPS = frozenset({"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ",
                       "NEWOBJ_EX"})


def _pickle_bytes(p: Path) -> bytes:
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            return z.read(name)
    return p.read_bytes()


def _needs_code(p: Path, exc: BaseException) -> str | None:
    """The global a refused pickle imports (``"?"`` when unnamed), None if it is corrupt.

    Scans the opcodes without executing anything.
    """
    m = re.search(r"GLOBAL ([\w.]+)", str(exc))
    if m:
        return m.group(1)
    if "Unsupported global" in str(exc):
        return "?"
    try:
        data = _pickle_bytes(p)
        names: list[str] = []
        code = False
        for op, arg, _ in pickletools.genops(data):
            if op.name in _CODE_OPS:
                code = True
            if op.name == "GLOBAL" and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
    except Exception:
        return None
    return (names[0] if names else "?") if code else None


def _torch_load(p: Path, trust_pickle: bool) -> Any:
    """``torch.load`` safely; unpickle arbitrary objects only when trusted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            needed = _needs_code(p, exc)
            if needed is None:
                raise ModelError(f"{p}: corrupt or unreadable PyTorch file "
                                 f"({_first_line(exc)})") from exc
            if not trust_pickle:
                what = "" if needed == "?" else f" (it imports {needed})"
                raise UnsafeModelError(
                    f"{p} is a whole pickled model, not plain weights{what}: unpickling it "
                    "runs arbitrary code from the file. Pass --trust-pickle "
                    "(trust_pickle=True) only for files you trust, or save the model as "
                    "TorchScript, ONNX or a state_dict/safetensors with --arch."
                ) from exc
        except Exception as exc:
            raise ModelError(f"{p}: corrupt or unreadable PyTorch file "
                             f"({_first_line(exc)})") from exc
    warnings.warn(f"{p}: unpickling a whole model because --trust-pickle was given; "
                  "this runs code from the file", TrojanscanWarning, stacklevel=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return torch.load(str(p), map_location="cpu", weights_only=False)
            except RuntimeError as exc:
                if "magic number" not in str(exc):
                    raise
                with open(p, "rb") as f:  # a plain pickle.dump, not torch.save
                    return pickle.load(f)
    except TrojanscanError:
        raise
    except Exception as exc:
        raise ModelError(f"{p}: cannot unpickle the model ({type(exc).__name__}: "
                         f"{_first_line(exc)}); the classes it refers to must be importable"
                         ) from exc


def _as_state_dict(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    def tensors(d: Any) -> bool:
        return (isinstance(d, Mapping) and len(d) > 0
                and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                        for k, v in d.items()))

    if tensors(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            if tensors(obj.get(key)):
                return dict(obj[key])
    raise ModelError(f"{p}: holds a {type(obj).__name__}, not a state_dict (a mapping of "
                     "parameter names to tensors)")


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise ModelError(f"{p}: corrupt safetensors file ({_first_line(exc)})") from exc


# ----------------------------------------------------------------------------- --arch


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Make modules in the working directory importable (as ``python -m`` does)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _builtin_archs() -> Any | None:
    try:
        return importlib.import_module("trojanscan.archs")
    except ImportError:
        return None


def _resolve_factory(arch: str) -> Callable[..., Any]:
    if not isinstance(arch, str) or not arch.strip():
        raise bad_param("arch", "package.module:factory or a built-in architecture name", arch)
    if ":" not in arch:
        archs = _builtin_archs()
        names = list(getattr(archs, "ARCHS", {})) if archs is not None else []
        if archs is None or arch not in names:
            builtin = f" or a built-in name ({', '.join(names)})" if names else ""
            raise ModelError(f"invalid --arch {arch!r}: expected package.module:factory "
                             f"(a callable returning the nn.Module){builtin}")

        def build(input_shape: Shape | None = None, num_classes: int | None = None) -> Any:
            kwargs: dict[str, Any] = {}
            if input_shape is not None:
                kwargs["input_shape"] = input_shape
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            return archs.build(arch, **kwargs)

        return build
    mod_name, attr = arch.rsplit(":", 1)
    if not mod_name or not attr:
        raise ModelError(f"invalid --arch {arch!r}: expected package.module:factory")
    try:
        if mod_name.endswith(".py"):
            file = Path(mod_name)
            if not file.is_file():
                raise ModelError(f"--arch {arch}: file {file} not found")
            spec = importlib.util.spec_from_file_location(f"_trojanscan_arch_{file.stem}", file)
            if spec is None or spec.loader is None:
                raise ModelError(f"--arch {arch}: cannot import {file}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            with _cwd_on_path():
                module = importlib.import_module(mod_name)
    except TrojanscanError:
        raise
    except Exception as exc:
        raise ModelError(f"--arch {arch}: cannot import module {mod_name!r} "
                         f"({type(exc).__name__}: {_first_line(exc)})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"--arch {arch}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"--arch {arch}: {attr!r} is not callable (it is a "
                         f"{type(obj).__name__}); give a function or class returning the "
                         "nn.Module")
    return obj


def _accepted(factory: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params
            if p.name in ("input_shape", "num_classes")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _call_factory(factory: Callable[..., Any], arch: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        module = factory(**kwargs)
    except TrojanscanError:
        raise
    except Exception as exc:
        raise ModelError(f"--arch {arch}: the factory raised {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"--arch {arch}: the factory returned a {type(module).__name__}, "
                         "not a torch.nn.Module")
    return module


def _mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str],
                                                                        list[str]]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} (file {_fmt_shape(tuple(sd[k].shape))}, model "
              f"{_fmt_shape(tuple(expected[k].shape))})"
              for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    return missing, unexpected, shapes


def _list(items: list[str], limit: int = 10) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _shape_candidates(sd: Mapping[str, torch.Tensor]) -> list[Shape]:
    convs = [v for v in sd.values() if v.dim() == 4 and v.is_floating_point()]
    if convs:
        c = int(convs[0].shape[1])
        return [(c, s, s) for s in _PROBE_SIZES]
    mats = [v for v in sd.values() if v.dim() == 2 and v.is_floating_point()]
    out: list[Shape] = []
    if mats:
        d = int(mats[0].shape[1])
        for c in (1, 3):
            side = math.isqrt(d // c) if d % c == 0 else 0
            if side > 0 and c * side * side == d:
                out.append((c, side, side))
    return out


def _num_classes_guess(sd: Mapping[str, torch.Tensor]) -> int | None:
    mats = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    return int(mats[-1].shape[0]) if mats else None


def build_arch(arch: str, *, input_shape: Shape | None = None, num_classes: int | None = None,
               state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Instantiate ``--arch``: ``package.module:factory`` (also ``file.py:factory``) or a
    built-in name of :mod:`trojanscan.archs`.

    The factory is called without arguments, except that ``input_shape`` and
    ``num_classes`` are passed when it has parameters of those names and they are
    known. When they are not, and ``state_dict`` is given, shapes that make the
    network's parameters match the weights are searched for.
    """
    factory = _resolve_factory(arch)
    accepted = _accepted(factory)
    kwargs: dict[str, Any] = {}
    if "input_shape" in accepted and input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" in accepted and num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    need_shape = "input_shape" in accepted and input_shape is None
    need_classes = "num_classes" in accepted and num_classes is None
    if state_dict is not None and (need_shape or need_classes):
        guesses_k = [_num_classes_guess(state_dict)] if need_classes else [None]
        guesses_s: list[Shape | None] = (list(_shape_candidates(state_dict)) if need_shape
                                         else [None])
        for k in guesses_k:
            for s in guesses_s:
                trial = dict(kwargs)
                if s is not None:
                    trial["input_shape"] = s
                if k is not None:
                    trial["num_classes"] = k
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        module = factory(**trial)
                except Exception:
                    continue
                if isinstance(module, nn.Module) and not any(_mismatch(module, state_dict)):
                    return module
    return _call_factory(factory, arch, kwargs)


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], p: Path, arch: str) -> None:
    expected = model.state_dict()
    prefix = "module."
    if (sd and all(k.startswith(prefix) for k in sd)
            and not any(k.startswith(prefix) for k in expected)):
        sd = {k[len(prefix):]: v for k, v in sd.items()}  # saved from DataParallel
    missing, unexpected, shapes = _mismatch(model, sd)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_list(shapes)}")
        raise ModelError(f"{p}: the weights do not fit --arch {arch}; " + "; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:
        raise ModelError(f"{p}: cannot load the weights into --arch {arch} "
                         f"({_first_line(exc)})") from exc


# ----------------------------------------------------------------------------- shapes


def _first_conv_channels(module: nn.Module) -> int | None:
    try:
        for v in module.state_dict().values():
            if isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_floating_point():
                return int(v.shape[1])
    except Exception:
        return None
    return None


def _forward(module: nn.Module, x: torch.Tensor) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(x)


def _probe(module: nn.Module, device: torch.device) -> tuple[Shape | None, int | None]:
    """Try a few common input shapes; return the one that works (if unique) and K."""
    channels = _first_conv_channels(module)
    cands = [(c, s, s) for c in ((channels,) if channels else (1, 3)) for s in _PROBE_SIZES]
    found: list[tuple[Shape, int]] = []
    for shape in cands:
        try:
            out = _forward(module, torch.zeros(1, *shape, device=device))
        except Exception:
            continue
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
            found.append((shape, int(out.shape[1])))
    ks = {k for _, k in found}
    k = ks.pop() if len(ks) == 1 else None
    return (found[0][0] if len(found) == 1 else None), k


def _logits_dim(module: nn.Module, shape: Shape, device: torch.device, what: str) -> int:
    try:
        out = _forward(module, torch.zeros(2, *shape, device=device))
    except Exception as exc:
        raise IncompatibleError(f"{what}: the model fails on inputs of shape "
                                f"N×{_fmt_shape(shape)} ({_first_line(exc)})") from exc
    try:  # zeros may legitimately give NaN (a model normalising by the input's spread)
        return check_logits(out, 2, what=f"inputs of shape {_fmt_shape(shape)}", finite=False)
    except NotAClassifierError as exc:
        raise NotAClassifierError(f"{what}: {exc}") from exc


def _check_shape(input_shape: Any) -> Shape | None:
    if input_shape is None:
        return None
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise bad_param("input_shape", "(C, H, W) with positive integers", input_shape)
    return shape[0], shape[1], shape[2]


# ----------------------------------------------------------------------------- public


def load_model(path: str | os.PathLike[str], *, arch: str | None = None,
               trust_pickle: bool = False, device: str | torch.device | None = None,
               input_shape: tuple[int, int, int] | None = None,
               num_classes: int | None = None) -> LoadedModel:
    """Load a user's model file (format recognised from its content).

    ``arch`` (``package.module:factory`` or a built-in name) is required for
    safetensors and state_dict files and ignored otherwise. ``trust_pickle`` allows
    unpickling a whole module (runs code from the file; a :class:`TrojanscanWarning`
    says so). ``input_shape``/``num_classes`` help build built-in architectures and
    are checked against the model. The file is only read. Error messages are one line:
    names taken from the file (keys, ONNX value names) have their control characters
    escaped.
    """
    with printable_errors():
        return _load_model(Path(path), arch=arch, trust_pickle=trust_pickle, device=device,
                           input_shape=input_shape, num_classes=num_classes)


def _load_model(p: Path, *, arch: str | None, trust_pickle: bool,
                device: str | torch.device | None, input_shape: tuple[int, int, int] | None,
                num_classes: int | None) -> LoadedModel:
    shape = _check_shape(input_shape)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise bad_param("num_classes", "a positive integer", num_classes)
    dev = pick_device(device)
    kind = detect_format(p)
    sha = sha256_file(p)
    converter: str | None = None
    used_arch: str | None = None
    if kind == "torchscript":
        module, fmt = _load_torchscript(p, dev), "torchscript"
    elif kind == "onnx":
        module, converter = _load_onnx(p)
        fmt = "onnx"
    else:
        if kind == "safetensors":
            obj: Any = _read_safetensors(p)
            fmt = "safetensors"
        else:
            obj = _torch_load(p, trust_pickle)
            fmt = "pickle" if isinstance(obj, nn.Module) else "state_dict"
        if isinstance(obj, nn.Module):
            module = obj
        else:
            sd = _as_state_dict(obj, p)
            if arch is None:
                raise ModelError(
                    f"{p} holds only weights ({fmt}); say which network they belong to with "
                    "--arch package.module:factory (a callable returning the nn.Module)"
                    + _builtin_hint())
            module = build_arch(arch, input_shape=shape, num_classes=num_classes,
                                state_dict=sd)
            _load_weights(module, sd, p, arch)
            used_arch = arch
    if arch is not None and used_arch is None:
        warnings.warn(f"--arch {arch} is ignored for {fmt} models (they carry their own "
                      "architecture)", TrojanscanWarning, stacklevel=2)
    try:
        module = module.to(dev)
    except Exception as exc:
        raise ModelError(f"{p}: cannot move the model to {dev} ({_first_line(exc)})") from exc
    module.eval()

    found_shape: Shape | None = shape
    found_k: int | None = num_classes
    if isinstance(module, OnnxModule):
        onnx_shape = module.input_shape
        if shape is not None and onnx_shape is not None and shape != onnx_shape:
            raise IncompatibleError(f"{p}: the ONNX model takes inputs of shape "
                                    f"{_fmt_shape(onnx_shape)}, not {_fmt_shape(shape)}")
        found_shape = shape or onnx_shape
        found_k = found_k or module.num_outputs
    if found_shape is not None:
        k = _logits_dim(module, found_shape, dev, str(p))
        if num_classes is not None and k != num_classes:
            raise IncompatibleError(f"{p}: the model outputs {k} logits, expected "
                                    f"num_classes={num_classes}")
        found_k = k
    else:
        found_shape, probed_k = _probe(module, dev)
        if num_classes is not None and probed_k is not None and probed_k != num_classes:
            raise IncompatibleError(f"{p}: the model outputs {probed_k} logits, expected "
                                    f"num_classes={num_classes}")
        found_k = found_k or probed_k
    return LoadedModel(module=module, format=fmt, path=str(p), sha256=sha,
                       input_shape=found_shape, num_classes=found_k, device=dev,
                       converter=converter, arch=used_arch)


def _builtin_hint() -> str:
    archs = _builtin_archs()
    names = list(getattr(archs, "ARCHS", {})) if archs is not None else []
    return f", or a built-in name ({', '.join(names)})" if names else ""


def check_compatible(loaded: LoadedModel, dataset: ImageDataset, *, samples: int = 4
                     ) -> LoadedModel:
    """Run the model on a few samples of ``dataset``; return it with shapes filled in.

    Raises :class:`IncompatibleError` when the model fails on the data's input shape or
    has fewer logits than the labels' classes, and :class:`NotAClassifierError` (an
    ``IncompatibleError`` too) when it does not output ``N×K`` logits with ``K ≥ 2``
    or outputs NaN/inf (:func:`trojanscan.classifier.check_logits`).
    """
    data_shape = dataset.input_shape
    src = dataset.source
    expects = (f" (the model expects {_fmt_shape(loaded.input_shape)})"
               if loaded.input_shape is not None else "")
    if loaded.input_shape is not None and loaded.input_shape != data_shape:
        raise IncompatibleError(f"the model expects inputs of shape "
                                f"{_fmt_shape(loaded.input_shape)} but {src} has "
                                f"{_fmt_shape(data_shape)}")
    x = dataset.x[:max(1, min(samples, len(dataset)))].to(loaded.device)
    n = int(x.shape[0])
    module = loaded.module
    try:
        with borrow_model(module):
            out = _forward(module, x)
    except Exception as exc:
        channels = _first_conv_channels(module)
        hint = (f" (its first convolution takes {channels} channel(s))"
                if channels is not None and not expects else "")
        raise IncompatibleError(f"the model fails on {src}'s inputs of shape "
                                f"N×{_fmt_shape(data_shape)}{expects}{hint}: "
                                f"{_first_line(exc)}") from exc
    k = check_logits(out, n, what=f"inputs from {src}")
    if dataset.y is not None:
        need = dataset.num_classes
        if k < need:
            raise IncompatibleError(f"the model outputs {k} logits but {src}'s labels span "
                                    f"{need} classes (0..{need - 1})")
    return dataclasses.replace(loaded, input_shape=data_shape, num_classes=k)
