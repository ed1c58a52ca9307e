"""Persistent state: users, settings, counters and the access log, behind one interface.

The rest of the server depends only on `Store` and `StoreError` from here. A backend
is a module of this package implementing `Store` (`sqlite.SqliteStore`, embedded;
`postgres.PostgresStore`, shared by several instances); the backend-independent parts
sit beside it: `persister.Persister`, the background writer
of counters and access-log entries, and `settings`, which keeps MSMP `SET` changes
across restarts.
"""

from __future__ import annotations

from typing import Protocol

from geventpop3.core.metrics import AccessEntry


class StoreError(Exception):
    """The database cannot be opened, read or written; str() says which database and why."""


class Store(Protocol):
    """The operations the server needs from a state database.

    Every call blocks only the calling greenlet, never the event loop, and raises
    StoreError on any database failure. User and setting writes are on disk when the
    call returns; counters and access-log entries may be batched (the persister
    writes them about once a second anyway).
    """

    @property
    def location(self) -> str:
        """Where the data lives (a file, a server), for messages."""
        ...

    # users (what users.UserStore needs)
    def load_users(self) -> dict[str, str]: ...

    def save_user(self, name: str, password_hash: str) -> None: ...

    def delete_user(self, name: str) -> None: ...

    # settings changed over MSMP
    def load_settings(self) -> dict[str, str]: ...

    def save_setting(self, key: str, value_text: str) -> None: ...

    # counters (Metrics.snapshot)
    def load_counters(self) -> dict[str, int]: ...

    def save_counters(self, values: dict[str, int]) -> None: ...

    # access log
    def append_access(self, entries: list[AccessEntry]) -> None:
        """Store a batch; an entry whose fields do not convert is skipped (and logged)."""
        ...

    def query_access(self, user: str, limit: int) -> list[AccessEntry]:
        """The user's last `limit` entries, oldest first."""
        ...

    def access_count(self, user: str) -> int: ...

    def prune(self, keep_per_user: int, max_age_days: int, max_total: int | None = None) -> int:
        """Drop entries older than `max_age_days`, all but each user's last
        `keep_per_user` of each kind (failed logins; logins and logouts), then the
        oldest beyond `max_total`; returns the number removed."""
        ...

    def trim(self, max_total: int) -> int:
        """Drop the oldest entries beyond `max_total`; returns the number left."""
        ...

    def close(self) -> None:
        """Release the database; later calls raise StoreError. Idempotent."""
        ...
