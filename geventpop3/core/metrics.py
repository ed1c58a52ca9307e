"""Counters and the access log: the one owner of every number the server reports.

The hot path only increments attributes and appends to a list; persistence (the
SQLite store) drains `AccessLog.take_pending()` and reads `Metrics.snapshot()` from a
background greenlet, so no command ever waits for a database write.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Counters that persist across restarts (totals), as opposed to gauges.
PERSISTED_COUNTERS = (
    "total_connections",
    "max_concurrent",
    "bytes_sent",
    "bytes_received",
    "logins_ok",
    "logins_failed",
    "messages_retrieved",
    "messages_deleted",
    "transformer_runs",
    "transformer_failures",
    "transformer_timeouts",
    "transformer_cache_hits",
    "refused_per_ip",
    "refused_proxy",
    "refused_user_ip",
    "login_timeouts",
    "admin_refused",
    "admin_login_timeouts",
)


class Metrics:
    """Plain integer counters; cheap enough to touch on every command."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.current_connections = 0
        self.total_connections = 0
        self.max_concurrent = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.logins_ok = 0
        self.logins_failed = 0
        self.messages_retrieved = 0
        self.messages_deleted = 0
        self.transformer_runs = 0
        self.transformer_failures = 0
        self.transformer_timeouts = 0
        self.transformer_cache_hits = 0
        self.transformer_seconds = 0.0
        # Refusals by the connection limits (geventpop3.service.pop3.session, geventpop3.service.msmp.session).
        self.refused_per_ip = 0  # POP3 connections over max_connections_per_ip
        self.refused_proxy = 0  # POP3 connections closed for proxy_networks (outside them, or a bad header)
        self.refused_user_ip = 0  # POP3 logins over max_sessions_per_user_ip
        self.login_timeouts = 0  # POP3 connections closed at login_timeout
        self.admin_refused = 0  # MSMP connections over admin_max_connections
        self.admin_login_timeouts = 0  # MSMP connections closed at admin_login_timeout
        # The authentication penalty (geventpop3.core.penalty): failed-login answers it made wait
        # longer than login_failure_delay, and the sources it tracks now (it installs the reader).
        self.auth_penalty_delays = 0
        self.penalised_sources: Callable[[], int] = lambda: 0
        # Seconds until the TLS certificate new connections get expires (the app installs
        # the reader when a certificate is configured); read at each STAT and scrape, so
        # it follows reloads.
        self.tls_seconds_left: Callable[[], float] | None = None

    def connection_opened(self) -> None:
        self.total_connections += 1
        self.current_connections += 1
        if self.current_connections > self.max_concurrent:
            self.max_concurrent = self.current_connections

    def connection_closed(self) -> None:
        self.current_connections -= 1

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in PERSISTED_COUNTERS}

    def restore(self, saved: dict[str, int]) -> None:
        """Continue the totals of an earlier run (from the store)."""
        for name, value in saved.items():
            if name in PERSISTED_COUNTERS:
                setattr(self, name, int(value))

    def uptime(self) -> float:
        return time.time() - self.started_at

    def stat_lines(self) -> list[str]:
        """The MSMP STAT body: the four lines msmp.md requires, then the extras."""
        return [
            f"Total connections: {self.total_connections}",
            f"Current connections: {self.current_connections}",
            f"Historical maximum traffic: {self.max_concurrent}",
            f"Total transferred bytes: {self.bytes_sent + self.bytes_received}",
            f"Bytes sent: {self.bytes_sent}",
            f"Bytes received: {self.bytes_received}",
            f"Logins ok: {self.logins_ok}",
            f"Logins failed: {self.logins_failed}",
            f"Messages retrieved: {self.messages_retrieved}",
            f"Messages deleted: {self.messages_deleted}",
            f"Transformer runs: {self.transformer_runs}",
            f"Transformer failures: {self.transformer_failures}",
            f"Transformer timeouts: {self.transformer_timeouts}",
            f"Transformer cache hits: {self.transformer_cache_hits}",
            f"Transformer seconds: {self.transformer_seconds:.3f}",
            f"Connections refused per IP: {self.refused_per_ip}",
            f"Connections refused by PROXY rules: {self.refused_proxy}",
            f"Logins refused per user and IP: {self.refused_user_ip}",
            f"Login timeouts: {self.login_timeouts}",
            f"Admin connections refused: {self.admin_refused}",
            f"Admin login timeouts: {self.admin_login_timeouts}",
            f"Penalised sources: {self.penalised_sources()}",
            f"Penalty delays: {self.auth_penalty_delays}",
            f"Uptime seconds: {int(self.uptime())}",
            *self._certificate_lines(),
        ]

    def _certificate_lines(self) -> list[str]:
        """`Certificate expires in days: N` (whole days, negative once expired), with TLS only."""
        if self.tls_seconds_left is None:
            return []
        return [f"Certificate expires in days: {int(self.tls_seconds_left() // 86400)}"]


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
    detail: str = ""  # e.g. transformer failures during the session

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
