"""Soak test of ``trojanscan guard``: a bounded run of hostile and honest clients on
127.0.0.1, checking that the service stays up, its memory stays bounded, every request
gets the answer it should, and ``/metrics`` counts exactly what the clients sent.

The guard runs as a real subprocess with a bearer token (``--token-file``), a short
``--body-timeout`` and ``--port 0`` (the port is read from its stderr). The model is a
seeded, untrained 8×8 CNN calibrated on scikit-learn's digits: what is measured is the
service, not the detector. For ``--seconds``, ``--clients`` concurrent clients each pick
a request class at random (fixed weights, seeded) and check the status code:

==================  =================================================  ========
class               what is sent                                       expected
==================  =================================================  ========
valid-json          1–4 inputs as JSON, right token                    200
valid-npy           1–4 inputs as ``.npy``, right token                200
malformed           broken JSON/.npy, wrong shape, NaN, bad type, ...  400/413/415/422
oversized           Content-Length over the limit                      413
oversized-chunked   a chunked body that grows past the limit           413
no-token            any body, no Authorization header                  401
wrong-token         any body, a wrong bearer token                     401
slow-ok             a valid body trickled in pieces within the timeout 200
slowloris           a body trickled one byte at a time, forever        408
disconnect          headers and half a body, then the client leaves    (499)
healthz             GET /healthz with or without the token             200
metrics-no-token    GET /metrics without the token                     401
==================  =================================================  ========

A disconnecting client receives nothing; the server must count it as 499, never 5xx.
Every loop is bounded in time (``--seconds``, per-request timeouts) and in count
(``--max-requests``). The server's RSS (``VmRSS``, peak ``VmHWM``), threads and open file
descriptors are sampled from ``/proc/PID/status`` every ``--sample-every`` seconds.

Usage::

    python benchmarks/soak_guard.py [--seconds 180] [--clients 8] [--body-timeout 3]

Prints a table and writes ``benchmarks/results/guard_soak.json``; exits 1 when any check
fails (a 5xx, an unexpected status, a client error, a metrics mismatch, the server dying,
memory growing past ``--max-rss-growth-mb`` after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from load_guard import _forged_npy, _object_npy, npy, parse_metrics  # noqa: E402
from trojanscan.utils import atomic_write_text  # noqa: E402

RESULTS = HERE / "results" / "guard_soak.json"
MAX_BATCH = 32
SHAPE = (1, 8, 8)
WEIGHTS = {"valid-json": 26, "valid-npy": 10, "malformed": 14, "oversized": 4,
           "oversized-chunked": 3, "no-token": 7, "wrong-token": 7, "slow-ok": 6,
           "slowloris": 4, "disconnect": 8, "healthz": 6, "metrics-no-token": 5}
JSON = "application/json"
NPY = "application/x-npy"


# ---------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------


def build_files(d: Path, token: str) -> tuple[Path, Path, Path, np.ndarray]:
    """Model, calibration data, token file, and a pool of inputs for the clients."""
    import torch
    from sklearn.datasets import load_digits

    from trojanscan.archs import small_cnn

    torch.manual_seed(0)
    model = small_cnn(SHAPE, 10).eval()
    torch.jit.save(torch.jit.script(model), str(d / "model.pt"))
    x = (load_digits().images / 16.0).astype(np.float32)[:, None]
    np.savez(d / "clean.npz", x=x[:300])
    tok = d / "token"
    tok.write_text(token + "\n")
    tok.chmod(0o600)
    return d / "model.pt", d / "clean.npz", tok, x[300:800]


def start_server(model: Path, clean: Path, tok: Path, args: argparse.Namespace
                 ) -> tuple[subprocess.Popen[str], int, list[str]]:
    cmd = [sys.executable, "-m", "trojanscan", "guard", str(model), "--calibrate", str(clean),
           "--host", "127.0.0.1", "--port", "0", "--token-file", str(tok), "--body-timeout",
           str(args.body_timeout), "--max-batch", str(MAX_BATCH), "--device", "cpu", "--frr",
           "0.05", "--param", "n_overlays=8", "--quiet"]
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, TROJANSCAN_NO_PROGRESS="1")
    env.pop("TROJANSCAN_GUARD_TOKEN", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + args.startup_timeout
    port = None
    while port is None and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 0.5)[0]:
            line = proc.stderr.readline()
            lines.append(line.rstrip("\n"))
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
    if port is None:
        stop_server(proc)
        raise SystemExit("the guard did not report its port:\n" + "\n".join(lines))

    def drain() -> None:  # keep the pipe from filling; keep what it said
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    return proc, port, lines


def stop_server(proc: subprocess.Popen[str]) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def proc_sample(pid: int) -> dict[str, float] | None:
    """VmRSS and VmHWM (MiB), threads and open file descriptors of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    out: dict[str, float] = {"fds": fds}
    for key in ("VmRSS", "VmHWM", "Threads"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        if m:
            out[key] = int(m.group(1)) / (1024 if key.startswith("Vm") else 1)
    return out


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


def malformed(rng: random.Random, one: np.ndarray) -> tuple[str, bytes, str, int]:
    """(kind, body, content type, expected status) of a malformed /predict body."""
    good = one.tolist()
    kinds: dict[str, tuple[bytes, str, int]] = {
        "broken-json": (b'{"inputs": [[[', JSON, 400),
        "not-utf8": (b"\xff\xfe\x00", JSON, 400),
        "deep-nesting": (b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON, 400),
        "no-inputs-key": (b'{"images": []}', JSON, 422),
        "wrong-shape": (json.dumps({"inputs": np.zeros((2, 1, 5, 5)).tolist()}).encode(),
                        JSON, 422),
        "nan": (json.dumps({"inputs": np.full_like(one, np.nan).tolist()}).encode(), JSON,
                422),
        "out-of-range": (json.dumps({"inputs": (one * 0 + 5).tolist()}).encode(), JSON, 422),
        "ragged": (json.dumps({"inputs": [good[0], [[0.1]]]}).encode(), JSON, 422),
        "strings": (json.dumps({"inputs": [[[["a"] * 8] * 8]]}).encode(), JSON, 422),
        "too-many-inputs": (json.dumps({"inputs": good * (MAX_BATCH + 1)}).encode(), JSON,
                            413),
        "text-plain": (json.dumps({"inputs": good}).encode(), "text/plain", 415),
        "no-content-type": (json.dumps({"inputs": good}).encode(), "", 415),
        "npy-garbage": (b"\x93NUMPY\x01\x00garbage", NPY, 400),
        "npy-object": (_object_npy(), NPY, 422),
        "npy-forged": (_forged_npy(SHAPE), NPY, 400),
    }
    kind = rng.choice(sorted(kinds))
    body, ctype, status = kinds[kind]
    return kind, body, ctype, status


class Tally:
    """What the clients sent and saw, and what the server should have counted."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.as_expected: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = {}
        self.expected_metrics: Counter[tuple[str, int]] = Counter()
        self.errors: list[str] = []
        self.latency_ok: list[float] = []
        self.malformed_kinds: Counter[str] = Counter()

    def record(self, cls: str, endpoint: str, expected: int, got: int | None,
               detail: str = "") -> None:
        self.sent[cls] += 1
        self.expected_metrics[(endpoint, expected)] += 1
        if got is not None:
            self.statuses.setdefault(cls, Counter())[got] += 1
        if got == expected or (got is None and expected == 499):
            self.as_expected[cls] += 1
        else:
            self.unexpected[cls] += 1
            if len(self.errors) < 50:
                self.errors.append(f"{cls}: expected {expected}, got {got} {detail}"[:300])


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed before any answer")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def raw_post(port: int, token: str, body: bytes, *, pieces: int, delay: float,
                   stop_after: int | None, timeout: float) -> int | None:
    """POST /predict over a bare connection, the body sent in ``pieces`` ``delay`` apart.

    ``stop_after``: close the connection after that many body bytes (no answer awaited).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {JSON}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    try:
        if stop_after is not None:
            writer.write(head + body[:stop_after])
            await writer.drain()
            return None
        writer.write(head)
        await writer.drain()
        size = max(1, -(-len(body) // pieces))

        async def pump() -> None:
            for i in range(0, len(body), size):
                await asyncio.sleep(delay)
                writer.write(body[i:i + size])
                await writer.drain()

        pumping = asyncio.create_task(pump())
        try:
            status, _ = await asyncio.wait_for(read_response(reader), timeout)
        finally:
            pumping.cancel()
            with_exc = await asyncio.gather(pumping, return_exceptions=True)
            del with_exc  # a write after the server closed is expected for slowloris
        return status
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def client(cid: int, port: int, token: str, pool: np.ndarray, deadline: float,
                 budget: list[int], args: argparse.Namespace, tally: Tally) -> None:
    import httpx

    rng = random.Random(args.seed * 1000 + cid)
    classes, weights = zip(*sorted(WEIGHTS.items()), strict=True)
    good_auth = {"authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=args.timeout,
                                 limits=limits) as http:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            cls = rng.choices(classes, weights)[0]
            n = rng.randint(1, 4)
            i = rng.randrange(0, len(pool) - n)
            x = pool[i:i + n]
            valid = json.dumps({"inputs": x.tolist()}).encode()
            endpoint, expected = "/predict", 200
            t0 = time.perf_counter()
            try:
                if cls in ("valid-json", "valid-npy"):
                    body, ctype = (valid, JSON) if cls == "valid-json" else (npy(x), NPY)
                    r = await http.post("/predict", content=body,
                                        headers={"content-type": ctype, **good_auth})
                    got, detail = r.status_code, r.text[:200]
                    if got == 200 and len(r.json()["predictions"]) != n:
                        got, detail = -1, "wrong number of predictions"
                    elif got == 200:
                        tally.latency_ok.append(time.perf_counter() - t0)
                elif cls == "malformed":
                    kind, body, ctype, expected = malformed(rng, pool[:1])
                    tally.malformed_kinds[kind] += 1
                    headers = {**good_auth, **({"content-type": ctype} if ctype else {})}
                    r = await http.post("/predict", content=body, headers=headers)
                    got, detail = r.status_code, f"{kind} {r.text[:200]}"
                elif cls == "oversized":
                    expected = 413
                    body = b'{"inputs": [' + b" " * args.max_body_bytes + b"]}"
                    r = await http.post("/predict", content=body,
                                        headers={"content-type": JSON, **good_auth})
                    got, detail = r.status_code, r.text[:200]
                elif cls == "oversized-chunked":
                    expected = 413

                    async def chunks() -> Any:
                        for _ in range(args.max_body_bytes // 16384 + 2):
                            yield b" " * 16384

                    r = await http.post("/predict", content=chunks(),
                                        headers={"content-type": JSON, **good_auth})
                    got, detail = r.status_code, r.text[:200]
                elif cls in ("no-token", "wrong-token"):
                    expected = 401
                    body, ctype = ((valid, JSON) if rng.random() < 0.7 else
                                   malformed(rng, pool[:1])[1:3])
                    headers = {"content-type": ctype} if ctype else {}
                    if cls == "wrong-token":
                        wrong = rng.choice([token[:-1], token + "x", "Bearer",
                                            "x" * len(token)])
                        headers["authorization"] = f"Bearer {wrong}"
                    r = await http.post("/predict", content=body, headers=headers)
                    got, detail = r.status_code, r.text[:200]
                    if got == 401 and not r.headers.get("www-authenticate", "").startswith(
                            "Bearer"):
                        got, detail = -1, "401 without WWW-Authenticate: Bearer"
                elif cls == "slow-ok":
                    got = await raw_post(port, token, valid, pieces=4,
                                         delay=args.body_timeout / 16, stop_after=None,
                                         timeout=args.timeout)
                    detail = ""
                elif cls == "slowloris":
                    expected = 408
                    got = await raw_post(port, token, valid, pieces=len(valid),
                                         delay=args.body_timeout / 4, stop_after=None,
                                         timeout=args.body_timeout + args.timeout)
                    detail = ""
                elif cls == "disconnect":
                    expected = 499
                    got = await raw_post(port, token, valid, pieces=1, delay=0,
                                         stop_after=len(valid) // 2, timeout=args.timeout)
                    detail = ""
                elif cls == "healthz":
                    endpoint = "/healthz"
                    with_token = rng.random() < 0.5
                    r = await http.get("/healthz", headers=good_auth if with_token else {})
                    got, detail = r.status_code, r.text[:200]
                    keys = set(r.json()) if got == 200 else set()
                    if got == 200 and (("threshold" in keys) != with_token):
                        got, detail = -1, f"healthz details {'missing' if with_token else 'leaked'}"
                else:  # metrics-no-token
                    endpoint, expected = "/metrics", 401
                    r = await http.get("/metrics")
                    got, detail = r.status_code, r.text[:200]
            except Exception as exc:  # every failure is a finding
                tally.sent[cls] += 1
                tally.unexpected[cls] += 1
                tally.expected_metrics[(endpoint, expected)] += 1  # it may have been counted
                if len(tally.errors) < 50:
                    tally.errors.append(f"{cls}: {type(exc).__name__}: {exc}"[:300])
                continue
            tally.record(cls, endpoint, expected, got, detail)
            await asyncio.sleep(rng.uniform(0, args.think_ms / 1000))


async def sampler(pid: int, stop: asyncio.Event, every: float, t0: float,
                  samples: list[dict[str, float]]) -> None:
    while not stop.is_set():
        s = proc_sample(pid)
        if s is not None:
            s["t"] = round(time.monotonic() - t0, 2)
            samples.append(s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="traffic duration")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--body-timeout", type=float, default=3.0,
                    help="the guard's --body-timeout (slowloris clients outlast it)")
    ap.add_argument("--max-requests", type=int, default=200_000, help="cap on all requests")
    ap.add_argument("--think-ms", type=float, default=20.0,
                    help="random pause of up to this between a client's requests")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request timeout")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--sample-every", type=float, default=1.0)
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0,
                    help="allowed RSS growth from warm-up (first 20%%) to the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (0 < args.seconds <= 3600 and 1 <= args.clients <= 256):
        ap.error("--seconds must be in (0, 3600] and --clients in [1, 256]")
    import httpx

    token = "soak-" + os.urandom(16).hex()
    with tempfile.TemporaryDirectory(prefix="guard-soak-") as tmp:
        model, clean, tok, pool = build_files(Path(tmp), token)
        proc, port, server_lines = start_server(model, clean, tok, args)
        tally = Tally()
        samples: list[dict[str, float]] = []
        try:
            url = f"http://127.0.0.1:{port}"
            auth = {"authorization": f"Bearer {token}"}
            t_start = time.monotonic()
            # one request that waits out calibration (the socket already listens)
            health = httpx.get(url + "/healthz", headers=auth,
                               timeout=args.startup_timeout).json()
            startup = time.monotonic() - t_start
            tally.expected_metrics[("/healthz", 200)] += 1
            args.max_body_bytes = int(health["max_body_bytes"])
            print(f"guard up on port {port} after {startup:.1f} s; body limit "
                  f"{args.max_body_bytes} bytes", file=sys.stderr, flush=True)
            baseline = proc_sample(proc.pid)

            async def drive() -> float:
                stop = asyncio.Event()
                t0 = time.monotonic()
                sampling = asyncio.create_task(sampler(proc.pid, stop, args.sample_every,
                                                       t0, samples))
                budget = [args.max_requests]
                await asyncio.gather(*(client(c, port, token, pool, t0 + args.seconds,
                                              budget, args, tally)
                                       for c in range(args.clients)))
                elapsed = time.monotonic() - t0
                stop.set()
                await sampling
                return elapsed

            elapsed = asyncio.run(drive())
            time.sleep(6.0)  # idle keep-alive connections close after 5 s
            after = proc_sample(proc.pid)
            alive = proc.poll() is None
            metrics = parse_metrics(httpx.get(url + "/metrics", headers=auth, timeout=30).text)
            tally.expected_metrics[("/metrics", 200)] += 1
            alive = alive and httpx.get(url + "/healthz", timeout=30).status_code == 200
        finally:
            rc = stop_server(proc)
    report = summarise(args, tally, metrics, samples, baseline, after, elapsed, startup,
                       alive, rc, server_lines)
    print_table(report)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    raise SystemExit(0 if report["passed"] else 1)


def summarise(args: argparse.Namespace, tally: Tally, metrics: dict[str, float],
              samples: list[dict[str, float]], baseline: dict[str, float] | None,
              after: dict[str, float] | None, elapsed: float, startup: float, alive: bool,
              rc: int | None, server_lines: list[str]) -> dict[str, Any]:
    served: dict[str, int] = {}
    for key, v in metrics.items():
        m = re.match(r'trojanscan_requests_total\{endpoint="([^"]+)",code="(\d+)"\}', key)
        if m:
            served[f"{m.group(1)} {m.group(2)}"] = int(v)
    expected = {f"{e} {c}": n for (e, c), n in sorted(tally.expected_metrics.items())}
    mismatches = {k: {"clients": expected.get(k, 0), "server": served.get(k, 0)}
                  for k in sorted(set(served) | set(expected))
                  if expected.get(k, 0) != served.get(k, 0)}
    served_5xx = {k: v for k, v in served.items() if k.split()[1].startswith("5")}
    rss = [s["VmRSS"] for s in samples if "VmRSS" in s]
    n = len(rss)
    warm = rss[max(1, n // 10):max(2, n // 5)] or rss[:1]
    tail = rss[-max(1, n // 10):]
    growth = (statistics.median(tail) - statistics.median(warm)) if rss else None
    total = sum(tally.sent.values())
    checks = {
        "server_alive_at_end": alive,
        "no_5xx": not served_5xx,
        "every_response_as_expected": not tally.unexpected,
        "metrics_match_clients": not mismatches,
        "rss_bounded": growth is not None and growth <= args.max_rss_growth_mb,
    }
    return {
        "seconds": round(elapsed, 1), "startup_seconds": round(startup, 1),
        "clients": args.clients, "body_timeout_s": args.body_timeout,
        "max_body_bytes": args.max_body_bytes, "seed": args.seed,
        "requests": total, "requests_per_s": round(total / elapsed, 1),
        "by_class": {c: {"sent": tally.sent[c], "as_expected": tally.as_expected[c],
                         "unexpected": tally.unexpected[c],
                         "statuses": {str(k): v for k, v in
                                      sorted(tally.statuses.get(c, Counter()).items())}}
                     for c in sorted(WEIGHTS)},
        "malformed_kinds": dict(sorted(tally.malformed_kinds.items())),
        "client_errors": tally.errors,
        "latency_ok_p50_ms": _ms(tally.latency_ok, 50),
        "latency_ok_p99_ms": _ms(tally.latency_ok, 99),
        "server_counts": served, "client_expected_counts": expected,
        "metrics_mismatches": mismatches, "server_5xx": served_5xx,
        "memory": {
            "rss_start_mb": round(baseline["VmRSS"], 1) if baseline else None,
            "rss_end_mb": round(rss[-1], 1) if rss else None,
            "rss_peak_sampled_mb": round(max(rss), 1) if rss else None,
            "vmhwm_mb": round(max(s.get("VmHWM", 0) for s in samples), 1) if samples
            else None,
            "rss_growth_after_warmup_mb": None if growth is None else round(growth, 1),
            "threads_max": max((s.get("Threads", 0) for s in samples), default=None),
            "fds_start": baseline.get("fds") if baseline else None,
            "fds_max": max((s.get("fds", 0) for s in samples), default=None),
            "fds_after_idle": after.get("fds") if after else None,
            "samples": samples,
        },
        "server_exit_code_after_sigint": rc, "server_stderr": server_lines[-20:],
        "checks": checks, "passed": all(checks.values()),
        "cpu_count": os.cpu_count(), "host": "127.0.0.1",
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"\nguard soak: {r['seconds']} s, {r['clients']} clients, {r['requests']} requests "
          f"({r['requests_per_s']}/s), body timeout {r['body_timeout_s']} s")
    print(f"{'class':<20}{'sent':>8}{'as expected':>13}{'unexpected':>12}  statuses")
    for c, v in r["by_class"].items():
        print(f"{c:<20}{v['sent']:>8}{v['as_expected']:>13}{v['unexpected']:>12}  "
              f"{v['statuses'] or '-'}")
    print("\nserver /metrics (endpoint code: server / clients' expectation)")
    for k in sorted(set(r["server_counts"]) | set(r["client_expected_counts"])):
        print(f"  {k:<16}{r['server_counts'].get(k, 0):>8} / "
              f"{r['client_expected_counts'].get(k, 0)}")
    m = r["memory"]
    print(f"\nRSS start {m['rss_start_mb']} MiB, end {m['rss_end_mb']} MiB, peak sampled "
          f"{m['rss_peak_sampled_mb']} MiB, VmHWM {m['vmhwm_mb']} MiB, growth after warm-up "
          f"{m['rss_growth_after_warmup_mb']} MiB; threads max {m['threads_max']}; fds "
          f"{m['fds_start']} -> max {m['fds_max']} -> {m['fds_after_idle']} after idle")
    print(f"good-request latency p50 {r['latency_ok_p50_ms']} ms, p99 {r['latency_ok_p99_ms']}"
          f" ms; 5xx: {r['server_5xx'] or 'none'}")
    for e in r["client_errors"][:10]:
        print("  error:", e)
    print("checks:", ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in r["checks"].items()))


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


if __name__ == "__main__":
    main()
