"""The PostgreSQL implementation of `geventpop3.state.Store`: one database shared by every instance.

`--state-url postgresql://...` puts users, settings, counters and access logs here, so
several geventpop3 instances (on several hosts, behind one load balancer) share them.
`Database` is the connection side (a psycopg-pool pool, errors -> StoreError, whether
the server answers), used by the store and by `leases.Leases`; `PostgresStore` is the
`Store` on top of it, plus what only a shared store has: the instances' rows for STAT.

gevent: psycopg 3 drives libpq in non-blocking mode and waits in Python
(`psycopg.waiting`); once `select` is monkey-patched it picks a wait function built on
the patched `select.poll` instead of its C one, and resolves host names with the
patched `socket.getaddrinfo`; the pool's worker threads are greenlets once `threading`
is patched. So a slow query stalls only the greenlet that asked (tests/server/
test_store_contract.py::test_a_slow_query_does_not_block_the_hub), as long as this
module is imported after `gevent.monkey.patch_all()` (geventpop3/__main__.py does it first).

Counters: one row per (instance, counter), each instance writing only its own rows,
with its own absolute values, about once a second and only those that changed: no hot
row shared between instances, and a retried write after a lost answer cannot count
twice. STAT sums the rows of every instance. Access-log entries carry (origin, seq),
unique, so a batch retried after a lost answer is not stored twice.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from geventpop3.core.metrics import AccessEntry
from geventpop3.state import StoreError

try:
    import psycopg as psycopg  # re-exported: None when the extra is not installed
    from psycopg import conninfo as _conninfo
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError:  # pragma: no cover - checked by config.check_state_url first
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTALL_HINT = "PostgreSQL support is not installed: pip install 'geventpop3[postgres]'"
SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x67705033  # advisory lock: one instance creates the schema, the others wait
_PRUNE_LOCK = 0x67705034  # advisory lock: one instance prunes at a time
SETTINGS_CHANNEL = "geventpop3_settings"
USERS_CHANNEL = "geventpop3_users"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS geventpop3_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name text PRIMARY KEY,
    password_hash text NOT NULL,
    created double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    instance text NOT NULL,
    name text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (instance, name)
);
CREATE TABLE IF NOT EXISTS instances (
    instance text PRIMARY KEY,
    owner text NOT NULL,
    current_connections integer NOT NULL,
    started double precision NOT NULL,
    seen timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS access_log (
    id bigserial PRIMARY KEY,
    origin text NOT NULL,
    seq bigint NOT NULL,
    time double precision NOT NULL,
    "user" text NOT NULL,
    address text NOT NULL,
    port integer NOT NULL,
    event text NOT NULL,
    retr integer NOT NULL,
    dele integer NOT NULL,
    top integer NOT NULL,
    bytes bigint NOT NULL,
    duration double precision NOT NULL,
    ended text NOT NULL,
    detail text NOT NULL,
    UNIQUE (origin, seq)
);
CREATE INDEX IF NOT EXISTS access_log_user ON access_log ("user", id);
CREATE INDEX IF NOT EXISTS access_log_time ON access_log (time);
CREATE TABLE IF NOT EXISTS leases (
    mailbox text PRIMARY KEY,
    owner text NOT NULL,
    instance text NOT NULL,
    expires timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_owner ON leases (owner);
CREATE TABLE IF NOT EXISTS auth_penalty (
    source text PRIMARY KEY,
    failures integer NOT NULL,
    last timestamptz NOT NULL
);
"""

# AccessEntry field -> converter and PostgreSQL array type, in column order.
_COLUMNS: tuple[tuple[str, Callable[[Any], Any], str], ...] = (
    ("time", float, "float8"),
    ("user", str, "text"),
    ("address", str, "text"),
    ("port", int, "int4"),
    ("event", str, "text"),
    ("retr", int, "int4"),
    ("dele", int, "int4"),
    ("top", int, "int4"),
    ("bytes", int, "int8"),
    ("duration", float, "float8"),
    ("ended", str, "text"),
    ("detail", str, "text"),
)
_NAMES = ", ".join(f'"{name}"' for name, _, _ in _COLUMNS)
_INSERT_ACCESS = (
    f"INSERT INTO access_log (origin, seq, {_NAMES}) "
    f"SELECT %s, * FROM unnest(%s::int8[], {', '.join(f'%s::{kind}[]' for _, _, kind in _COLUMNS)}) "
    "ON CONFLICT (origin, seq) DO NOTHING"
)
_SELECT_ACCESS = f'SELECT {_NAMES} FROM access_log WHERE "user" = %s ORDER BY id DESC LIMIT %s'
_FAILED = "(event = 'login-failed')"
PRUNE_CHUNK = 5000


