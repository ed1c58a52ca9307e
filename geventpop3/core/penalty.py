"""The authentication penalty: failed logins from one source slow its next answers.

As Dovecot's auth penalty: each failed login (POP3 or MSMP) from a source is answered
after `login_failure_delay` seconds, doubled for every earlier failure of that source
(2, 4, 8 ... seconds), at most `auth_penalty_max`. A source is an IPv4 address (/32) or
an IPv6 /64, so an attacker cannot dodge it by reconnecting, nor by hopping through the
addresses of one IPv6 network. A source with no failure for `auth_penalty_forget`
seconds is forgotten; a successful login forgets its source at once.

Memory is bounded: at most `auth_penalty_sources` sources are tracked, the one whose
last failure is oldest is dropped first. Reconnecting sessions only read and write a
dict here: no I/O, so both protocol cores stay free of it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from geventpop3.core.metrics import Metrics
    from geventpop3.core.settings import Settings

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}\Z")
IPV4_PREFIX = 32
IPV6_PREFIX = 64
_MAX_DOUBLINGS = 30  # 2**30 times any base is past any cap: keeps the float finite


def source_of(address: str) -> str | None:
    """The source of a client address, what per-source limits and penalties count by:
    `a.b.c.d` or `x:x:x:x::/64`; None if not an IP.

    An IPv4 client seen through a dual-stack listener (`::ffff:a.b.c.d`) is its IPv4
    source. Called for every connection and login: a dotted address is taken as it is
    (sockets give well-formed ones; anything else is checked), the rest is cached."""
    if _DOTTED_QUAD.match(address):
        return address
    return _parsed_source(address)


@functools.lru_cache(maxsize=4096)
def _parsed_source(address: str) -> str | None:
    host = address.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.ip_network((ip, IPV4_PREFIX), strict=False).network_address)
    return str(ipaddress.ip_network((ip, IPV6_PREFIX), strict=False))

@dataclass
class _Source:
    failures: int
    last: float  # clock() of the last failure


@dataclass(frozen=True)
class PenaltyEntry:
    """One penalised source, as MSMP `PENALTY` lists it."""

    source: str
    failures: int
    next_delay: float  # what the next failed login from it waits
    idle: float  # seconds since its last failure

    def line(self) -> str:
        return f"{self.source} failures={self.failures} delay={self.next_delay:g} idle={int(self.idle)}"


class Penalty:
    """Failures by source; reads its settings at every call, so `SET` applies at once."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        # Ordered by last failure, oldest first: forgetting and eviction pop from the front.
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        # Called with a source whose failures changed (None: every source's), so that a
        # supervisor publishes them to its workers (geventpop3.process.table).
        self.changed: Callable[[str | None], None] | None = None
        if metrics is not None:
            metrics.penalised_sources = self.__len__

    def delay(self, failures: int) -> float:
        """The wait for the `failures`-th failure in a row: base, doubled each time, capped.

        A base of 0 (`login_failure_delay 0`) turns the delay off; a cap below the base is the base."""
        base = float(self._settings.login_failure_delay)
        if base <= 0 or failures <= 0:
            return 0.0
        cap = max(float(self._settings.auth_penalty_max), base)
        return float(min(base * 2 ** min(failures - 1, _MAX_DOUBLINGS), cap))

    def failed(self, address: str) -> float:
        """Count a failed login from `address`; the seconds its answer waits."""
        now = self._clock()
        self._forget(now)
        source = source_of(address) or address
        entry = self._sources.pop(source, None) or _Source(0, now)
        entry.failures += 1
        entry.last = now
        self._sources[source] = entry
        while len(self._sources) > self._settings.auth_penalty_sources:
            self._changed(self._sources.popitem(last=False)[0])
        self._changed(source)
        seconds = self.delay(entry.failures)
        if self._metrics is not None and seconds > self._settings.login_failure_delay:
            self._metrics.auth_penalty_delays += 1
        return seconds

    def failures(self, address: str) -> int:
        """Recent failures of the source of `address` (0 once forgotten)."""
        self._forget(self._clock())
        entry = self._sources.get(source_of(address) or address)
        return entry.failures if entry is not None else 0

    def succeeded(self, address: str) -> None:
        """A successful login: its source starts afresh (others keep theirs)."""
        source = source_of(address) or address
        if self._sources.pop(source, None) is not None:
            self._changed(source)

    def clear(self, address: str | None) -> int:
        """Forget one source (any address in it) or, with None, all; how many were forgotten."""
        if address is None:
            count = len(self._sources)
            self._sources.clear()
            self._changed(None)
            return count
        source = source_of(address.split("/", 1)[0])
        if source is None:
            raise ValueError("not an IP address")
        cleared = self._sources.pop(source, None) is not None
        self._changed(source)  # (with --state-url other hosts' failures may be cleared too)
        return 1 if cleared else 0

    def entries(self) -> list[PenaltyEntry]:
        """The sources with recent failures, most recent first."""
        now = self._clock()
        self._forget(now)
        return [PenaltyEntry(source, entry.failures, self.delay(entry.failures + 1), now - entry.last)
                for source, entry in reversed(self._sources.items())]

    def __len__(self) -> int:
        self._forget(self._clock())
        return len(self._sources)

    def _changed(self, source: str | None) -> None:
        if self.changed is not None:
            self.changed(source)

    def _forget(self, now: float) -> None:
        horizon = now - float(self._settings.auth_penalty_forget)
        sources = self._sources
        while sources:
            source, entry = next(iter(sources.items()))
            if entry.last > horizon:
                return
            del sources[source]
