"""The PROXY protocol parser: the spec's forms, hostile input, and agreement with an
independent implementation (the `proxy-protocol` package) on headers it builds."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.tlv import ProxyProtocolSSLTLV, ProxyProtocolTLV
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from geventpop3.core.proxy_protocol import NEED_MORE, V2_SIGNATURE, ProxyError, ProxyHeader, parse, v1_header, v2_header


def test_v1_tcp4_and_the_bytes_after_it_belong_to_the_client() -> None:
    data = b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 110\r\nCAPA\r\n"
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert (header.version, header.local, header.tls) == (1, False, False)
    assert header.source == ("192.0.2.7", 51234) and header.destination == ("198.51.100.1", 110)
    assert data[header.length:] == b"CAPA\r\n"


def test_v1_tcp6_and_unknown() -> None:
    header = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 995\r\n")
    assert isinstance(header, ProxyHeader) and header.source == ("2001:db8::1", 4000)
    unknown = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
    assert isinstance(unknown, ProxyHeader) and unknown.source is None and not unknown.local


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",  # a field missing
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # IPv6 under TCP4
    b"PROXY TCP4 192.0.2.007 198.51.100.1 1 2\r\n",  # leading zero in an address
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",  # port out of range
    b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # LF without CR
    b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",  # two spaces
    b"USER alice\r\n",  # no header at all
    b"\x16\x03\x01\x02\x00",  # a TLS ClientHello instead of the header
])
def test_v1_malformed_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(line)


def test_v1_without_crlf_within_107_bytes_is_refused() -> None:
    assert parse(b"PROXY TCP4 " + b"1" * 90) is NEED_MORE
    with pytest.raises(ProxyError):
        parse(b"PROXY TCP4 " + b"1" * 200)


def test_v2_proxy_ipv4_ipv6_local_and_ssl_tlv() -> None:
    four = parse(v2_header(("192.0.2.7", 5000), ("198.51.100.1", 995), tls_version="TLSv1.3") + b"rest")
    assert isinstance(four, ProxyHeader)
    assert (four.version, four.source, four.destination, four.tls, four.tls_version) == (
        2, ("192.0.2.7", 5000), ("198.51.100.1", 995), True, "TLSv1.3")
    six = parse(v2_header(("2001:db8::7", 1), ("2001:db8::1", 110)))
    assert isinstance(six, ProxyHeader) and six.source == ("2001:db8::7", 1) and not six.tls
    local = parse(v2_header(None, local=True))
    assert isinstance(local, ProxyHeader) and local.local and local.source is None


def test_v2_ssl_tlv_without_the_client_bit_is_not_tls() -> None:
    body = ipaddress.ip_address("192.0.2.7").packed + ipaddress.ip_address("192.0.2.1").packed
    body += struct.pack("!HH", 1, 2) + struct.pack("!BH", 0x20, 5) + b"\x00\x00\x00\x00\x00"
    header = parse(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, len(body)) + body)
    assert isinstance(header, ProxyHeader) and not header.tls


@pytest.mark.parametrize("data", [
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # IPv4 block too short
    V2_SIGNATURE + b"\x21\x51\x00\x00",  # family 5
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x20\x00",  # truncated TLV
    V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x20\x00\x09\x01",  # TLV past the end
])
def test_v2_malformed_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_every_prefix_of_a_header_needs_more() -> None:
    for header in (v1_header(("192.0.2.7", 1), ("192.0.2.1", 110)),
                   v2_header(("2001:db8::7", 1), ("2001:db8::1", 110), tls_version="TLSv1.2")):
        for cut in range(len(header)):
            assert parse(header[:cut]) is NEED_MORE
        result = parse(header)
        assert isinstance(result, ProxyHeader) and result.length == len(header)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_a_header_more_or_proxyerror(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=4, max_size=200))
def test_arbitrary_v2_bodies_never_crash(tail: bytes) -> None:
    try:
        result = parse(V2_SIGNATURE + tail)
    except ProxyError:
        return
    if isinstance(result, ProxyHeader):
        assert result.length <= len(V2_SIGNATURE) + len(tail)


addresses = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)),
    st.tuples(st.ip_addresses(v=6), st.ip_addresses(v=6)),
)
ports = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(addresses, ports, ports, st.booleans(), st.sampled_from(["TLSv1.2", "TLSv1.3"]))
def test_agrees_with_the_proxy_protocol_package(pair: tuple, sport: int, dport: int, tls: bool, version: str) -> None:
    """Headers built by an independent implementation parse to the same addresses here."""
    src, dst = pair
    kind = ProxyResultIPv4 if src.version == 4 else ProxyResultIPv6
    ssl = ProxyProtocolSSLTLV(has_ssl=True, version=version) if tls else None
    packed = kind((src, sport), (dst, dport), protocol=socket.SOCK_STREAM, tlv=ProxyProtocolTLV(ssl=ssl))
    for data, version_number in ((ProxyProtocolV1().pack(packed), 1), (ProxyProtocolV2().pack(packed), 2)):
        header = parse(data + b"CAPA\r\n")
        assert isinstance(header, ProxyHeader)
        assert header.version == version_number and header.length == len(data)
        assert header.source == (str(src), sport) and header.destination == (str(dst), dport)
        if version_number == 2:
            assert header.tls == tls and header.tls_version == (version if tls else None)


def test_our_v2_headers_parse_in_the_proxy_protocol_package() -> None:
    result = ProxyProtocolV2().unpack(v2_header(("192.0.2.7", 5000), ("198.51.100.1", 995), tls_version="TLSv1.3"))
    assert str(result.source[0]) == "192.0.2.7" and result.source[1] == 5000
    assert result.tlv.ssl.has_ssl and result.tlv.ssl.version == "TLSv1.3"
