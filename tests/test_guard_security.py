"""Security of the guard service: bearer tokens, TLS, exposure warnings, the listening
socket bound before calibration, client disconnects and slow bodies.

The app is driven through FastAPI's test client or raw ASGI messages; the CLI runs in
process (with the server's ``run`` replaced) except where a real process is the point
(HTTPS on a port the service picks itself).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
import httpx
from fastapi.testclient import TestClient

from trojanscan.dataset import ImageDataset
from trojanscan.exceptions import ParameterError
from trojanscan.guard import Guard
from trojanscan.serve import create_app
from trojanscan.serve_options import (
    DEFAULT_TOKEN_ENV,
    bind_socket,
    check_tls_files,
    check_token,
    read_token_file,
    resolve_listen_address,
    resolve_token,
    token_from_env,
)

FAST = {"n_overlays": 8, "blend": "sum_clip"}
TOKEN = "s3cret-token-0123456789abcdef"
GOOD = {"inputs": np.full((2, 1, 8, 8), 0.5).tolist()}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, ImageDataset]:
    """A seeded, untrained digits-shaped CNN and 120 digits images: the service's security
    does not depend on what the model learned, and nothing needs training."""
    from sklearn.datasets import load_digits

    from trojanscan.archs import small_cnn

    torch.manual_seed(0)
    model = small_cnn((1, 8, 8), 10).eval()
    x = torch.from_numpy((load_digits().images[:120] / 16.0).astype(np.float32))[:, None]
    return model, ImageDataset(x, None, source="digits", format="builtin")


@pytest.fixture(scope="module")
def guard(small: tuple[torch.nn.Module, ImageDataset]) -> Guard:
    model, clean = small
    return Guard.calibrate(model, clean, detector="strip", frr=0.05, seed=0, device="cpu",
                           **FAST)


@pytest.fixture(scope="module")
def files(small: tuple[torch.nn.Module, ImageDataset],
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model, clean = small
    d = tmp_path_factory.mktemp("guard_sec")
    torch.jit.save(torch.jit.script(model), str(d / "model.pt"))
    np.savez(d / "clean.npz", x=clean.x.numpy())
    tok = d / "token"
    tok.write_text(TOKEN + "\n")
    tok.chmod(0o600)
    return {"model": d / "model.pt", "clean": d / "clean.npz", "token": tok, "dir": d}


@pytest.fixture
def no_default_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEFAULT_TOKEN_ENV, raising=False)


class Calls:
    """Records whether the model was loaded or calibrated (it must not be, on errors)."""

    def __init__(self) -> None:
        self.loaded = 0
        self.calibrated = 0


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Calls:
    import trojanscan.commands.guard as cmd

    calls = Calls()
    real_load = cmd.load_inputs

    def load(*args: Any, **kwargs: Any) -> Any:
        calls.loaded += 1
        return real_load(*args, **kwargs)

    def calibrate(*args: Any, **kwargs: Any) -> Any:
        calls.calibrated += 1
        raise AssertionError("calibration must not run")

    monkeypatch.setattr(cmd, "load_inputs", load)
    monkeypatch.setattr(Guard, "calibrate", classmethod(calibrate))
    return calls


def _cli(*args: str) -> int:
    from trojanscan.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)


def _guard_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["guard", str(files["model"]), "--calibrate", str(files["clean"]), "--device",
            "cpu", "--frr", "0.05", "--param", "n_overlays=8", *extra]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------
# bearer tokens
# ---------------------------------------------------------------------------


def test_token_required_beyond_localhost(guard: Guard, files: dict[str, Path], watch: Calls,
                                         no_default_token: None,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # the command refuses a non-loopback host without a token, before loading anything
    assert _cli(*_guard_args(files, "--host", "0.0.0.0", "--port", "0")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--token-file" in line and "--insecure-no-auth" in line
    assert watch.loaded == 0 and watch.calibrated == 0
    # the app with a token: /predict and /metrics need it
    with TestClient(create_app(guard, max_batch=8, token=TOKEN)) as c:
        r = c.post("/predict", json=GOOD)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in r.json()["error"]
        for bad in ("Basic " + TOKEN, TOKEN, "Bearer", "Bearer " + TOKEN[:-1]):
            r = c.post("/predict", json=GOOD, headers={"Authorization": bad})
            assert r.status_code == 401, bad
        assert c.get("/metrics").status_code == 401
        # refused before the body is read: a malformed body gets 401, not 400
        assert c.post("/predict", content=b"{", headers={"content-type": "application/json"}
                      ).status_code == 401
        r = c.post("/predict", json=GOOD, headers=AUTH)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert c.post("/predict", json=GOOD, headers={"authorization": f"bearer {TOKEN}"}
                      ).status_code == 200  # the scheme is case-insensitive
        m = c.get("/metrics", headers=AUTH)
    assert m.status_code == 200
    assert 'trojanscan_requests_total{endpoint="/predict",code="401"} 6' in m.text
    assert 'trojanscan_requests_total{endpoint="/predict",code="200"} 2' in m.text
    assert 'trojanscan_requests_total{endpoint="/metrics",code="401"} 1' in m.text
    assert "trojanscan_inputs_total 4" in m.text  # refused requests scored nothing


def test_wrong_token_401_constant_time_compare_used(guard: Guard,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import trojanscan.serve as serve_mod

    seen: list[tuple[bytes, bytes]] = []
    real = serve_mod.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve_mod.hmac, "compare_digest", spy)
    with TestClient(create_app(guard, max_batch=8, token=TOKEN)) as c:
        r = c.post("/predict", json=GOOD, headers={"Authorization": "Bearer wrong-token-xyz"})
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
        assert r.json()["error"] == "invalid bearer token" and TOKEN not in r.text
        assert c.get("/metrics").status_code == 401  # no header: compared all the same
    assert (b"wrong-token-xyz", TOKEN.encode()) in seen
    assert (b"", TOKEN.encode()) in seen


def test_token_never_from_command_line(files: dict[str, Path], watch: Calls,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from trojanscan.cli import app

    cmd = typer.main.get_command(app).commands["guard"]  # type: ignore[attr-defined]
    token_opts = {o for p in cmd.params for o in p.opts if "token" in o}
    assert token_opts == {"--token-file", "--token-env"}
    assert _cli(*_guard_args(files, "--token", TOKEN)) == 2
    # a token passed to --token-env by mistake is refused without being echoed
    capsys.readouterr()
    assert _cli(*_guard_args(files, "--token-env", "tok en/+=")) == 2
    err = capsys.readouterr().err
    assert "NAME of an environment variable" in err and "tok en/+=" not in err
    assert watch.calibrated == 0


def test_token_sources_and_their_checks(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text(TOKEN + "\r\n")
    f.chmod(0o600)
    assert read_token_file(f) == (TOKEN, [])
    f.chmod(0o644)
    token, warnings = read_token_file(f)
    assert token == TOKEN and len(warnings) == 1 and "chmod 600" in warnings[0]
    for content, match in [("", "empty"), ("\n", "empty"), ("short\n", "too short"),
                           ("two words here, long enough", "visible ASCII"),
                           ("x" * 5000, "more than a token")]:
        f.write_text(content)
        with pytest.raises(ParameterError, match=match):
            read_token_file(f)
    f.write_bytes("é".encode() * 20)
    with pytest.raises(ParameterError, match="ASCII"):
        read_token_file(f)
    with pytest.raises(ParameterError, match="no such file"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ParameterError, match="regular file"):
        read_token_file(tmp_path)
    if os.name == "posix" and os.geteuid() != 0:  # root reads anything
        f.write_text(TOKEN)
        f.chmod(0)
        with pytest.raises(ParameterError, match="cannot read"):
            read_token_file(f)
    assert token_from_env("T", {"T": f" {TOKEN}\n"}) == TOKEN
    with pytest.raises(ParameterError, match="not set"):
        token_from_env("T", {})
    with pytest.raises(ParameterError, match="empty"):
        token_from_env("T", {"T": ""})
    # the default variable, and contradictions
    assert resolve_token(token_file=None, token_env=None, no_auth=False, environ={})[0] is None
    got = resolve_token(token_file=None, token_env=None, no_auth=False,
                        environ={DEFAULT_TOKEN_ENV: TOKEN})
    assert got[0] == TOKEN and DEFAULT_TOKEN_ENV in got[1]
    with pytest.raises(ParameterError, match="not both"):
        resolve_token(token_file=f, token_env="T", no_auth=False, environ={})
    with pytest.raises(ParameterError, match="contradicts"):
        resolve_token(token_file=f, token_env=None, no_auth=True, environ={})
    with pytest.raises(ParameterError, match="contradicts"):
        resolve_token(token_file=None, token_env=None, no_auth=True,
                      environ={DEFAULT_TOKEN_ENV: TOKEN})
    with pytest.raises(ParameterError, match="too short"):
        check_token("short", "token")


def test_option_errors_exit2_one_line_before_calibrating(
        files: dict[str, Path], watch: Calls, tmp_path: Path, no_default_token: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    monkeypatch.setenv("SHORT_TOKEN", "abc")
    cases = [
        (["--token-file", str(tmp_path / "missing")], "no such file"),
        (["--token-file", str(empty)], "empty"),
        (["--token-env", "SHORT_TOKEN"], "too short"),
        (["--token-env", "NOT_SET_ANYWHERE_X"], "not set"),
        (["--token-file", str(files["token"]), "--insecure-no-auth"], "contradicts"),
        (["--tls-cert", str(garbage)], "needs --tls-key"),
        (["--tls-key", str(garbage)], "needs --tls-cert"),
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(garbage)], "no such"),
        (["--tls-cert", str(garbage), "--tls-key", str(garbage)], "cannot load"),
        (["--body-timeout", "0"], "--body-timeout"),
        (["--port", "70000"], "port"),
    ]
    for extra, match in cases:
        capsys.readouterr()
        assert _cli(*_guard_args(files, *extra)) == 2, extra
        assert match in _one_error_line(capsys.readouterr().err), extra
    assert watch.loaded == 0 and watch.calibrated == 0


# ---------------------------------------------------------------------------
# exposure, docs, healthz
# ---------------------------------------------------------------------------


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch, guard: Guard) -> list[dict[str, Any]]:
    """The command up to serving, with calibration replaced by the module's guard and
    the server's run recorded instead of serving."""
    import uvicorn

    runs: list[dict[str, Any]] = []

    def run(self: Any, sockets: list[socket.socket] | None = None) -> None:
        assert sockets is not None
        runs.append({"config": self.config, "address": sockets[0].getsockname(),
                     "listening": sockets[0].getsockopt(socket.SOL_SOCKET,
                                                        socket.SO_ACCEPTCONN)})

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.setattr(Guard, "calibrate", classmethod(lambda cls, *a, **k: guard))
    return runs


