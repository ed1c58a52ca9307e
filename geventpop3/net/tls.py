"""The server's TLS: building and holding the SSLContext, and one connection's handshake.

The context is built here, in our own code, not by StreamServer's ssl arguments: the
handshake then runs under our deadline (a client that sends garbage or nothing is
closed), a PROXY header can later be read before it, and `ServerTls.context` is the
one place a reload swaps the certificate (a connection keeps the context it was
wrapped with). Start-up checks go through `load()` too, so a bad certificate
or key is reported in the words used for a reload.

A POP3 connection's TLS is `accept()`: the bare SSL object (what `ssl.SSLSocket` wraps)
over the bare descriptor, no `SSLSocket` and no gevent socket around them. A held TLS
session is mostly OpenSSL's own state (about 14 KiB with OpenSSL 3.0); gevent's
SSLSocket added about 0.5 KiB of Python objects to each (a socket wrapper with its own
two I/O watchers, an attribute dict, weak references), which the session's transport
does not need: it waits on the event loop itself (see geventpop3.net.transport). The SSL
object is made by `SSLContext._wrap_socket`, the call `ssl.SSLSocket` and gevent's
SSLSocket make themselves (CPython 3.7 and later). MSMP's few connections keep the
plain `handshake()`, an SSLSocket its blocking-style code reads lines from.

A reload (SIGHUP, MSMP `RELOAD`) builds a complete new context from the same paths
and swaps it in only if it loads; the certificate's notAfter comes with it (read with
`cryptography`, which parses the PEM the same way everywhere), so the expiry the
server reports is always that of the certificate new connections get.
"""

from __future__ import annotations

import _socket
import logging
import os
import socket
import ssl
import stat
import time
import typing

import gevent
import gevent.ssl
from gevent.socket import wait_read, wait_write

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0  # seconds a client has for its whole TLS handshake

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """The certificate or key cannot be used: one line for the operator."""


class HandshakeFailed(Exception):
    """A client's TLS handshake failed or took too long; str() says which, for the log."""


