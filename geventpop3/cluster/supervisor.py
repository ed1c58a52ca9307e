"""The supervisor of `--workers N` (N > 1): binds, keeps the state, serves MSMP, runs the workers.

Start-up as a single process does it (geventpop3.app.App): bind every listener, drop
privileges, open the store, users and settings; then start N workers (fresh
interpreters, geventpop3.cluster.worker) that inherit the POP3 and POP3S listeners,
wait until each is ready, and only then serve MSMP and the metrics and say ready.

One management plane: MSMP and the metrics are served here only. `SET` reaches the
workers through the settings listener, `ADD`, `DELE`, `PENALTY CLEAR` through the
backend, `RELOAD` and SIGHUP through `reload()`: each is a message on every worker's
channel, applied there at once. The workers report counters, logged-in users and
access-log entries; this process sums them (aggregate.Totals) and is the one writer
of the store (the usual Persister).

Faults: a worker that dies is replaced at once if it had been serving, else after a
backoff that doubles (0.5 s .. 30 s) while it keeps failing at start; SIGTERM/SIGINT
stop the workers first (they end their sessions and send their last report), then the
supervisor's own shutdown flushes the state.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event
from gevent.socket import socket

from geventpop3.app import SHUTDOWN_GRACE, App, StartupError
from geventpop3.cluster.aggregate import Totals, WorkerState
from geventpop3.cluster.channel import Channel, Message, socketpair
from geventpop3.config import Config
from geventpop3.context import ServerContext
from geventpop3.metrics import start_prometheus_server
from geventpop3.msmp.backend import ManagementBackend
from geventpop3.msmp.session import start_admin_servers
from geventpop3.settings import KEYS, format_value
from geventpop3.store import Store
from geventpop3.users import UserError, UserStore

if TYPE_CHECKING:
    from geventpop3.cluster.shared_store import SupervisorShare

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # every worker ready within this, or the start fails
BACKOFF_FIRST = 0.5  # after a worker failed at start; doubles up to BACKOFF_MAX
BACKOFF_MAX = 30.0
APPLY_WAIT = 1.0  # an MSMP change is answered once every serving worker applied it, or after this
CLEAN_EXIT_GRACE = 0.2  # a worker that exits 0 on its own: maybe we are being stopped too (systemd)


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


class WorkerPool:
    """Starts, watches, replaces and stops the worker processes of the slots in `totals`."""

    def __init__(self, argv: list[str], listeners: dict[str, list[socket]], totals: Totals,
                 initial: Callable[[], Message]) -> None:
        self.argv = argv
        self.listeners = listeners
        self.totals = totals
        self.initial = initial
        self.channels: dict[int, Channel] = {}
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.failures = [0] * len(totals.workers)  # failed starts in a row, per slot
        self.stopping = False
        self.started = False
        self.changed = Event()  # a worker became ready or exited (start-up waits on it)
        self.acked = Event()  # a worker applied a broadcast
        self.sequence = 0  # of broadcasts
        self.start_failure: str | None = None
        self.exited: list[Callable[[int, int], None]] = []  # called with (slot, pid) once a worker is reaped
        self._watchers: list[gevent.Greenlet[..., None]] = []

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start every worker and wait until all serve; StartupError if one exits first."""
        for worker in self.totals.workers:
            self._spawn(worker)
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self.totals.workers):
            if self.start_failure is not None or time.monotonic() > deadline:
                why = self.start_failure or f"not every worker was ready within {timeout:.0f} s"
                self.stop(SHUTDOWN_GRACE)
                raise StartupError(why)
            self.changed.clear()
            self.changed.wait(0.5)
        self.started = True

    def broadcast(self, message: Message, wait: float = 0.0) -> bool:
        """Tell every worker; with `wait`, until each serving one has applied it (at most
        `wait` seconds: a worker that is slower gets it all the same, later). True if all did."""
        self.sequence += 1
        message = {**message, "seq": self.sequence}
        for channel in list(self.channels.values()):
            channel.send(message)
        if not wait:
            return True
        deadline = time.monotonic() + wait
        while any(w.ready and w.acked < self.sequence for w in self.totals.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("not every worker applied %s within %.1f s", message.get("op"), wait)
                return False
            self.acked.clear()
            self.acked.wait(left)
        return True

    def _spawn(self, worker: WorkerState) -> None:
        ours, theirs = socketpair()
        fds = [theirs.fileno()]
        args = [sys.executable, "-m", "geventpop3.cluster", "--index", str(worker.index),
                "--parent", str(os.getpid()), "--channel", str(theirs.fileno())]
        for service, sockets in self.listeners.items():
            for sock in sockets:
                args += ["--listen", f"{service}={sock.fileno()}"]
                fds.append(sock.fileno())
        try:
            process = subprocess.Popen([*args, "--", *self.argv], pass_fds=fds, stdin=subprocess.DEVNULL,
                                       process_group=0)  # Ctrl-C reaches the supervisor, which stops them
        except OSError as exc:
            ours.close()
            log.error("worker %d: cannot start: %s", worker.index, exc)
            self._failed(worker, f"worker {worker.index} cannot start: {exc}")
            return
        finally:
            theirs.close()
        channel = Channel(ours)
        channel.start(first=self.initial())  # built and queued without a yield: no broadcast is missed
        self.channels[worker.index] = channel
        self.processes[worker.index] = process
        worker.pid = process.pid
        worker.starts += 1
        self._watchers.append(gevent.spawn(self._watch, worker, process, channel))

    def _watch(self, worker: WorkerState, process: subprocess.Popen[bytes], channel: Channel) -> None:
        """Read the worker's messages until it ends, then replace it (unless stopping)."""
        for message in channel.messages():
            op = message.get("op")
            if op == "report":
                self.totals.add(worker, message)
            elif op == "ack":
                worker.acked = int(message.get("seq", 0))
                self.acked.set()
            elif op == "ready":
                worker.ready = True
                self.failures[worker.index] = 0
                log.info("worker %d serving (pid %d)", worker.index, process.pid)
                self.changed.set()
        status = process.wait()
        for exited in self.exited:
            exited(worker.index, process.pid)
        channel.close()
        was_ready = worker.ready
        self.totals.forget(worker)
        if self.channels.get(worker.index) is channel:
            del self.channels[worker.index]
            del self.processes[worker.index]
        if status == 0 and not self.stopping:
            gevent.sleep(CLEAN_EXIT_GRACE)
        if self.stopping:
            return
        how = f"killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        if was_ready:
            log.error("worker %d (pid %d) %s; replacing it", worker.index, process.pid, how)
            self._spawn(worker)
            return
        self._failed(worker, f"worker {worker.index} {how} before it was ready (its error is logged above)")

    def _failed(self, worker: WorkerState, why: str) -> None:
        """A worker that did not get to serve: the start fails, or it is tried again later."""
        self.changed.set()
        if not self.started:
            self.start_failure = self.start_failure or why
            return
        self.failures[worker.index] += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures[worker.index] - 1))
        log.error("%s; starting it again in %.1f s (failure %d in a row)", why, delay, self.failures[worker.index])
        gevent.spawn_later(delay, self._respawn, worker)

    def _respawn(self, worker: WorkerState) -> None:
        if not self.stopping and worker.index not in self.processes:
            self._spawn(worker)

    def close_listeners(self) -> None:
        """The supervisor's copies of the POP3 listeners: closed once no worker will start again."""
        for sockets in self.listeners.values():
            for sock in sockets:
                sock.close()

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


