"""Mailbox leases in PostgreSQL: one POP3 session per mailbox across every instance.

A lease is a row (mailbox, owner process, instance, expiry). A login takes it in one
statement, or finds it held and answers `[IN-USE]` at once (the takes and the releases
of concurrent sessions share statements: `_batch_loop`); a lease whose expiry has
passed is taken over (its instance died). One greenlet per process renews all of its
leases in one statement a second, so a live instance's leases never expire and a dead
one's expire within `lease_timeout`. `confirm` renews one lease just before UPDATE and
says whether it is still ours: a session that lost it deletes nothing.

With SQLite there are no leases: the Maildir lock (maildir.Mailbox.lock) is the lock.
With PostgreSQL both are taken, the local lock first (cheap, and what serialises the
sessions of one process); the lease is what another host sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import AsyncResult, Event

from geventpop3.state import StoreError

if TYPE_CHECKING:
    import psycopg

    from geventpop3.state.postgres import Database

log = logging.getLogger(__name__)

_TAKE = ("INSERT INTO leases (mailbox, owner, instance, expires)"
         " SELECT m, %s, %s, now() + make_interval(secs => %s) FROM unnest(%s::text[]) AS m"
         " ON CONFLICT (mailbox) DO UPDATE SET owner = excluded.owner, instance = excluded.instance,"
         " expires = excluded.expires WHERE leases.expires < now() OR leases.owner = excluded.owner"
         " RETURNING mailbox")
RENEW_INTERVAL = 1.0  # seconds between two renewals of every lease of this process
HELD, IN_USE, UNAVAILABLE = "held", "in-use", "unavailable"
_ACQUIRE_WAIT = 1.0  # seconds a login waits for a database connection before [SYS/TEMP]


class Leases:
    """This process's leases; `timeout` reads the live `lease_timeout` setting."""

    def __init__(self, db: Database, timeout: Callable[[], float]) -> None:
        self.db = db
        self.timeout = timeout
        self.held: set[str] = set()  # mailboxes whose lease this process holds (as far as it knows)
        self._stopping = Event()
        self._renewer: gevent.Greenlet[[], None] | None = None
        self.renew_failures = 0
        # Takes and releases waiting for the batcher: mailbox -> the waiter's result.
        self._takes: dict[str, AsyncResult[str]] = {}
        self._releases: dict[str, AsyncResult[None]] = {}
        self._work = Event()
        self._batcher: gevent.Greenlet[[], None] | None = None

    # -- one session ------------------------------------------------------------
    def acquire(self, mailbox: str) -> str:
        """HELD, IN_USE (another live session has it) or UNAVAILABLE (no database answer)."""
        if not self.db.available:
            return UNAVAILABLE  # answered at once; the renewer finds out when it is back
        if mailbox in self._takes:
            return IN_USE  # another session of this process asks for it right now
        result = self._takes[mailbox] = AsyncResult()
        self._wake()
        outcome = result.get() or UNAVAILABLE
        if outcome == HELD:
            self.held.add(mailbox)
        return outcome

    def confirm(self, mailbox: str) -> bool:
        """Still ours? Renewed for a full `lease_timeout` if so (the deletions that follow
        run under it); False if another instance took it over or the database cannot say."""
        try:
            row = self.db.run("confirm a lease in", lambda c: c.execute(
                "UPDATE leases SET expires = now() + make_interval(secs => %s)"
                " WHERE mailbox = %s AND owner = %s RETURNING 1",
                (self.timeout(), mailbox, self.db.owner)).fetchone(), wait=_ACQUIRE_WAIT)
        except StoreError as exc:
            log.error("lease of %s not confirmed: %s", mailbox, exc)
            return False
        return row is not None

    def release(self, mailbox: str) -> None:
        """Give it back now (returns once the database has it); while the database is down
        it is only forgotten here and expires on its own (this process's next lease of it
        takes it over)."""
        self.held.discard(mailbox)
        if not self.db.available:
            return
        result = self._releases.get(mailbox)
        if result is None:
            result = self._releases[mailbox] = AsyncResult()
            self._wake()
        result.get()

    # -- the batcher: group commit of takes and releases ----------------------------
    def _wake(self) -> None:
        self._work.set()
        if self._batcher is None or self._batcher.dead:
            self._batcher = gevent.spawn(self._batch_loop)

    def _batch_loop(self) -> None:
        """One statement for every release and every take waiting, and again while more
        came meanwhile. Idle, a request goes at once; under load the requests that arrive
        during a round trip share the next one, so the statements per second stay bounded
        however many logins there are. Releases and takes go in one statement when both
        wait: each costs a round trip and a wake-up of the database, and a session is one
        take and one release (with `--workers` each process batches only its own)."""
        while True:
            self._work.wait()
            self._work.clear()
            releases, self._releases = self._releases, {}
            takes, self._takes = self._takes, {}
            if takes:
                self._take_batch(takes, releases)
            elif releases:
                self._release_batch(releases)

    def _take_batch(self, takes: dict[str, AsyncResult[str]], releases: dict[str, AsyncResult[None]]) -> None:
        """The takes, and the releases (the DELETE in a WITH of the same statement). A
        mailbox both released and taken again here stays ours: only the take runs for it,
        so the two never touch one row in one statement."""
        names = list(takes)
        released = [name for name in releases if name not in takes]
        sql = _TAKE
        args: tuple[object, ...] = (self.db.owner, self.db.instance, self.timeout(), names)
        if released:
            sql = "WITH released AS (DELETE FROM leases WHERE owner = %s AND mailbox = ANY(%s)) " + sql
            args = (self.db.owner, released, *args)
        try:
            rows = self.db.run("take leases in", lambda c: c.execute(sql, args).fetchall(), wait=_ACQUIRE_WAIT)
        except Exception as exc:  # a StoreError; anything else too: no waiter may hang
            log.error("leases of %d mailboxes not taken: %s", len(names), exc,
                      exc_info=None if isinstance(exc, StoreError) else exc)
            if released:
                log.warning("leases of %d mailboxes not released (they expire on their own)", len(released))
            for result in takes.values():
                result.set(UNAVAILABLE)
            for done in releases.values():
                done.set(None)
            return
        for done in releases.values():
            done.set(None)
        taken = {str(row[0]) for row in rows}
        for name, result in takes.items():
            result.set(HELD if name in taken else IN_USE)

    def _release_batch(self, releases: dict[str, AsyncResult[None]]) -> None:
        try:
            self.db.run("release leases in", lambda c: c.execute(
                "DELETE FROM leases WHERE owner = %s AND mailbox = ANY(%s)", (self.db.owner, list(releases))),
                wait=0.5)
        except Exception as exc:  # as in _take_batch
            log.warning("leases of %d mailboxes not released (they expire on their own): %s", len(releases), exc,
                        exc_info=None if isinstance(exc, StoreError) else exc)
        for result in releases.values():
            result.set(None)

    def holder(self, mailbox: str) -> str | None:
        """The instance holding a live lease of `mailbox`, or None (StoreError if unknown)."""
        row = self.db.run("read", lambda c: c.execute(
            "SELECT instance FROM leases WHERE mailbox = %s AND expires > now()", (mailbox,)).fetchone())
        return str(row[0]) if row else None

    # -- every lease of this process ---------------------------------------------
    def start(self) -> None:
        if self._renewer is None:
            self._stopping.clear()
            self._renewer = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self._stopping.wait(RENEW_INTERVAL):
            self.renew()

    def renew(self) -> None:
        """One statement for every lease of this process; a lease no longer ours is logged
        (its session finds out at `confirm` and deletes nothing)."""
        if not self.held and self.db.available:
            return  # nothing to renew; while the database is down this is also the probe
        try:
            rows = self.db.run("renew the leases in", self._renew_all, wait=RENEW_INTERVAL)
        except StoreError as exc:
            self.renew_failures += 1
            if self.renew_failures == 1:
                log.error("leases not renewed (%d held; they expire after lease_timeout): %s", len(self.held), exc)
            return
        if self.renew_failures:
            log.warning("leases renewed again after %d failed attempts", self.renew_failures)
            self.renew_failures = 0
        lost = self.held - rows
        for mailbox in lost:
            log.error("lease of %s lost to another instance: its session here will delete nothing", mailbox)
        self.held -= lost  # logged once; `confirm` asks the database anyway

    def _renew_all(self, conn: psycopg.Connection[Any]) -> set[str]:
        cursor = conn.execute("UPDATE leases SET expires = now() + make_interval(secs => %s) WHERE owner = %s"
                              " RETURNING mailbox", (self.timeout(), self.db.owner))
        return {str(row[0]) for row in cursor.fetchall()}

    def stop(self) -> None:
        """Stop renewing and give back every lease still held (sessions have ended)."""
        self._stopping.set()
        if self._renewer is not None:
            self._renewer.kill(block=True, timeout=2.0)
            self._renewer = None
        if self._batcher is not None:
            self._batcher.kill(block=True, timeout=2.0)
            self._batcher = None
        for take in self._takes.values():
            take.set(UNAVAILABLE)
        for done in self._releases.values():
            done.set(None)
        self._takes, self._releases = {}, {}
        self.held.clear()
        if not self.db.available:
            return
        try:
            self.db.run("release the leases in", lambda c: c.execute(
                "DELETE FROM leases WHERE owner = %s", (self.db.owner,)), wait=1.0)
        except StoreError as exc:
            log.warning("leases not released at shutdown (they expire on their own): %s", exc)


def release_owner(db: Database, owner: str, prefix: bool = False) -> int:
    """Delete every lease of `owner` (with `prefix`: of every owner starting so), processes
    known to be dead: a cluster worker killed, whose supervisor gives its leases back at
    once instead of after `lease_timeout`. How many were deleted."""
    if prefix:
        owner = owner.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    sql = "DELETE FROM leases WHERE owner LIKE %s" if prefix else "DELETE FROM leases WHERE owner = %s"
    return int(db.run("release a dead process's leases in", lambda c: c.execute(sql, (owner,)).rowcount, wait=1.0))