def check_url(url: str) -> str:
    """`url` if it is a PostgreSQL URL psycopg can parse; ValueError (one line) otherwise."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL")
    if psycopg is None:
        raise ValueError(INSTALL_HINT)
    try:
        params = _conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ValueError(_first_line(exc)) from None
    for port in str(params.get("port") or "5432").split(","):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid port {port!r}")
    return url


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        params = _conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname', '')}"


INSTANCE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,62}\Z")


def default_instance_name(port: int) -> str:
    """<host>-<POP3 port>: unique per instance unless two share a host and a port."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0]) or "host"
    return f"{host}-{port}"[:63]


class Database:
    """A small pool of connections to one PostgreSQL database, in autocommit mode.

    `run` lends a connection to a function and turns every failure into StoreError;
    `available` says whether the last attempt reached the server (False from a failed
    connection until the next success), so callers can answer at once while it is down.
    """

    def __init__(self, url: str, instance: str, connect_timeout: float = 5.0, wait: float = 3.0,
                 max_size: int = 4, require: bool = True) -> None:
        """With `require`, StoreError if no connection is made within `connect_timeout`;
        without, the pool keeps trying in the background (a cluster worker started during
        an outage serves, answering logins [SYS/TEMP] until the database answers)."""
        if psycopg is None:
            raise StoreError(INSTALL_HINT)
        self.url = url
        self.location = redact(url)
        self.instance = instance  # this instance's name: its counters, its STAT line
        self.owner = uuid.uuid4().hex  # this process: its leases, the notifications it sent
        self.wait = wait  # seconds a call waits for a connection while the server is unreachable
        self.available = True
        # The pool logs every failed connection attempt (a warning a second while the server
        # is down); our callers log the outage once, and its end.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self._pool = ConnectionPool(
            url, min_size=1, max_size=max_size, open=False, name="geventpop3",
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout)),
                    "application_name": f"geventpop3 {instance}"[:63]},
            check=_check, reconnect_timeout=86400.0, timeout=wait,
            configure=_configure,
        )
        if not require:
            self._pool.open(wait=False)
            return
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self._pool.close(timeout=1.0)
            raise StoreError(f"cannot connect to state database {self.location} within {connect_timeout:g} s "
                             f"({self._last_error()})") from None

    def _last_error(self) -> str:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return "it answers now"
        except psycopg.Error as exc:
            return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__

    def run(self, action: str, func: Callable[[psycopg.Connection[Any]], T], wait: float | None = None) -> T:
        """`func(connection)`; StoreError on any failure. A transaction is the caller's
        (`with conn.transaction():`): the connection is in autocommit mode."""
        try:
            with self._pool.connection(timeout=self.wait if wait is None else wait) as conn:
                result = func(conn)
        except PoolTimeout:
            self.available = False
            raise StoreError(f"cannot {action} state database {self.location}: not reachable") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.available = False
            raise StoreError(f"cannot {action} state database {self.location}: {_first_line(exc)}") from None
        except psycopg.Error as exc:
            raise StoreError(f"cannot {action} state database {self.location}: {_first_line(exc)}") from None
        self.available = True
        return result

    def connect(self) -> psycopg.Connection[Any]:
        """A connection of its own, outside the pool (LISTEN needs one that stays)."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.wait)))

    def close(self) -> None:
        self._pool.close(timeout=5.0)


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Every pooled connection: commits do not wait for the WAL flush. Leases, counters,
    heartbeats and access-log batches are that (a database crash loses at most its last
    fraction of a second of them, as SQLite's synchronous=NORMAL does); users and settings
    wait for it (`_durable`)."""
    conn.execute("SET synchronous_commit = off")


