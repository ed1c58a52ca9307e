"""Wires the server together: state, users, listeners, signals and shutdown."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import sys

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from geventpop3 import listen, maildir
from geventpop3.config import Config
from geventpop3.context import ServerContext
from geventpop3.filters import FilterRunner
from geventpop3.metrics import start_prometheus_server
from geventpop3.msmp.session import start_admin_servers
from geventpop3.pop3.session import Pop3Server, Pop3Service
from geventpop3.store import Store, StoreError
from geventpop3.store.persister import Persister
from geventpop3.store.settings import persist_settings, restore_settings
from geventpop3.store.sqlite import SqliteStore
from geventpop3.users import HASHER, UserDirectory, UserError

log = logging.getLogger(__name__)

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


class StartupError(Exception):
    """The server cannot start: one line for the operator, exit status 2."""


class App:
    """One server process: `run()` blocks until SIGTERM/SIGINT, then returns 0 (2 if it cannot start)."""

    def __init__(self, config: Config, warnings: list[str] | None = None) -> None:
        self.config = config
        self.warnings = warnings or []  # logged once ready (cli: plain passwords in flags)
        self.stopping = Event()
        self.pop3_servers: list[StreamServer] = []
        self.admin_servers: list[StreamServer] = []
        self.admin_sessions = Pool()  # MSMP handlers: ended at shutdown before the state closes
        self.metrics_servers: list[WSGIServer] = []
        self.pop3: Pop3Service | None = None
        self.ctx: ServerContext | None = None
        self.store: Store | None = None
        self.persister: Persister | None = None

    def run(self) -> int:
        configure_logging(self.config.settings.log_level)
        self.config.settings.subscribe(self._on_setting)
        raise_file_limit()
        try:
            self.ctx = self._prepare()
            self._listen(self.ctx)
        except StartupError as exc:
            print(f"geventpop3: {exc}", file=sys.stderr)
            self._close_listeners()
            return 2
        handlers = [gevent.signal_handler(signum, self.stopping.set) for signum in (signal.SIGTERM, signal.SIGINT)]
        log.info("geventpop3 ready: maildir=%s users=%d state=%s", self.ctx.settings.maildir, len(self.ctx.users),
                 self.config.state_dir if self.store is not None else "none")
        for warning in self.warnings:
            log.warning("%s", warning)
        self.stopping.wait()
        self.shutdown()
        for handler in handlers:
            handler.cancel()  # the process is done with them (matters when run in-process, as tests do)
        return 0

    def _prepare(self) -> ServerContext:
        """Maildir root, state store, users and the shared context, before any listener opens."""
        config = self.config
        settings = config.settings
        try:
            os.makedirs(config.maildir, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create Maildir root {config.maildir}: {exc.strerror}") from None
        settings.apply("maildir", config.maildir, "config")
        self.store = open_store(config.state_dir)
        HASHER.configure(settings.auth_hash_threads, settings.auth_hash_queue)
        users = list(config.users)
        if config.demo:
            users.append(DEMO_USER)
        try:
            directory = UserDirectory(self.store)
            directory.add_configured(users)
        except UserError as exc:
            raise StartupError(str(exc)) from None
        ctx = ServerContext(settings=settings, users=directory)
        ctx.admins.add_configured(config.admins)
        self.pop3 = Pop3Service(ctx)
        if self.store is not None:
            self._restore_state(ctx, self.store)
        ctx.filters = FilterRunner(ctx, os.path.join(config.state_dir, "filtered") if config.state_dir else None)
        if config.demo:
            demo = maildir.Mailbox(settings.maildir, DEMO_USER[0])
            demo.open()
            if demo.size()[0] == 0:
                maildir.deliver(demo.path, DEMO_MESSAGE)
        return ctx

    def _listen(self, ctx: ServerContext) -> None:
        """Bind and start every listener: POP3, MSMP, and metrics if asked for."""
        config = self.config
        assert self.pop3 is not None
        try:
            for listener in listen.open_listeners(config.pop3_addresses, config.pop3_port, "POP3"):
                server = Pop3Server(listener, self.pop3.handle)
                server.start()
                self.pop3_servers.append(server)
                log.info("pop3 listening on %s", listen.describe(listener))
            self.admin_servers = start_admin_servers(ctx, config.admin_addresses, config.admin_port,
                                                     spawn=self.admin_sessions)
            if config.metrics_port is not None:
                for listener in listen.open_listeners([config.metrics_address], config.metrics_port, "metrics"):
                    self.metrics_servers.append(start_prometheus_server(ctx.metrics, listener))
                    log.info("prometheus metrics on http://%s/metrics", listen.describe(listener))
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise StartupError(why if why.startswith("cannot ") else "cannot listen: " + why) from None

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
        """Stop accepting, end admin and POP3 sessions (no UPDATE without QUIT), then flush state.

        The order matters: every session has ended (and logged its logout) before the
        persister writes its last batch and the store closes.
        """
        log.info("shutting down: %d open sessions", len(self.pop3) if self.pop3 else 0)
        self._close_listeners()
        self.admin_sessions.kill(block=True, timeout=SHUTDOWN_GRACE)
        if self.pop3 is not None:
            self.pop3.shutdown(SHUTDOWN_GRACE)
        if self.persister is not None:
            self.persister.stop()
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    def _close_listeners(self) -> None:
        for server in [*self.pop3_servers, *self.admin_servers, *self.metrics_servers]:
            server.close()

    def _on_setting(self, key: str, old: object, new: object) -> None:
        if key == "log_level":
            logging.getLogger().setLevel(str(new))
        elif key in ("auth_hash_threads", "auth_hash_queue"):
            settings = self.config.settings
            HASHER.configure(settings.auth_hash_threads, settings.auth_hash_queue)
