"""The guard HTTP service (optional extra ``serve``: FastAPI + uvicorn).

``create_app(guard, max_batch=..., max_body_bytes=..., token=..., body_timeout=...)``
returns a FastAPI app:

``POST /predict``
    Body: JSON ``{"inputs": [...]}`` (nested ``N×C×H×W`` numbers in [0, 1]) with
    ``Content-Type: application/json``, or a NumPy ``.npy`` payload with
    ``Content-Type: application/x-npy`` (parsed without pickle: object arrays are
    refused). Answer: ``{"predictions": [...], "flagged": [...], "scores": [...]}``.
    Concurrent requests are micro-batched (:class:`trojanscan.guard.MicroBatcher`).
    Client errors get a 4xx and ``{"error": "<message>"}``, never a 5xx: 400 unreadable
    body (bad JSON, bad ``.npy``), 413 body larger than ``max_body_bytes`` or more than
    ``max_batch`` inputs, 415 other content types, 422 readable but wrong (missing
    ``inputs``, wrong shape, non-numbers, NaN/inf, values outside [0, 1], no inputs),
    408 the body did not arrive within ``body_timeout`` seconds (a client trickling it
    cannot hold the service). A client that disconnects before its body is complete is
    counted with code 499 in ``/metrics`` (a client error; nobody receives an answer).
``GET /healthz``
    ``{"status": "ok", ...}`` with the detector, its threshold and calibration figures.
    Liveness needs no token: without a valid one the answer is ``{"status": "ok"}`` only.
``GET /metrics``
    Prometheus text format: ``trojanscan_requests_total{endpoint,code}``,
    ``trojanscan_inputs_total``, ``trojanscan_flagged_total``, ``trojanscan_batches_total``,
    the ``trojanscan_request_latency_seconds`` histogram of ``/predict`` and the
    ``trojanscan_threshold`` gauge.

Authentication: with ``token`` set, ``/predict`` and ``/metrics`` need the header
``Authorization: Bearer <token>`` (compared in constant time); otherwise 401 with
``WWW-Authenticate: Bearer``, before any body is read. The interactive docs
(``/docs``, ``/redoc``, ``/openapi.json``) are off unless ``docs=True``.

:func:`serve` runs the app with uvicorn on a socket bound beforehand
(:func:`trojanscan.serve_options.bind_socket`), optionally with TLS.

FastAPI is imported only when an app is built; without it a
:class:`~trojanscan.exceptions.DependencyError` names the extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from .exceptions import DataError, ParameterError, bad_param, require
from .guard import Guard, MicroBatcher, as_inputs
from .serve_options import (
    bind_socket,
    check_tls_files,
    check_token,
    is_loopback,
    resolve_listen_address,
)

JSON_TYPES = ("application/json",)
NPY_TYPES = ("application/x-npy",)
#: parse bodies larger than this in a worker thread, off the event loop
_OFFLOAD_BYTES = 64 * 1024
#: seconds a request's whole body may take to arrive
DEFAULT_BODY_TIMEOUT = 30.0
#: seconds an idle keep-alive connection stays open
KEEP_ALIVE_TIMEOUT = 5
#: the code counted in /metrics for a client that left before its body was complete
CLIENT_DISCONNECTED = 499
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)


class ClientError(Exception):
    """A request the client got wrong: HTTP ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Metrics:
    """Thread-safe counters and a latency histogram, rendered in Prometheus text format."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self._lock = threading.Lock()
        self.buckets = buckets
        self.requests: dict[tuple[str, int], int] = {}
        self.inputs = 0
        self.flagged = 0
        self.batches = 0
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self._n = 0

    def request(self, endpoint: str, code: int) -> None:
        with self._lock:
            key = (endpoint, int(code))
            self.requests[key] = self.requests.get(key, 0) + 1

    def scored(self, inputs: int, flagged: int) -> None:
        with self._lock:
            self.inputs += inputs
            self.flagged += flagged

    def latency(self, seconds: float) -> None:
        with self._lock:
            i = next((k for k, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))
            self._counts[i] += 1
            self._sum += seconds
            self._n += 1

    def render(self, *, threshold: float, batches: int) -> str:
        with self._lock:
            lines = [
                "# HELP trojanscan_requests_total HTTP requests by endpoint and status code.",
                "# TYPE trojanscan_requests_total counter",
            ]
            for (endpoint, code), n in sorted(self.requests.items()):
                lines.append(f'trojanscan_requests_total{{endpoint="{endpoint}",code="{code}"}}'
                             f" {n}")
            lines += [
                "# HELP trojanscan_inputs_total Inputs scored by the detector.",
                "# TYPE trojanscan_inputs_total counter",
                f"trojanscan_inputs_total {self.inputs}",
                "# HELP trojanscan_flagged_total Inputs flagged as carrying a trigger.",
                "# TYPE trojanscan_flagged_total counter",
                f"trojanscan_flagged_total {self.flagged}",
                "# HELP trojanscan_batches_total Model batches run by the micro-batcher.",
                "# TYPE trojanscan_batches_total counter",
                f"trojanscan_batches_total {batches}",
                "# HELP trojanscan_request_latency_seconds Latency of POST /predict.",
                "# TYPE trojanscan_request_latency_seconds histogram",
            ]
            cum = 0
            for b, c in zip(self.buckets, self._counts, strict=False):
                cum += c
                lines.append(f'trojanscan_request_latency_seconds_bucket{{le="{b:g}"}} {cum}')
            lines += [
                f'trojanscan_request_latency_seconds_bucket{{le="+Inf"}} {self._n}',
                f"trojanscan_request_latency_seconds_sum {self._sum:.6f}",
                f"trojanscan_request_latency_seconds_count {self._n}",
                "# HELP trojanscan_threshold The detector's calibrated threshold.",
                "# TYPE trojanscan_threshold gauge",
                f"trojanscan_threshold {threshold if math.isfinite(threshold) else 0.0:.9g}",
            ]
        return "\n".join(lines) + "\n"


def default_max_body_bytes(max_batch: int, input_shape: tuple[int, ...]) -> int:
    """Room for ``max_batch`` inputs as JSON (~24 bytes per number) plus slack."""
    return int(max_batch * math.prod(input_shape) * 24 + 65536)


def load_npy(body: bytes) -> np.ndarray:
    """Parse a ``.npy`` payload without pickle and without trusting its header's size.

    The header is read first; the payload must hold exactly the bytes the header
    announces, so a forged shape cannot make us allocate more than the body.
    """
    from numpy.lib import format as npy

    f = io.BytesIO(body)
    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, SyntaxError, TypeError, RecursionError, OverflowError) as exc:
        raise ClientError(400, f"body is not a valid .npy payload: {exc}") from None
    if dtype.hasobject:
        raise ClientError(422, "inputs: object arrays are refused (they would need pickle)")
    if dtype.kind not in "fiub":
        raise ClientError(422, f"inputs: expected numbers, got a .npy array of dtype {dtype}")
    count = math.prod(shape)
    data = body[f.tell():]
    if len(data) != count * dtype.itemsize:
        raise ClientError(400, f"body is not a valid .npy payload: the header announces shape "
                               f"{shape} ({count * dtype.itemsize} bytes) but {len(data)} "
                               "bytes follow")
    arr = np.frombuffer(data, dtype=dtype, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def parse_json(body: bytes) -> Any:
    """``body["inputs"]`` from a JSON object, or a ClientError (400 unreadable, 422 wrong)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise ClientError(422, 'body must be a JSON object {"inputs": [...]} with nested '
                               "N×C×H×W numbers")
    return doc["inputs"]


