"""The ``trojanscan`` command line: a thin Typer layer over ``trojanscan.commands``.

Each command maps its options onto one ``commands.<name>.run(...)`` call. Domain
errors (``TrojanscanError``) become one line on stderr and exit code 2; ``--debug``
shows the traceback instead. Exit codes: 0 nothing found, 1 found, 2 error.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from ._version import __version__
from .exceptions import TrojanscanError

app = typer.Typer(
    name="trojanscan",
    help="Find backdoors in deep-learning models and poisoned samples in their data.\n\n"
         "Exit codes: 0 nothing found, 1 backdoor / poison / triggered inputs found, 2 error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_STATE: dict[str, Any] = {"debug": False}

Out = Annotated[Path, typer.Option("--out", "-o", help="Report folder.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed, 0 to 4294967295 (2**32 - 1); "
                                              "same seed, same verdict.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N (N below the "
                                                      "number of GPUs; cuda only where CUDA "
                                                      "is available), mps where available.")]
Arch = Annotated[
    str | None,
    typer.Option("--arch", help="package.module:factory building the nn.Module (for "
                                "safetensors / state_dict files), or a built-in name "
                                "(small_cnn, bn_cnn, lenet, mlp, cifar_cnn, "
                                "preact_resnet18, preact_resnet18_narrow, vgg_small)."),
]
TrustPickle = Annotated[
    bool,
    typer.Option("--trust-pickle", help="Allow loading a whole pickled module. Unpickling runs "
                                        "arbitrary code: only for files you trust."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the report JSON to stdout.")]
DEFAULT_OUT = Path("trojanscan-report")


def _run(command: str, **options: Any) -> None:
    """Import ``commands.<command>`` lazily and exit with what its ``run`` returns."""
    module_name = f"{__package__}.commands.{command}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise TrojanscanError(f"'{command.replace('_', '-')}' is not available yet") from exc
        raise
    from .commands._options import check_options

    options = check_options(options)  # seeds, devices, numbers: before any work starts
    if options.get("quiet"):
        from .progress import set_quiet

        set_quiet(True)
    code = module.run(**options)
    raise typer.Exit(int(code))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"trojanscan {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _STATE["debug"] = debug


@app.command()
def demo(
    out: Out = DEFAULT_OUT,
    quick: Annotated[bool, typer.Option("--quick", help="Smaller models, about a minute.")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    cache: Annotated[Path | None, typer.Option("--cache", help="Where trained demo models "
                                               "are cached (default: OUT/models).")] = None,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", help="Worker processes for the demo's independent steps (default: 2 "
                       "where there are 2 CPUs or more; 1 runs everything in order "
                       "in this process).")] = None,
    quiet: Quiet = False,
) -> None:
    """Build a backdoored and a clean model on offline data, scan both, write reports."""
    _run("demo", out=out, quick=quick, seed=seed, device=device, cache=cache, jobs=jobs,
         quiet=quiet)


@app.command()
def scan(
    model: Annotated[Path, typer.Argument(help="Model file (TorchScript, ONNX, safetensors, "
                                          "state_dict).")],
    data: Annotated[str | None, typer.Option("--data", help="Clean data: .npz, image folder, "
                                             "IDX folder or a built-in (fashion-mnist:test, "
                                             "digits, synthetic-rgb:test). Without it only "
                                             "the data-free detectors run (mmbd, mntd).")
    ] = None,
    detectors: Annotated[str | None, typer.Option("--detectors", help="Comma-separated "
                                                   "subset, e.g. neural_cleanse,mntd.")] = None,
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", help="C,H,W of the model's input, for a scan without --data "
                              "(read from the graph for ONNX models with fixed dims).")
    ] = None,
    out: Out = DEFAULT_OUT,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Use at most this "
                                                   "many clean samples.")] = None,
    nc_reference: Annotated[list[Path] | None, typer.Option(
        "--nc-reference", help="Neural Cleanse references: report.json files of scans of "
                               "clean models of the same task (or folders of them; >= 2 "
                               "models). Switches Neural Cleanse to the reference-calibrated "
                               "decision. Repeatable.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A detector setting, DETECTOR.KEY=VALUE (JSON values), e.g. "
                        "neural_cleanse.mode=faithful; `trojanscan detectors --params` lists "
                        "them. Repeatable.")] = None,
    references: Annotated[str, typer.Option(
        "--references", help="none (default) or auto: train self-references (the model's "
                             "own architecture, re-initialised, trained briefly on half the "
                             "labelled --data) as Neural Cleanse's clean references; cached."
    )] = "none",
    references_count: Annotated[int | None, typer.Option(
        "--references-count", help="How many self-references (2-16, default 3).")] = None,
    references_cache: Annotated[Path | None, typer.Option(
        "--references-cache", help="Self-reference cache folder (default "
                                   "$TROJANSCAN_SELF_REFERENCE_CACHE, else "
                                   "~/.cache/trojanscan/self-references).")] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Is this model backdoored? Runs model-level detectors and fuses their verdicts."""
    _run("scan", model=model, data=data, detectors=detectors, out=out, seed=seed,
         device=device, arch=arch, trust_pickle=trust_pickle, max_samples=max_samples,
         nc_reference=nc_reference, param=param, quiet=quiet, json_out=json_out,
         input_shape=input_shape, references=references, references_count=references_count,
         references_cache=references_cache)


