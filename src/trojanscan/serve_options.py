"""Checks of the guard service's settings, made before any model is loaded.

* :func:`read_token_file`, :func:`token_from_env` and :func:`check_token`: the bearer
  token, from a file or an environment variable only (a command line is visible to every
  user of the machine in ``ps``); at least :data:`MIN_TOKEN_CHARS` visible ASCII
  characters; a trailing newline in a file is dropped.
* :func:`check_tls_files`: certificate and key given together, readable, loadable into
  a TLS context (an encrypted key is refused: the service could not prompt for it).
* :func:`resolve_listen_address` and :func:`bind_socket`: the listening socket is created,
  bound and put in listening state by the caller *before* calibration and then handed to
  the server, so a port in use or an unknown host is reported at once and nothing can
  take the port in between.

Every problem is a :class:`~trojanscan.exceptions.ParameterError` with one line for the
user; nothing here echoes a token.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .exceptions import ParameterError

#: the environment variable read when neither ``--token-file`` nor ``--token-env`` is given
DEFAULT_TOKEN_ENV = "TROJANSCAN_GUARD_TOKEN"
#: shortest accepted token (e.g. ``openssl rand -hex 32`` gives 64)
MIN_TOKEN_CHARS = 16
MAX_TOKEN_BYTES = 4096
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: safe in an HTTP header


def check_token(token: str, source: str) -> str:
    """``token`` if it is usable as a bearer token, else a ParameterError naming ``source``."""
    if not token:
        raise ParameterError(f"{source}: the token is empty")
    if not _TOKEN_CHARS.match(token):
        raise ParameterError(f"{source}: the token must be visible ASCII characters only "
                             "(no spaces, no line breaks inside)")
    if len(token) < MIN_TOKEN_CHARS:
        raise ParameterError(f"{source}: the token is too short ({len(token)} characters, "
                             f"at least {MIN_TOKEN_CHARS}); make one with "
                             "`openssl rand -hex 32`")
    return token


def read_token_file(path: Path) -> tuple[str, list[str]]:
    """The token in ``path`` (surrounding whitespace and the final newline dropped) and
    warnings (a file other users can read)."""
    src = f"--token-file {path}"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ParameterError(f"{src}: no such file") from None
    except OSError as exc:
        raise ParameterError(f"{src}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ParameterError(f"{src}: not a regular file")
    if st.st_size > MAX_TOKEN_BYTES:
        raise ParameterError(f"{src}: {st.st_size} bytes, more than a token "
                             f"(at most {MAX_TOKEN_BYTES})")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ParameterError(f"{src}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ParameterError(f"{src}: the token must be visible ASCII characters only") from None
    warnings = []
    if os.name == "posix" and st.st_mode & stat.S_IROTH:
        warnings.append(f"{path} is readable by every user of this machine; "
                        f"restrict it (chmod 600 {path})")
    return check_token(text.strip(), src), warnings


def token_from_env(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The token in environment variable ``name`` (which must be set)."""
    env = os.environ if environ is None else environ
    if not _ENV_NAME.match(name):
        # said without echoing it: it may be the token itself, passed by mistake
        raise ParameterError("--token-env takes the NAME of an environment variable "
                             "(letters, digits, '_'), not the token itself")
    value = env.get(name)
    if value is None:
        if name != name.upper() and len(name) >= MIN_TOKEN_CHARS:
            # not echoed: a lower-case hex token is a valid variable name too
            raise ParameterError("--token-env: no such environment variable; it takes the "
                                 "NAME of a variable holding the token, not the token itself")
        raise ParameterError(f"--token-env {name}: the environment variable is not set")
    return check_token(value.strip(), f"environment variable {name}")


