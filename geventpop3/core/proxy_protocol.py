"""The PROXY protocol (HAProxy's, versions 1 and 2), sans-IO: what a load balancer in front
says about the client before the client's own bytes.

`parse(data)` looks at the bytes received so far and answers `NEED_MORE`, or a `ProxyHeader`
with the number of bytes it used (the rest belongs to the client: POP3 commands or a TLS
ClientHello), or raises `ProxyError`. It never asks for more than a header can hold
(107 bytes for v1, 16 + 65535 for v2 where the length field allows), so a peer cannot make
the reader buffer without bound. Only the parts geventpop3 uses are decoded: the command
(PROXY or LOCAL), the client and server addresses of TCP over IPv4/IPv6, and whether the
v2 SSL TLV says the client spoke TLS to the proxy.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included
_V2_FIXED: Final = 16
_PP2_TYPE_SSL: Final = 0x20
_PP2_SUBTYPE_SSL_VERSION: Final = 0x21
_PP2_CLIENT_SSL: Final = 0x01
_TCP_ADDRESS_BYTES: Final = {0x11: 4, 0x21: 16}  # family/protocol byte of TCP over IPv4, IPv6 -> address size


class ProxyError(ValueError):
    """Not a PROXY header, or a malformed one: the connection is closed."""


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = _NeedMore()


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy said. `local`: the proxy's own connection (a health check): no client
    addresses, the connection is the proxy's. `source`/`destination` are None when the proxy
    does not know them (v1 UNKNOWN, v2 UNSPEC or a non-TCP family)."""

    version: int
    local: bool
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int  # bytes of the header in the stream
    tls: bool = False  # v2 SSL TLV with the client-SSL bit: the client used TLS up to the proxy
    tls_version: str | None = None


def parse(data: bytes) -> ProxyHeader | _NeedMore:
    """The header at the start of `data`, NEED_MORE, or ProxyError."""
    probe = min(len(data), len(V2_SIGNATURE))
    if data[:probe] == V2_SIGNATURE[:probe]:
        return NEED_MORE if probe < len(V2_SIGNATURE) else _parse_v2(data)
    probe = min(len(data), len(V1_PREFIX))
    if data[:probe] == V1_PREFIX[:probe]:
        return NEED_MORE if probe < len(V1_PREFIX) else _parse_v1(data)
    raise ProxyError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | _NeedMore:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("PROXY v1 line too long or not ended by CRLF")
        return NEED_MORE
    fields = data[:end].split(b" ")
    length = end + 2
    if fields[1:2] == [b"UNKNOWN"]:  # the rest of the line may hold anything and is ignored
        return ProxyHeader(1, False, None, None, length)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("PROXY v1: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family = 4 if fields[1] == b"TCP4" else 6
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(1, False, source, destination, length)


def _v1_address(raw: bytes, family: int) -> str:
    try:
        address = ipaddress.ip_address(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("PROXY v1: bad address") from None
    if address.version != family:
        raise ProxyError("PROXY v1: address of the other family")
    return str(address)


def _v1_port(raw: bytes) -> int:
    # digits only, no sign, no leading zero (the spec's form), 0-65535
    if not raw.isdigit() or len(raw) > 5 or (len(raw) > 1 and raw[:1] == b"0") or int(raw) > 65535:
        raise ProxyError("PROXY v1: bad port")
    return int(raw)


def _parse_v2(data: bytes) -> ProxyHeader | _NeedMore:
    if len(data) < _V2_FIXED:
        return NEED_MORE
    version_command, family_protocol, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyError("PROXY v2: unknown version")
    command = version_command & 0x0F
    if command > 1:
        raise ProxyError("PROXY v2: unknown command")
    length = _V2_FIXED + size
    if len(data) < length:
        return NEED_MORE
    body = data[_V2_FIXED:length]
    if command == 0:  # LOCAL: the proxy's own connection; whatever follows is skipped
        return ProxyHeader(2, True, None, None, length)
    width = _TCP_ADDRESS_BYTES.get(family_protocol)
    if width is None:
        if family_protocol >> 4 > 3 or family_protocol & 0x0F > 2:
            raise ProxyError("PROXY v2: unknown address family or protocol")
        return ProxyHeader(2, False, None, None, length)  # UNSPEC, UDP or UNIX: no TCP client address
    used = 2 * width + 4
    if size < used:
        raise ProxyError("PROXY v2: address block too short")
    sport, dport = struct.unpack_from("!HH", body, 2 * width)
    source = (str(ipaddress.ip_address(body[:width])), sport)
    destination = (str(ipaddress.ip_address(body[width:2 * width])), dport)
    tls, tls_version = _ssl_tlv(body[used:])
    return ProxyHeader(2, False, source, destination, length, tls, tls_version)


def _tlvs(block: bytes) -> list[tuple[int, bytes]]:
    items = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyError("PROXY v2: truncated TLV")
        kind, size = struct.unpack_from("!BH", block, offset)
        offset += 3
        if len(block) - offset < size:
            raise ProxyError("PROXY v2: TLV longer than the header")
        items.append((kind, block[offset:offset + size]))
        offset += size
    return items


def _ssl_tlv(block: bytes) -> tuple[bool, str | None]:
    """(client used TLS, its version) from the PP2_TYPE_SSL TLV, if any."""
    for kind, value in _tlvs(block):
        if kind != _PP2_TYPE_SSL:
            continue
        if len(value) < 5:
            raise ProxyError("PROXY v2: SSL TLV too short")
        if not value[0] & _PP2_CLIENT_SSL:
            return False, None
        version = None
        for sub_kind, sub_value in _tlvs(value[5:]):
            if sub_kind == _PP2_SUBTYPE_SSL_VERSION:
                version = sub_value.decode("ascii", "replace")[:32]
        return True, version
    return False, None


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header (for tests and load tools that play the proxy)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] | None = None, *,
              local: bool = False, tls_version: str | None = None) -> bytes:
    """A v2 header (for tests and load tools); `tls_version` adds an SSL TLV with the client-SSL bit."""
    if local or source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 if local else 0x21, 0x00, 0)
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    if tls_version is not None:
        sub = struct.pack("!BH", _PP2_SUBTYPE_SSL_VERSION, len(tls_version)) + tls_version.encode("ascii")
        value = bytes([_PP2_CLIENT_SSL]) + b"\x00\x00\x00\x00" + sub
        body += struct.pack("!BH", _PP2_TYPE_SSL, len(value)) + value
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body
