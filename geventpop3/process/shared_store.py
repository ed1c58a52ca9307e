"""`--workers N` with the PostgreSQL store (`--state-url`): what the supervisor and each worker hold of it.

The supervisor holds the `PostgresStore` and the `SharedState` as a single process does:
the workers' counters and access-log entries reach it in their reports and go to
PostgreSQL through its persister, exactly as they go into SQLite; its follower applies
what other instances change, and its heartbeat and STAT speak for the whole instance.
`SupervisorShare` adds what workers need of it:

- a user another instance added, changed or deleted (NOTIFY -> follower) is broadcast
  like an MSMP ADD/DELE, and remembered for workers started later; a setting needs
  nothing here: the follower applies it to the supervisor's settings, whose every
  change is broadcast already. Either way it applies in every worker within a second.
- whether the database answers: while it does not, a failed login in a worker is
  temporary (`[SYS/TEMP]`), as in a single process.
- the leases of a worker that died: deleted as soon as the supervisor reaps it, as
  the kernel drops its Maildir locks, instead of blocking its users for `lease_timeout`.

Each worker (`WorkerShare`) has its own connections and `Leases`: a lease is taken at
login and confirmed before UPDATE in the process serving the session. Its owner (the
identity that renews, takes over and releases) is one per worker process,
`<supervisor owner>-w<index>-<pid>`, never the instance's: with one owner per instance a
worker's renewal would keep a dead worker's leases alive, a stopping worker would delete
the others', and a take would succeed over another worker's lease. The supervisor can
name each of its workers' owners from the pid it reaped, with no message that could be
lost. [IN-USE] between two workers of one instance comes from the Maildir lock first
(same host), then from the lease; between instances from the lease.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent

from geventpop3.process.messages import ControlMessage, Init, StoreState, User
from geventpop3.state import StoreError
from geventpop3.state.leases import release_owner
from geventpop3.state.postgres import Database
from geventpop3.state.shared import SessionShare, SharedState

if TYPE_CHECKING:
    from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)

AVAILABILITY_CHECK = 0.25  # seconds between two looks at whether the database answers
RELEASE_RETRY = 1.0  # seconds between attempts to release a dead worker's leases while the database is down


def lease_owner(prefix: str, index: int, pid: int) -> str:
    """The lease owner of worker `index` running as `pid` under the supervisor whose owner is `prefix`."""
    return f"{prefix}-w{index}-{pid}"


class SupervisorShare:
    """The supervisor's side (see the module docstring). `users` is the name -> entry
    map new workers are started with; `broadcast` tells every running worker."""

    def __init__(self, shared: SharedState, users: Callable[[], dict[str, str]],
                 broadcast: Callable[[ControlMessage], object]) -> None:
        self.shared = shared
        self.prefix = shared.db.owner
        self.users = users
        self.broadcast = broadcast
        self.told = shared.available  # what the workers were told of the database: a new one's Init says it too
        shared.follower.user_changed.append(self._user_changed)
        self._watcher = gevent.spawn(self._follow_availability)
        self._releases: list[gevent.Greenlet[..., None]] = []

    def _user_changed(self, name: str, entry: str | None) -> None:
        users = self.users()
        if entry is None:
            users.pop(name, None)
        else:
            users[name] = entry
        self.broadcast(User(name, entry))

    def _follow_availability(self) -> None:
        while True:
            gevent.sleep(AVAILABILITY_CHECK)
            available = self.shared.available
            if available != self.told:
                self.told = available
                self.broadcast(StoreState(available))

    def worker_exited(self, index: int, pid: int) -> None:
        """Worker `index` (process `pid`) is gone: its leases are deleted now (retried
        while the database is down, until they would have expired anyway)."""
        self._releases = [release for release in self._releases if not release.dead]
        self._releases.append(gevent.spawn(self._release, lease_owner(self.prefix, index, pid), index))

    def _release(self, owner: str, index: int) -> None:
        give_up = time.monotonic() + float(self.shared.ctx.settings.lease_timeout)
        while True:
            try:
                released = release_owner(self.shared.db, owner)
            except StoreError as exc:
                if time.monotonic() >= give_up:
                    log.warning("leases of worker %d not released (they expired meanwhile): %s", index, exc)
                    return
                gevent.sleep(RELEASE_RETRY)
                continue
            if released:
                log.info("released %d mailbox leases of worker %d", released, index)
            return

    def stop(self) -> None:
        """After the workers stopped (each gave its leases back): whatever a worker killed
        at the stop deadline left is deleted too."""
        self._watcher.kill(block=True, timeout=1.0)
        # The workers just stopped have a release each in flight: killed mid-query, its
        # connection would go back to the pool still busy.
        gevent.joinall(self._releases, timeout=2.0)
        gevent.killall(self._releases, block=True, timeout=1.0)
        if not self.shared.available:
            return
        try:
            release_owner(self.shared.db, f"{self.prefix}-w", prefix=True)  # every lease_owner()
        except StoreError as exc:
            log.warning("workers' leases not released at shutdown (they expire on their own): %s", exc)


class WorkerShare(SessionShare):
    """A worker's side: its own pool of connections and its own leases (see the module
    docstring); `available` is false when either the supervisor or its own last
    attempt found the database not answering."""

    def __init__(self, ctx: ServerContext, url: str, instance: str, owner: str, available: bool) -> None:
        db = Database(url, instance, require=False)  # a worker replaced during an outage serves all the same
        db.owner = owner
        super().__init__(ctx, db)
        self.supervisor_says = available

    @classmethod
    def for_worker(cls, ctx: ServerContext, url: str, instance: str, index: int, init: Init) -> WorkerShare:
        prefix = init.lease_prefix or uuid.uuid4().hex
        return cls(ctx, url, instance, lease_owner(prefix, index, os.getpid()), init.store_available)

    @property
    def available(self) -> bool:
        return self.supervisor_says and self.db.available

    def stop(self) -> None:
        super().stop()
        self.db.close()


def told_available(ctx: ServerContext, available: bool) -> None:
    """The supervisor says whether the database answers (messages.StoreState)."""
    if isinstance(ctx.shared, WorkerShare):
        ctx.shared.supervisor_says = available