def test_exposure_warning_survives_quiet(files: dict[str, Path], fake_server: list[Any],
                                         no_default_token: None,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(*_guard_args(files, "--host", "0.0.0.0", "--port", "0",
                             "--insecure-no-auth", "--quiet")) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: listening on http://0\.0\.0\.0:\d+, reachable from other "
                     r"machines, WITHOUT authentication", err), err
    monkeypatch.setenv(DEFAULT_TOKEN_ENV, TOKEN)
    assert _cli(*_guard_args(files, "--host", "0.0.0.0", "--port", "0", "-q")) == 0
    err = capsys.readouterr().err
    assert "reachable from other machines" in err and "unencrypted" in err
    assert TOKEN not in err
    assert [r["address"][0] for r in fake_server] == ["0.0.0.0", "0.0.0.0"]
    assert all(r["listening"] for r in fake_server)
    # loopback under --quiet: silent, except the port when the service picked it
    monkeypatch.delenv(DEFAULT_TOKEN_ENV)
    assert _cli(*_guard_args(files, "--port", "0", "-q")) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"guard: listening on http://127.0.0.1:{fake_server[-1]['address'][1]}"


def test_library_serve_needs_token_beyond_loopback(guard: Guard,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from trojanscan.serve import serve

    ran: list[Any] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(sockets))
    with pytest.raises(ParameterError, match="needs a bearer token"):
        serve(guard, host="0.0.0.0", port=0)
    assert ran == []
    serve(guard, host="0.0.0.0", port=0, token=TOKEN)
    serve(guard, host="0.0.0.0", port=0, insecure_no_auth=True)
    serve(guard, host="127.0.0.1", port=0)
    assert len(ran) == 3 and all(s[0].fileno() == -1 for s in ran)  # closed afterwards


