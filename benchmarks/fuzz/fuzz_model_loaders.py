"""Coverage-guided fuzzing of trojanscan's model loaders with atheris (libFuzzer).

Prerequisite (not a dependency of trojanscan): ``pip install atheris coverage``.

Each input's first byte picks a target, the rest is the model file's content:

0 TorchScript (``.pt``) · 1 a ``torch.save`` state_dict ZIP with ``--arch`` · 2 safetensors
with ``--arch`` · 3 ONNX (``.onnx``) · 4 a file without extension (format from content
only, ``--arch`` given). ``(byte // 5) % 2`` says whether the input shape is passed to
the loader (checked against the model at once) or probed. A loaded model is then run by
:func:`~trojanscan.io.models.check_compatible` on four random 1×4×4 images.

Seeds: the same tiny network (flatten → linear 16 → 3) in every format. Besides
libFuzzer's byte mutations, a structure-aware mutator mutates one member of a ZIP and
re-packs it with correct CRCs, so that inputs get past the integrity check into
TorchScript's and ``torch.load``'s own parsers.

The only acceptable outcomes are a loaded model that passes or fails
``check_compatible`` with a :class:`~trojanscan.exceptions.TrojanscanError`, or such an
error from the loader, with a one-line message. Anything else is a *finding*: it is
recorded (type, place, message, the input) in ``FINDINGS/`` and the run goes on. A hard
crash or a hang of the process (libFuzzer's own reports) is recorded too, and fuzzing
restarts until the time is spent.

Run for a bounded time (one core)::

    python benchmarks/fuzz/fuzz_model_loaders.py --seconds 480 --out benchmarks/results/fuzz-models

then ``--replay`` measures line and branch coverage of ``trojanscan/io/models.py``,
``trojanscan/io/onnx_torch.py`` and ``trojanscan/classifier.py`` reached by the corpus
(coverage.py) and writes ``summary.json`` beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import _harness

TARGETS = ((".pt", "torchscript"), (".pt", "state_dict"), (".safetensors", "safetensors"),
           (".onnx", "onnx"), ("", "any"))
SHAPE = (1, 4, 4)
WORK = Path(tempfile.mkdtemp(prefix="ts-fuzz-models-"))
ARCH_FILE = WORK / "tiny_arch.py"
ARCH = f"{ARCH_FILE}:tiny"
FINDINGS = _harness.Findings()

ARCH_SOURCE = '''
from torch import nn


def tiny() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
'''


# --------------------------------------------------------------------------- harness


def test_one_input(data: bytes) -> None:
    import torch

    from trojanscan.dataset import ImageDataset
    from trojanscan.io.models import LoadedModel, check_compatible, load_model

    if not data:
        return
    suffix, _ = TARGETS[data[0] % len(TARGETS)]
    give_shape = (data[0] // len(TARGETS)) % 2 == 1
    path = WORK / f"model{suffix}"
    path.write_bytes(data[1:])

    def load_and_check() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_model(path, arch=ARCH, device="cpu",
                                input_shape=SHAPE if give_shape else None)
            assert isinstance(loaded, LoadedModel)
            ds = ImageDataset(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0)),
                              None, source="fuzz")
            check_compatible(loaded, ds)

    _harness.guarded(FINDINGS, data, load_and_check)


# --------------------------------------------------------------------------- mutator


def _repack(blob: bytes, rng: random.Random, mutate: Any) -> bytes:
    """``blob`` (a ZIP) with one member's content mutated, CRCs recomputed."""
    with zipfile.ZipFile(io.BytesIO(blob)) as src:
        infos = src.infolist()
        victim = rng.randrange(len(infos))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for i, info in enumerate(infos):
                content = src.read(info)
                if i == victim:
                    content = mutate(content, len(content) + 64)
                dst.writestr(info, content)
    return out.getvalue()


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    if len(data) > 3 and data[1:3] == b"PK" and rng.random() < 0.5:
        try:
            packed = data[:1] + _repack(data[1:], rng, atheris.Mutate)
            if len(packed) <= max_size:
                return packed
        except Exception:
            pass
    return atheris.Mutate(data, max_size)


# --------------------------------------------------------------------------- seeds


def write_arch() -> None:
    ARCH_FILE.write_text(ARCH_SOURCE)


