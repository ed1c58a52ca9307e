"""Counters and the access log: the one owner of every number the server reports.

The numbers are those of the registry (geventpop3.core.counters). The hot path only
increments attributes and appends to a list; persistence (the state store, SQLite or PostgreSQL) drains
`AccessLog.take_pending()` and reads `Metrics.snapshot()` from a background greenlet,
so no command ever waits for a database write.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from geventpop3.core.counters import REGISTRY, Definition, persisted


class Metrics:
    """The numbers of `registry` (geventpop3.core.counters) as plain attributes, cheap
    enough to touch on every command (`metrics.bytes_sent += n`), and what reads them."""

    if TYPE_CHECKING:  # the numbers are set from the registry: any of them, typed loosely
        def __getattr__(self, name: str) -> Any: ...
        def __setattr__(self, name: str, value: Any) -> None: ...

    def __init__(self, registry: tuple[Definition, ...] = REGISTRY) -> None:
        self.registry = registry
        self.started_at = time.time()
        # Readers their owners install: the authentication penalty (geventpop3.core.penalty)
        # its count of sources; the app, when a certificate is configured, its seconds left.
        self.penalised_sources: Callable[[], int] = lambda: 0
        self.tls_seconds_left: Callable[[], float] | None = None
        for definition in registry:
            if not definition.reader:
                setattr(self, definition.attribute, definition.zero)

    def connection_opened(self) -> None:
        self.total_connections += 1
        self.current_connections += 1
        if self.current_connections > self.max_concurrent:
            self.max_concurrent: int = self.current_connections  # typed: an assignment here declares it

    def connection_closed(self) -> None:
        self.current_connections -= 1

    def value(self, definition: Definition) -> float | None:
        """A registered number now; None for a reader with nothing to show (no certificate)."""
        value = getattr(self, definition.attribute)
        if definition.reader:
            return None if value is None else value()
        return value  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, int]:
        """The persisted totals, for the store."""
        return {name: getattr(self, name) for name in persisted(self.registry)}

    def restore(self, saved: dict[str, int]) -> None:
        """Continue the totals of an earlier run (from the store)."""
        names = persisted(self.registry)
        for name, value in saved.items():
            if name in names:
                setattr(self, name, int(value))

    def uptime(self) -> float:
        return time.time() - self.started_at

    def transferred_bytes(self) -> int:
        return int(self.bytes_sent + self.bytes_received)

    def stat_lines(self) -> list[str]:
        """The MSMP STAT body, in the registry's order: the four lines msmp.md requires first."""
        lines: list[str] = []
        for definition in self.registry:
            value = self.value(definition)
            if value is not None:
                lines.append(definition.stat_line(value))
        return lines


@dataclass
class AccessEntry:
    """One POP3 session event: login, login-failed or logout."""

    time: float
    user: str
    address: str
    port: int
    event: str  # "login" | "login-failed" | "logout"
    retr: int = 0
    dele: int = 0
    top: int = 0
    bytes: int = 0
    duration: float = 0.0
    ended: str = ""  # how a logout ended: quit, disconnect, timeout, shutdown, error
    detail: str = ""  # e.g. filter failures during the session

    def line(self) -> str:
        """`YYYY-MM-DD HH:MM:SS IP: <address> <event> ...` as msmp.md shows."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        text = f"{stamp} IP: {self.address} port={self.port} {self.event}"
        if self.event == "logout":
            text += (
                f" retr={self.retr} dele={self.dele} top={self.top} bytes={self.bytes}"
                f" duration={self.duration:.1f}s ended={self.ended}"
            )
        if self.detail:
            text += f" {self.detail}"
        return text


# The one bucket of failed logins under names that are no user: it starts with `-`,
# so it can never be a user name (users.valid_username), and made-up names cannot
# create buckets of their own.
UNKNOWN_USER = "-unknown-"
TRIED_NAME_LENGTH = 32  # how much of a made-up name the entry detail keeps
_UNSAFE_NAME_CHARS = re.compile(r"[^\x21-\x7e]")


def tried_name(name: str) -> str:
    """A made-up login name as it may appear in an entry: printable ASCII, truncated."""
    return _UNSAFE_NAME_CHARS.sub("?", name)[:TRIED_NAME_LENGTH] or "?"


@dataclass
class AccessLog:
    """Entries not yet persisted; the store drains them in batches.

    `known_user` (set by the context) decides whose bucket a failed login goes to: a
    user's own, or `UNKNOWN_USER` for a name that is no user, so the access log stays
    the users' and not the attacker's."""

    pending: list[AccessEntry] = field(default_factory=list)
    recent_limit: int = 10_000
    known_user: Callable[[str], bool] | None = None

    def record(self, entry: AccessEntry) -> None:
        if entry.event == "login-failed" and self.known_user is not None and not self.known_user(entry.user):
            tried = f"tried={tried_name(entry.user)}"
            entry.detail = f"{entry.detail} {tried}" if entry.detail else tried
            entry.user = UNKNOWN_USER
        self.pending.append(entry)
        if len(self.pending) > self.recent_limit * 10:
            # No store draining us (or it is failing): keep memory bounded.
            del self.pending[: len(self.pending) - self.recent_limit]

    def take_pending(self) -> list[AccessEntry]:
        taken, self.pending = self.pending, []
        return taken