def parse_body(body: bytes, content_type: str, input_shape: tuple[int, int, int],
               max_batch: int) -> np.ndarray:
    """Decode and validate a request body into float32 inputs ``n×C×H×W``."""
    if content_type in JSON_TYPES:
        raw = parse_json(body)
        if isinstance(raw, list) and len(raw) > max_batch:
            raise ClientError(413, f"at most {max_batch} inputs per request, got {len(raw)}")
    elif content_type in NPY_TYPES:
        raw = load_npy(body)
    else:
        shown = content_type or "none"
        raise ClientError(415, f"unsupported Content-Type {shown!r}: send application/json "
                               '({"inputs": [...]}) or application/x-npy (a .npy file)')
    try:
        arr = np.asarray(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ClientError(422, f"inputs: not a rectangular array of numbers ({exc})") from None
    if arr.ndim >= 1 and arr.shape[0] > max_batch:
        raise ClientError(413, f"at most {max_batch} inputs per request, got {arr.shape[0]}")
    if arr.dtype == np.bool_:
        raise ClientError(422, "inputs: expected numbers in [0, 1], got booleans")
    try:
        return as_inputs(arr, input_shape, max_batch=max_batch)
    except DataError as exc:
        raise ClientError(422, str(exc)) from None


async def read_body(request: Any, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refusing (413) anything larger than ``limit`` bytes early and
    (408) a body that has not fully arrived ``timeout`` seconds after the headers."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ClientError(400, f"invalid Content-Length {declared!r}") from None
        if size > limit:
            raise ClientError(413, f"body of {size} bytes exceeds the limit of {limit} bytes")

    async def collect() -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ClientError(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    if timeout is None:
        return await collect()
    try:
        return await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise ClientError(408, f"the request body did not arrive within {timeout:g} s"
                          ) from None


def bearer_token(header: str | None) -> bytes:
    """The credentials of an ``Authorization: Bearer <token>`` header (b"" if none)."""
    if not header:
        return b""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    # header values arrive latin-1 decoded: back to the bytes the client sent
    return value.strip().encode("latin-1", errors="replace")


def create_app(guard: Guard, *, max_batch: int = 256, max_body_bytes: int | None = None,
               max_wait_ms: float = 2.0, token: str | None = None,
               body_timeout: float | None = DEFAULT_BODY_TIMEOUT, docs: bool = False) -> Any:
    """The FastAPI app serving ``guard`` (see the module docstring for the API).

    ``token``: the bearer token ``/predict`` and ``/metrics`` require (None: no
    authentication, for loopback or a proxy that authenticates). ``body_timeout``:
    seconds a body may take to arrive (None: no limit). ``docs``: serve ``/docs``,
    ``/redoc`` and ``/openapi.json``.
    """
    fastapi = require("fastapi", "serve")
    responses = require("fastapi.responses", "serve")
    starlette_exc = require("starlette.exceptions", "serve")
    starlette_requests = require("starlette.requests", "serve")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise bad_param("max_batch", "an integer >= 1", max_batch)
    if body_timeout is not None and (isinstance(body_timeout, bool) or not isinstance(
            body_timeout, (int, float)) or not 0 < body_timeout < math.inf):
        raise bad_param("body_timeout", "a number of seconds > 0 (or None)", body_timeout)
    expected = None if token is None else check_token(token, "token").encode("ascii")
    shape = guard.input_shape
    limit = default_max_body_bytes(max_batch, shape) if max_body_bytes is None else max_body_bytes
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1024:
        raise bad_param("max_body_bytes", "an integer >= 1024", max_body_bytes)
    if not isinstance(guard, Guard):
        raise ParameterError(f"expected a trojanscan.guard.Guard, got {type(guard).__name__}")

    JSONResponse = responses.JSONResponse
    PlainTextResponse = responses.PlainTextResponse
    metrics = Metrics()
    batcher = MicroBatcher(guard, max_batch=max_batch, max_wait_ms=max_wait_ms)
    info = guard.info()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        batcher.close()

    doc_urls: dict[str, Any] = ({} if docs else
                                {"docs_url": None, "redoc_url": None, "openapi_url": None})
    app = fastapi.FastAPI(title="trojanscan guard", lifespan=lifespan,
                          description="Predictions with triggered inputs flagged.",
                          **doc_urls)
    app.state.guard = guard
    app.state.batcher = batcher
    app.state.metrics = metrics
    app.state.max_body_bytes = limit
    app.state.auth = expected is not None

    def authorized(request: Any) -> bool:
        if expected is None:
            return True
        # always compared, in constant time, whether a header came or not
        return hmac.compare_digest(bearer_token(request.headers.get("authorization")),
                                   expected)

    def unauthorized(request: Any) -> Any:
        # answered before the body is read; the server discards the body as it arrives
        sent = bool(request.headers.get("authorization"))
        challenge = 'Bearer realm="trojanscan guard"'
        if sent:
            challenge += ', error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
        msg = ("invalid bearer token" if sent else
               "missing bearer token: send the header 'Authorization: Bearer <token>'")
        return JSONResponse({"error": msg}, status_code=401, headers=headers)

    @app.exception_handler(starlette_exc.HTTPException)
    async def _http_error(request: Any, exc: Any) -> Any:
        metrics.request(request.url.path if request.url.path in
                        ("/predict", "/healthz", "/metrics") else "other", exc.status_code)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    client_disconnect = starlette_requests.ClientDisconnect

    async def predict(request: Any) -> Any:
        t0 = time.perf_counter()
        code = 200
        try:
            if not authorized(request):
                code = 401
                return unauthorized(request)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await read_body(request, limit, body_timeout)
            if len(body) > _OFFLOAD_BYTES:
                x = await asyncio.to_thread(parse_body, body, ctype, shape, max_batch)
            else:
                x = parse_body(body, ctype, shape, max_batch)
            result = await batcher.submit(x)
            metrics.scored(len(result), int(result.flagged.sum()))
            return JSONResponse(result.to_dict())
        except ClientError as exc:
            code = exc.status
            # a client too slow to send its body loses the connection; the rest of an
            # oversized body is read and discarded by the server (closing instead would
            # race the answer with a reset while the client is still sending)
            headers = {"Connection": "close"} if code == 408 else None
            return JSONResponse({"error": exc.message}, status_code=exc.status,
                                headers=headers)
        except client_disconnect:  # the client left mid-body: its error, not ours
            code = CLIENT_DISCONNECTED
            return JSONResponse({"error": "client disconnected"}, status_code=code)
        except DataError as exc:
            code = 422
            return JSONResponse({"error": str(exc)}, status_code=422)
        except Exception as exc:  # the model failed: a server-side fault, said plainly
            code = 500
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                status_code=500)
        finally:
            metrics.latency(time.perf_counter() - t0)
            metrics.request("/predict", code)

    # annotations are strings here (postponed evaluation) and FastAPI resolves them in
    # this module's globals, where fastapi is not imported: give it the class itself
    predict.__annotations__["request"] = fastapi.Request
    app.post("/predict")(predict)

    async def healthz(request: Any) -> Any:
        metrics.request("/healthz", 200)
        if not authorized(request):  # liveness for anyone, details for token holders
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "max_batch": max_batch,
                             "max_body_bytes": limit, "auth": expected is not None,
                             **_jsonable(info)})

    async def prometheus(request: Any) -> Any:
        if not authorized(request):
            metrics.request("/metrics", 401)
            return unauthorized(request)
        metrics.request("/metrics", 200)
        return PlainTextResponse(metrics.render(threshold=guard.threshold,
                                                batches=batcher.stats.batches),
                                 media_type="text/plain; version=0.0.4")

    for fn in (healthz, prometheus):
        fn.__annotations__["request"] = fastapi.Request
    app.get("/healthz")(healthz)
    app.get("/metrics")(prometheus)
    return app


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        elif isinstance(v, (np.generic,)):
            v = v.item()
        out[k] = v
    return out