def test_docs_and_openapi_off_by_default(guard: Guard) -> None:
    with TestClient(create_app(guard, max_batch=8)) as c:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert c.get(path).status_code == 404, path
    with TestClient(create_app(guard, max_batch=8, docs=True)) as c:
        assert c.get("/openapi.json").status_code == 200
        assert c.get("/docs").status_code == 200


def test_healthz_is_liveness_without_a_token(guard: Guard) -> None:
    with TestClient(create_app(guard, max_batch=8, token=TOKEN)) as c:
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        full = c.get("/healthz", headers=AUTH).json()
    assert full["status"] == "ok" and full["auth"] is True
    assert full["threshold"] == pytest.approx(guard.threshold)


# ---------------------------------------------------------------------------
# clients that leave or trickle
# ---------------------------------------------------------------------------


def _scope(length: int) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/predict", "raw_path": b"/predict",
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(length).encode())]}


def _asgi_post(app: Any, messages: list[dict[str, Any]], *, hang: bool = False
               ) -> list[dict[str, Any]]:
    """POST /predict with these receive messages; then hang (a trickling client) or end."""
    sent: list[dict[str, Any]] = []
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if hang:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(_scope(1000), receive, send))
    return sent


def test_disconnect_mid_body_not_5xx_in_metrics(guard: Guard) -> None:
    app = create_app(guard, max_batch=8, max_body_bytes=200_000)
    try:
        _asgi_post(app, [{"type": "http.request", "body": b'{"inputs": [[[', "more_body": True},
                         {"type": "http.disconnect"}])
        requests = dict(app.state.metrics.requests)
    finally:
        app.state.batcher.close()
    assert not any(code >= 500 for (_, code) in requests), requests
    assert requests == {("/predict", 499): 1}


