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
    """A server-side context from the files `cert` and `key` (read now, by this process)."""
    cert_pem, key_pem = read_pair(cert, key)
    return context_from_pem(cert_pem, key_pem, min_version, cert, key)


def context_from_pem(cert_pem: bytes, key_pem: bytes, min_version: str = "TLSv1.2", cert: str = "certificate",
                     key: str = "key") -> ssl.SSLContext:
    """A server-side context: no compression, no renegotiation, Python's default ciphers
    with the server's preference, `min_version` or newer, and the certificate chain and key
    given as bytes (`cert` and `key` only name them in errors).

    The bytes reach OpenSSL through an anonymous memory file opened as /proc/self/fd/N
    (load_cert_chain takes paths only): a process that cannot read the key file (the
    server's user, when the key is root's) gets the key from the privileged side (the
    keeper, geventpop3.process.keeper) and never needs a file of its own."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    fd = os.memfd_create("geventpop3-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(cert_pem + b"\n" + key_pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise TlsError(f"certificate {cert} and key {key} do not load as a pair: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsError(f"cannot load certificate {cert} and key {key}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return context


def read_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    """The bytes of the certificate file and of the key file; TlsError naming the one that cannot be read."""
    return _read(cert), _read(key)


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


class ServerTls:
    """The certificate and key paths, the context new connections get, and its expiry.

    The context is built from bytes (`use`), kept with it so that a change of
    `tls_min_version` rebuilds it without reading the files again: only the process that
    started the server (root, or the keeper it leaves behind) needs to read the key file.
    `reload()` reads the files (the keeper's way, and a process that can read them);
    `use(cert_pem, key_pem)` takes bytes read elsewhere. Open connections keep the context
    they were wrapped with.
    """

    def __init__(self, cert: str, key: str, min_version: str = "TLSv1.2") -> None:
        self.cert = cert
        self.key = key
        self.min_version = min_version
        self.cert_pem, self.key_pem = b"", b""
        self.reload(min_version)

    def follow(self, settings: typing.Any) -> None:
        """Rebuild on every change of `tls_min_version` in `settings` (now, if a restored
        SET differs: TlsError then). A live change whose rebuild fails is logged and the
        current context stays."""
        if settings.tls_min_version != self.min_version:
            self.use(self.cert_pem, self.key_pem, settings.tls_min_version)

        def on_change(key: str, old: object, new: object) -> None:
            if key == "tls_min_version" and old != new:
                try:
                    self.use(self.cert_pem, self.key_pem, str(new))
                except TlsError as exc:
                    log.error("tls_min_version %s not applied, the current context stays: %s", new, exc)

        settings.subscribe(on_change)

    def reload(self, min_version: str | None = None) -> None:
        """A new context from the files (and `min_version`, default the current one),
        swapped in only once it loaded; on TlsError everything stays as it was.

        A renewal may replace the two files between the reads of the certificate and the
        key: a pair that does not load is read again (up to three times) if a file changed."""
        version = self.min_version if min_version is None else min_version
        for attempt in range(3):
            pair = read_pair(self.cert, self.key)
            try:
                self.use(*pair, version)
                return
            except TlsError:
                if attempt == 2 or read_pair(self.cert, self.key) == pair:
                    raise

    def use(self, cert_pem: bytes, key_pem: bytes, min_version: str | None = None) -> None:
        """The context of this certificate and key (bytes), swapped in only once it loaded."""
        version = self.min_version if min_version is None else min_version
        context = context_from_pem(cert_pem, key_pem, version, self.cert, self.key)
        expiry = not_after(cert_pem, self.cert)
        self.context, self.not_after, self.min_version = context, expiry, version
        self.cert_pem, self.key_pem = cert_pem, key_pem

    def days_left(self, now: float | None = None) -> int:
        """Whole days until the certificate expires (negative once it has)."""
        return int((self.not_after - (time.time() if now is None else now)) // 86400)

    def seconds_left(self, now: float | None = None) -> float:
        return self.not_after - (time.time() if now is None else now)


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
