"""``trojanscan guard``: serve predictions over HTTP and flag triggered inputs.

Every option is checked first — detector settings, the bearer token (``--token-file`` or
``--token-env``, else ``TROJANSCAN_GUARD_TOKEN``; never the token itself on the command
line), the TLS files, the host — and the listening socket is bound, all before the model
is loaded: a mistake, a port in use or an unknown host costs one line and exit 2, not a
calibration. Then the runtime detector is calibrated on ``--calibrate`` at ``--frr`` and
the FastAPI app of :mod:`trojanscan.serve` runs with uvicorn on that socket until
interrupted. Beyond loopback a token is required unless ``--insecure-no-auth`` waives it;
exposure is always said on stderr, ``--quiet`` or not. Needs the optional extra ``serve``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..detectors import create
from ..exceptions import ParameterError, bad_param, require
from ..guard import RUNTIME_DETECTORS, Guard
from ..serve_options import (
    DEFAULT_TOKEN_ENV,
    bind_socket,
    check_tls_files,
    format_url,
    resolve_listen_address,
    resolve_token,
)
from ..utils import seed_everything
from ._common import load_inputs, parse_params


def _say(message: str) -> None:
    print(f"guard: {message}", file=sys.stderr, flush=True)


def run(*, model: Path, calibrate: str, frr: float, detector: str, host: str, port: int,
        max_batch: int, seed: int, device: str, arch: str | None, trust_pickle: bool,
        quiet: bool, param: list[str] | None = None, token_file: Path | None = None,
        token_env: str | None = None, insecure_no_auth: bool = False,
        tls_cert: Path | None = None, tls_key: Path | None = None,
        body_timeout: float = 30.0, docs: bool = False) -> int:
    # fail fast, before loading anything, when the extra is missing
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from ..progress import set_quiet
    from ..serve import serve

    if detector not in RUNTIME_DETECTORS:
        raise bad_param("detector", RUNTIME_DETECTORS, detector)
    if not 0 <= port <= 65535:
        raise bad_param("port", "an integer in [0, 65535]", port)
    if max_batch < 1:
        raise bad_param("max_batch", "an integer >= 1", max_batch)
    if not (0 < body_timeout < math.inf):
        raise bad_param("body_timeout", "a number of seconds > 0", body_timeout)
    extra = parse_params(param)
    create(detector, frr=frr, seed=seed, **extra)  # unknown names fail before any loading
    tls = check_tls_files(tls_cert, tls_key)
    token, token_source, token_warnings = resolve_token(
        token_file=token_file, token_env=token_env, no_auth=insecure_no_auth)
    address = resolve_listen_address(host, port)
    if not address.loopback and token is None and not insecure_no_auth:
        raise ParameterError(
            f"--host {host} is reachable from other machines: give a bearer token "
            f"(--token-file PATH, --token-env NAME, or set {DEFAULT_TOKEN_ENV}) or waive "
            "authentication explicitly with --insecure-no-auth")
    for w in token_warnings:
        _say(f"warning: {w}")
    sock = bind_socket(address)  # held from here on: nobody can take the port meanwhile
    try:
        bound = sock.getsockname()
        url = format_url("https" if tls else "http", bound[0], bound[1])
        if not address.loopback:  # said whatever --quiet says
            if token is None:
                _say(f"warning: listening on {url}, reachable from other machines, WITHOUT "
                     "authentication (--insecure-no-auth): anyone who can reach it can "
                     "query the model")
            elif not tls:
                _say(f"warning: listening on {url}, reachable from other machines; a bearer "
                     "token is required, but without --tls-cert/--tls-key the token and the "
                     "inputs cross the network unencrypted (or terminate TLS in a reverse "
                     "proxy and bind 127.0.0.1)")
            else:
                _say(f"warning: listening on {url}, reachable from other machines (bearer "
                     "token required, TLS)")
        elif quiet and port == 0:
            _say(f"listening on {url}")  # the only way to learn the port
        seed_everything(seed)
        loaded, clean = load_inputs(model, calibrate, arch=arch, trust_pickle=trust_pickle,
                                    device=device, need_labels=False)
        assert clean is not None
        guard = Guard.calibrate(loaded.module, clean, detector=detector, frr=frr, seed=seed,
                                device=str(loaded.device), **extra)
        set_quiet(True)  # no progress bar per request
        info = guard.info()
        if info.get("calibration_warning"):
            _say(f"warning: {info['calibration_warning']}")
        if not quiet:
            meas = info.get("frr_measured")
            meas_s = "n/a" if meas is None else f"{meas:.4f}"
            auth = ("bearer token from " + token_source) if token else "no authentication"
            _say(f"{detector} calibrated on {len(clean)} clean inputs (threshold "
                 f"{guard.threshold:.4g}, target FRR {frr:g}, measured FRR {meas_s}); "
                 f"serving {model} on {url} (POST /predict, GET /healthz, GET /metrics; "
                 f"{auth}); Ctrl-C stops")
        serve(guard, sock=sock, max_batch=max_batch, token=token,
              insecure_no_auth=insecure_no_auth, tls_cert=tls_cert, tls_key=tls_key,
              body_timeout=body_timeout, docs=docs)
    finally:
        sock.close()
    return 0