def serve(guard: Guard, *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 256,
          max_body_bytes: int | None = None, log_level: str = "warning",
          sock: socket.socket | None = None, token: str | None = None,
          insecure_no_auth: bool = False, tls_cert: Path | None = None,
          tls_key: Path | None = None, body_timeout: float | None = DEFAULT_BODY_TIMEOUT,
          docs: bool = False) -> None:
    """Run the app with uvicorn until interrupted.

    ``sock``: a listening socket from :func:`trojanscan.serve_options.bind_socket`
    (otherwise one is bound here on ``host``/``port``, loopback by default); the server
    closes it on exit. Beyond loopback a ``token`` is required unless
    ``insecure_no_auth``. ``tls_cert``/``tls_key``: serve HTTPS (PEM files, key
    unencrypted).
    """
    uvicorn = require("uvicorn", "serve")
    tls = check_tls_files(tls_cert, tls_key)
    app = create_app(guard, max_batch=max_batch, max_body_bytes=max_body_bytes, token=token,
                     body_timeout=body_timeout, docs=docs)
    if sock is None:
        sock = bind_socket(resolve_listen_address(host, port))
    try:
        where = sock.getsockname()[0]
        if token is None and not insecure_no_auth and not is_loopback(where):
            raise ParameterError(f"listening on {where} (reachable from other machines) "
                                 "needs a bearer token, or insecure_no_auth=True")
        config = uvicorn.Config(app, log_level=log_level, access_log=False,
                                timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
                                ssl_certfile=str(tls_cert) if tls else None,
                                ssl_keyfile=str(tls_key) if tls else None)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        app.state.batcher.close()
