"""Who is at the other end of a connection, computed once at accept.

The address a connection comes from means different things behind a load balancer (the
PROXY header's source, not the balancer's) and on a dual-stack listener (`::ffff:a.b.c.d`
is the IPv4 client a.b.c.d). Working it out once, as a `Peer`, keeps the session, the
connection limits, the auth penalty and the logs from each deciding it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from geventpop3.core.penalty import source_of
from geventpop3.core.proxy_protocol import ProxyHeader


def client_host(address: tuple[Any, ...]) -> str:
    """The client's address as text; dual-stack listeners see IPv4 clients as ::ffff:a.b.c.d,
    which is a.b.c.d here (in logs and in the limits)."""
    host = str(address[0])
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def source_key(host: str) -> str:
    """What the per-source limits count by: an IPv4 address, or the /64 of an IPv6 one
    (one site gets a whole /64, so counting single IPv6 addresses would be no limit);
    the same sources as the auth penalty's."""
    return source_of(host) or host


@dataclass(frozen=True, slots=True)
class Peer:
    """The client of one connection. Behind a proxy: the client the PROXY header names."""

    address: str  # as logged, limited and penalised (a dual-stack IPv4 client as a.b.c.d)
    port: int
    secure: bool  # TLS already ended before the server (the proxy's PROXY v2 SSL TLV)
    proxied: bool  # the connection came through a load balancer's PROXY header

    @classmethod
    def accepted(cls, address: tuple[Any, ...], proxy: ProxyHeader | None = None) -> Peer:
        """The peer of a connection accepted from socket `address`, after its PROXY header (if any)."""
        if proxy is not None and proxy.source is not None:
            address = proxy.source
        return cls(client_host(address), int(address[1]), proxy is not None and proxy.tls, proxy is not None)

    @property
    def source(self) -> str:
        """The source the per-source limits count by (`source_key`)."""
        return source_key(self.address)