class ClusterBackend(ManagementBackend):
    """MSMP over the supervisor's context, telling every worker what changed."""

    def __init__(self, ctx: ServerContext, reload: Callable[[], list[str]], pool: WorkerPool, totals: Totals,
                 recorded: RecordingUsers) -> None:
        super().__init__(ctx, reload)
        self.pool = pool
        self.totals = totals
        self.recorded = recorded

    def add_user(self, name: str, password: str) -> bool:
        """Hashed once, here; the workers take the entry (the password never leaves this process)."""
        created = super().add_user(name, password)
        self.pool.broadcast({"op": "user", "name": name, "entry": self.recorded.users[name]}, APPLY_WAIT)
        return created

    def delete_user(self, name: str) -> None:
        """Withdrawn in every worker first (no login can start there any more), then deleted
        here (the checks, the Maildir moved aside, the store); then the workers forget the
        user, or put it back if the deletion failed."""
        if name not in self.ctx.users:
            raise UserError("User does not exist")
        self.pool.broadcast({"op": "deluser-begin", "name": name}, APPLY_WAIT)
        try:
            super().delete_user(name)
        except BaseException:
            self.pool.broadcast({"op": "deluser-end", "name": name, "deleted": False}, APPLY_WAIT)
            raise
        self.pool.broadcast({"op": "deluser-end", "name": name, "deleted": True}, APPLY_WAIT)

    def clear_penalty(self, address: str | None) -> int:
        cleared = super().clear_penalty(address)
        self.pool.broadcast({"op": "penalty-clear", "address": address}, APPLY_WAIT)
        return cleared

    def set_setting(self, key: str, value: str) -> None:
        """Saved and applied here (the settings listener tells the workers), then waits for them."""
        super().set_setting(key, value)
        self.pool.broadcast({"op": "sync"}, APPLY_WAIT)

    def reload(self) -> list[str]:
        """As SIGHUP (Supervisor.reload), answered once the workers reloaded too."""
        problems = super().reload()
        self.pool.broadcast({"op": "sync"}, APPLY_WAIT)
        return problems

    def stat_lines(self) -> list[str]:
        return [*super().stat_lines(), *self.totals.stat_lines()]