def test_slow_body_times_out_with_408(guard: Guard) -> None:
    app = create_app(guard, max_batch=8, body_timeout=0.2)
    try:
        sent = _asgi_post(app, [{"type": "http.request", "body": b'{"inputs"',
                                 "more_body": True}], hang=True)
        requests = dict(app.state.metrics.requests)
    finally:
        app.state.batcher.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert b"did not arrive within 0.2 s" in b"".join(m.get("body", b"") for m in sent)
    assert requests == {("/predict", 408): 1}
    with pytest.raises(ParameterError, match="body_timeout"):
        create_app(guard, body_timeout=0)


# ---------------------------------------------------------------------------
# the listening socket
# ---------------------------------------------------------------------------


def test_port_in_use_exit2_one_line_before_calibrating(files: dict[str, Path], watch: Calls,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _cli(*_guard_args(files, "--port", str(port))) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"127.0.0.1:{port}" in line and "--port 0" in line
    assert watch.loaded == 0 and watch.calibrated == 0


def test_unresolvable_host_exit2_one_line(files: dict[str, Path], watch: Calls,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(*_guard_args(files, "--host", "no-such-host.invalid", "--port", "0")) == 2
    assert "no-such-host.invalid" in _one_error_line(capsys.readouterr().err)
    assert _cli(*_guard_args(files, "--host", "")) == 2
    assert "host" in _one_error_line(capsys.readouterr().err)
    assert watch.loaded == 0 and watch.calibrated == 0


def test_listen_address_and_bind() -> None:
    assert resolve_listen_address("127.0.0.1", 0).loopback
    assert resolve_listen_address("localhost", 0).loopback
    assert not resolve_listen_address("0.0.0.0", 0).loopback
    sock = bind_socket(resolve_listen_address("127.0.0.1", 0))
    try:
        port = sock.getsockname()[1]
        assert port > 0
        with pytest.raises(ParameterError, match="already in use"):
            bind_socket(resolve_listen_address("127.0.0.1", port))
        # the socket listens at once: a connection made now waits for the server
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        sock.close()


# ---------------------------------------------------------------------------
# TLS, in a real process
# ---------------------------------------------------------------------------


def _self_signed(d: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 and its key, by `cryptography` or the openssl CLI."""
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        import shutil

        if shutil.which("openssl") is None:
            return None
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                        "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    import ipaddress

    pk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(pk.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(minutes=5))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName(
               [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
           .sign(pk, hashes.SHA256()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    key.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return cert, key


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 120.0
                   ) -> re.Match[str]:
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            line = proc.stderr.readline()
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        if proc.poll() is not None:
            break
    raise AssertionError(f"no line matching {pattern!r}; stderr: {''.join(seen)!r}")


def test_tls_serves_https(files: dict[str, Path], tmp_path: Path) -> None:
    made = _self_signed(tmp_path)
    if made is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available")
    cert, key = made
    assert check_tls_files(cert, key)
    env = dict(os.environ, TROJANSCAN_NO_PROGRESS="1", MY_GUARD_TOKEN=TOKEN)
    env.pop(DEFAULT_TOKEN_ENV, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trojanscan", *_guard_args(files, "--port", "0",
                                                           "--token-env", "MY_GUARD_TOKEN",
                                                           "--tls-cert", str(cert),
                                                           "--tls-key", str(key), "-q")],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        port = int(_wait_for_line(proc, r"listening on https://127\.0\.0\.1:(\d+)").group(1))
        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{port}"
        with httpx.Client(base_url=url, verify=ctx, timeout=120) as c:
            assert c.get("/healthz").json() == {"status": "ok"}  # waits for calibration
            assert c.post("/predict", json=GOOD).status_code == 401
            r = c.post("/predict", json=GOOD, headers=AUTH)
            assert r.status_code == 200 and len(r.json()["flagged"]) == 2
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
