"""One worker process: POP3 and POP3S on listeners inherited from the supervisor.

Forked by the keeper (geventpop3.process.keeper) at the supervisor's request, from the
preloaded process the supervisor was before it dropped privileges: it drops at once,
then runs `Server(config, Worker(...))` with the supervisor's configuration as it was
at the fork, the listening sockets and one end of a socketpair (the channel) to the
supervisor, so it serves exactly as a single process would, except that:

- it binds nothing (the sockets are inherited) and keeps no state store: it reads and
  parses the users file at once (the supervisor reads it meanwhile), says `Hello` with
  the digest of what it read, and the answer (`Init`) is the supervisor's current
  settings and stored users (and the supervisor's users file content if it read
  another); later messages (geventpop3.process.messages) carry every SET, ADD, DELE,
  RELOAD (with the certificate and key the keeper read) and PENALTY CLEAR, each
  dispatched through a table and acknowledged; it reports its counters, logged-in users
  and access-log entries twice a second, and at once when asked (`Refresh`: MSMP STAT);
- its connection limits are the whole server's, counted in the supervisor's shared table
  (geventpop3.process.table), and its authentication penalty the supervisor's, asked
  over the channel at a failure (geventpop3.process.accountant);
- its settings are not checked against the machine (the supervisor checked them): a
  value is only parsed;
- it dies with the keeper, which dies with the supervisor (PR_SET_PDEATHSIG, Linux:
  SIGTERM), and the end of the channel stops it too; either way it ends its sessions
  without UPDATE, as at SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket

from geventpop3.auth.users import UserDirectory, Withdrawal
from geventpop3.config import Config
from geventpop3.core.accounting import LocalAccounting
from geventpop3.core.names import UserError
from geventpop3.core.settings import SettingError
from geventpop3.process import messages
from geventpop3.process.accountant import RemoteAccounting
from geventpop3.process.aggregate import report
from geventpop3.process.channel import MAX_LINE_FROM_SUPERVISOR, Channel
from geventpop3.process.messages import (
    PROTOCOL_VERSION,
    Ack,
    Answer,
    ControlMessage,
    DelUser,
    Hello,
    Init,
    PenaltyClear,
    Ready,
    Refresh,
    Reload,
    Report,
    Set,
    StoreState,
    User,
)
from geventpop3.process.server import Endpoints, Server
from geventpop3.process.table import AccountingTable
from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.5  # seconds between reports: what a killed worker's counters may lose
# One connection per wake-up: with the listener shared by every worker, the one woken
# first must not take a whole burst while the others are idle (docs/architecture.md).
MAX_ACCEPT = 1


class SeededUsers:
    """The users the supervisor's store holds, as the worker's UserDirectory sees them:
    loaded once from the first message; writes stay in memory (the supervisor persists)."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = dict(users)

    def load_users(self) -> dict[str, str]:
        return dict(self.users)

    def save_user(self, name: str, password_hash: str) -> None:
        self.users[name] = password_hash

    def delete_user(self, name: str) -> None:
        self.users.pop(name, None)


def run_forked(config: Config, index: int, channel_fd: int, listeners: dict[str, list[int]],
               table: AccountingTable) -> int:
    """Worker `index` in a child of the keeper (geventpop3.process.keeper), which has dropped
    privileges already: the configuration is the supervisor's as it was at the fork (the
    config file as it read it, the certificate as the keeper last loaded it), the settings
    in force come in the `Init`."""
    config.warnings.clear()  # the supervisor logged them once
    config.settings.drop_checks()  # values come checked by the supervisor: parsed only
    gevent.sleep(0.001)  # one turn of the loop made new: a signal the supervisor had pending at the fork is not ours
    channel = Channel.from_fd(channel_fd, MAX_LINE_FROM_SUPERVISOR)
    return Server(config, Worker(index, channel, listeners, table)).run()


