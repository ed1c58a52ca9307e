"""What an instance shares with the other instances through a PostgreSQL store, beyond
the `Store` calls: live settings and users, mailbox leases, and STAT over every instance.

`SharedPenalty` counts failed logins in the database, so the authentication penalty is
one for every instance (and every worker of each: their supervisor holds it).

`Follower` keeps this instance in step with the others: a connection of its own
LISTENs for what they change (an MSMP `SET`, `ADD`, `DELE` anywhere sends a NOTIFY at
commit), and every change is re-read from the tables and applied here within a second.
After a (re)connect, and every `reread_interval` seconds as a safety net, everything is
re-read, so a notification lost with a connection is caught up. Once a second it also
says this instance is alive (the `instances` row: STAT's per-instance lines).

Fits both process models: a single process runs it all (`SharedState`); with
supervisor and workers (geventpop3.process) the supervisor holds the store and the
`Follower` (the settings and users it applies reach its workers as its own changes do:
geventpop3.process.shared_store), and each worker serving POP3 has only what a session
needs (`SessionShare`: a `Database` and its own `Leases`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from geventpop3.core.accounting import LocalAccounting
from geventpop3.core.metrics import Metrics
from geventpop3.core.penalty import Penalty, PenaltyEntry, source_of
from geventpop3.core.settings import SettingError, format_value
from geventpop3.state import StoreError
from geventpop3.state.leases import Leases
from geventpop3.state.postgres import SETTINGS_CHANNEL, USERS_CHANNEL, Database, PostgresStore, psycopg

if TYPE_CHECKING:  # the context these apply changes to; its module is a layer above
    from geventpop3.core.settings import Settings
    from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)

ALIVE_WITHIN = 10.0  # seconds: an instance seen longer ago counts as down in STAT


class SessionShare:
    """What a POP3 session uses of the shared store: this process's leases, and whether
    the database answers (a failed login is then temporary). A worker of
    geventpop3.process has this alone; `SharedState` adds the rest."""

    def __init__(self, ctx: ServerContext, db: Database) -> None:
        self.db = db
        self.leases = Leases(db, lambda: float(ctx.settings.lease_timeout))

    @property
    def available(self) -> bool:
        """Whether the database answered the last time it was asked."""
        return self.db.available

    def start(self) -> None:
        self.leases.start()

    def stop(self) -> None:
        self.leases.stop()

    def stat_lines(self, metrics: Metrics) -> list[str]:
        """This process's own (MSMP is served where the whole view is: `SharedState`)."""
        return metrics.stat_lines()


class SharedState(SessionShare):
    """The leases, the follower and the penalty of one instance (single process, or a supervisor's)."""

    def __init__(self, ctx: ServerContext, store: PostgresStore, skip: Collection[str] = (),
                 reread_interval: float = 30.0) -> None:
        super().__init__(ctx, store.db)
        self.ctx = ctx
        self.store = store
        self.follower = Follower(ctx, store, skip, reread_interval)
        # One penalty for every instance: a guesser behind a load balancer meets one, wherever it lands.
        penalty = SharedPenalty(ctx.settings, ctx.metrics, store)
        ctx.penalty = penalty
        if isinstance(ctx.accounting, LocalAccounting):
            ctx.accounting.penalty = penalty

    def start(self) -> None:
        super().start()
        self.follower.start()

    def stop(self) -> None:
        self.follower.stop()
        super().stop()

    def stat_lines(self, metrics: Metrics) -> list[str]:
        """STAT over every instance: the totals (this one's live counters plus the others'
        stored ones), then lines per instance; this instance alone if the database is down."""
        try:
            instances = self.store.instances()
        except StoreError:
            return [*metrics.stat_lines(), "Instances: unknown, the state database is unavailable"]
        own = self.store.instance
        rows = {name: (counters, current, age) for name, counters, current, age in instances}
        rows[own] = (metrics.snapshot(), metrics.current_connections, 0.0)
        totals = copy.copy(metrics)  # this instance's readers and unpersisted numbers; the totals below
        totals.current_connections = 0
        summed: dict[str, int] = {}
        lines = []
        alive = 0
        for name in sorted(rows):
            counters, current, age = rows[name]
            up = age is not None and age < ALIVE_WITHIN
            alive += up
            for key, value in counters.items():
                summed[key] = summed.get(key, 0) + value
            totals.current_connections += current if up else 0
            lines += [
                f"Instance {name} connections: {counters.get('total_connections', 0)}",
                f"Instance {name} current connections: {current if up else 0}",
                f"Instance {name} logins ok: {counters.get('logins_ok', 0)}",
                f"Instance {name} seconds since seen: {int(age) if age is not None else -1}",
            ]
        totals.restore(summed)  # max_concurrent: the sum of the instances' maxima, an upper bound
        return [*totals.stat_lines(), f"Instances: {len(rows)}", f"Instances alive: {alive}", *lines]


