"""Loopback ports for tests and load runs: free ones, and whether something answers on one.

A server started by `geventpop3.testing.launcher` binds port 0 and says which port it got,
so these are for what cannot do that: a port that must be the same on 127.0.0.1 and ::1,
kept across a restart, or given to another program (HAProxy, PostgreSQL, POP3S).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (another process may take it before it is used)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def free_dual_port() -> int:
    """A port free on both 127.0.0.1 and ::1 right now (just the IPv4 one without IPv6)."""
    if not ipv6_loopback():
        return free_port()
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe6:
                probe6.bind(("::1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on both loopback families")


def ipv6_loopback() -> bool:
    """True if this host can bind ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def greets(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server on host:port answers a new connection with +OK (POP3's greeting)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1) as sock:
        return sock.recv(512).startswith(b"+OK")
    return False


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something true, or raise AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
