"""Peer: who the client is, worked out once at accept (dual-stack listeners, PROXY headers)."""

from __future__ import annotations

from geventpop3.core.peer import Peer
from geventpop3.core.proxy_protocol import ProxyHeader


def header(source: tuple[str, int] | None, tls: bool = False) -> ProxyHeader:
    return ProxyHeader(version=2, local=False, source=source, destination=("192.0.2.1", 110), length=28, tls=tls)


def test_a_direct_client_is_the_socket_address() -> None:
    assert Peer.accepted(("198.51.100.7", 40000)) == Peer("198.51.100.7", 40000, secure=False, proxied=False)


def test_an_ipv4_client_of_a_dual_stack_listener_is_its_ipv4_address() -> None:
    peer = Peer.accepted(("::ffff:198.51.100.7", 40000, 0, 0))
    assert (peer.address, peer.port, peer.source) == ("198.51.100.7", 40000, "198.51.100.7")


def test_an_ipv6_client_counts_by_its_64() -> None:
    assert Peer.accepted(("2001:db8::1", 1, 0, 0)).source == Peer.accepted(("2001:db8::2", 2, 0, 0)).source \
        == "2001:db8::/64"


def test_behind_a_proxy_the_client_is_the_one_the_header_names() -> None:
    peer = Peer.accepted(("127.0.0.1", 5000), header(("203.0.113.9", 51000), tls=True))
    assert peer == Peer("203.0.113.9", 51000, secure=True, proxied=True)


def test_a_header_that_names_no_client_leaves_the_proxy_as_the_peer() -> None:
    peer = Peer.accepted(("127.0.0.1", 5000), header(None))
    assert peer == Peer("127.0.0.1", 5000, secure=False, proxied=True)
