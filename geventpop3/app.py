"""Wires the server together: state, users, listeners, signals and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import sys

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from geventpop3 import listen, maildir
from geventpop3.cli import Config
from geventpop3.context import ServerContext
from geventpop3.filters import FilterRunner
from geventpop3.metrics import start_prometheus_server
from geventpop3.msmp.session import start_admin_servers
from geventpop3.pop3.session import Pop3Server, Pop3Service
from geventpop3.store import Store, StoreError
from geventpop3.store.persister import Persister
from geventpop3.store.settings import persist_settings, restore_settings
from geventpop3.store.sqlite import SqliteStore
from geventpop3.users import UserDirectory, UserError, hash_password

log = logging.getLogger("geventpop3")

LISTEN_BACKLOG = 4096
SHUTDOWN_GRACE = 5.0
STATE_DB = "geventpop3.db"
DEMO_USER = ("demo", "demo")
DEMO_MESSAGE = (
    b"From: geventpop3 <postmaster@localhost>\n"
    b"To: demo@localhost\n"
    b"Subject: Welcome to geventpop3\n"
    b"\n"
    b"This message was delivered into ./mail/demo/new by geventpop3 --demo.\n"
    b"Fetch it with any POP3 client, then deliver your own with a rename into new/.\n"
)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s geventpop3[%(process)d] %(levelname)s %(message)s",
    )


def raise_file_limit() -> None:
    """Each session is a descriptor: use all the descriptors the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_listeners(addresses: list[str] | None, port: int) -> list[socket.socket]:
    """Listening sockets: one dual-stack socket by default, else one per address.

    A host name binds every address it resolves to. With port 0 every listener
    shares the port the first one got (a fresh one where that port is taken).
    """
    if not addresses:
        dualstack = socket.has_dualstack_ipv6()
        family, host = (socket.AF_INET6, "::") if dualstack else (socket.AF_INET, "0.0.0.0")
        try:
            return [listen.listener(family, host, port, LISTEN_BACKLOG, dualstack=dualstack)]
        except OSError as exc:
            raise _listen_error(host, port, exc) from exc
    requested = port
    listeners: list[socket.socket] = []
    try:
        for host in addresses:
            try:
                bound = listen.bind(host, port, LISTEN_BACKLOG, shared_port=requested == 0 and port != 0)
            except socket.gaierror as exc:
                raise OSError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
            except OSError as exc:
                raise _listen_error(host, port, exc) from exc
            listeners.extend(bound)
            if bound and not port:
                port = bound[0].getsockname()[1]
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _listen_error(host: str, port: int, exc: OSError) -> OSError:
    return OSError(exc.errno, f"cannot listen for POP3 on {host} port {port}: {exc.strerror or exc}")


def open_store(state_dir: str | None) -> Store | None:
    """The SQLite state store; without one the server still serves POP3 (logged loudly)."""
    if state_dir is None:
        return None
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        return SqliteStore(os.path.join(state_dir, STATE_DB))
    except (OSError, StoreError) as exc:
        log.error("cannot open the state database in %s, running WITHOUT persistent state: %s", state_dir, exc)
        return None


class App:
    """One server process: `run()` blocks until SIGTERM/SIGINT, then returns 0."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = Event()
        self.servers: list[StreamServer] = []
        self.pop3: Pop3Service | None = None
        self.ctx: ServerContext | None = None
        self.store: Store | None = None
        self.persister: Persister | None = None

    def run(self) -> int:
        config = self.config
        settings = config.settings
        configure_logging(settings.log_level)
        settings.subscribe(self._on_setting)
        raise_file_limit()
        self.store = open_store(config.state_dir)
        users = list(config.users)
        if config.demo:
            users.append(DEMO_USER)
        try:
            directory = UserDirectory(self.store)
            directory.add_configured(users)
        except UserError as exc:
            print(f"geventpop3: {exc}", file=sys.stderr)
            return 2
        ctx = ServerContext(settings=settings, users=directory)
        ctx.admins = {name: hash_password(secret) for name, secret in config.admins}
        self.ctx = ctx
        self.pop3 = Pop3Service(ctx)
        if self.store is not None:
            self._restore_state(ctx, self.store)
        ctx.filters = FilterRunner(ctx, os.path.join(config.state_dir, "filtered") if config.state_dir else None)
        if config.demo:
            demo = maildir.Mailbox(settings.maildir, DEMO_USER[0])
            demo.open()
            if demo.size()[0] == 0:
                maildir.deliver(demo.path, DEMO_MESSAGE)
        try:
            for listener in make_listeners(config.pop3_addresses, config.pop3_port):
                server = Pop3Server(listener, self.pop3.handle, spawn=self.pop3.pool)
                server.start()
                self.servers.append(server)
                log.info("pop3 listening on %s port %d", *listener.getsockname()[:2])
            self.servers.extend(start_admin_servers(ctx, config.admin_addresses, config.admin_port))
            if config.metrics_port is not None:
                self.servers.append(start_prometheus_server(ctx.metrics, config.metrics_address, config.metrics_port))
                log.info("prometheus metrics on http://%s:%d/metrics", config.metrics_address, config.metrics_port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            print(f"geventpop3: {why if why.startswith('cannot ') else 'cannot listen: ' + why}", file=sys.stderr)
            self._close_servers()
            return 2
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.stopping.set)
        log.info("geventpop3 ready: maildir=%s users=%d state=%s", settings.maildir, len(directory),
                 config.state_dir if self.store is not None else "none")
        self.stopping.wait()
        self.shutdown()
        return 0

    def _restore_state(self, ctx: ServerContext, store: Store) -> None:
        """Counters and SET values of earlier runs; flags given now still win."""
        try:
            ctx.metrics.restore(store.load_counters())
            restore_settings(ctx.settings, store, skip=self.config.explicit)
        except StoreError as exc:
            log.error("state database unreadable, starting from defaults: %s", exc)
        persist_settings(ctx.settings, store)
        self.persister = Persister(ctx, store)
        ctx.persister = self.persister
        self.persister.start()

    def shutdown(self) -> None:
        """Stop accepting, end open sessions (no UPDATE without QUIT), flush state."""
        log.info("shutting down: %d open sessions", len(self.pop3) if self.pop3 else 0)
        self._close_servers()
        if self.pop3 is not None:
            self.pop3.shutdown(SHUTDOWN_GRACE)
        if self.persister is not None:
            self.persister.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    def _close_servers(self) -> None:
        for server in self.servers:
            server.close()

    def _on_setting(self, key: str, old: object, new: object) -> None:
        if key == "log_level":
            logging.getLogger().setLevel(str(new))