class Supervisor(App):
    """App whose POP3 is served by worker processes (see the module docstring)."""

    def __init__(self, config: Config, argv: list[str]) -> None:
        super().__init__(config)
        self.argv = argv
        self.pool: WorkerPool | None = None
        self.recorded = RecordingUsers(None)
        self.share: SupervisorShare | None = None  # with --state-url (geventpop3.cluster.shared_store)

    def _drop_privileges(self) -> None:
        super()._drop_privileges()
        server_tls = self.config.tls
        if server_tls is None or self.config.run_as is None:
            return
        for path in dict.fromkeys((server_tls.cert, server_tls.key)):  # in order, once
            if not os.access(path, os.R_OK):
                raise StartupError(f"with --workers, {self.config.run_as.user} must be able to read {path}: "
                                   "every worker loads the certificate and key")

    def _user_store(self) -> UserStore | None:
        self.recorded = RecordingUsers(self.store)
        return self.recorded

    def _initial(self) -> Message:
        assert self.ctx is not None
        settings = self.ctx.settings
        return {"op": "init", "settings": {key: settings.get(key) for key in KEYS},
                "users": dict(self.recorded.users), **(self.share.init_fields() if self.share else {})}

    def _serve(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        listeners: dict[str, list[socket]] = {service: self.bound.pop(service)
                                              for service in ("pop3", "pop3s") if service in self.bound}
        totals = Totals(ctx, self.config.workers)
        self.pool = WorkerPool(self.argv, listeners, totals, self._initial)
        if self.share is not None:
            self.pool.exited.append(self.share.worker_exited)
        ctx.settings.subscribe(self._setting_changed)
        try:
            self.pool.start()
        except StartupError:
            self.pool.close_listeners()
            raise
        backend = ClusterBackend(ctx, self.reload, self.pool, totals, self.recorded)
        self.admin_servers = start_admin_servers(ctx, None, 0, spawn=self.admin_sessions,
                                                 listeners=self.bound.pop("msmp", []), reload=self.reload,
                                                 server_tls=ctx.tls if self.config.admin_tls else None,
                                                 backend=backend)
        for listener in self.bound.pop("metrics", []):
            self.metrics_servers.append(start_prometheus_server(ctx.metrics, listener, collectors=[totals]))

    def _ready(self, ctx: ServerContext) -> None:
        log.info("geventpop3 ready: maildir=%s users=%d state=%s workers=%d", ctx.settings.maildir, len(ctx.users),
                 self.store.location if self.store is not None else "none", self.config.workers)

    def _setting_changed(self, key: str, old: object, new: object) -> None:
        if self.pool is not None and old != new:
            self.pool.broadcast({"op": "set", "key": key, "value": format_value(new)})

    def reload(self) -> list[str]:
        """Here (the certificate MSMP over TLS uses, the users file) and in every worker."""
        problems = super().reload()
        if self.pool is not None:
            self.pool.broadcast({"op": "reload"})
        return problems

    def shutdown(self) -> None:
        """Workers first (their sessions end, their last reports arrive), then the state."""
        if self.pool is not None:
            log.info("stopping %d workers", len(self.pool.processes))
            self.pool.close_listeners()
            self.pool.stop(SHUTDOWN_GRACE + 5)
        super().shutdown()

    # -- with --state-url: the shared store's part (geventpop3.cluster.shared_store) ----------
    def _restore_state(self, ctx: ServerContext, store: Store) -> None:
        super()._restore_state(ctx, store)
        if self.config.state_url is None:
            return
        from geventpop3.cluster.shared_store import SupervisorShare
        from geventpop3.store.shared import SharedState

        assert isinstance(ctx.shared, SharedState)
        # Before any yield, so the follower has not applied anything the workers would miss.
        self.share = SupervisorShare(ctx.shared, lambda: self.recorded.users, self._broadcast)

    def _broadcast(self, message: Message) -> None:
        if self.pool is not None:
            self.pool.broadcast(message)

    def _close_state(self) -> None:
        if self.share is not None:
            self.share.stop()  # the workers have stopped: what a killed one left goes now
        super()._close_state()
