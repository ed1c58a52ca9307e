"""Listening sockets for the POP3 and MSMP servers: one place that resolves and binds.

A host name binds every address it resolves to. gevent sockets are used whether or not
the process is monkey-patched, so a StreamServer never accepts on a blocking socket.
"""

from __future__ import annotations

import errno

from gevent import socket


def endpoints(address: str) -> list[tuple[int, str]]:
    """(family, host) to bind for an address or host name: every address it resolves to, once."""
    infos = socket.getaddrinfo(address, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    found: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in found:
            found.append((family, sockaddr[0]))
    return found


def listener(family: int, host: str, port: int, backlog: int, dualstack: bool = False) -> socket.socket:
    """A listening socket with SO_REUSEADDR; an IPv6 one takes IPv4 clients too only if `dualstack`."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind(address: str, port: int, backlog: int, shared_port: bool = False) -> list[socket.socket]:
    """Listeners for every address `address` resolves to; with `shared_port` (an ephemeral
    port picked for an earlier address) fall back to a fresh ephemeral port if that one is
    taken here. Raises OSError (socket.gaierror if it does not resolve), leaking nothing."""
    listeners: list[socket.socket] = []
    try:
        for family, host in endpoints(address):
            try:
                listeners.append(listener(family, host, port, backlog))
            except OSError as exc:
                if not shared_port or exc.errno != errno.EADDRINUSE:
                    raise
                listeners.append(listener(family, host, 0, backlog))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners
