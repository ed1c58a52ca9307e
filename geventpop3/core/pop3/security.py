"""Is this connection secure, and may it send a password in the clear? (no I/O)

The rule of the TLS spec: a connection is secure when it is TLS (implicit, or after
STLS), when the client's address equals the server's address on that connection (a
local client), or when the client's address is in `trusted_networks`. With
`plaintext_auth = tls` only secure connections may use USER/PASS and AUTH PLAIN/LOGIN.
Settings are read at each question, so an MSMP `SET` applies to open sessions too.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> Address | None:
    """An IP address (IPv4-mapped IPv6 as IPv4, zone dropped), None for what is not one.
    Cached: asked per connection, about the same few addresses most of the time."""
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ConnectionSecurity:
    """What the POP3 core asks about its connection; the session fills it in."""

    __slots__ = ("settings", "client", "local", "tls", "tls_available")

    def __init__(self, settings: Any, client: str = "", server: str = "", tls: bool = False,
                 tls_available: bool = False) -> None:
        self.settings = settings  # reads plaintext_auth and trusted_networks; None: plaintext always allowed
        self.client = client  # parsed only if trusted_networks must be asked
        self.local = _same_host(client, server)
        self.tls = tls  # the connection is TLS now
        self.tls_available = tls_available  # a certificate is configured: STLS can be offered

    def secure(self) -> bool:
        if self.tls or self.local:
            return True
        if self.settings is None or not self.settings.trusted_networks:
            return False
        client = parse_address(self.client)
        return client is not None and any(client in network for network in self.settings.trusted_networks)

    def plaintext_allowed(self) -> bool:
        """USER/PASS and AUTH PLAIN/LOGIN may be used on this connection now."""
        settings = self.settings
        return settings is None or settings.plaintext_auth == "always" or self.secure()

    @property
    def offer_stls(self) -> bool:
        return self.tls_available and not self.tls


def _same_host(client: str, server: str) -> bool:
    """The client is on the server's own address: the same text, or the same IP once
    parsed (an IPv4-mapped form, a zone); only the rare unequal texts are parsed."""
    if not client or not server:
        return False
    if client == server:
        return True
    if ":" not in client and ":" not in server:  # two different dotted IPv4 addresses
        return False
    parsed = parse_address(client)
    return parsed is not None and parsed == parse_address(server)