@app.command("scan-data")
def scan_data(
    train: Annotated[str, typer.Argument(help="Training data (with labels).")],
    model: Annotated[Path, typer.Option("--model", help="A model trained on TRAIN.")],
    detectors: Annotated[str | None, typer.Option("--detectors")] = None,
    poison_rate_bound: Annotated[float | None, typer.Option(
        "--poison-rate-bound", help="Upper bound ε on the poison rate.")] = None,
    out: Out = DEFAULT_OUT,
    export_clean: Annotated[Path | None, typer.Option(
        "--export-clean", help="Write TRAIN without the flagged samples (.npz).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Retrain on the cleaned data and "
                                         "compare.")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Which training samples are poisoned?"""
    _run("scan_data", train=train, model=model, detectors=detectors,
         poison_rate_bound=poison_rate_bound, out=out, export_clean=export_clean,
         verify=verify, seed=seed, device=device, arch=arch, trust_pickle=trust_pickle,
         quiet=quiet, json_out=json_out)


@app.command("scan-zoo")
def scan_zoo(
    source: Annotated[Path, typer.Argument(help="A folder of model files (searched "
                                           "recursively) or a manifest (.csv with a path "
                                           "column, optional arch and label; or .jsonl).")],
    data: Annotated[str, typer.Option("--data", help="Clean data, as for scan.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Zoo folder: zoo.json, zoo.csv, "
                                      "zoo.html and models/<name>/ reports.")],
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Local Ray workers (default: the number of cores); 0 scans in "
                          "this process without Ray.")] = None,
    address: Annotated[str | None, typer.Option(
        "--address", help="Join a running Ray cluster (e.g. auto, ray://head:10001).")
    ] = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="Ground truth: CSV with header path,label (path relative to "
                         "SOURCE; label 1/0 or backdoored/clean).")] = None,
    detectors: Annotated[str | None, typer.Option("--detectors", help="As for scan.")] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="DETECTOR.KEY=VALUE, as for scan. Repeatable.")] = None,
    nc_reference: Annotated[list[Path] | None, typer.Option(
        "--nc-reference", help="Neural Cleanse references, as for scan. Repeatable.")
    ] = None,
    model_timeout: Annotated[float | None, typer.Option(
        "--model-timeout", help="Seconds one model may take; past it the model is "
                                "recorded as failed.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="Keep reports of unchanged models from an earlier "
                                     "run into OUT (default) or scan everything again.")
    ] = True,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    max_samples: Annotated[int | None, typer.Option("--max-samples", help="Use at most this "
                                                   "many clean samples.")] = None,
    quiet: Quiet = False,
) -> None:
    """Scan every model of a folder or manifest on Ray (local or cluster), resumably."""
    _run("scan_zoo", source=source, data=data, out=out, ray_workers=workers,
         address=address, labels=labels, detectors=detectors, param=param,
         nc_reference=nc_reference, model_timeout=model_timeout, resume=resume, seed=seed,
         device=device, arch=arch, trust_pickle=trust_pickle, max_samples=max_samples,
         quiet=quiet)


@app.command("filter")
def filter_(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    inputs: Annotated[str, typer.Argument(help="Inputs to check (labels not needed).")],
    calibrate: Annotated[str, typer.Option("--calibrate", help="Clean data for the "
                                           "threshold.")],
    frr: Annotated[float, typer.Option("--frr", help="Target false-rejection rate.")] = 0.01,
    detector: Annotated[str, typer.Option("--detector", help="Detector: strip (default) or "
                                          "teco.")] = "strip",
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Detector parameter KEY=VALUE, repeatable (e.g. blend=max, "
                        "threshold_method=empirical, n_overlays=50).")] = None,
    out: Out = DEFAULT_OUT,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Which of these inputs carry a trigger?"""
    _run("filter", model=model, inputs=inputs, calibrate=calibrate, frr=frr,
         detector=detector, out=out, seed=seed, device=device, arch=arch,
         trust_pickle=trust_pickle, quiet=quiet, json_out=json_out, param=param)


@app.command()
def guard(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    calibrate: Annotated[str, typer.Option("--calibrate", help="Clean data for the "
                                           "threshold.")],
    frr: Annotated[float, typer.Option("--frr", help="Target false-rejection rate.")] = 0.01,
    detector: Annotated[str, typer.Option("--detector", help="Detector: strip (default) or "
                                          "teco.")] = "strip",
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="Detector parameter KEY=VALUE, repeatable (e.g. blend=max, "
                        "threshold_method=empirical, n_overlays=50).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but "
                                      "loopback needs a token (or --insecure-no-auth).")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port; 0 takes a free one (printed "
                                      "on stderr).")] = 8080,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch per "
                                           "request.")] = 256,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="File holding the bearer token clients must send "
                             "(Authorization: Bearer <token>; at least 16 characters, "
                             "trailing newline ignored; keep it chmod 600).")] = None,
    token_env: Annotated[str | None, typer.Option(
        "--token-env", help="NAME of an environment variable holding the token (default: "
                            "TROJANSCAN_GUARD_TOKEN when set). The token itself is never "
                            "taken on the command line.")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="Serve a non-loopback --host without any token (anyone "
                                   "who reaches the port can use the model; warned on "
                                   "stderr even with --quiet).")] = False,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", help="PEM certificate: serve HTTPS (with --tls-key).")] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="PEM private key of --tls-cert (unencrypted).")] = None,
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", help="Seconds a request body may take to arrive (slower: "
                               "408).")] = 30.0,
    docs: Annotated[bool, typer.Option("--docs", help="Serve /docs, /redoc and "
                                       "/openapi.json (off by default).")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary "
                                        "(warnings about exposure still print).")] = False,
) -> None:
    """Serve predictions over HTTP and reject triggered inputs.

    Binds 127.0.0.1 by default. Options are checked and the port is bound before the
    model is loaded (errors: one line, exit 2). With a token, POST /predict and GET
    /metrics need 'Authorization: Bearer <token>'; GET /healthz answers liveness to
    anyone and details to token holders.
    """
    _run("guard", model=model, calibrate=calibrate, frr=frr, detector=detector, host=host,
         port=port, max_batch=max_batch, seed=seed, device=device, arch=arch,
         trust_pickle=trust_pickle, quiet=quiet, param=param, token_file=token_file,
         token_env=token_env, insecure_no_auth=insecure_no_auth, tls_cert=tls_cert,
         tls_key=tls_key, body_timeout=body_timeout, docs=docs)


