"""The supervisor of `--workers N` (N > 1): binds, keeps the state, serves MSMP, runs the workers.

The `Supervisor` role of `Server(config, role)` (geventpop3.process.server). Start-up:
bind every listener, import what the workers need and fork the keeper
(geventpop3.process.keeper), the one process that stays root (if started as root) and
reads no network input; then drop privileges as a single process does. Then ask the
keeper for N workers (forked from it: geventpop3.process.worker) that inherit the POP3
and POP3S listeners; while they read the users file, open the store, users and
settings here; then answer each worker's hello with its init, wait until each is
ready, and only then serve MSMP and the metrics and say ready. The keeper reports
each worker's exit; certificate reloads go through it too (the key may be root's alone).

One management plane: MSMP and the metrics are served here only. Each change made over
MSMP (`SET`, `ADD`, `DELE`, `PENALTY CLEAR`, `RELOAD`) is one broadcast of a typed
message (geventpop3.process.messages) on every worker's channel, answered once every
serving worker acknowledged it; SIGHUP and the changes another instance makes (with
--state-url) are broadcast too, without waiting. A `SET` carries the value as checked
here: the workers only parse it. The workers report counters, logged-in users and
access-log entries; this process sums them (aggregate.Totals) and is the one writer
of the store (the usual Persister).

Faults: a worker that dies is replaced at once if it had been serving or was killed
from outside (SIGKILL, the OOM killer), else after a backoff that doubles (0.5 s .. 30 s)
while it keeps failing at start by itself, which includes dying soon after it became
ready (geventpop3.process.restarts); SIGTERM/SIGINT
stop the workers first (they end their sessions and send their last report), then the
supervisor's own shutdown flushes the state.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event
from gevent.socket import socket

from geventpop3.auth.users import UserDirectory
from geventpop3.core.accounting import LocalAccounting
from geventpop3.core.names import UserError
from geventpop3.core.settings import KEYS, Settings, format_value
from geventpop3.process import accountant, messages
from geventpop3.process.aggregate import Totals, WorkerState
from geventpop3.process.channel import Channel, encode, socketpair
from geventpop3.process.keeper import Keeper, KeeperError
from geventpop3.process.messages import (
    PROTOCOL_VERSION,
    Ack,
    Ask,
    ControlMessage,
    DelUser,
    Hello,
    Init,
    PenaltyClear,
    Ready,
    Received,
    Refresh,
    Reload,
    Report,
    Set,
    Tell,
    User,
)
from geventpop3.process.restarts import RestartPolicy, by_itself
from geventpop3.process.server import SHUTDOWN_GRACE, Endpoints, Server, StartupError
from geventpop3.process.table import AccountingTable
from geventpop3.service.context import ServerContext
from geventpop3.service.msmp.backend import ManagementBackend
from geventpop3.state import Store

if TYPE_CHECKING:
    from geventpop3.process.shared_store import SupervisorShare

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # every worker ready within this, or the start fails
APPLY_WAIT = 1.0  # an MSMP change is answered once every serving worker applied it, or after this
CLEAN_EXIT_GRACE = 0.2  # a worker that exits 0 on its own: maybe we are being stopped too (systemd)
REFRESH_WAIT = 0.5  # STAT waits this long at most for the workers' fresh reports (then: their last ones)


class RecordingUsers:
    """The store's users as the supervisor's UserDirectory writes them, remembered, so a
    new worker gets them without a database read (and with --no-state too)."""

    def __init__(self, store: Store | None) -> None:
        self.store = store
        self.users: dict[str, str] = {}

    def load_users(self) -> dict[str, str]:
        users = self.store.load_users() if self.store is not None else {}
        self.users = dict(users)
        return users

    def save_user(self, name: str, password_hash: str) -> None:
        if self.store is not None:
            self.store.save_user(name, password_hash)
        self.users[name] = password_hash

    def delete_user(self, name: str) -> None:
        if self.store is not None:
            self.store.delete_user(name)
        self.users.pop(name, None)


class WorkerProcess:
    """A worker the keeper forked: its pid, signals, and its exit status as the keeper reports it."""

    def __init__(self) -> None:
        self.pid = 0
        self.returncode: int | None = None  # as subprocess gives it: negative for a signal
        self._ended = Event()

    def exited(self, status: int) -> None:
        self.returncode = status
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None if the worker still runs after `timeout` seconds."""
        self._ended.wait(timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """To the worker, if it still runs. In its first instant it is root still (it drops at
        once): the signal is then refused, and the end of its channel stops it instead."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class Launched:
    """A worker process started, and the supervisor's end of its channel (not read yet)."""

    process: WorkerProcess
    channel: Channel


class UnverifiedUsers(UserDirectory):
    """The supervisor's POP3 users: kept for MSMP (LIST, ADD, DELE) and reloads, never
    checked against a POP3 password here, so their failure floor is not measured here
    either (those hash runs would take CPU from the workers while they start)."""

    def _calibrate_soon(self) -> None:
        pass


class WorkerPool:
    """Starts, watches, replaces and stops the worker processes of `count` slots.

    `launch()` starts every interpreter early (they import and read the users file while
    the supervisor still starts); `start(totals)` then watches them. Each worker's first
    message is `hello` with the digest of the users file it read; its answer, `init`, is
    built then (`initial(slot, digest)`) and queued before any later broadcast."""

    def __init__(self, keeper: Keeper | None, count: int, initial: Callable[[int, str], ControlMessage]) -> None:
        self.keeper = keeper  # forks the workers (with the configuration as this process read it)
        self.count = count
        self.initial = initial
        self.totals: Totals | None = None
        self.channels: dict[int, Channel] = {}  # of the workers that said hello: broadcasts go there
        self.processes: dict[int, WorkerProcess] = {}
        self.restarts = RestartPolicy(count)
        self.ready_at: dict[int, float] = {}  # monotonic time each slot's process said ready
        self.stopping = False
        self.started = False
        self.changed = Event()  # a worker became ready or exited (start-up waits on it)
        self.acked = Event()  # a worker applied a broadcast
        self.sequence = 0  # of broadcasts
        self.start_failure: str | None = None
        self._launched: dict[int, Launched | OSError] = {}
        self.exited: list[Callable[[int, int], None]] = []  # called with (slot, pid) once a worker is reaped
        self.withdrawn: set[str] = set()  # users whose MSMP DELE is in progress: a worker started meanwhile too
        self._watchers: list[gevent.Greenlet[..., None]] = []
        # The whole server's penalty, which the workers ask (geventpop3.process.accountant), and
        # the table where they count connections and logins (geventpop3.process.table).
        self.accounting: LocalAccounting | None = None
        self.table: AccountingTable | None = None
        self.refreshed = Event()  # a worker answered a Refresh
        self._refreshes = 0
        self._handlers: dict[type[ControlMessage], Callable[[WorkerState, WorkerProcess, Any], None]] = {
            Report: self._report, Ack: self._ack, Ready: self._ready, Ask: self._ask, Tell: self._tell}

    def launch(self) -> None:
        """Start every worker's interpreter now; each waits for its `init` (sent once `start` runs)."""
        for index in range(self.count):
            try:
                self._launched[index] = self._launch(index)
            except OSError as exc:
                self._launched[index] = exc

    def abandon(self) -> None:
        """The supervisor's start failed before `start`: end the launched workers (the end of
        their channel stops them before they say anything), reaped."""
        launched = [item for item in self._launched.values() if isinstance(item, Launched)]
        self._launched.clear()
        for item in launched:
            item.channel.close()
            if item.process.poll() is None:
                item.process.terminate()
        for item in launched:
            if item.process.wait(SHUTDOWN_GRACE) is None:
                item.process.kill()
                item.process.wait(SHUTDOWN_GRACE)

    def start(self, totals: Totals, interrupted: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        """Watch every launched worker and wait until all serve, or until `interrupted()` (SIGTERM
        during start-up: the caller stops them); StartupError if one exits first."""
        self.totals = totals
        for worker in totals.workers:
            self._spawn(worker, self._launched.pop(worker.index, None))
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in totals.workers) and not interrupted():
            if self.start_failure is not None or time.monotonic() > deadline:
                why = self.start_failure or f"not every worker was ready within {timeout:.0f} s"
                self.stop(SHUTDOWN_GRACE)
                raise StartupError(why)
            self.changed.clear()
            self.changed.wait(0.5)
        self.started = True

    def broadcast(self, message: ControlMessage, wait: float = 0.0) -> bool:
        """Tell every worker; with `wait`, until each serving one has applied it (at most
        `wait` seconds: a worker that is slower gets it all the same, later). True if all did."""
        self.sequence += 1
        data = encode(messages.encode(message, self.sequence))  # once: a reload carries the whole users file
        for channel in list(self.channels.values()):
            channel.send_encoded(data)
        if not wait or self.totals is None:
            return True
        deadline = time.monotonic() + wait
        while any(w.ready and w.acked < self.sequence for w in self.totals.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("not every worker applied %s within %.1f s", message.OP, wait)
                return False
            self.acked.clear()
            self.acked.wait(left)
        return True

    def _launch(self, index: int) -> Launched:
        """A new worker for slot `index`, forked by the keeper, with its end of a new channel."""
        if self.keeper is None:
            raise OSError("no keeper to start workers")
        ours, theirs = socketpair()
        process = WorkerProcess()
        try:
            process.pid = self.keeper.fork_worker(index, theirs.fileno(), process.exited)
        except KeeperError as exc:
            ours.close()
            raise OSError(str(exc)) from None
        finally:
            theirs.close()
        return Launched(process, Channel(ours))

    def _spawn(self, worker: WorkerState, launched: Launched | OSError | None = None) -> None:
        """Watch `launched` (launched now if None) as the process of `worker`'s slot."""
        try:
            if isinstance(launched, OSError):
                raise launched
            launched = launched or self._launch(worker.index)
        except OSError as exc:
            log.error("worker %d: cannot start: %s", worker.index, exc)
            self._failed(worker, f"worker {worker.index} cannot start: {exc}")
            return
        self.processes[worker.index] = launched.process
        worker.pid = launched.process.pid
        worker.starts += 1
        self._watchers = [watcher for watcher in self._watchers if not watcher.dead]  # one per restart otherwise
        self._watchers.append(gevent.spawn(self._watch, worker, launched.process, launched.channel))

    def _watch(self, worker: WorkerState, process: WorkerProcess, channel: Channel) -> None:
        """Answer the worker's hello, read its messages until it ends, then replace it (unless stopping)."""
        assert self.totals is not None
        received = messages.decoded(channel.messages(), f"worker {worker.index}")
        hello = next(received, None)
        if hello is not None and isinstance(hello.message, Hello) and hello.message.version == PROTOCOL_VERSION:
            first = self.initial(worker.index, hello.message.users_digest)
            channel.start(first=messages.encode(first))  # no yield until
            self.channels[worker.index] = channel  # registered: no broadcast is missed, none is doubled
            worker.acked = self.sequence  # init carries every change so far: none to wait for
            try:
                self._read(worker, process, received)
            except Exception:  # a message this process cannot take: the worker is replaced, the watch goes on
                log.exception("worker %d (pid %d) sent what the supervisor cannot take: stopped", worker.index,
                              process.pid)
                process.kill()
        elif hello is not None and isinstance(hello.message, Hello):
            log.error("worker %d (pid %d) speaks control protocol version %d, this supervisor %d (started from "
                      "another geventpop3?): stopped", worker.index, process.pid, hello.message.version,
                      PROTOCOL_VERSION)
            process.kill()
        elif hello is not None:
            log.error("worker %d (pid %d) did not say hello: stopped", worker.index, process.pid)
            process.kill()
        status = process.wait()
        assert status is not None
        if self.table is not None:  # its connections and logins in flight are gone with it
            self.table.forget(worker.index)
        for exited in self.exited:
            exited(worker.index, process.pid)
        channel.close()
        was_ready = worker.ready
        self.totals.forget(worker)
        if self.channels.get(worker.index) is channel:
            del self.channels[worker.index]
        if self.processes.get(worker.index) is process:
            del self.processes[worker.index]
        if status == 0 and not self.stopping:
            gevent.sleep(CLEAN_EXIT_GRACE)
        if self.stopping:
            return
        how = f"killed by {signal_name(-status)}" if status < 0 else f"exited with status {status}"
        if was_ready:
            self._ended(worker, process.pid, how, time.monotonic() - self.ready_at[worker.index], status)
            return
        self._failed(worker, f"worker {worker.index} {how} before it was ready (its error is logged above)",
                     status)

    def _read(self, worker: WorkerState, process: WorkerProcess, received: Iterator[Received]) -> None:
        for message, _ in received:
            handler = self._handlers.get(type(message))
            if handler is None:
                log.error("worker %d (pid %d): %s is no message for the supervisor, ignored", worker.index,
                          process.pid, message.OP)
                continue
            handler(worker, process, message)

    def _report(self, worker: WorkerState, process: WorkerProcess, message: Report) -> None:
        assert self.totals is not None
        self.totals.add(worker, message.fields)
        refresh = message.fields.get("refresh")
        if isinstance(refresh, int):
            worker.refreshed = refresh
            self.refreshed.set()

    def _ask(self, worker: WorkerState, process: WorkerProcess, message: Ask) -> None:
        gevent.spawn(self._answer, worker, message)  # may wait for the shared database: the reading goes on

    def _answer(self, worker: WorkerState, message: Ask) -> None:
        channel = self.channels.get(worker.index)
        if self.accounting is not None and channel is not None:
            channel.send(messages.encode(accountant.answer(self.accounting, message)))

    def _tell(self, worker: WorkerState, process: WorkerProcess, message: Tell) -> None:
        if self.accounting is not None:
            accountant.told(self.accounting, message)

    def refresh(self, wait: float = REFRESH_WAIT) -> None:
        """Every serving worker's report as of now (MSMP STAT, a scrape): asked, and waited
        for at most `wait` seconds (a slower worker's last report counts then)."""
        if self.totals is None:
            return
        self._refreshes += 1
        number = self._refreshes
        asked = [w for w in self.totals.workers if w.ready and w.index in self.channels]
        data = encode(messages.encode(Refresh(number)))
        for worker in asked:
            self.channels[worker.index].send_encoded(data)
        deadline = time.monotonic() + wait
        while any(w.ready and w.refreshed < number for w in asked):
            left = deadline - time.monotonic()
            if left <= 0:
                log.debug("not every worker reported within %.1f s for STAT", wait)
                return
            self.refreshed.clear()
            self.refreshed.wait(left)

    def _ack(self, worker: WorkerState, process: WorkerProcess, message: Ack) -> None:
        worker.acked = message.applied
        self.acked.set()

    def _ready(self, worker: WorkerState, process: WorkerProcess, message: Ready) -> None:
        worker.ready = True
        self.ready_at[worker.index] = time.monotonic()
        if self.started:  # the first ones are said once, by the supervisor's start
            log.info("worker %d serving (pid %d)", worker.index, process.pid)
        self.changed.set()

    def _ended(self, worker: WorkerState, pid: int, how: str, served: float, status: int) -> None:
        """A worker that had been serving ended: replaced at once, or after a backoff if it
        failed by itself within CRASH_WINDOW of its start (geventpop3.process.restarts); one
        line either way."""
        delay = self.restarts.after_exit(worker.index, served, status)
        failures = self.restarts.failures[worker.index]
        if not by_itself(status):
            log.error("worker %d (pid %d) %s after serving %.1f s, from outside; replacing it now", worker.index,
                      pid, how, served)
        elif failures == 0:
            log.error("worker %d (pid %d) %s after serving %.0f s; replacing it", worker.index, pid, how, served)
        else:
            log.error("worker %d (pid %d) %s %.1f s after it was ready, a failure at start (failure %d in a row); "
                      "%s", worker.index, pid, how, served, failures, _next_start(delay))
        self._start_later(worker, delay)

    def _failed(self, worker: WorkerState, why: str, status: int = 1) -> None:
        """A worker that did not get to serve: the start fails, or it is tried again (at once
        if it was killed from outside, else later)."""
        self.changed.set()
        if not self.started:
            self.start_failure = self.start_failure or why
            return
        delay = self.restarts.after_exit(worker.index, None, status)
        if not by_itself(status):
            log.error("%s, from outside; %s", why.replace(" (its error is logged above)", ""), _next_start(delay))
        else:
            log.error("%s (failure %d in a row); %s", why, self.restarts.failures[worker.index], _next_start(delay))
        self._start_later(worker, delay)

    def _start_later(self, worker: WorkerState, delay: float) -> None:
        if delay > 0:
            gevent.spawn_later(delay, self._respawn, worker)
        else:
            self._spawn(worker)

    def _respawn(self, worker: WorkerState) -> None:
        if not self.stopping and worker.index not in self.processes:
            self._spawn(worker)

    def close_listeners(self) -> None:
        """The POP3 listeners are the keeper's and the workers': nothing to close here (the
        keeper closes its copies when the supervisor's end of its socket closes)."""

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker, wait for their last reports and exits; SIGKILL after `timeout`."""
        self.stopping = True
        for process in list(self.processes.values()):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        if not gevent.joinall(self._watchers, timeout=timeout) or any(not w.dead for w in self._watchers):
            for process in list(self.processes.values()):
                if process.poll() is None:
                    log.error("worker pid %d did not stop in %.0f s: killed", process.pid, timeout)
                    process.kill()
            gevent.joinall(self._watchers, timeout=5)


def signal_name(number: int) -> str:
    """SIGKILL, or "signal 40" for a real-time signal, which signal.Signals does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _next_start(delay: float) -> str:
    return f"starting it again in {delay:.1f} s" if delay > 0 else "replacing it now"


class SettingsRelay:
    """Every change of the supervisor's settings, told to every worker as one `Set` of the
    value as formatted here (checked here; a worker only parses it). A SET over MSMP is
    sent by `set` (one broadcast, acknowledged); any other change (another instance's,
    through the shared store's follower) as it is applied here."""

    def __init__(self, settings: Settings, pool: WorkerPool) -> None:
        self.settings = settings
        self.pool = pool
        self._own: list[str] = []  # keys being SET over MSMP: `set` broadcasts them
        settings.subscribe(self._changed)

    @contextmanager
    def own(self, key: str) -> Iterator[None]:
        """The caller broadcasts the changes of `key` made in the block."""
        self._own.append(key)
        try:
            yield
        finally:
            self._own.remove(key)

    def _changed(self, key: str, old: object, new: object) -> None:
        if old != new and key not in self._own:
            self.pool.broadcast(Set(key, format_value(new)))


class ClusterBackend(ManagementBackend):
    """MSMP over the supervisor's context, telling every worker what changed: one
    broadcast per change, answered once every serving worker applied it (or after APPLY_WAIT)."""

    def __init__(self, ctx: ServerContext, reload: Callable[[], list[str]], pool: WorkerPool, totals: Totals,
                 recorded: RecordingUsers, relay: SettingsRelay) -> None:
        super().__init__(ctx, reload)
        self.pool = pool
        self.totals = totals
        self.recorded = recorded
        self.relay = relay

    def add_user(self, name: str, password: str) -> bool:
        """Hashed once, here; the workers take the entry (the password never leaves this process)."""
        created = super().add_user(name, password)
        self.pool.broadcast(User(name, self.recorded.users[name]), APPLY_WAIT)
        return created

    def delete_user(self, name: str) -> None:
        """Withdrawn in every worker first (no login can start there any more), then deleted
        here (the checks, the Maildir moved aside, the store); then the workers forget the
        user (commit), or put it back if the deletion failed (rollback)."""
        if name not in self.ctx.users:
            raise UserError("User does not exist")
        self.pool.withdrawn.add(name)  # a worker that says hello meanwhile gets it in its init
        self.pool.broadcast(DelUser(name, "begin"), APPLY_WAIT)
        deleted = False
        try:
            super().delete_user(name)
            deleted = True
        finally:
            self.pool.withdrawn.discard(name)
            self.pool.broadcast(DelUser(name, "commit" if deleted else "rollback"), APPLY_WAIT)

    def clear_penalty(self, address: str | None) -> int:
        cleared = super().clear_penalty(address)
        self.pool.broadcast(PenaltyClear(address), APPLY_WAIT)
        return cleared

    def set_setting(self, key: str, value: str) -> None:
        """Checked, saved and applied here, then one broadcast of the value in force, acknowledged."""
        with self.relay.own(key):
            super().set_setting(key, value)
        self.pool.broadcast(Set(key, self.ctx.settings.get(key)), APPLY_WAIT)

    def stat_lines(self) -> list[str]:
        """As of now: every worker reports first (at most REFRESH_WAIT)."""
        self.pool.refresh()
        return [*super().stat_lines(), *self.totals.stat_lines()]


class Supervisor:
    """The role whose POP3 is served by worker processes (see the module docstring)."""

    def __init__(self, argv: list[str] | None = None) -> None:
        self.argv = argv or []  # the command line (the workers are forked with its configuration)
        self.pool: WorkerPool | None = None
        self.recorded = RecordingUsers(None)
        self.share: SupervisorShare | None = None  # with --state-url (geventpop3.process.shared_store)
        self.table: AccountingTable | None = None  # the workers' shared counts (made before the keeper)

    def bind(self, server: Server) -> None:
        server.bind_all()

    def drop(self, server: Server) -> None:
        """The keeper first (it keeps the POP3 listeners and forks the workers from what is
        imported now), then the drop."""
        from geventpop3.process import worker  # imported before the fork: every worker shares it

        config = server.config
        listeners: dict[str, list[socket]] = {service: list(server.bound[service]) for service in ("pop3", "pop3s")
                                              if service in server.bound}
        # Mapped before the fork: every worker the keeper forks counts in it (geventpop3.process.table).
        table = self.table = AccountingTable(config.workers, config.settings.max_connections,
                                             config.settings.auth_penalty_sources)
        server.start_keeper(listeners, lambda index, fd, fds: worker.run_forked(config, index, fd, fds, table))
        server.drop_privileges()

    def prepare(self, server: Server) -> ServerContext:
        """The workers' interpreters start first: they import, parse the configuration and
        read the users file while this process opens the state and reads the users file
        too, then each waits for its `Init` (sent once this process serves, `serve`).
        Start-up takes about one read of the users file instead of two in a row."""
        config = server.config
        self.pool = WorkerPool(server.keeper, config.workers, lambda index, digest: self.initial(server, index, digest))
        self.pool.launch()
        try:
            ctx = server.prepare_context(lambda: self._directory(server))
            if config.state_url is not None:
                self._share(ctx)
        except BaseException:
            self.pool.abandon()
            raise
        return ctx

    def _directory(self, server: Server) -> UserDirectory:
        self.recorded = RecordingUsers(server.store)
        directory = UnverifiedUsers(self.recorded, server.hasher, allow_weak=server.config.allow_weak_schemes)
        return server.configured_users(directory)

    def _share(self, ctx: ServerContext) -> None:
        """With --state-url: the shared store's part (geventpop3.process.shared_store), made
        before any yield, so the follower has not applied anything the workers would miss."""
        from geventpop3.process.shared_store import SupervisorShare
        from geventpop3.state.shared import SharedState

        assert isinstance(ctx.shared, SharedState)
        self.share = SupervisorShare(ctx.shared, lambda: self.recorded.users, self._broadcast)

    def _broadcast(self, message: ControlMessage) -> None:
        if self.pool is not None:
            self.pool.broadcast(message)

    def initial(self, server: Server, index: int, users_digest: str) -> Init:
        """A new worker's first message: the settings and stored users in force, and the users
        file's content if the worker read another one than this process (`users_digest`, of
        what it read, differs: the file changed in between), so every process has the same users."""
        assert server.ctx is not None
        settings = server.ctx.settings
        users_data = None
        if not server.users.matches(users_digest):
            log.info("worker %d read another users file than the one in force here: it takes this one", index)
            users_data = server.users.data.decode()
        share = self.share
        return Init(settings={key: settings.get(key) for key in KEYS}, users=dict(self.recorded.users),
                    withdrawn=tuple(sorted(self.pool.withdrawn)) if self.pool is not None else (),
                    users_data=users_data, lease_prefix=share.prefix if share is not None else None,
                    store_available=share.told if share is not None else True)

    def serve(self, server: Server, ctx: ServerContext) -> None:
        assert self.pool is not None
        for service in ("pop3", "pop3s"):
            for sock in server.bound.pop(service, []):  # the keeper's and its workers': not held here
                sock.close()
        totals = Totals(ctx, server.config.workers)
        if self.share is not None:
            self.pool.exited.append(self.share.worker_exited)
        relay = SettingsRelay(ctx.settings, self.pool)
        assert isinstance(ctx.accounting, LocalAccounting)
        self.pool.accounting = ctx.accounting  # the one penalty for every worker
        if self.table is not None:
            self.pool.table = table = self.table
            penalty = ctx.penalty

            def publish(source: str | None) -> None:  # what a worker's login reads of the penalty
                table.publish(source, penalty.failures(source) if source is not None else 0, time.monotonic())

            penalty.changed = publish
        try:
            self.pool.start(totals, server.stopping.is_set)
        except StartupError:
            self.pool.close_listeners()
            raise
        if server.stopping.is_set():
            return  # asked to stop during start-up: no MSMP, the workers are stopped at once
        backend = ClusterBackend(ctx, lambda: self.reload(server, APPLY_WAIT), self.pool, totals, self.recorded,
                                 relay)
        server.serve_admin(ctx, backend, collectors=[totals], refresh=self.pool.refresh)

    def started(self, server: Server, ctx: ServerContext) -> None:
        server.log_start()
        pids = sorted((index, process.pid) for index, process in self.pool.processes.items()) if self.pool else []
        log.info("geventpop3 ready: maildir=%s users=%d state=%s workers=%d (%s)", ctx.settings.maildir,
                 len(ctx.users), server.store.location if server.store is not None else "none",
                 server.config.workers, ", ".join(f"worker {index} pid {pid}" for index, pid in pids))

    def ready(self, server: Server, served: Endpoints) -> int:
        return server.write_ready_file(served)

    def hangup(self, server: Server) -> None:
        server.reload_when_serving()

    def reload(self, server: Server, wait: float = 0.0) -> list[str]:
        """Here (the certificate MSMP over TLS uses, the users file) and in every worker, which
        take the users file's content in force here rather than read the file again: the
        same users everywhere, even if the file changes meanwhile or its reload failed here.
        `wait`: at most this long for every worker to have reloaded (MSMP RELOAD)."""
        problems = server.reload_local(server.users.read)
        if self.pool is not None:
            server_tls = server.config.tls
            cert = key = None
            if server_tls is not None:  # the pair in force here: the keeper's if it read a new one
                cert, key = server_tls.cert_pem.decode("latin-1"), server_tls.key_pem.decode("latin-1")
            message = Reload(server.users.data.decode() if server.config.users_file else None, cert, key)
            self.pool.broadcast(message, wait)
            gevent.spawn(self._reloaded, self.pool.sequence)
        return problems

    def _reloaded(self, sequence: int) -> None:
        """One line once every serving worker has applied the reload numbered `sequence` (a
        worker's own lines are DEBUG; its problems it logs itself, ERROR)."""
        pool = self.pool
        assert pool is not None and pool.totals is not None
        deadline = time.monotonic() + START_TIMEOUT
        while (late := [w for w in pool.totals.workers if w.ready and w.acked < sequence]) and not pool.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("reload: %d workers did not confirm it within %.0f s", len(late), START_TIMEOUT)
                return
            pool.acked.clear()
            pool.acked.wait(min(left, 1.0))
        log.info("reload done in %d workers", sum(1 for w in pool.totals.workers if w.ready))

    def shutdown(self, server: Server) -> None:
        """Workers first (their sessions end, their last reports arrive), then the state."""
        if self.pool is not None:
            log.info("stopping %d workers", len(self.pool.processes))
            self.pool.close_listeners()
            self.pool.stop(SHUTDOWN_GRACE + 5)
        server.remove_ready_file()
        server.stop_serving()
        self.close_state(server)
        log.info("stopped")

    def close_state(self, server: Server) -> None:
        if self.share is not None:
            self.share.stop()  # the workers have stopped: what a killed one left goes now
        server.close_state()
