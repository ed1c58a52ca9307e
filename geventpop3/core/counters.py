"""The one registry of the numbers the server reports: a definition per number.

From `REGISTRY` come the attributes of `Metrics` (geventpop3.core.metrics), the MSMP
STAT lines (in this order), the Prometheus series (geventpop3.service.prometheus), what
a worker reports and how the supervisor combines it (geventpop3.process.aggregate), and
the totals saved in the store. A new number is one `Definition` here; the code that
counts it does `metrics.<attribute> += 1`.

The kind says what a number is and how the workers' values combine in the supervisor:
a counter only grows and the supervisor adds each worker's increase to its totals; a
gauge is the sum over the live workers; a max is the highest its gauge (`of`) has
been, the maximum of that sum, counting a worker's peak between two reports.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    MAX = "max"


COUNTER, GAUGE, MAX = Kind.COUNTER, Kind.GAUGE, Kind.MAX


@dataclass(frozen=True, slots=True)
class Definition:
    """One number: where it is kept, and how STAT, Prometheus and the workers show it."""

    attribute: str  # of Metrics: a plain number, or with `reader` a function giving it
    kind: Kind
    stat: str  # the STAT label: `<stat>: <value>`
    prometheus: str | None  # the family name (prometheus-client adds `_total` to counters); None: STAT only
    help: str = ""
    persisted: bool = False  # saved in the store, so the total goes on after a restart
    reported: bool = True  # sent by the workers; False: the supervisor's own value is the answer
    reader: bool = False  # the attribute is a function (its owner installs it), None while there is nothing to show
    decimals: int = 0  # STAT shows this many; 0: whole numbers, truncated
    stat_unit: int = 1  # STAT counts whole units of this many (86400: days of seconds)
    of: str = ""  # a max: the gauge whose highest value it is

    def __post_init__(self) -> None:
        if (self.kind is MAX) != bool(self.of):
            raise ValueError(f"{self.attribute}: a max, and only a max, names the gauge it is the highest of")
        if self.reader and self.persisted:
            raise ValueError(f"{self.attribute}: a reader's value is computed, it cannot be persisted")
        if self.reader and self.reported and self.kind is not GAUGE:
            raise ValueError(f"{self.attribute}: a reader the workers report is a gauge (added to the supervisor's)")

    @property
    def zero(self) -> int | float:
        """The value a new `Metrics` starts from."""
        return 0.0 if self.decimals else 0

    def stat_line(self, value: float) -> str:
        shown = f"{value:.{self.decimals}f}" if self.decimals else str(int(value // self.stat_unit))
        return f"{self.stat}: {shown}"


REGISTRY: tuple[Definition, ...] = (
    Definition("total_connections", COUNTER, "Total connections", "geventpop3_connections",
               "POP3 connections accepted", persisted=True),
    Definition("current_connections", GAUGE, "Current connections", "geventpop3_current_connections",
               "open POP3 connections"),
    Definition("max_concurrent", MAX, "Historical maximum traffic", "geventpop3_max_concurrent_connections",
               "most simultaneous POP3 connections", persisted=True, of="current_connections"),
    Definition("transferred_bytes", COUNTER, "Total transferred bytes", None, reported=False, reader=True),
    Definition("bytes_sent", COUNTER, "Bytes sent", "geventpop3_bytes_sent", "octets sent on POP3", persisted=True),
    Definition("bytes_received", COUNTER, "Bytes received", "geventpop3_bytes_received", "octets received on POP3",
               persisted=True),
    Definition("logins_ok", COUNTER, "Logins ok", "geventpop3_logins_ok", "successful POP3 logins", persisted=True),
    Definition("logins_failed", COUNTER, "Logins failed", "geventpop3_logins_failed", "failed POP3 logins",
               persisted=True),
    Definition("messages_retrieved", COUNTER, "Messages retrieved", "geventpop3_messages_retrieved",
               "messages sent by RETR", persisted=True),
    Definition("messages_deleted", COUNTER, "Messages deleted", "geventpop3_messages_deleted",
               "messages removed in UPDATE", persisted=True),
    Definition("transformer_runs", COUNTER, "Transformer runs", "geventpop3_transformer_runs", "filter runs",
               persisted=True),
    Definition("transformer_failures", COUNTER, "Transformer failures", "geventpop3_transformer_failures",
               "filter runs that failed", persisted=True),
    Definition("transformer_timeouts", COUNTER, "Transformer timeouts", "geventpop3_transformer_timeouts",
               "filter runs killed after the timeout", persisted=True),
    Definition("transformer_cache_hits", COUNTER, "Transformer cache hits", "geventpop3_transformer_cache_hits",
               "filtered messages served from the cache", persisted=True),
    Definition("transformer_seconds", COUNTER, "Transformer seconds", "geventpop3_transformer_seconds",
               "seconds spent running filters", decimals=3),
    # Refusals by the connection limits (geventpop3.service.pop3.session, geventpop3.service.msmp.session).
    Definition("refused_per_ip", COUNTER, "Connections refused per IP", "geventpop3_connections_refused_per_ip",
               "POP3 connections refused by max_connections_per_ip", persisted=True),
    Definition("refused_proxy", COUNTER, "Connections refused by PROXY rules", "geventpop3_connections_refused_proxy",
               "POP3 connections closed by proxy_networks (not from a proxy, or no valid PROXY header)",
               persisted=True),
    Definition("refused_user_ip", COUNTER, "Logins refused per user and IP", "geventpop3_logins_refused_user_ip",
               "POP3 logins refused by max_sessions_per_user_ip", persisted=True),
    Definition("login_timeouts", COUNTER, "Login timeouts", "geventpop3_login_timeouts",
               "POP3 connections closed at login_timeout", persisted=True),
    Definition("admin_refused", COUNTER, "Admin connections refused", "geventpop3_admin_connections_refused",
               "MSMP connections refused by admin_max_connections", persisted=True),
    Definition("admin_login_timeouts", COUNTER, "Admin login timeouts", "geventpop3_admin_login_timeouts",
               "MSMP connections closed at admin_login_timeout", persisted=True),
    # The authentication penalty (geventpop3.core.penalty): the sources it tracks now (it
    # installs the reader), and the failed-login answers it made wait longer than login_failure_delay.
    Definition("penalised_sources", GAUGE, "Penalised sources", "geventpop3_penalised_sources",
               "client sources with recent failed logins", reader=True),
    Definition("auth_penalty_delays", COUNTER, "Penalty delays", "geventpop3_auth_penalty_delays",
               "failed-login answers delayed beyond login_failure_delay"),
    Definition("uptime", GAUGE, "Uptime seconds", "geventpop3_uptime_seconds", "seconds since the server started",
               reported=False, reader=True),
    # Installed when a certificate is configured; read at each STAT and scrape, so it follows reloads.
    Definition("tls_seconds_left", GAUGE, "Certificate expires in days", "geventpop3_tls_certificate_expiry_seconds",
               "seconds until the TLS certificate new connections get expires (negative: expired)",
               reported=False, reader=True, stat_unit=86400),
)


def persisted(registry: tuple[Definition, ...]) -> tuple[str, ...]:
    """The attributes saved in the store: the totals that go on across restarts."""
    return tuple(d.attribute for d in registry if d.persisted)


def reported(registry: tuple[Definition, ...]) -> tuple[Definition, ...]:
    """The definitions a worker sends its supervisor in each report."""
    return tuple(d for d in registry if d.reported)
