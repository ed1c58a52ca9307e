"""One worker process: POP3 and POP3S on listeners inherited from the supervisor.

Started as a fresh interpreter (`python -m geventpop3.process ...`, see
geventpop3.process.__main__) with the supervisor's command line, the descriptors of
the listening sockets and one end of a socketpair (the channel). It parses the same
configuration, so it serves exactly as a single process would, except that:

- it binds nothing (the sockets are inherited) and keeps no state store: it reads and
  parses the users file at once (the supervisor reads it meanwhile), says hello with the
  digest of what it read, and the answer is the supervisor's current settings and
  stored users (and the supervisor's users file content if it read another); later messages
  carry every SET, ADD, DELE, RELOAD and PENALTY CLEAR; it reports its counters,
  logged-in users and access-log entries to the supervisor twice a second;
- it dies with the supervisor: PR_SET_PDEATHSIG (Linux) sends it SIGTERM when the
  supervisor dies, and the end of the channel stops it too (the pipe check, on any
  system); either way it ends its sessions without UPDATE, as at SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from contextlib import AbstractContextManager
from typing import Any

import gevent
from gevent import socket

from geventpop3.auth.users import UserDirectory, UsersFile, UserStore
from geventpop3.config import Config, UsageError, read_users_file
from geventpop3.core.names import UserError
from geventpop3.core.settings import SettingError
from geventpop3.net import listen
from geventpop3.process.aggregate import report
from geventpop3.process.channel import Channel, Message
from geventpop3.process.server import App
from geventpop3.service.context import ServerContext
from geventpop3.service.pop3.session import Pop3Server
from geventpop3.state import Store

log = logging.getLogger(__name__)

REPORT_INTERVAL = 0.5  # seconds between reports: what a killed worker's counters may lose
PR_SET_PDEATHSIG = 1
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


def die_with_parent(parent: int) -> None:
    """SIGTERM when the supervisor dies (Linux); exit now if it died already."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        raise SystemExit(1)


