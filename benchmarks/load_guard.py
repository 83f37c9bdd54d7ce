"""Load test of ``trojanscan guard``: start the service on 127.0.0.1, drive concurrent
clients for a bounded time with a share of malformed requests, report requests/s,
latency percentiles and errors.

The guard runs as a real subprocess (``python -m trojanscan guard MODEL --calibrate
CLEAN --host 127.0.0.1 --port <free port>``). Clients (asyncio + httpx) send, for
``--seconds``: good JSON requests of 1–``--max-inputs`` clean or triggered Fashion-MNIST
images, good ``.npy`` requests, and ``--bad-share`` malformed ones (broken JSON, wrong
shape, NaN, out-of-range values, wrong content type, oversized bodies, forged ``.npy``
headers, object arrays). Good requests must get 200, malformed ones a 4xx; anything else
(5xx, connection errors, timeouts, a 200 for a malformed body) counts as an error. At the
end ``/metrics`` is read back and compared with the clients' own counts.

Usage::

    python benchmarks/load_guard.py [--seconds 30] [--clients 8] [--detector strip]

Needs the ``serve`` extra (fastapi, uvicorn, httpx) and the cached BadNets model of
``bench_strip.py`` (trained on first use).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_strip import CACHE, cached_model, triggered_inputs  # noqa: E402
from trojanscan.io.data import load_dataset  # noqa: E402
from trojanscan.utils import atomic_write_text  # noqa: E402

RESULTS = HERE / "results" / "runtime_load.json"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def malformed(rng: random.Random, good: np.ndarray, max_body: int) -> tuple[str, bytes, str]:
    """(kind, body, content type) of a request that must get a 4xx."""
    one = good[:1]
    kinds = {
        "broken-json": (b'{"inputs": [[[', "application/json"),
        "no-inputs-key": (b'{"images": []}', "application/json"),
        "wrong-shape": (json.dumps({"inputs": np.zeros((2, 1, 5, 5)).tolist()}).encode(),
                        "application/json"),
        "nan": (json.dumps({"inputs": np.where(one > 0.5, np.nan, one).tolist()}).encode()
                .replace(b"NaN", b"NaN"), "application/json"),
        "out-of-range": (json.dumps({"inputs": (one * 5).tolist()}).encode(),
                         "application/json"),
        "ragged": (json.dumps({"inputs": [one[0].tolist(), [[0.1]]]}).encode(),
                   "application/json"),
        "text-plain": (json.dumps({"inputs": one.tolist()}).encode(), "text/plain"),
        "oversized": (b'{"inputs": [' + b" " * (max_body + 10) + b"]}", "application/json"),
        "npy-garbage": (b"\x93NUMPY\x01\x00garbage", "application/x-npy"),
        "npy-object": (_object_npy(), "application/x-npy"),
        "npy-forged": (_forged_npy(one.shape[1:]), "application/x-npy"),
    }
    kind = rng.choice(sorted(kinds))
    body, ctype = kinds[kind]
    return kind, body, ctype


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _forged_npy(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10_000_000, *shape)})
    return buf.getvalue() + np.zeros((1, *shape), dtype="<f4").tobytes()


async def client_loop(cid: int, url: str, deadline: float, pools: dict[str, np.ndarray],
                      args: argparse.Namespace, max_body: int, stats: dict[str, Any]) -> None:
    import httpx

    rng = random.Random(args.seed * 1000 + cid)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as http:
        while time.perf_counter() < deadline:
            r = rng.random()
            if r < args.bad_share:
                kind, body, ctype = malformed(rng, pools["clean"], max_body)
                expect_ok = False
            else:
                which = "triggered" if rng.random() < 0.5 else "clean"
                pool = pools[which]
                n = rng.randint(1, args.max_inputs)
                i = rng.randrange(0, len(pool) - n)
                x = pool[i:i + n]
                if rng.random() < 0.2:
                    kind, body, ctype = f"npy-{which}", npy(x), "application/x-npy"
                else:
                    kind, body = f"json-{which}", json.dumps({"inputs": x.tolist()}).encode()
                    ctype = "application/json"
                expect_ok = True
            t0 = time.perf_counter()
            try:
                resp = await http.post("/predict", content=body,
                                       headers={"content-type": ctype})
                status = resp.status_code
                payload = resp.json()
            except Exception as exc:  # connection errors, timeouts, non-JSON answers
                stats["errors"].append(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            dt = time.perf_counter() - t0
            if expect_ok:
                if status != 200:
                    stats["errors"].append(f"{kind}: HTTP {status} {payload}")
                    continue
                stats["latency_ok"].append(dt)
                stats["ok"] += 1
                stats["inputs"] += len(payload["flagged"])
                key = "flagged_triggered" if "triggered" in kind else "flagged_clean"
                stats[key] += sum(payload["flagged"])
                stats["n_" + key.split("_")[1]] += len(payload["flagged"])
            else:
                if 400 <= status < 500 and isinstance(payload, dict) and payload.get("error"):
                    stats["rejected_4xx"] += 1
                    stats["latency_bad"].append(dt)
                    stats["bad_kinds"][kind] = stats["bad_kinds"].get(kind, 0) + 1
                else:
                    stats["errors"].append(f"{kind}: expected a 4xx, got {status} {payload}")


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"^(\S+?)(\{.*\})? (\S+)$", line)
            if m:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-inputs", type=int, default=4, help="inputs per good request")
    ap.add_argument("--bad-share", type=float, default=0.2)
    ap.add_argument("--detector", default="strip", choices=["strip"])
    ap.add_argument("--calibration-size", type=int, default=1000)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import httpx

    test = load_dataset("fashion-mnist:test")
    model_path = CACHE / "fmnist-badnets-s0.pt"
    if not model_path.exists():
        cached_model("badnets", None, test)
    calib_path = CACHE / f"fmnist-test-first{args.calibration_size}.npz"
    if not calib_path.exists():
        np.savez(calib_path, x=test.x[:args.calibration_size].numpy())
    ev = test.subset(np.arange(4000, len(test)))
    trig, _ = triggered_inputs("badnets", ev, 2000)
    pools = {"clean": ev.x[:2000].numpy(), "triggered": trig.numpy()}

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "trojanscan", "guard", str(model_path), "--calibrate",
           str(calib_path), "--detector", args.detector, "--host", "127.0.0.1", "--port",
           str(port), "--max-batch", str(args.max_batch), "--device", "cpu"]
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, TROJANSCAN_NO_PROGRESS="1")
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    t_start = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the guard exited early:\n{server.stdout.read()}")
            try:
                health = httpx.get(url + "/healthz", timeout=2).json()
                break
            except httpx.HTTPError:
                if time.perf_counter() - t_start > args.startup_timeout:
                    raise SystemExit("the guard did not come up in time") from None
                time.sleep(1)
        startup = time.perf_counter() - t_start
        print(f"guard up after {startup:.0f} s: threshold {health['threshold']:.4g}, "
              f"measured FRR {health.get('frr_measured')}", file=sys.stderr, flush=True)
        stats: dict[str, Any] = {"ok": 0, "rejected_4xx": 0, "errors": [], "latency_ok": [],
                                 "latency_bad": [], "inputs": 0, "flagged_triggered": 0,
                                 "flagged_clean": 0, "n_triggered": 0, "n_clean": 0,
                                 "bad_kinds": {}}

        async def drive() -> float:
            t0 = time.perf_counter()
            deadline = t0 + args.seconds
            await asyncio.gather(*(client_loop(c, url, deadline, pools, args,
                                               health["max_body_bytes"], stats)
                                   for c in range(args.clients)))
            return time.perf_counter() - t0

        elapsed = asyncio.run(drive())
        metrics = parse_metrics(httpx.get(url + "/metrics", timeout=10).text)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    total = stats["ok"] + stats["rejected_4xx"] + len(stats["errors"])
    served_ok = metrics.get('trojanscan_requests_total{endpoint="/predict",code="200"}', 0)
    served_4xx = sum(v for k, v in metrics.items()
                     if k.startswith("trojanscan_requests_total{endpoint=\"/predict\",code=\"4"))
    served_5xx = sum(v for k, v in metrics.items()
                     if k.startswith("trojanscan_requests_total{endpoint=\"/predict\",code=\"5"))
    report = {
        "detector": args.detector, "seconds": round(elapsed, 2), "clients": args.clients,
        "max_inputs_per_request": args.max_inputs, "bad_share": args.bad_share,
        "startup_seconds": round(startup, 1), "threshold": health["threshold"],
        "frr_measured_at_calibration": health.get("frr_measured"),
        "requests": total, "requests_per_s": total / elapsed,
        "good_requests": stats["ok"], "good_requests_per_s": stats["ok"] / elapsed,
        "inputs_per_s": stats["inputs"] / elapsed,
        "malformed_rejected_4xx": stats["rejected_4xx"], "malformed_kinds": stats["bad_kinds"],
        "errors": len(stats["errors"]), "error_samples": stats["errors"][:10],
        "latency_ok_p50_ms": _ms(percentile(stats["latency_ok"], 50)),
        "latency_ok_p99_ms": _ms(percentile(stats["latency_ok"], 99)),
        "latency_4xx_p50_ms": _ms(percentile(stats["latency_bad"], 50)),
        "latency_4xx_p99_ms": _ms(percentile(stats["latency_bad"], 99)),
        "flagged_share_triggered": stats["flagged_triggered"] / max(1, stats["n_triggered"]),
        "flagged_share_clean": stats["flagged_clean"] / max(1, stats["n_clean"]),
        "server_metrics": {"predict_200": served_ok, "predict_4xx": served_4xx,
                           "predict_5xx": served_5xx,
                           "batches": metrics.get("trojanscan_batches_total"),
                           "inputs": metrics.get("trojanscan_inputs_total"),
                           "flagged": metrics.get("trojanscan_flagged_total")},
        "host": "127.0.0.1", "cpu_count": os.cpu_count(),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "error_samples"}, indent=2))
    if stats["errors"]:
        print("errors:", *stats["errors"][:10], sep="\n  ", file=sys.stderr)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    raise SystemExit(1 if stats["errors"] or served_5xx else 0)


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


if __name__ == "__main__":
    main()
