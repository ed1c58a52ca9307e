"""Every listening socket of the server (POP3, MSMP, metrics): one place that resolves and binds.

A host name binds every address it resolves to. With port 0 the first listener picks
a free port and the others reuse it, so one number reaches every address. gevent
sockets are used whether or not the process is monkey-patched, so a StreamServer
never accepts on a blocking socket.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

from gevent import socket

log = logging.getLogger(__name__)

BACKLOG = 4096
# MSMP and metrics listen here unless told otherwise; ::1 is skipped quietly where IPv6 is missing.
LOOPBACK = ("127.0.0.1", "::1")


def open_listeners(addresses: Sequence[str] | None, port: int, label: str,
                   defaults: Sequence[str] | None = None, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening sockets for `label` ("POP3", "MSMP"...) on `addresses` and `port`.

    No addresses: the `defaults` if given (an IPv6 one that cannot be bound on this
    host is skipped with a log line), else one socket on all interfaces of both
    families. An address given explicitly that cannot be bound raises OSError whose
    text names the label, address and port. Nothing is leaked on failure.
    """
    if not addresses and not defaults:
        return [_wildcard(port, label, backlog)]
    optional_ipv6 = not addresses
    listeners: list[socket.socket] = []
    requested = port
    try:
        for address in addresses or defaults or ():
            try:
                bound = _bind_all(address, port, backlog, shared_port=requested == 0 and port != 0)
            except OSError as exc:
                if optional_ipv6 and ":" in address and _ipv6_unavailable(exc):
                    log.info("%s: IPv6 address %s unavailable (%s), skipped", label, address, exc)
                    continue
                raise _listen_error(label, address, port, exc) from None
            listeners.extend(bound)
            if bound and port == 0:
                port = bound[0].getsockname()[1]
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def describe(sock: socket.socket) -> str:
    """`host:port` of a listener for the log, with IPv6 hosts in brackets."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wildcard(port: int, label: str, backlog: int) -> socket.socket:
    dualstack = socket.has_dualstack_ipv6()
    family, host = (socket.AF_INET6, "::") if dualstack else (socket.AF_INET, "0.0.0.0")
    try:
        return _listener(family, host, port, backlog, dualstack=dualstack)
    except OSError as exc:
        raise _listen_error(label, host, port, exc) from None


def _endpoints(address: str) -> list[tuple[int, str]]:
    """(family, host) to bind for an address or host name: every address it resolves to, once."""
    infos = socket.getaddrinfo(address, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    found: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        host = str(sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and (family, host) not in found:
            found.append((family, host))
    return found


def _listener(family: int, host: str, port: int, backlog: int, dualstack: bool = False) -> socket.socket:
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


def _bind_all(address: str, port: int, backlog: int, shared_port: bool) -> list[socket.socket]:
    """Listeners for every address `address` resolves to; with `shared_port` (an ephemeral
    port picked for an earlier address) fall back to a fresh ephemeral port if that one is
    taken here."""
    listeners: list[socket.socket] = []
    try:
        for family, host in _endpoints(address):
            try:
                listeners.append(_listener(family, host, port, backlog))
            except OSError as exc:
                if not shared_port or exc.errno != errno.EADDRINUSE:
                    raise
                listeners.append(_listener(family, host, 0, backlog))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _ipv6_unavailable(exc: OSError) -> bool:
    return isinstance(exc, socket.gaierror) or exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


def _listen_error(label: str, address: str, port: int, exc: OSError) -> OSError:
    if isinstance(exc, socket.gaierror):
        return OSError(exc.errno, f"cannot resolve {label} listen address {address!r}: {exc.strerror}")
    return OSError(exc.errno, f"cannot listen for {label} on {address} port {port}: {exc.strerror or exc}")