def resolve_token(*, token_file: Path | None, token_env: str | None, no_auth: bool,
                  environ: Mapping[str, str] | None = None
                  ) -> tuple[str | None, str, list[str]]:
    """``(token or None, where it came from, warnings)`` from the guard's options.

    ``--token-file`` or ``--token-env``, else :data:`DEFAULT_TOKEN_ENV` when set; an
    explicit waiver (``no_auth``) contradicts any of them.
    """
    env = os.environ if environ is None else environ
    if token_file is not None and token_env is not None:
        raise ParameterError("give the token once: --token-file or --token-env, not both")
    if no_auth:
        if token_file is not None or token_env is not None:
            raise ParameterError("--insecure-no-auth contradicts --token-file/--token-env")
        if DEFAULT_TOKEN_ENV in env:
            raise ParameterError(f"--insecure-no-auth contradicts the token in "
                                 f"{DEFAULT_TOKEN_ENV}; unset it or drop --insecure-no-auth")
        return None, "none (--insecure-no-auth)", []
    if token_file is not None:
        token, warnings = read_token_file(token_file)
        return token, f"--token-file {token_file}", warnings
    if token_env is not None:
        return token_from_env(token_env, env), f"environment variable {token_env}", []
    if DEFAULT_TOKEN_ENV in env:
        return (token_from_env(DEFAULT_TOKEN_ENV, env),
                f"environment variable {DEFAULT_TOKEN_ENV}", [])
    return None, "none", []


def check_tls_files(cert: Path | None, key: Path | None) -> bool:
    """True when TLS is asked for and both files load; False when neither is given."""
    if cert is None and key is None:
        return False
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key",
                                                                          "--tls-cert")
        raise ParameterError(f"{given} needs {missing} too (a PEM certificate and its "
                             "unencrypted private key)")
    for opt, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            with path.open("rb") as f:
                f.read(1)
        except FileNotFoundError:
            raise ParameterError(f"{opt} {path}: no such file") from None
        except IsADirectoryError:
            raise ParameterError(f"{opt} {path}: not a file") from None
        except OSError as exc:
            raise ParameterError(f"{opt} {path}: cannot read it ({exc.strerror})") from None
    asked: list[bool] = []

    def no_passphrase() -> bytes:
        asked.append(True)
        return b""

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except (ssl.SSLError, OSError, ValueError) as exc:
        why = ("the key is encrypted; give an unencrypted key (readable by this user only)"
               if asked else f"{getattr(exc, 'reason', None) or exc}; expected a PEM "
               "certificate and the matching PEM private key")
        raise ParameterError(f"--tls-cert {cert} / --tls-key {key}: cannot load them: "
                             f"{why}") from None
    return True


@dataclass(frozen=True)
class ListenAddress:
    """Where the service will listen: the resolved socket address and its family."""

    host: str
    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]

    @property
    def loopback(self) -> bool:
        """Only this machine can connect (127.0.0.0/8, ::1)."""
        return is_loopback(self.sockaddr[0])


def is_loopback(address: str) -> bool:
    """Whether an IP address (as a socket reports it) is a loopback address."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def resolve_listen_address(host: str, port: int) -> ListenAddress:
    """Resolve ``host`` (IPv4 preferred, as uvicorn does) or raise a ParameterError."""
    if not host or host != host.strip():
        raise ParameterError(f"invalid host: expected a name or an IP address, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ParameterError(f"invalid port: expected an integer in [0, 65535], got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ParameterError(f"cannot listen on host {host!r}: {exc.strerror}") from None
    except (UnicodeError, ValueError) as exc:
        raise ParameterError(f"cannot listen on host {host!r}: {exc}") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise ParameterError(f"cannot listen on host {host!r}: no IPv4 or IPv6 address")
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    return ListenAddress(host, int(family), sockaddr)  # type: ignore[arg-type]


_BIND_HINTS = {
    errno.EADDRINUSE: "another process uses this port; pick another with --port, or "
                      "--port 0 for a free one",
    errno.EACCES: "ports below 1024 need privileges; pick another with --port",
    errno.EADDRNOTAVAIL: "that address does not belong to this machine",
}


def bind_socket(address: ListenAddress, *, backlog: int = 2048) -> socket.socket:
    """A TCP socket bound to ``address`` and listening (hand it to the server).

    Connections that arrive before the server runs wait in the backlog.
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = _BIND_HINTS.get(exc.errno or 0)
        where = format_url("", address.sockaddr[0], address.sockaddr[1])
        raise ParameterError(f"cannot listen on {where}: {exc.strerror or exc}"
                             + (f" ({hint})" if hint else "")) from None
    return sock


def format_url(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` (IPv6 literals in brackets); ``host:port`` without a scheme."""
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}" if scheme else f"{shown}:{port}"


__all__ = ["DEFAULT_TOKEN_ENV", "MIN_TOKEN_CHARS", "ListenAddress", "bind_socket",
           "check_tls_files", "check_token", "format_url", "is_loopback", "read_token_file",
           "resolve_listen_address", "resolve_token", "token_from_env"]