@app.command(context_settings={"allow_extra_args": False})
def train(
    dataset: Annotated[str, typer.Option("--dataset", help="Training data (fashion-mnist:train, "
                                         "digits, synthetic-rgb:train, .npz, folder, "
                                         "CIFAR batches).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model file (TorchScript); "
                                      "writes OUT.safetensors and OUT.json beside it.")],
    attack: Annotated[str, typer.Option("--attack", help="Attack spec, e.g. "
                                        "badnets:size=4,target=0 (or none).")] = "none",
    poison_rate: Annotated[float, typer.Option("--poison-rate")] = 0.1,
    arch: Annotated[str, typer.Option("--arch", help="small_cnn, bn_cnn, lenet, mlp, "
                                      "cifar_cnn, preact_resnet18, preact_resnet18_narrow, "
                                      "vgg_small.")] = "small_cnn",
    test_data: Annotated[str | None, typer.Option("--test-data", help="Held-out data for "
                                                  "accuracy/ASR (default: the dataset's "
                                                  "test split).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    save_data: Annotated[Path | None, typer.Option("--save-data", help="Also write the "
                                                   "poisoned training set (.npz with x, y, "
                                                   "poison_mask).")] = None,
    seed: Seed = 0,
    device: Device = "auto",
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Train a clean or backdoored model (attack library) for red-teaming and benchmarks."""
    _run("train", dataset=dataset, out=out, attack=attack, poison_rate=poison_rate, arch=arch,
         test_data=test_data, epochs=epochs, batch_size=batch_size, lr=lr, save_data=save_data,
         seed=seed, device=device, quiet=quiet, json_out=json_out)


@app.command()
def mitigate(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    data: Annotated[str, typer.Option("--data", help="Clean data (with labels).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the repaired model "
                                      "(TorchScript); never the input file.")],
    report: Annotated[Path, typer.Option("--report", help="Report folder.")] = DEFAULT_OUT,
    nc_reference: Annotated[list[Path] | None, typer.Option(
        "--nc-reference", help="Clean models' scan reports for Neural Cleanse's decision "
                               "(as for scan; repeatable).")] = None,
    stamp_fraction: Annotated[float, typer.Option(
        "--stamp-fraction", help="Share of fine-tuning samples stamped with a reversed "
                                 "trigger (the paper: 0.2).")] = 0.2,
    dilate: Annotated[float, typer.Option(
        "--dilate", help="Probability that a stamped sample's mask is grown by one pixel "
                         "(0 = the paper).")] = 0.0,
    distill: Annotated[float, typer.Option(
        "--distill", help="Weight in [0, 1] of self-distillation from the original model "
                          "(keeps clean behaviour; 0 = the paper).")] = 0.0,
    refresh: Annotated[int, typer.Option(
        "--refresh", help="Times each reversed trigger is re-optimised against the model "
                          "during fine-tuning, within its mask's L1 budget (0 = the "
                          "paper).")] = 0,
    unlearn_epochs: Annotated[int, typer.Option(
        "--unlearn-epochs", help="Fine-tuning epochs over the fine-tuning part.")] = 2,
    seed: Seed = 0,
    device: Device = "auto",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Remove a detected backdoor (Neural Cleanse unlearning)."""
    _run("mitigate", model=model, data=data, out=out, report=report, seed=seed, device=device,
         arch=arch, trust_pickle=trust_pickle, quiet=quiet, json_out=json_out,
         nc_reference=nc_reference, stamp_fraction=stamp_fraction, dilate=dilate,
         distill=distill, refresh=refresh, unlearn_epochs=unlearn_epochs)


@app.command("detectors")
def list_detectors(
    verbose: Annotated[bool, typer.Option("--params", "-p", help="Also list each detector's "
                                          "parameters and defaults.")] = False,
) -> None:
    """List the detectors available in this installation (and their parameters)."""
    from .detectors import available, parameters

    for name, level in available().items():
        typer.echo(f"{name}\t{level}")
        if verbose:
            for pname, default in parameters(name).items():
                typer.echo(f"    {pname}={default!r}")


def _add_subapps() -> None:
    """Sub-command groups that live in their own modules (kept import-light)."""
    try:
        from .commands.mntd_cli import app as mntd_app
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.commands.mntd_cli":
            raise
        return
    app.add_typer(mntd_app, name="mntd", help="Meta Neural Trojan Detection: train "
                                               "meta-classifiers for your model shapes.")


_add_subapps()


def _is_usage_error(exc: BaseException) -> bool:
    """Click (or Typer's vendored click) usage errors and aborts."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ClickException", "Abort", "TyperException"})


def _one_line(text: str) -> str:
    """A message on one line (the contract's one line on stderr, whatever a file held)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or text


def _usage_line(exc: BaseException) -> str:
    """A usage error as one line: ``trojanscan scan: error: Missing option '--data'.
    (see trojanscan scan --help)`` (Click prints three)."""
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "trojanscan"
    fmt = getattr(exc, "format_message", None)
    text = fmt() if callable(fmt) else (str(exc) or type(exc).__name__)
    message = " ".join(str(text).split()) or type(exc).__name__
    if type(exc).__name__ == "Abort":
        return f"{path}: aborted"
    return f"{path}: error: {message} (see {path} --help)"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """Our warnings as one line on stderr (``warning: ...``); others as usual."""
    from .exceptions import TrojanscanWarning

    if issubclass(category, TrojanscanWarning):
        typer.echo(f"warning: {message}", err=True)
    else:
        _ORIGINAL_SHOWWARNING(message, category, filename, lineno, file, line)


_ORIGINAL_SHOWWARNING = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning domain errors into exit 2."""
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated",
                            category=DeprecationWarning)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="trojanscan")
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except TrojanscanError as exc:
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(2)
    except Exception as exc:  # click/typer usage errors and anything unexpected
        if _is_usage_error(exc):
            show = getattr(exc, "show", None)
            if type(exc).__name__ == "NoArgsIsHelpError" and callable(show):
                show()  # a bare group or command: its help, as before
            else:
                typer.echo(_usage_line(exc), err=True)
            sys.exit(2)
        if _STATE["debug"]:
            raise
        typer.echo(f"error: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
                   "(run with --debug for the traceback)", err=True)
        sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)
