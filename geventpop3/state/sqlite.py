"""The SQLite implementation of `geventpop3.state.Store`: one embedded database file.

Every SQLite call runs in gevent's thread pool on one connection guarded by a native
lock, so a slow query or a busy disk stalls only the greenlet that asked, never the
event loop. The database is in WAL mode with `synchronous=NORMAL` (batched counters and
log entries); user and setting writes switch to `synchronous=FULL` for their commit and
return only once it is on disk, so an account is never lost, not even to a power cut.

Any SQLite failure (read-only file, disk full, directory gone, locked by another
process) becomes a `StoreError` with a readable message; the callers decide what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import gevent
from gevent.monkey import get_original

from geventpop3.core.metrics import AccessEntry
from geventpop3.state import StoreError

log = logging.getLogger(__name__)

# A native lock even when threading is monkey-patched: it is taken in pool threads.
_allocate_lock = get_original("_thread", "allocate_lock")

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS access_log (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    user TEXT NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    event TEXT NOT NULL,
    retr INTEGER NOT NULL,
    dele INTEGER NOT NULL,
    top INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    duration REAL NOT NULL,
    ended TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS access_log_user ON access_log (user, id);
CREATE INDEX IF NOT EXISTS access_log_time ON access_log (time);
"""

# AccessEntry field -> converter, in column order.
_COLUMNS: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("time", float),
    ("user", str),
    ("address", str),
    ("port", int),
    ("event", str),
    ("retr", int),
    ("dele", int),
    ("top", int),
    ("bytes", int),
    ("duration", float),
    ("ended", str),
    ("detail", str),
)
_NAMES = ", ".join(name for name, _ in _COLUMNS)
_INSERT_ACCESS = f"INSERT INTO access_log ({_NAMES}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT_ACCESS = f"SELECT {_NAMES} FROM access_log WHERE user = ? ORDER BY id DESC LIMIT ?"

# The two kinds retention counts apart: failed logins, and the rest (logins, logouts).
_FAILED = "(event = 'login-failed')"
PRUNE_CHUNK = 5000  # rows per transaction, so appends are never locked out for long


def _row(entry: AccessEntry) -> tuple[Any, ...]:
    return tuple(convert(getattr(entry, name)) for name, convert in _COLUMNS)


def _entry(row: Iterable[Any]) -> AccessEntry:
    return AccessEntry(**{name: value for (name, _), value in zip(_COLUMNS, row, strict=True)})


