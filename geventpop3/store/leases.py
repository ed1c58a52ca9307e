"""Mailbox leases in PostgreSQL: one POP3 session per mailbox across every instance.

A lease is a row (mailbox, owner process, instance, expiry). A login takes it in one
statement, or finds it held and answers `[IN-USE]` at once; a lease whose expiry has
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
from gevent.event import Event

from geventpop3.store import StoreError

if TYPE_CHECKING:
    import psycopg

    from geventpop3.store.postgres import Database

log = logging.getLogger(__name__)

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

    # -- one session ------------------------------------------------------------
    def acquire(self, mailbox: str) -> str:
        """HELD, IN_USE (another live session has it) or UNAVAILABLE (no database answer)."""
        if not self.db.available:
            return UNAVAILABLE  # answered at once; the renewer finds out when it is back
        try:
            row = self.db.run("take a lease in", lambda c: c.execute(
                "INSERT INTO leases (mailbox, owner, instance, expires)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (mailbox) DO UPDATE SET owner = excluded.owner, instance = excluded.instance,"
                " expires = excluded.expires WHERE leases.expires < now() OR leases.owner = excluded.owner"
                " RETURNING 1", (mailbox, self.db.owner, self.db.instance, self.timeout())).fetchone(),
                wait=_ACQUIRE_WAIT)
        except StoreError as exc:
            log.error("lease of %s not taken: %s", mailbox, exc)
            return UNAVAILABLE
        if row is None:
            return IN_USE
        self.held.add(mailbox)
        return HELD

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
        """Give it back now; while the database is down it is only forgotten here and
        expires on its own (this process's next lease of it takes it over)."""
        self.held.discard(mailbox)
        if not self.db.available:
            return
        try:
            self.db.run("release a lease in", lambda c: c.execute(
                "DELETE FROM leases WHERE mailbox = %s AND owner = %s", (mailbox, self.db.owner)), wait=0.5)
        except StoreError as exc:
            log.warning("lease of %s not released (it expires on its own): %s", mailbox, exc)

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
        self.held.clear()
        if not self.db.available:
            return
        try:
            self.db.run("release the leases in", lambda c: c.execute(
                "DELETE FROM leases WHERE owner = %s", (self.db.owner,)), wait=1.0)
        except StoreError as exc:
            log.warning("leases not released at shutdown (they expire on their own): %s", exc)
