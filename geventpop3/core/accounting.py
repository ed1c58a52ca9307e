"""One accounting of connections, logins and failures for the whole server (Dovecot's anvil).

Three things must hold for the server as a whole, not per process: `max_connections` and
`max_connections_per_ip` (open POP3 connections), `max_sessions_per_user_ip` (logins of one
user from one source in flight) and the authentication penalty (geventpop3.core.penalty).
`Accounting` is what a POP3 service asks, at each of the five moments that change them:

- `connect(source)`: may this source open one more connection? (counted if so);
- `disconnect(source)`: one of its connections ended;
- `login(user, source)`: may this login start? (counted if so) and how many recent
  failures its source has (a source with failures waits behind clean ones for a hash thread);
- `login_done(user, source, verified)`: it ended; `verified`: the password was right, so the
  source's penalty is forgotten;
- `failed(source, user)`: a guess failed; the seconds its answer waits.

`LocalAccounting` keeps all of it in this process: the single process (`--workers 1`); in
the supervisor of `--workers N` its penalty is the one for every worker. A worker counts
connections and logins in a table shared by every worker and asks the supervisor at a
failure (geventpop3.process.accountant, geventpop3.process.table). Pure: dicts and the
clock, no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from geventpop3.core.penalty import Penalty
    from geventpop3.core.settings import Settings

# What `connect` answers: admitted, or which limit refused the connection.
ADMITTED = ""
MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
K = TypeVar("K")


class Accounting(Protocol):
    """What a POP3 service asks (see the module docstring); local or the supervisor's."""

    def connect(self, source: str) -> str:
        """ADMITTED (and counted), or the limit that refuses it."""
        ...

    def disconnect(self, source: str) -> None: ...

    def login(self, user: str, source: str) -> int | None:
        """None: over `max_sessions_per_user_ip`; else counted, and the source's recent failures."""
        ...

    def login_done(self, user: str, source: str, verified: bool) -> None: ...

    def failed(self, source: str, user: str = "") -> float:
        """Count a failed guess (at `user`, "" if none was named); the seconds its answer waits."""
        ...


class LocalAccounting:
    """The counts and the penalty, in this process."""

    def __init__(self, settings: Settings, penalty: Penalty) -> None:
        self.settings = settings
        self.penalty = penalty
        self.connections = 0
        self.per_source: dict[str, int] = {}  # source -> open connections
        self.in_flight: dict[tuple[str, str], int] = {}  # (user, source) -> logins in flight

    def connect(self, source: str) -> str:
        settings = self.settings
        if self.connections >= settings.max_connections:
            return MAX_CONNECTIONS
        per_source = self.per_source
        count = per_source.get(source, 0)
        if count >= settings.max_connections_per_ip:
            return MAX_CONNECTIONS_PER_IP
        per_source[source] = count + 1
        self.connections += 1
        return ADMITTED

    def disconnect(self, source: str) -> None:
        if source in self.per_source:
            _decrement(self.per_source, source)
            self.connections -= 1

    def login(self, user: str, source: str) -> int | None:
        key = (user, source)
        in_flight = self.in_flight
        count = in_flight.get(key, 0)
        if count >= self.settings.max_sessions_per_user_ip:
            return None
        in_flight[key] = count + 1
        return self.penalty.failures(source)

    def login_done(self, user: str, source: str, verified: bool) -> None:
        _decrement(self.in_flight, (user, source))
        if verified:
            self.penalty.succeeded(source)

    def failed(self, source: str, user: str = "") -> float:
        return self.penalty.failed(source)  # by source alone (per user too: issue 22)


def _decrement(counts: dict[K, int], key: K, by: int = 1) -> None:
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