def _owner_only(path: str) -> None:
    """Create the database file mode 0600 (SQLite gives its -wal and -shm files the same mode),
    or take group and other access away from an existing one: it holds password hashes."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return  # sqlite3.connect says what is wrong
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError:
        pass
    finally:
        os.close(fd)


class SqliteStore:
    """One SQLite file; every method blocks only the calling greenlet."""

    def __init__(self, path: str, busy_timeout: float = 5.0) -> None:
        self.location = path  # the database file
        self._busy_timeout = busy_timeout
        self._lock = _allocate_lock()
        self._db: sqlite3.Connection | None = None
        self._pool(self._open)

    # -- plumbing ---------------------------------------------------------
    def _pool(self, func: Callable[[], T]) -> T:
        """Run `func` in gevent's thread pool; the calling greenlet waits, the loop does not.

        Errors travel back as values: gevent prints a traceback for every exception
        escaping a pool task, which would flood stderr while the disk is full."""
        outcome: T | _Failure = gevent.get_hub().threadpool.apply(_capture, (func,))
        if isinstance(outcome, _Failure):
            raise outcome.error
        return outcome

    def _open(self) -> None:
        _owner_only(self.location)
        try:
            db = sqlite3.connect(self.location, timeout=self._busy_timeout, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {self.location}: {exc}") from exc
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("state database %s: WAL mode unavailable, using %s", self.location, mode)
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
                raise StoreError(f"state database {self.location} was written by a newer version")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"cannot open state database {self.location}: {exc}") from exc
        except StoreError:
            db.close()
            raise
        self._db = db

    def _locked(self, action: str, func: Callable[[sqlite3.Connection], T]) -> T:
        """In a pool thread: run `func` on the connection under the lock; errors -> StoreError."""
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"state database {self.location} is closed")
            try:
                return func(db)
            except sqlite3.Error as exc:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.rollback()
                raise StoreError(f"cannot {action} state database {self.location}: {exc}") from exc

    def _read(self, func: Callable[[sqlite3.Connection], T]) -> T:
        return self._pool(lambda: self._locked("read", func))

    def _write(self, func: Callable[[sqlite3.Connection], T], durable: bool = False) -> T:
        """One transaction; `durable` fsyncs the WAL at commit (users, settings)."""

        def transaction(db: sqlite3.Connection) -> T:
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                result = func(db)
                db.execute("COMMIT")
                return result
            finally:
                if db.in_transaction:
                    db.rollback()
                if durable:
                    db.execute("PRAGMA synchronous=NORMAL")

        return self._pool(lambda: self._locked("write", transaction))

    # -- users ------------------------------------------------------------------
    def load_users(self) -> dict[str, str]:
        return self._read(lambda db: dict(db.execute("SELECT name, password_hash FROM users").fetchall()))

    def save_user(self, name: str, password_hash: str) -> None:
        """Create or replace; on disk when this returns."""
        self._write(
            lambda db: db.execute(
                "INSERT INTO users (name, password_hash, created) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash",
                (name, password_hash, time.time()),
            ),
            durable=True,
        )

    def delete_user(self, name: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM users WHERE name = ?", (name,)), durable=True)

    # -- settings -----------------------------------------------------------
    def load_settings(self) -> dict[str, str]:
        return self._read(lambda db: dict(db.execute("SELECT key, value FROM settings").fetchall()))

    def save_setting(self, key: str, value_text: str) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value_text),
            ),
            durable=True,
        )

    # -- counters -----------------------------------------------------------
    def load_counters(self) -> dict[str, int]:
        return self._read(lambda db: {k: int(v) for k, v in db.execute("SELECT name, value FROM counters")})

    def save_counters(self, values: dict[str, int]) -> None:
        rows = [(str(name), int(value)) for name, value in values.items()]
        self._write(
            lambda db: db.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                rows,
            )
        )

    # -- access log ---------------------------------------------------------
    def append_access(self, entries: list[AccessEntry]) -> None:
        """One transaction per batch; an entry whose fields do not convert is skipped (logged)."""
        rows = []
        for entry in entries:
            try:
                rows.append(_row(entry))
            except (TypeError, ValueError, AttributeError) as exc:
                log.warning("dropping malformed access-log entry %r: %s", entry, exc)
        if rows:
            self._write(lambda db: db.executemany(_INSERT_ACCESS, rows))

    def query_access(self, user: str, limit: int) -> list[AccessEntry]:
        """The user's last `limit` entries, oldest first."""
        if limit <= 0:
            return []
        rows = self._read(lambda db: db.execute(_SELECT_ACCESS, (user, limit)).fetchall())
        return [_entry(row) for row in reversed(rows)]

    def access_count(self, user: str) -> int:
        return self._read(
            lambda db: int(db.execute("SELECT count(*) FROM access_log WHERE user = ?", (user,)).fetchone()[0])
        )

    def prune(self, keep_per_user: int, max_age_days: int, max_total: int | None = None) -> int:
        """Drop entries older than `max_age_days`, all but each user's last `keep_per_user`
        of each kind (failed logins apart from logins/logouts, so failures cannot push a
        user's sessions out), then the oldest beyond `max_total`; in small transactions.
        Returns the number of rows removed."""
        cutoff = time.time() - max_age_days * 86400.0
        removed = self._pool(lambda: self._prune(max(0, keep_per_user), cutoff))
        if max_total is not None:
            removed += self._pool(lambda: self._trim(max(0, max_total)))[0]
        return removed

    def trim(self, max_total: int) -> int:
        """Drop the oldest entries beyond `max_total` in the whole table; the number left."""
        return self._pool(lambda: self._trim(max(0, max_total)))[1]

    def _chunk(self, sql: str, *args: Any) -> int:
        return self._locked("write", lambda db: _in_transaction(db, sql, args))

    def _prune(self, keep: int, cutoff: float) -> int:
        removed = 0
        while True:
            count = self._chunk(
                "DELETE FROM access_log WHERE id IN (SELECT id FROM access_log WHERE time < ? LIMIT ?)",
                cutoff,
                PRUNE_CHUNK,
            )
            removed += count
            if count < PRUNE_CHUNK:
                break
        buckets = self._locked(
            "read",
            lambda db: db.execute(
                f"SELECT user, {_FAILED} AS failed FROM access_log GROUP BY user, failed HAVING count(*) > ?",
                (keep,),
            ).fetchall(),
        )
        for user, failed in buckets:
            removed += self._chunk(
                f"DELETE FROM access_log WHERE user = ? AND {_FAILED} = ? AND id <= "
                f"(SELECT id FROM access_log WHERE user = ? AND {_FAILED} = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                user,
                failed,
                user,
                failed,
                keep,
            )
        return removed

    def _trim(self, max_total: int) -> tuple[int, int]:
        """(removed, left): the oldest rows beyond `max_total` go, in chunks."""
        total = self._locked("read", lambda db: int(db.execute("SELECT count(*) FROM access_log").fetchone()[0]))
        removed = 0
        while total - removed > max_total:
            count = self._chunk(
                "DELETE FROM access_log WHERE id IN (SELECT id FROM access_log ORDER BY id LIMIT ?)",
                min(PRUNE_CHUNK, total - removed - max_total),
            )
            if not count:
                break
            removed += count
        return removed, total - removed

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Checkpoint the WAL and close; later calls raise StoreError. Idempotent."""
        self._pool(self._close)

    def _close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("state database %s: checkpoint at close failed: %s", self.location, exc)
            db.close()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _capture(func: Callable[[], T]) -> T | _Failure:
    try:
        return func()
    except Exception as exc:  # re-raised in the calling greenlet
        return _Failure(exc)


def _in_transaction(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
    db.execute("BEGIN IMMEDIATE")
    count = db.execute(sql, args).rowcount
    db.execute("COMMIT")  # on error, SqliteStore._locked rolls back
    return count
