"""Listening sockets for every server of the process: defaults, explicit addresses, shared ports, errors."""

from __future__ import annotations

import logging
import socket

import pytest
from helpers import ipv6_loopback

from geventpop3.net.listen import LOOPBACK, describe, open_listeners

# A documentation address (RFC 3849): assigned to no interface here, so binding it fails
# the way ::1 fails on a host without IPv6 (EADDRNOTAVAIL). Nothing is ever sent to it.
UNASSIGNED_IPV6 = "2001:db8::1"


def close_all(listeners: list[socket.socket]) -> None:
    for sock in listeners:
        sock.close()


def test_default_addresses_skip_an_ipv6_address_this_host_cannot_bind(caplog: pytest.LogCaptureFixture) -> None:
    """The MSMP default (127.0.0.1 and ::1) must not stop a host without IPv6 from starting."""
    caplog.set_level(logging.INFO)
    listeners = open_listeners(None, 0, "MSMP", defaults=("127.0.0.1", UNASSIGNED_IPV6))
    try:
        assert [sock.getsockname()[0] for sock in listeners] == ["127.0.0.1"]
        assert any("MSMP" in record.getMessage() and UNASSIGNED_IPV6 in record.getMessage()
                   for record in caplog.records)
    finally:
        close_all(listeners)


def test_an_explicit_address_that_cannot_be_bound_is_an_error() -> None:
    with pytest.raises(OSError, match=f"cannot listen for MSMP on {UNASSIGNED_IPV6} port"):
        open_listeners(["127.0.0.1", UNASSIGNED_IPV6], 0, "MSMP")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_loopback_defaults_share_one_ephemeral_port() -> None:
    listeners = open_listeners(None, 0, "MSMP", defaults=LOOPBACK)
    try:
        assert sorted(sock.getsockname()[0] for sock in listeners) == ["127.0.0.1", "::1"]
        assert len({sock.getsockname()[1] for sock in listeners}) == 1
        assert describe(listeners[1]).startswith("[::1]:")
    finally:
        close_all(listeners)


def test_no_addresses_and_no_defaults_is_one_wildcard_socket() -> None:
    listeners = open_listeners(None, 0, "POP3")
    try:
        assert len(listeners) == 1
        assert listeners[0].getsockname()[0] in ("::", "0.0.0.0")
        port = listeners[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # IPv4 clients reach it whatever the family
    finally:
        close_all(listeners)


def test_a_port_in_use_names_the_label_address_and_port() -> None:
    [taken] = open_listeners(["127.0.0.1"], 0, "POP3")
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen for POP3 on 127.0.0.1 port {port}"):
            open_listeners(["127.0.0.1"], port, "POP3")
    finally:
        taken.close()