def seed_corpus(folder: Path) -> None:
    """The tiny network in every format, for every target."""
    import torch
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    blobs: dict[str, bytes] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buf)
        blobs["torchscript"] = buf.getvalue()
        buf = io.BytesIO()
        torch.jit.save(torch.jit.trace(net, torch.rand(2, *SHAPE)), buf)
        blobs["traced"] = buf.getvalue()
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        blobs["state_dict"] = buf.getvalue()
        blobs["safetensors"] = save(net.state_dict())
        onnx_path = WORK / "seed.onnx"
        torch.onnx.export(net, (torch.rand(2, *SHAPE),), str(onnx_path), dynamo=False,
                          input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
        blobs["onnx"] = onnx_path.read_bytes()
    plan = [(0, "torchscript"), (0, "traced"), (1, "state_dict"), (2, "safetensors"),
            (3, "onnx"), (4, "torchscript"), (4, "state_dict"), (4, "safetensors"),
            (4, "onnx")]
    for target, name in plan:
        for shape_bit in (0, 1):
            s = bytes([target + len(TARGETS) * shape_bit]) + blobs[name]
            (folder / hashlib.sha1(s).hexdigest()).write_bytes(s)


# --------------------------------------------------------------------------- driver


def _instrumented_imports() -> None:
    import atheris
    import onnx  # noqa: F401 - heavy dependencies are not instrumented
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["trojanscan"]):
        import trojanscan.classifier
        import trojanscan.dataset
        import trojanscan.io.models
        import trojanscan.io.onnx_torch  # noqa: F401


def fuzz(out: Path, seconds: int) -> None:
    import atheris

    FINDINGS.folder = out / "findings"
    corpus = out / "corpus"
    _instrumented_imports()
    write_arch()
    if not corpus.is_dir() or not any(corpus.iterdir()):
        seed_corpus(corpus)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=20",
            "-rss_limit_mb=4096", "-max_len=16384", "-print_final_stats=1", "-seed=1",
            f"-artifact_prefix={out}/crash-"]
    atheris.Setup(args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def replay(out: Path) -> dict[str, Any]:
    """Run the corpus once under coverage.py; line/branch coverage of the model loaders."""
    import trojanscan

    FINDINGS.folder = out / "findings-replay"
    write_arch()
    src = Path(trojanscan.__file__).parent
    return _harness.replay(out / "corpus", test_one_input,
                           include=[src / "io" / "models.py", src / "io" / "onnx_torch.py",
                                    src / "classifier.py"])


def main() -> None:
    args = _harness.parse_args(__doc__ or "", 480, "benchmarks/results/fuzz-models")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        import torch

        torch.set_num_threads(1)
        sys.argv = sys.argv[:1]
        fuzz(args.out, args.seconds)
        return
    if not args.replay:
        t0 = time.time()
        log = args.out / "fuzz.log"
        log.write_text("")
        restarts, text = 0, ""
        while (left := args.seconds - (time.time() - t0)) > 30:
            text = _harness.run_child(__file__, args.out, int(left), log)
            if "Done " in text.rsplit("INFO: Running with", 1)[-1]:
                break
            restarts += 1  # a crash, hang or out-of-memory: libFuzzer stopped; go on
        text = log.read_text(errors="replace")
        stats = [dict(re.findall(r"stat::(\w+):\s+(\d+)", part))
                 for part in text.split("INFO: Running with")[1:]]
        crashes = re.findall(r"(==\d+== ERROR: libFuzzer: [^\n]+|Test unit written to [^\n]+)",
                             text)
        run = {"engine": "atheris (libFuzzer), structure-aware ZIP mutator",
               "seconds": round(time.time() - t0, 1),
               "executions": sum(int(s.get("number_of_executed_units", 0)) for s in stats),
               "execs_per_sec": [int(s.get("average_exec_per_sec", 0)) for s in stats],
               "peak_rss_mb": max((int(s.get("peak_rss_mb", 0)) for s in stats), default=None),
               **_harness.libfuzzer_progress(text),
               "restarts": restarts, "libfuzzer_reports": crashes}
        (args.out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        print(json.dumps(run, indent=2))
    _harness.write_summary(args.out, replay(args.out), "the model loaders")


if __name__ == "__main__":
    main()
