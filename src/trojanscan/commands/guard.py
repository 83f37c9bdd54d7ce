"""``trojanscan guard``: serve predictions over HTTP and flag triggered inputs.

Calibrates the runtime detector on ``--calibrate`` at ``--frr``, then runs the FastAPI
app of :mod:`trojanscan.serve` with uvicorn on ``--host``/``--port`` (loopback by
default) until interrupted. Needs the optional extra ``serve``.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from ..detectors import create
from ..exceptions import bad_param, require
from ..guard import RUNTIME_DETECTORS, Guard
from ..utils import seed_everything
from ._common import load_inputs, parse_params


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(*, model: Path, calibrate: str, frr: float, detector: str, host: str, port: int,
        max_batch: int, seed: int, device: str, arch: str | None, trust_pickle: bool,
        quiet: bool, param: list[str] | None = None) -> int:
    # fail fast, before loading anything, when the extra is missing
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from ..progress import set_quiet
    from ..serve import create_app

    if detector not in RUNTIME_DETECTORS:
        raise bad_param("detector", RUNTIME_DETECTORS, detector)
    if not 0 <= port <= 65535:
        raise bad_param("port", "an integer in [0, 65535]", port)
    if max_batch < 1:
        raise bad_param("max_batch", "an integer >= 1", max_batch)
    extra = parse_params(param)
    create(detector, frr=frr, seed=seed, **extra)  # unknown names fail before any loading
    seed_everything(seed)
    loaded, clean = load_inputs(model, calibrate, arch=arch, trust_pickle=trust_pickle,
                                device=device, need_labels=False)
    assert clean is not None
    guard = Guard.calibrate(loaded.module, clean, detector=detector, frr=frr, seed=seed,
                            device=str(loaded.device), **extra)
    set_quiet(True)  # no progress bar per request
    app = create_app(guard, max_batch=max_batch)
    info = guard.info()
    if info.get("calibration_warning"):
        print(f"guard: warning: {info['calibration_warning']}", file=sys.stderr, flush=True)
    if not quiet:
        meas = info.get("frr_measured")
        meas_s = "n/a" if meas is None else f"{meas:.4f}"
        print(f"guard: {detector} calibrated on {len(clean)} clean inputs (threshold "
              f"{guard.threshold:.4g}, target FRR {frr:g}, measured FRR {meas_s}); "
              f"serving {model} on http://{host}:{port} (POST /predict, GET /healthz, "
              "GET /metrics); Ctrl-C stops", file=sys.stderr, flush=True)
        if not _is_loopback(host):
            print(f"guard: warning: listening on {host}, reachable from other machines; "
                  "the service has no authentication", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info",
                access_log=False)
    return 0