def _check(conn: psycopg.Connection[Any]) -> None:
    """Before lending a pooled connection: one found broken is replaced. No round trip
    (ConnectionPool.check_connection's would cost a third of a lease's CPU): a connection
    the server dropped fails its next statement instead, the pool discards it, and the
    caller answers that once (a login: [SYS/TEMP])."""
    if conn.broken or conn.pgconn.status != psycopg.pq.ConnStatus.OK:
        raise psycopg.OperationalError("connection is broken")


def _durable(conn: psycopg.Connection[Any]) -> None:
    """In a transaction: its commit returns once it is on disk (users, settings)."""
    conn.execute("SET LOCAL synchronous_commit = on")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore:
    """The shared store; every method blocks only the calling greenlet."""

    def __init__(self, url: str, instance: str, connect_timeout: float = 5.0) -> None:
        self.db = Database(url, instance, connect_timeout)
        self.location = self.db.location
        self.instance = instance
        self.started = time.time()
        self._closed = False
        self._saved_counters: dict[str, int] = {}
        self._seq = 0  # the last seq given to an access-log entry of this process
        self._pending_seq: dict[int, tuple[AccessEntry, int]] = {}  # id(entry) -> seq, until stored
        try:
            self.db.run("create the schema of", self._create_schema)
        except StoreError:
            self.db.close()
            raise

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(_SCHEMA)
            row = conn.execute("SELECT max(version) FROM geventpop3_schema").fetchone()
            version = row[0] if row else None
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"state database {self.location} was written by a newer version")
            if version is None:
                conn.execute("INSERT INTO geventpop3_schema (version) VALUES (%s)", (SCHEMA_VERSION,))

    def _run(self, action: str, func: Callable[[psycopg.Connection[Any]], T], wait: float | None = None) -> T:
        if self._closed:
            raise StoreError(f"state database {self.location} is closed")
        return self.db.run(action, func, wait)

    # -- users ------------------------------------------------------------------
    def load_users(self) -> dict[str, str]:
        return self._run("read", lambda c: dict(c.execute("SELECT name, password_hash FROM users").fetchall()))

    def load_user(self, name: str) -> str | None:
        """One user's password entry, or None: what a notification from another instance is about."""
        row = self._run("read", lambda c: c.execute("SELECT password_hash FROM users WHERE name = %s",
                                                    (name,)).fetchone())
        return row[0] if row else None

    def save_user(self, name: str, password_hash: str) -> None:
        """Create or replace; committed when this returns; the other instances are told."""

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                _durable(conn)
                conn.execute("INSERT INTO users (name, password_hash, created) VALUES (%s, %s, %s)"
                             " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash",
                             (name, password_hash, time.time()))
                self._notify(conn, USERS_CHANNEL, name)

        self._run("write", write)

    def delete_user(self, name: str) -> None:
        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                _durable(conn)
                conn.execute("DELETE FROM users WHERE name = %s", (name,))
                self._notify(conn, USERS_CHANNEL, name)

        self._run("write", write)

    def _notify(self, conn: psycopg.Connection[Any], channel: str, subject: str) -> None:
        """Sent at commit, to every instance listening (this one skips its own: the origin)."""
        conn.execute("SELECT pg_notify(%s, %s)", (channel, f"{self.db.owner} {subject}"))

    # -- settings -----------------------------------------------------------
    def load_settings(self) -> dict[str, str]:
        return self._run("read", lambda c: dict(c.execute("SELECT key, value FROM settings").fetchall()))

    def save_setting(self, key: str, value_text: str) -> None:
        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                _durable(conn)
                conn.execute("INSERT INTO settings (key, value) VALUES (%s, %s)"
                             " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value_text))
                self._notify(conn, SETTINGS_CHANNEL, key)

        self._run("write", write)

    # -- counters -----------------------------------------------------------
    def load_counters(self) -> dict[str, int]:
        """This instance's counters (an earlier run of the same name): its totals go on from them."""
        rows = self._run("read", lambda c: c.execute("SELECT name, value FROM counters WHERE instance = %s",
                                                     (self.instance,)).fetchall())
        counters = {str(name): int(value) for name, value in rows}
        self._saved_counters = dict(counters)
        return counters

    def save_counters(self, values: dict[str, int]) -> None:
        """This instance's rows, only the counters that changed since the last save, one statement."""
        changed = {str(k): int(v) for k, v in values.items() if self._saved_counters.get(str(k)) != int(v)}
        if not changed:
            return
        self._run("write", lambda c: c.execute(
            "INSERT INTO counters (instance, name, value) SELECT %s, * FROM unnest(%s::text[], %s::int8[])"
            " ON CONFLICT (instance, name) DO UPDATE SET value = excluded.value",
            (self.instance, list(changed), list(changed.values()))))
        self._saved_counters.update(changed)

    def heartbeat(self, current_connections: int) -> None:
        """This instance is alive, with this many connections open (STAT's per-instance lines)."""
        self._run("write", lambda c: c.execute(
            "INSERT INTO instances (instance, owner, current_connections, started, seen)"
            " VALUES (%s, %s, %s, %s, now()) ON CONFLICT (instance) DO UPDATE SET owner = excluded.owner,"
            " current_connections = excluded.current_connections, started = excluded.started, seen = now()",
            (self.instance, self.db.owner, current_connections, self.started)), wait=1.0)

    def instances(self) -> list[tuple[str, dict[str, int], int, float | None]]:
        """Every instance that ever counted: (name, counters, current connections, seconds
        since it was last seen alive or None), by name."""

        def read(conn: psycopg.Connection[Any]) -> tuple[list[Any], list[Any]]:
            counters = conn.execute("SELECT instance, name, value FROM counters").fetchall()
            alive = conn.execute("SELECT instance, current_connections,"
                                 " extract(epoch FROM now() - seen)::float8 FROM instances").fetchall()
            return counters, alive

        counters, alive = self._run("read", read, wait=1.0)
        by_name: dict[str, dict[str, int]] = {}
        for instance, name, value in counters:
            by_name.setdefault(instance, {})[name] = int(value)
        seen = {instance: (int(current), float(age)) for instance, current, age in alive}
        names = sorted(set(by_name) | set(seen))
        return [(name, by_name.get(name, {}), *seen.get(name, (0, None))) for name in names]

    # -- the authentication penalty, shared by every instance (geventpop3.state.shared.SharedPenalty) --
    def penalty_failed(self, source: str, forget: float) -> int:
        """Count a failed login from `source` (its count starts again after `forget` quiet
        seconds); its failures in a row, over every instance. One statement, the database's clock."""
        row = self._run("write", lambda c: c.execute(
            "INSERT INTO auth_penalty (source, failures, last) VALUES (%s, 1, now())"
            " ON CONFLICT (source) DO UPDATE SET failures = CASE WHEN auth_penalty.last"
            " < now() - make_interval(secs => %s) THEN 1 ELSE auth_penalty.failures + 1 END, last = now()"
            " RETURNING failures", (source, forget)).fetchone(), wait=1.0)
        return int(row[0]) if row else 1

    def penalty_clear(self, source: str | None) -> int:
        """Forget one source, or (None) every one; how many rows were removed."""
        if source is None:
            return int(self._run("write", lambda c: c.execute("DELETE FROM auth_penalty").rowcount))
        return int(self._run("write", lambda c: c.execute("DELETE FROM auth_penalty WHERE source = %s",
                                                          (source,)).rowcount, wait=1.0))

    def penalty_entries(self, forget: float) -> list[tuple[str, int, float]]:
        """(source, failures, seconds since its last failure) of the sources failing within
        `forget` seconds, most recent first; older rows are removed on the way."""

        def read(conn: psycopg.Connection[Any]) -> list[Any]:
            conn.execute("DELETE FROM auth_penalty WHERE last < now() - make_interval(secs => %s)", (forget,))
            return conn.execute("SELECT source, failures, extract(epoch FROM now() - last)::float8"
                                " FROM auth_penalty ORDER BY last DESC").fetchall()

        return [(str(source), int(failures), float(idle)) for source, failures, idle in
                self._run("read", read, wait=1.0)]

    # -- access log ---------------------------------------------------------
    def append_access(self, entries: list[AccessEntry]) -> None:
        """One statement per batch; each entry keeps its (origin, seq) across retries, so a
        batch whose commit answer was lost is not stored twice when the persister retries it."""
        columns: list[list[Any]] = [[] for _ in _COLUMNS]
        seqs: list[int] = []
        for entry in entries:
            try:
                row = [convert(getattr(entry, name)) for name, convert, _ in _COLUMNS]
            except (TypeError, ValueError, AttributeError) as exc:
                log.warning("dropping malformed access-log entry %r: %s", entry, exc)
                continue
            seqs.append(self._seq_of(entry))
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        if not seqs:
            return
        self._run("write", lambda c: c.execute(_INSERT_ACCESS, (self.db.owner, seqs, *columns)))
        for entry in entries:
            self._pending_seq.pop(id(entry), None)

    def _seq_of(self, entry: AccessEntry) -> int:
        known = self._pending_seq.get(id(entry))
        if known is not None and known[0] is entry:
            return known[1]
        self._seq += 1
        self._pending_seq[id(entry)] = (entry, self._seq)  # holds the entry: its id is not reused meanwhile
        return self._seq

    def query_access(self, user: str, limit: int) -> list[AccessEntry]:
        if limit <= 0:
            return []
        rows = self._run("read", lambda c: c.execute(_SELECT_ACCESS, (user, limit)).fetchall())
        return [_entry(row) for row in reversed(rows)]

    def access_count(self, user: str) -> int:
        row = self._run("read", lambda c: c.execute('SELECT count(*) FROM access_log WHERE "user" = %s',
                                                    (user,)).fetchone())
        return int(row[0]) if row else 0

    def prune(self, keep_per_user: int, max_age_days: int, max_total: int | None = None) -> int:
        """As the SQLite store prunes, in chunks; one instance at a time (an advisory lock:
        the others skip their turn and return 0)."""
        cutoff = time.time() - max_age_days * 86400.0

        def prune(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_PRUNE_LOCK,)).fetchone()
            if not row or not row[0]:
                return 0
            try:
                removed = _prune(conn, max(0, keep_per_user), cutoff)
                if max_total is not None:
                    removed += _trim(conn, max(0, max_total))[0]
                return removed
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_PRUNE_LOCK,))

        return self._run("prune", prune)

    def trim(self, max_total: int) -> int:
        return self._run("trim", lambda c: _trim(c, max(0, max_total)))[1]

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.db.close()