class SharedPenalty(Penalty):
    """The authentication penalty counted in the shared database (`auth_penalty`: one row per
    source, the database's clock), so every instance sees every instance's failures.

    A failure is one upsert that returns the source's failures in a row over all instances
    (this is what its delay doubles with); `PENALTY` and `PENALTY CLEAR` read and clear the
    table, so they agree on every instance. This instance keeps its own count too (the
    `Penalty` it extends): what orders the hash queue (`failures`, asked at every login, with
    no round trip) and what it falls back to while the database does not answer. A right
    password clears the source's row only when this instance saw failures of that source
    (no write per login otherwise), in the background.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None, store: PostgresStore) -> None:
        super().__init__(settings, metrics)
        self.store = store
        self._clears: set[gevent.Greenlet[..., None]] = set()

    def failed(self, address: str) -> float:
        local = super().failed(address)
        source = source_of(address) or address
        try:
            failures = self.store.penalty_failed(source, float(self._settings.auth_penalty_forget))
        except StoreError:
            return local  # this instance's own count meanwhile
        entry = self._sources.get(source)
        if entry is not None:
            entry.failures = failures  # this instance's count follows the shared one
            self._changed(source)
        seconds = self.delay(failures)
        if self._metrics is not None:  # counted above from the local count: the shared one decides
            base = float(self._settings.login_failure_delay)
            self._metrics.auth_penalty_delays += int(seconds > base) - int(local > base)
        return seconds

    def succeeded(self, address: str) -> None:
        source = source_of(address) or address
        if source in self._sources:
            clear = gevent.spawn(self._clear_shared, source)
            self._clears.add(clear)
            clear.link(self._clears.discard)
        super().succeeded(address)

    def _clear_shared(self, source: str) -> None:
        with contextlib.suppress(StoreError):
            self.store.penalty_clear(source)

    def clear(self, address: str | None) -> int:
        cleared = super().clear(address)  # ValueError if not an IP
        source = None if address is None else source_of(address.split("/", 1)[0])
        try:
            return max(cleared, self.store.penalty_clear(source))
        except StoreError as exc:
            log.warning("penalty cleared on this instance only: %s", exc)
            return cleared

    def entries(self) -> list[PenaltyEntry]:
        try:
            rows = self.store.penalty_entries(float(self._settings.auth_penalty_forget))
        except StoreError:
            return super().entries()
        return [PenaltyEntry(source, failures, self.delay(failures + 1), idle) for source, failures, idle in rows]

    def __len__(self) -> int:
        return len(self.entries())


class Follower:
    """Applies here what the other instances change in the shared store (see the module)."""

    def __init__(self, ctx: ServerContext, store: PostgresStore, skip: Collection[str],
                 reread_interval: float) -> None:
        self.ctx = ctx
        self.store = store
        self.skip = frozenset(skip)  # settings given as flags here: they win, as at start-up
        self.reread_interval = reread_interval
        self.connected = Event()  # set while LISTENing (tests wait for it)
        # Called after a user another instance changed is applied here (name, entry or
        # None): a supervisor tells its workers (geventpop3.process.shared_store).
        self.user_changed: list[Callable[[str, str | None], None]] = []
        self.failures = 0
        self._stopping = Event()
        self._greenlet: gevent.Greenlet[[], None] | None = None

    def start(self) -> None:
        if self._greenlet is None:
            self._stopping.clear()
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._stopping.set()
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=2.0)
            self._greenlet = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except (psycopg.Error, StoreError) as exc:
                self.failures += 1
                if self.failures == 1:
                    log.error("state database %s: not following the other instances: %s; retrying every second",
                              self.store.location, str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            self.connected.clear()
            self._heartbeat()  # also the probe that tells the leases when the database is back
            self._stopping.wait(1.0)

    def _listen(self) -> None:
        conn = self.store.db.connect()
        try:
            conn.execute(f"LISTEN {SETTINGS_CHANNEL}")
            conn.execute(f"LISTEN {USERS_CHANNEL}")
            self.reread()  # what changed while nobody listened
            if self.failures:
                log.warning("state database %s: following the other instances again after %d failed attempts",
                            self.store.location, self.failures)
                self.failures = 0
            self.connected.set()
            self._heartbeat()  # alive from the start, not a second later
            next_reread = time.monotonic() + self.reread_interval
            while not self._stopping.is_set():
                for notify in conn.notifies(timeout=1.0):
                    self._on_notify(notify.channel, notify.payload)
                self._heartbeat()
                if time.monotonic() >= next_reread:
                    self.reread()
                    next_reread = time.monotonic() + self.reread_interval
        finally:
            conn.close()

    def _heartbeat(self) -> None:
        with contextlib.suppress(StoreError):  # the follower's own error says it, once
            self.store.heartbeat(self.ctx.metrics.current_connections)

    def _on_notify(self, channel: str, payload: str) -> None:
        origin, _, subject = payload.partition(" ")
        if origin == self.store.db.owner:
            return  # our own change, applied already
        if channel == SETTINGS_CHANNEL:
            self.reread_settings()
        elif channel == USERS_CHANNEL:
            self._take_user(subject, self.store.load_user(subject))
            log.info("user %s %s by another instance", subject, "changed" if subject in self.ctx.users else "removed")

    def reread(self) -> None:
        self.reread_settings()
        self.reread_users()

    def reread_settings(self) -> None:
        """Apply the stored values that differ from the live ones (a flag given here wins)."""
        settings = self.ctx.settings
        for key, text in sorted(self.store.load_settings().items()):
            if key in self.skip:
                continue
            try:
                value = settings.parse(key, text)
                settings.check_msmp(key, value)
            except SettingError as exc:
                log.warning("ignoring setting %s=%r from another instance: %s", key, text, exc)
                continue
            if format_value(value) != settings.get(key):
                settings.apply(key, value, "another instance")

    def reread_users(self) -> None:
        users = self.ctx.users
        stored = self.store.load_users()
        held = users.stored_entries()
        for name in set(held) - set(stored):
            self._take_user(name, None)
        for name, encoded in stored.items():
            if held.get(name) != encoded:
                self._take_user(name, encoded)

    def _take_user(self, name: str, entry: str | None) -> None:
        self.ctx.users.take_stored(name, entry)
        for observer in self.user_changed:
            observer(name, entry)