class WorkerApp(App):
    """App with inherited listeners, no store, and the channel to the supervisor."""

    def __init__(self, config: Config, index: int, channel: Channel, listeners: dict[str, list[int]]) -> None:
        super().__init__(config)
        self.index = index
        self.channel = channel
        self.listener_fds = listeners
        self._inbox = channel.messages()
        self._init: Message = {}
        self._sent_logged_in: dict[str, int] = {}
        self._greenlets: list[gevent.Greenlet[..., Any]] = []
        self._deleting: dict[str, AbstractContextManager[None]] = {}  # users withdrawn for a DELE in progress
        self._early: UserDirectory | None = None  # the users, parsed before the supervisor's init
        self._given_users: UsersFile | bytes | None = None  # the users file read early, or the supervisor's content

    def _bind(self) -> None:
        for service, fds in self.listener_fds.items():
            self.bound[service] = [socket.socket(fileno=fd) for fd in fds]

    def _drop_privileges(self) -> None:
        identity = self.config.run_as
        if identity is not None and os.geteuid() == identity.uid:
            return  # the supervisor dropped already, before starting us
        super()._drop_privileges()

    def _open_store(self) -> Store | None:
        return None

    def _user_store(self) -> UserStore | None:
        return SeededUsers(self._init.get("users") or {})

    def _prepare(self) -> ServerContext:
        """Read and parse the users file first (while the supervisor reads it too), say hello
        with its digest, then wait for the supervisor's init and start as App does."""
        self.channel.start()
        self._early = self._configure_early()
        self._init = next(self._inbox, {})
        if self._init.get("op") != "init":
            raise SystemExit(1)  # the supervisor is gone before it told us anything
        ctx = super()._prepare()
        for key, text in (self._init.get("settings") or {}).items():
            self._apply_setting(ctx, key, text, "store")
        for name in self._init.get("withdrawn") or []:  # an MSMP DELE in progress: no login before its end
            self._begin_delete(ctx, str(name))
        if self.config.state_url is not None:  # its own leases (geventpop3.process.shared_store)
            from geventpop3.process.shared_store import WorkerShare

            ctx.shared = WorkerShare.for_worker(ctx, self.config.state_url, self._instance_name(), self.index,
                                                self._init)
            ctx.shared.start()
        return ctx

    def _configure_early(self) -> UserDirectory | None:
        """The configured users (flags, users file), read and parsed before the supervisor's
        init, after a hello with the digest of the file read; None if the file could not be
        read or parsed (the supervisor's content comes in the init then: its digest differs)."""
        users_file = None
        if self.config.users_file:
            with contextlib.suppress(UsageError):
                users_file = read_users_file(self.config.users_file)
        self.channel.send({"op": "hello", "users_digest": users_file.digest if users_file is not None else ""})
        if self.config.users_file and users_file is None:
            return None
        directory = UserDirectory(None, allow_weak=self.config.allow_weak_schemes)
        self._given_users = users_file
        try:
            self._configure_users(directory)
        except (UsageError, UserError):
            return None
        return directory

    def _user_directory(self) -> UserDirectory:
        """The early directory if the supervisor's users file is the one read (the init has no
        `users_data`), with the stored users; else one of the supervisor's content."""
        data = self._init.pop("users_data", None)
        early, self._early = self._early, None
        if data is None and early is not None:
            early.attach_store(SeededUsers(self._init.get("users") or {}))
            return early
        if data is not None:
            self._given_users = str(data).encode()
        return super()._user_directory()

    def _read_users_file(self) -> UsersFile:
        """What `_configure_early` read, or the content the supervisor sent, once; else the file."""
        given, self._given_users = self._given_users, None
        if isinstance(given, bytes):
            return read_users_file(str(self.config.users_file), given)
        return given if given is not None else super()._read_users_file()

    def _serve(self, ctx: ServerContext) -> None:
        assert self.pop3 is not None
        for service, handler in (("pop3", self.pop3.handle), ("pop3s", self.pop3.handle_tls)):
            for listener in self.bound.pop(service, []):
                server = Pop3Server(listener, handler)
                server.max_accept = MAX_ACCEPT
                server.start()
                self.pop3_servers.append(server)
                log.debug("worker %d: %s on %s", self.index, service, listen.describe(listener))
        self._greenlets = [gevent.spawn(self._read, ctx), gevent.spawn(self._report_loop, ctx)]

    def _log_identity(self) -> None:
        pass  # the supervisor says who serves, once

    def _hangup(self) -> None:
        """SIGHUP sent to a worker itself: reloading here alone would give this worker other users."""
        log.warning("worker %d: SIGHUP ignored: send it to the supervisor (pid %d), which reloads every worker",
                    self.index, os.getppid())

    def _write_ready_file(self, served: dict[str, list[dict[str, object]]]) -> int:
        return 0  # the supervisor writes --ready-file, with every listener

    def _ready(self, ctx: ServerContext) -> None:
        log.info("worker %d ready", self.index)
        self.channel.send({"op": "ready", "pid": os.getpid()})

    def _read(self, ctx: ServerContext) -> None:
        for message in self._inbox:
            try:
                self._handle(ctx, message)
            except Exception:  # noqa: BLE001 - one bad message must not stop the worker
                log.exception("worker %d: message %s failed", self.index, message.get("op"))
            if "seq" in message:
                self.channel.send({"op": "ack", "seq": message["seq"]})
        if not self.stopping.is_set():
            log.warning("worker %d: the supervisor is gone, stopping", self.index)
            self.stopping.set()

    def _handle(self, ctx: ServerContext, message: Message) -> None:
        op = message.get("op")
        if op == "set":
            self._apply_setting(ctx, str(message["key"]), str(message["value"]), "msmp")
        elif op == "user":  # MSMP ADD: the supervisor's hash; None: deleted by another instance
            entry = message.get("entry")
            ctx.users.take_stored(str(message["name"]), None if entry is None else str(entry))
        elif op == "store":  # whether the shared database answers
            from geventpop3.process.shared_store import told_available

            told_available(ctx, bool(message.get("available")))
        elif op == "deluser-begin":
            self._begin_delete(ctx, str(message["name"]))
        elif op == "deluser-end":
            self._end_delete(ctx, str(message["name"]), bool(message.get("deleted")))
        elif op == "reload":  # the users file as the supervisor read it (a worker reads no users file but at start)
            if "users_data" in message:
                self._given_users = str(message["users_data"]).encode()
            self.reload()
        elif op == "penalty-clear":
            with contextlib.suppress(ValueError):
                ctx.penalty.clear(message.get("address"))
        elif op == "stop":
            self.stopping.set()

    def _begin_delete(self, ctx: ServerContext, name: str) -> None:
        """Withdraw `name` now (UserDirectory.deleting, entered and held open) until the
        supervisor says whether its deletion went through."""
        deleting = ctx.users.deleting(name)
        try:
            deleting.__enter__()
        except UserError:
            return  # not a user here (added after this worker's start failed?): nothing to withdraw
        self._deleting[name] = deleting

    def _end_delete(self, ctx: ServerContext, name: str, deleted: bool) -> None:
        """Forget the user (the deletion went through) or put it back as it was."""
        deleting = self._deleting.pop(name, None)
        if deleting is None:  # started after the withdrawal: only the outcome matters
            if deleted:
                with contextlib.suppress(UserError), ctx.users.deleting(name):
                    pass
            return
        if deleted:
            deleting.__exit__(None, None, None)
        else:
            kept = UserError("deletion failed in the supervisor")
            deleting.__exit__(UserError, kept, None)  # deleting() puts the user back

    def _apply_setting(self, ctx: ServerContext, key: str, text: str, source: str) -> None:
        settings = ctx.settings
        if settings.get(key) == text:
            return
        try:
            settings.apply(key, settings.parse(key, text), source)
        except SettingError as exc:
            log.error("worker %d: setting %s=%r not applied: %s", self.index, key, text, exc)

    def _report_loop(self, ctx: ServerContext) -> None:
        while not self.stopping.wait(REPORT_INTERVAL):
            self.channel.send(report(ctx, self._sent_logged_in))

    def shutdown(self) -> None:
        """As a single process; then the last report (the sessions' logouts) goes to the supervisor."""
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        super().shutdown()
        if self.ctx is not None:
            self.channel.send_now(report(self.ctx, self._sent_logged_in))
        self.channel.close()
