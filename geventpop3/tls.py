"""The server's TLS: building and holding the SSLContext, and one connection's handshake.

The context is built here, in our own code, not by StreamServer's ssl arguments: the
handshake then runs under our deadline (a client that sends garbage or nothing is
closed), a PROXY header can later be read before it, and `ServerTls.context` is the
one place a reload swaps the certificate (a connection keeps the context it was
wrapped with). Start-up checks go through `ServerTls.load` too, so a bad certificate
or key is reported in the words used for a reload.
"""

from __future__ import annotations

import os
import ssl
import stat
import typing

import gevent
import gevent.ssl

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
        raise TlsError(f"cannot read {exc.filename or cert}: no such file") from None
    except PermissionError as exc:
        raise TlsError(f"cannot read {exc.filename or cert}: permission denied") from None
    except ssl.SSLError as exc:
        raise TlsError(f"certificate {cert} and key {key} do not load as a pair: {_ssl_reason(exc)}") from None
    except OSError as exc:
        raise TlsError(f"cannot read certificate {cert} or key {key}: {exc.strerror or exc}") from None
    return context


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
    """The certificate and key paths and the context new connections get.

    Follows `tls_min_version`: a change builds a new context (open connections keep
    theirs), so a later certificate reload is the same swap.
    """

    def __init__(self, cert: str, key: str, min_version: str = "TLSv1.2") -> None:
        self.cert = cert
        self.key = key
        self.context = build_context(cert, key, min_version)

    def follow(self, settings: typing.Any) -> None:
        """Rebuild on every change of `tls_min_version` in `settings`."""
        self.reload(settings.tls_min_version)

        def on_change(key: str, old: object, new: object) -> None:
            if key == "tls_min_version" and old != new:
                self.reload(str(new))

        settings.subscribe(on_change)

    def reload(self, min_version: str) -> None:
        """A new context from the files; on TlsError the current one stays."""
        self.context = build_context(self.cert, self.key, min_version)


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


def describe(tls: ssl.SSLSocket | None) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384` for the logs, `no` for a plain connection."""
    if tls is None:
        return "no"
    cipher = tls.cipher()
    return f"{tls.version()}/{cipher[0] if cipher else '?'}"