def _entry(row: Iterable[Any]) -> AccessEntry:
    return AccessEntry(**{name: value for (name, _, _), value in zip(_COLUMNS, row, strict=True)})


def _chunk(conn: psycopg.Connection[Any], sql: str, args: tuple[Any, ...]) -> int:
    return conn.execute(sql, args).rowcount


def _prune(conn: psycopg.Connection[Any], keep: int, cutoff: float) -> int:
    removed = 0
    while True:
        count = _chunk(conn, "DELETE FROM access_log WHERE id IN"
                             " (SELECT id FROM access_log WHERE time < %s LIMIT %s)", (cutoff, PRUNE_CHUNK))
        removed += count
        if count < PRUNE_CHUNK:
            break
    buckets = conn.execute(f'SELECT "user", {_FAILED} AS failed FROM access_log GROUP BY "user", failed'
                           " HAVING count(*) > %s", (keep,)).fetchall()
    for user, failed in buckets:
        removed += _chunk(conn,
                          f'DELETE FROM access_log WHERE "user" = %s AND {_FAILED} = %s AND id <= '
                          f'(SELECT id FROM access_log WHERE "user" = %s AND {_FAILED} = %s'
                          " ORDER BY id DESC LIMIT 1 OFFSET %s)",
                          (user, failed, user, failed, keep))
    return removed


def _trim(conn: psycopg.Connection[Any], max_total: int) -> tuple[int, int]:
    row = conn.execute("SELECT count(*) FROM access_log").fetchone()
    total = int(row[0]) if row else 0
    removed = 0
    while total - removed > max_total:
        count = _chunk(conn, "DELETE FROM access_log WHERE id IN (SELECT id FROM access_log ORDER BY id LIMIT %s)",
                       (min(PRUNE_CHUNK, total - removed - max_total),))
        if not count:
            break
        removed += count
    return removed, total - removed
