"""The PROXY protocol header of a connection from a load balancer, read off the socket before
anything else (before the greeting, before a POP3S handshake).

Only the header's own bytes are taken from the socket: the reader peeks, and consumes only
what the parser says is header, so the client's first bytes (a ClientHello on POP3S)
stay for the session. A peek that shows an incomplete header is all header, so it is
consumed and the next wait is for new bytes (no busy loop on the same peeked bytes).
"""

from __future__ import annotations

import socket

import gevent

from geventpop3.core.proxy_protocol import NEED_MORE, ProxyError, ProxyHeader, parse

HEADER_TIMEOUT = 3.0  # seconds for the whole header (a proxy sends it at once)
MAX_HEADER = 4096  # bytes: HAProxy's headers, TLVs included, are a few hundred at most


def read_header(sock: socket.socket, timeout: float = HEADER_TIMEOUT) -> ProxyHeader:
    """The header at the start of the connection; ProxyError if it is missing, malformed,
    too long or late."""
    taken = b""
    with gevent.Timeout(timeout, ProxyError(f"no complete PROXY header within {timeout:g} s")):
        while True:
            try:
                peeked = sock.recv(MAX_HEADER - len(taken), socket.MSG_PEEK)
            except OSError as exc:
                raise ProxyError(f"connection failed before the PROXY header: {exc.strerror}") from None
            if not peeked:
                raise ProxyError("connection closed before the PROXY header")
            result = parse(taken + peeked)
            if isinstance(result, ProxyHeader):
                _consume(sock, result.length - len(taken))
                return result
            assert result is NEED_MORE
            if len(taken) + len(peeked) >= MAX_HEADER:
                raise ProxyError("PROXY header too long")
            taken += _consume(sock, len(peeked))


def _consume(sock: socket.socket, size: int) -> bytes:
    """Take `size` bytes already peeked (they are in the kernel's buffer: no wait)."""
    chunks = []
    while size > 0:
        chunk = sock.recv(size)
        if not chunk:
            raise ProxyError("connection closed inside the PROXY header")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