def build_context(cert: str, key: str, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server-side context: no compression, no renegotiation, Python's default ciphers
    with the server's preference, `min_version` or newer, and the certificate chain."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsError(f"cannot read {exc.filename or _unreadable(cert, key)}: no such file") from None
    except PermissionError as exc:
        raise TlsError(f"cannot read {exc.filename or _unreadable(cert, key)}: permission denied") from None
    except ssl.SSLError as exc:
        raise TlsError(f"certificate {cert} and key {key} do not load as a pair: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsError(f"cannot read certificate {cert} or key {key}: {exc.strerror or exc}") from None
    return context


def _unreadable(cert: str, key: str) -> str:
    """Which of the two files cannot be opened (ssl's errors do not say)."""
    for path in (cert, key):
        try:
            with open(path, "rb"):
                pass
        except OSError:
            return path
    return cert


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    return str(reason).replace("_", " ").lower()


def key_permission_warning(key: str) -> str | None:
    """A warning when the private key can be read by others than the server's user."""
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"TLS key {key} is readable by others than the server's user (mode {stat.S_IMODE(mode):04o})"
    return None


def reload_warning(paths: typing.Iterable[str], uid: int, gid: int, user: str) -> str | None:
    """A warning when `user` (whom --run-as drops to) cannot read a certificate or key
    file: the start reads them as root, but a later reload would fail and keep the old one."""
    groups = set(os.getgrouplist(user, gid))
    for path in dict.fromkeys(paths):
        try:
            info = os.stat(path)
        except OSError:
            continue
        mode = info.st_mode
        readable = (info.st_uid == uid and mode & stat.S_IRUSR) or (
            info.st_uid != uid and info.st_gid in groups and mode & stat.S_IRGRP) or (
            info.st_uid != uid and info.st_gid not in groups and mode & stat.S_IROTH)
        if not readable:
            return (f"TLS file {path} is not readable by {user} (--run-as): the server starts, "
                    "but a certificate reload will fail (see docs/deploy.md)")
    return None


class ServerTls:
    """The certificate and key paths, the context new connections get, and its expiry.

    `reload()` is the one way the context changes: at a certificate reload and at every
    change of `tls_min_version`. Open connections keep the context they were wrapped with.
    """

    def __init__(self, cert: str, key: str, min_version: str = "TLSv1.2") -> None:
        self.cert = cert
        self.key = key
        self.min_version = min_version
        self.context, self.not_after = load(cert, key, min_version)

    def follow(self, settings: typing.Any) -> None:
        """Rebuild on every change of `tls_min_version` in `settings` (now, if a restored
        SET differs: TlsError then). A live change whose rebuild fails is logged and the
        current context stays."""
        if settings.tls_min_version != self.min_version:
            self.reload(settings.tls_min_version)

        def on_change(key: str, old: object, new: object) -> None:
            if key == "tls_min_version" and old != new:
                try:
                    self.reload(str(new))
                except TlsError as exc:
                    log.error("tls_min_version %s not applied, the current context stays: %s", new, exc)

        settings.subscribe(on_change)

    def reload(self, min_version: str | None = None) -> None:
        """A new context from the files (and `min_version`, default the current one),
        swapped in only once it loaded; on TlsError everything stays as it was."""
        version = self.min_version if min_version is None else min_version
        context, not_after = load(self.cert, self.key, version)
        self.context, self.not_after, self.min_version = context, not_after, version

    def days_left(self, now: float | None = None) -> int:
        """Whole days until the certificate expires (negative once it has)."""
        return int((self.not_after - (time.time() if now is None else now)) // 86400)

    def seconds_left(self, now: float | None = None) -> float:
        return self.not_after - (time.time() if now is None else now)


def load(cert: str, key: str, min_version: str) -> tuple[ssl.SSLContext, float]:
    """The context for `cert` and `key` and the leaf's notAfter (Unix time); TlsError if unusable.

    The certificate file is read before and after the context loads it: should a renewal
    replace it in between, the load is repeated, so the expiry is the loaded certificate's.
    """
    for _ in range(3):
        before = _read(cert)
        context = build_context(cert, key, min_version)
        if _read(cert) == before:
            return context, not_after(before, cert)
    raise TlsError(f"certificate {cert} keeps changing while it is loaded")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TlsError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}") from None


def not_after(pem: bytes, cert: str = "certificate") -> float:
    """The notAfter of the first (leaf) certificate in `pem`, as Unix time."""
    from cryptography import x509  # here: 25 ms of imports a server without TLS never needs

    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError):
        raise TlsError(f"no PEM certificate in {cert}") from None
    return leaf.not_valid_after_utc.timestamp()


class TlsSocket(_socket.socket):
    """The descriptor of a TLS connection as the SSL object needs it: the C socket, made
    weak-referenceable (the SSL object refers to its socket weakly), with no gevent
    wrapper and no I/O watchers of its own. Always non-blocking: an SSL call that would
    wait raises SSLWantReadError/SSLWantWriteError, and the caller waits on the event loop."""

    __slots__ = ("__weakref__",)


class Connection(typing.Protocol):
    """The server side of one TLS connection: the `_ssl._SSLSocket` that `ssl.SSLSocket` wraps."""

    def do_handshake(self) -> None: ...

    def read(self, size: int) -> bytes: ...

    def write(self, data: bytes | memoryview) -> int: ...

    def pending(self) -> int: ...

    def shutdown(self) -> object: ...

    def cipher(self) -> tuple[str, str, int] | None: ...

    def version(self) -> str | None: ...


def accept(sock: socket.socket, context: ssl.SSLContext,
           timeout: float = HANDSHAKE_TIMEOUT) -> tuple[TlsSocket, Connection]:
    """The server side of TLS on `sock`'s descriptor, handshake done within `timeout` seconds.

    `sock` (a gevent socket) is detached: the descriptor now belongs to the returned
    TlsSocket, which the returned Connection reads and writes. Raises HandshakeFailed
    (the descriptor is then closed), as `handshake()` does.
    """
    raw = TlsSocket(sock.family, sock.type, sock.proto, sock.detach())
    try:
        raw.setblocking(False)
        connection = typing.cast(Connection, context._wrap_socket(raw, True))  # type: ignore[attr-defined]
        fd = raw.fileno()
        with gevent.Timeout(timeout, HandshakeFailed("timed out")):
            while True:
                try:
                    connection.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    wait_read(fd)
                except ssl.SSLWantWriteError:
                    wait_write(fd)
    except HandshakeFailed:
        raw.close()
        raise
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; reset by peer, EOF
        raw.close()
        raise HandshakeFailed(_ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)) from None
    except BaseException:  # GreenletExit at shutdown: the descriptor is not left to the garbage collector
        raw.close()
        raise
    return raw, connection


def handshake(sock: typing.Any, context: ssl.SSLContext, timeout: float = HANDSHAKE_TIMEOUT) -> ssl.SSLSocket:
    """`sock` wrapped as the server side of TLS, handshake done within `timeout` seconds.

    Raises HandshakeFailed (the socket is then closed): the caller only logs and drops
    the connection, nothing is ever sent in plaintext after this starts.
    """
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        with gevent.Timeout(timeout, HandshakeFailed("timed out")):
            tls.do_handshake()
    except HandshakeFailed:
        tls.close()
        raise
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; reset by peer, EOF
        tls.close()
        raise HandshakeFailed(_ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)) from None
    return tls


def describe(tls: ssl.SSLSocket | Connection | None) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` for the logs, `no` for a plain connection."""
    if tls is None:
        return "no"
    cipher = tls.cipher()
    return f"{tls.version()}/{cipher[0] if cipher else '?'}"