class Worker:
    """The role of a worker process (see the module docstring)."""

    def __init__(self, index: int, channel: Channel, listeners: dict[str, list[int]],
                 table: AccountingTable) -> None:
        self.index = index
        self.table = table  # the supervisor's, mapped before the keeper was forked
        self.channel = channel
        self.listener_fds = listeners
        self._inbox = messages.decoded(channel.messages(), f"worker {index}")
        self._sent_logged_in: dict[str, int] = {}
        self._greenlets: list[gevent.Greenlet[..., Any]] = []
        self._withdrawals: dict[str, Withdrawal] = {}  # users withdrawn for an MSMP DELE in progress
        self._users_data: str | None = None  # the users file in force in the supervisor, as its last Reload said
        self._certificate: tuple[bytes, bytes] | None = None  # the last Reload's certificate and key
        self._handlers: dict[type[ControlMessage], Callable[[Server, ServerContext, Any], None]] = {
            Set: self._set, User: self._user, DelUser: self._deluser, Reload: self._reload,
            PenaltyClear: self._penalty_clear, StoreState: self._store_state, Answer: self._answer,
            Refresh: self._refresh}

    def bind(self, server: Server) -> None:
        for service, fds in self.listener_fds.items():
            server.bound[service] = [socket.socket(fileno=fd) for fd in fds]

    def drop(self, server: Server) -> None:
        identity = server.config.run_as
        if identity is not None and os.geteuid() == identity.uid:
            return  # the supervisor dropped already, before starting us
        server.drop_privileges()

    def prepare(self, server: Server) -> ServerContext:
        """Read and parse the users file first (while the supervisor reads it too), say hello
        with its digest, then wait for the supervisor's `Init` and start from it."""
        self.channel.start()
        early = self._early_users(server)
        first = next(self._inbox, None)
        if first is None or not isinstance(first.message, Init):
            raise SystemExit(1)  # the supervisor is gone before it told us anything
        init = first.message
        ctx = server.prepare_context(lambda: self._directory(server, init, early), keep_state=False)
        server.users.data = b""  # only a supervisor hands the content on: 1.4 MB for 10,000 users, not kept
        for key, text in init.settings.items():
            self._apply_setting(ctx, key, text, "store")
        for name in init.withdrawn:  # an MSMP DELE in progress: no login before its end
            self._withdraw(ctx, name)
        # The limits and the penalty are the whole server's: the supervisor's (geventpop3.process.accountant).
        assert isinstance(ctx.accounting, LocalAccounting)
        ctx.accounting = RemoteAccounting(self.channel, self.table, self.index, ctx.settings, ctx.accounting)
        if server.config.state_url is not None:  # its own leases (geventpop3.process.shared_store)
            from geventpop3.process.shared_store import WorkerShare

            ctx.shared = WorkerShare.for_worker(ctx, server.config.state_url, server.instance_name(), self.index,
                                                init)
            ctx.shared.start()
        return ctx

    def _early_users(self, server: Server) -> UserDirectory | None:
        """The configured users (flags, users file), read and parsed before the supervisor's
        `Init`, after a `Hello` with the digest of the file read; None if the file could not
        be read or parsed (the supervisor's content comes in the `Init` then: its digest differs)."""
        source = server.users
        users_file = None
        with contextlib.suppress(UserError):
            users_file = source.read()
        self.channel.send(messages.encode(Hello(PROTOCOL_VERSION, users_file.digest if users_file else "")))
        if source.path and users_file is None:
            return None
        directory = UserDirectory(None, server.hasher, allow_weak=server.config.allow_weak_schemes)
        directory.calibration_log_level = logging.DEBUG
        try:
            source.configure(directory, users_file)
        except UserError:
            return None
        return directory

    def _directory(self, server: Server, init: Init, early: UserDirectory | None) -> UserDirectory:
        """The early directory if the supervisor's users file is the one read (the `Init` has
        no `users_data`), with the stored users; else one of the supervisor's content."""
        seeded = SeededUsers(init.users)
        if init.users_data is None and early is not None:
            early.attach_store(seeded)
            return early
        source = server.users
        users_file = source.use(init.users_data.encode()) if init.users_data is not None else source.read()
        directory = UserDirectory(seeded, server.hasher, allow_weak=server.config.allow_weak_schemes)
        directory.calibration_log_level = logging.DEBUG
        source.configure(directory, users_file)
        return directory

    def serve(self, server: Server, ctx: ServerContext) -> None:
        server.serve_pop3(MAX_ACCEPT, logging.DEBUG)
        self._greenlets = [gevent.spawn(self._read, server, ctx), gevent.spawn(self._report_loop, server, ctx)]

    def started(self, server: Server, ctx: ServerContext) -> None:
        server.log_start(identity=False)  # the supervisor says who serves, once
        log.debug("worker %d ready", self.index)  # the supervisor says it, once for all
        self.channel.send(messages.encode(Ready(os.getpid())))

    def ready(self, server: Server, served: Endpoints) -> int:
        return 0  # the supervisor writes --ready-file, with every listener

    def hangup(self, server: Server) -> None:
        """SIGHUP sent to a worker itself: reloading here alone would give this worker other users."""
        log.warning("worker %d: SIGHUP ignored: send it to the supervisor (pid %d), which reloads every worker",
                    self.index, os.getppid())

    def reload(self, server: Server) -> list[str]:
        """The users file as the supervisor's last `Reload` carried it (a worker reads no users
        file but at start), and the certificate and key it carried (the keeper read them;
        none: the current ones stay). The supervisor logs the outcome, once."""
        data = self._users_data
        source = server.users
        pem = self._certificate
        self._certificate = None
        return server.reload_local(lambda: source.use(data.encode()) if data is not None else source.read(),
                                   pem if pem is not None else False, logging.DEBUG)

    def _read(self, server: Server, ctx: ServerContext) -> None:
        """The supervisor's messages, each through the table, acknowledged when it waits for that."""
        for message, seq in self._inbox:
            handler = self._handlers.get(type(message))
            try:
                if handler is None:
                    log.error("worker %d: %s is no message for a worker, ignored", self.index, message.OP)
                else:
                    handler(server, ctx, message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the worker
                log.exception("worker %d: message %s failed", self.index, message.OP)
            if seq is not None:
                self.channel.send(messages.encode(Ack(seq)))
        if not server.stopping.is_set():
            log.warning("worker %d: the supervisor is gone, stopping", self.index)
            server.stopping.set()

    # -- the handlers of the table ------------------------------------------------------------
    def _set(self, server: Server, ctx: ServerContext, message: Set) -> None:
        self._apply_setting(ctx, message.key, message.value, "msmp")

    def _user(self, server: Server, ctx: ServerContext, message: User) -> None:
        """MSMP ADD: the supervisor's hash; None: deleted by another instance."""
        ctx.users.take_stored(message.name, message.entry)

    def _deluser(self, server: Server, ctx: ServerContext, message: DelUser) -> None:
        if message.step == "begin":
            self._withdraw(ctx, message.name)
            return
        withdrawal = self._withdrawals.pop(message.name, None)
        if withdrawal is None:  # started after the withdrawal: only the outcome matters
            if message.step == "commit":
                with contextlib.suppress(UserError):
                    ctx.users.withdraw(message.name).commit()
        elif message.step == "commit":
            withdrawal.commit()
        else:
            withdrawal.rollback()

    def _reload(self, server: Server, ctx: ServerContext, message: Reload) -> None:
        self._users_data = message.users_data
        if message.cert is not None and message.key is not None:
            self._certificate = (message.cert.encode("latin-1"), message.key.encode("latin-1"))
        server.reload()

    def _penalty_clear(self, server: Server, ctx: ServerContext, message: PenaltyClear) -> None:
        with contextlib.suppress(ValueError):
            ctx.penalty.clear(message.address)

    def _answer(self, server: Server, ctx: ServerContext, message: Answer) -> None:
        """The supervisor's answer to one of our accounting questions."""
        if isinstance(ctx.accounting, RemoteAccounting):
            ctx.accounting.answered(message)

    def _refresh(self, server: Server, ctx: ServerContext, message: Refresh) -> None:
        """A report now (MSMP STAT, a scrape), marked as the answer to `message`."""
        self.channel.send(messages.encode(Report({**report(ctx, self._sent_logged_in), "refresh": message.id})))

    def _store_state(self, server: Server, ctx: ServerContext, message: StoreState) -> None:
        """Whether the shared database answers."""
        from geventpop3.process.shared_store import told_available

        told_available(ctx, message.available)

    def _withdraw(self, ctx: ServerContext, name: str) -> None:
        """Withdraw `name` now, until the supervisor says whether its deletion went through."""
        with contextlib.suppress(UserError):  # not a user here (added after this worker's start failed?)
            self._withdrawals[name] = ctx.users.withdraw(name)

    def _apply_setting(self, ctx: ServerContext, key: str, text: str, source: str) -> None:
        """The supervisor's value, parsed (this process's settings check nothing against the machine)."""
        settings = ctx.settings
        if settings.get(key) == text:
            return
        try:
            settings.apply(key, settings.parse(key, text), source)
        except SettingError as exc:
            log.error("worker %d: setting %s=%r not applied: %s", self.index, key, text, exc)

    def _report_loop(self, server: Server, ctx: ServerContext) -> None:
        while not server.stopping.wait(REPORT_INTERVAL):
            self.channel.send(messages.encode(Report(report(ctx, self._sent_logged_in))))

    def shutdown(self, server: Server) -> None:
        """As a single process (but --ready-file is the supervisor's); then the last report
        (the sessions' logouts) goes to the supervisor."""
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        server.stop_serving()
        server.close_state()
        log.info("stopped")
        if server.ctx is not None:
            self.channel.send_now(messages.encode(Report(report(server.ctx, self._sent_logged_in))))
        self.channel.close()

    def close_state(self, server: Server) -> None:
        server.close_state()
