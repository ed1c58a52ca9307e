"""One server process: `Server(config, role).run()`, the same fixed sequence for every role.

bind -> drop privileges -> prepare -> serve -> (started, ready) -> wait -> shutdown.
Bind every listener (POP3, MSMP, metrics) as whoever started us, so port 110 can be
bound as root; then drop to `--run-as` for good (a warning if we stay root); only then
touch the Maildir root, the state store and the users file, as the user that will
serve; then start accepting on the sockets bound first; wait for SIGTERM/SIGINT; stop.

What each step does is the role's (geventpop3.process.roles: single; .supervisor;
.worker), an object passed in; `Server` holds what every role shares (the listeners,
the context, the store, the hasher, the users source) and the steps they are made of
(`bind_all`, `prepare_context`, `serve_pop3`, `reload_local`, `stop_serving`, ...).

SIGHUP and MSMP `RELOAD` run `Server.reload()`: everything that can be re-read while
running is re-read there (the users file, the TLS certificate and key), each part keeping
its old state when its new one fails, and the problems come back as one line each.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer
from gevent.socket import socket

from geventpop3.auth.source import UsersSource
from geventpop3.auth.users import MIB, Hasher, UserDirectory, UsersFile
from geventpop3.config import Config
from geventpop3.core.names import UserError
from geventpop3.mail import maildir
from geventpop3.net import listen, tls
from geventpop3.process import filter_spawner, ready
from geventpop3.process.keeper import Keeper, limit_malloc_arenas, trim_malloc
from geventpop3.service import privileges
from geventpop3.service.context import ServerContext
from geventpop3.service.filters import SPAWNER_ENV, FilterRunner, Launcher
from geventpop3.service.msmp.backend import ManagementBackend
from geventpop3.service.msmp.session import start_admin_servers
from geventpop3.service.pop3.session import Pop3Server, Pop3Service
from geventpop3.service.prometheus import start_prometheus_server
from geventpop3.state import Store, StoreError, keys
from geventpop3.state.persister import Persister
from geventpop3.state.settings import persist_settings, restore_settings
from geventpop3.state.sqlite import SqliteStore

if TYPE_CHECKING:
    from geventpop3.process.keeper import WorkerStart

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


class StartupError(Exception):
    """The server cannot start: one line for the operator, exit status 2."""


def open_store(state_dir: str | None, state_url: str | None = None, instance: str = "") -> Store | None:
    """The PostgreSQL store of `state_url`, else the SQLite one in `state_dir`, or None with
    --no-state (the one way to run without state).

    A store that cannot be used stops the start (StartupError), a database that does not
    answer too: running on without it would answer +OK to changes forgotten at the next
    restart, and an instance that never read the shared users cannot tell them apart."""
    if state_url is not None:
        from geventpop3.state.postgres import PostgresStore

        try:
            return PostgresStore(state_url, instance)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
    if state_dir is None:
        return None
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    try:
        return SqliteStore(os.path.join(state_dir, STATE_DB))
    except StoreError as exc:
        raise StartupError(f"{exc} (fix or move it away, or start with --no-state)") from None


Endpoints = dict[str, list[dict[str, object]]]  # ready.endpoints: what --ready-file says


class Role(Protocol):
    """What one kind of process does at each step of `Server.run` (geventpop3.process.roles)."""

    def bind(self, server: Server) -> None:
        """Put the listening sockets in `server.bound` (none accepts yet)."""

    def drop(self, server: Server) -> None:
        """Become the --run-as user for good."""

    def prepare(self, server: Server) -> ServerContext:
        """Maildir root, state, users: the context, before any listener accepts."""

    def serve(self, server: Server, ctx: ServerContext) -> None:
        """Start accepting on the sockets of `server.bound` (taking them out)."""

    def started(self, server: Server, ctx: ServerContext) -> None:
        """Say it serves (the log, the supervisor)."""

    def ready(self, server: Server, served: Endpoints) -> int:
        """After the signal handlers know it serves: --ready-file; 0, or 2 if stopping."""

    def hangup(self, server: Server) -> None:
        """SIGHUP."""

    def reload(self, server: Server) -> list[str]:
        """Re-read what can be re-read; the problems, one line each."""

    def shutdown(self, server: Server) -> None:
        """After SIGTERM/SIGINT: end the sessions, then the state."""

    def close_state(self, server: Server) -> None:
        """The start failed (StartupError at any step, the listeners closed already): close the state."""


class Server:
    """One server process: `run()` blocks until SIGTERM/SIGINT, then returns 0 (2 if it cannot start)."""

    def __init__(self, config: Config, role: Role) -> None:
        self.config = config
        self.role = role
        self.stopping = Event()
        self.pop3_servers: list[StreamServer] = []
        self.admin_servers: list[StreamServer] = []
        self.admin_sessions = Pool()  # MSMP handlers: ended at shutdown before the state closes
        self.metrics_servers: list[WSGIServer] = []
        self.pop3: Pop3Service | None = None
        self.ctx: ServerContext | None = None
        self.store: Store | None = None
        self.persister: Persister | None = None
        self.bound: dict[str, list[socket]] = {}  # listening sockets by service, before they serve
        self.admin_socket_file: tuple[int, int | None] = (0, None)  # (binding pid, inode): removed at the end
        self.start_notes: list[str] = []  # said once started (log_start): a failed start stays one line
        self.hasher = Hasher()  # the password checks' threads: the context's (users and admins)
        self.users = UsersSource(config.users_file, config.users, [DEMO_USER] if config.demo else [])
        self.serving = False  # start-up done: SIGHUP reloads at once
        self.keeper: Keeper | None = None  # the privileged side (geventpop3.process.keeper), if forked
        self.failed = False  # stopping because of a fault, not a signal: exit status 1
        self.listening: list[str] = []  # "POP3 on 0.0.0.0:110", ...: every listener bound, for the log
        self._signal_handlers: list[Any] = []
        self.hangup_at_start = False  # SIGHUP during start-up: reload once serving
        self.filter_spawner: filter_spawner.Spawner | None = None  # forked before the drop (root only)

    def run(self) -> int:
        configure_logging(self.config.settings.log_level)
        self.config.settings.subscribe(self._on_setting)
        raise_file_limit()
        limit_malloc_arenas()
        # From the start on, not once serving: start-up can take seconds (a large users file,
        # workers starting), and a signal's default action would end the process without a word.
        # They are handled once start-up yields (SIGTERM, SIGINT) or is done (SIGHUP).
        handlers = [gevent.signal_handler(signum, self.stopping.set) for signum in (signal.SIGTERM, signal.SIGINT)]
        handlers.append(gevent.signal_handler(signal.SIGHUP, lambda: self.role.hangup(self)))
        self._signal_handlers = handlers
        try:
            status = self._run()
        finally:
            self.leave_process()  # the process is done with them (matters when run in-process, as tests do)
            if self.keeper is not None:
                self.keeper.close()
        return status

    def leave_process(self) -> None:
        """Stop hearing signals and setting changes: the process is done with this server, or
        is a fork of it that will be another (the keeper, and the workers forked from it)."""
        for handler in self._signal_handlers:
            handler.cancel()
        self._signal_handlers = []
        self.config.settings.unsubscribe(self._on_setting)

    def _run(self) -> int:
        role = self.role
        try:
            role.bind(self)
            role.drop(self)
            self.ctx = ctx = role.prepare(self)
            gc.freeze()  # what start-up made (100,000 users, say) stays out of every later collection
            trim_malloc()  # and what it freed goes back to the system
            served = ready.endpoints(self.bound)  # serving takes the sockets out of self.bound
            role.serve(self, ctx)
        except StartupError as exc:
            print(f"geventpop3: {exc}", file=sys.stderr)
            self.close_listeners()
            role.close_state(self)
            return 2
        status = 0
        if not self.stopping.is_set():  # else asked to stop during start-up: straight to shutdown
            role.started(self, ctx)
            self.serving = True
            if self.hangup_at_start:
                log.info("SIGHUP came during start-up: reloading now")
                self.reload()
            status = role.ready(self, served)  # after the signal handlers: a reader may signal at once
        self.stopping.wait()
        role.shutdown(self)
        return 1 if self.failed else status

    def reload(self) -> list[str]:
        """SIGHUP, MSMP `RELOAD`: the role's reload."""
        return self.role.reload(self)

    # -- the steps roles are made of ------------------------------------------------------
    def reload_when_serving(self) -> None:
        """SIGHUP: reload; during start-up, once serving (what start-up read may predate the change)."""
        if self.serving:
            self.reload()
        else:
            self.hangup_at_start = True

    def write_ready_file(self, served: Endpoints) -> int:
        """0, or 2 (and stopping) when --ready-file cannot be written: whoever waits for it would wait forever."""
        if self.config.ready_file is None:
            return 0
        try:
            ready.write(self.config.ready_file, served)
        except OSError as exc:
            log.error("cannot write ready file %s: %s; stopping", self.config.ready_file, exc.strerror)
            self.stopping.set()
            return 2
        return 0

    def prepare_context(self, directory: Callable[[], UserDirectory], keep_state: bool = True) -> ServerContext:
        """Maildir root, state store (`keep_state`), users (`directory()`, made with
        `self.hasher`) and the shared context, before any listener opens."""
        config = self.config
        settings = config.settings
        try:
            os.makedirs(config.maildir, mode=0o700, exist_ok=True)  # user names are nobody else's business
        except OSError as exc:
            raise StartupError(f"cannot create Maildir root {config.maildir}: {exc.strerror}") from None
        settings.apply("maildir", config.maildir, "config")
        if keep_state:  # the process that keeps the state says it, once
            config.warnings.extend(_open_warning(config.maildir, "Maildir root",
                                                 "chmod 0700 (or 0750 with a mail group)"))
            self.store = open_store(config.state_dir, config.state_url, self.instance_name())
            if config.state_dir is not None and config.state_url is None:
                config.warnings.extend(_open_warning(config.state_dir, "state directory", "chmod 0700"))
        if config.state_dir is not None:  # else (--no-state) a random key per process
            try:
                maildir.use_size_cache_key(keys.installation_key(config.state_dir))
            except OSError as exc:
                raise StartupError(f"cannot use the size cache key in {config.state_dir}: {exc.strerror}") from None
        self._configure_hasher()
        try:
            users = directory()
        except (UserError, StoreError) as exc:
            raise StartupError(str(exc)) from None
        ctx = ServerContext(settings=settings, users=users, tls=config.tls)
        if config.tls is not None:
            try:
                config.tls.follow(settings)  # tls_min_version: now, after a restored SET, and live
            except tls.TlsError as exc:
                raise StartupError(str(exc)) from None
            ctx.metrics.tls_seconds_left = config.tls.seconds_left
        ctx.admins.allow_weak = config.allow_weak_schemes
        try:
            ctx.admins.configure(config.admins)
        except UserError as exc:
            raise StartupError(str(exc)) from None
        self.pop3 = Pop3Service(ctx)
        if self.store is not None:
            self._restore_state(ctx, self.store)
        ctx.filters = FilterRunner(ctx, os.path.join(config.state_dir, "filtered") if config.state_dir else None,
                                   self.filter_launcher(quiet=not keep_state))
        if config.demo:
            demo = maildir.Mailbox(settings.maildir, DEMO_USER[0])
            demo.open()
            if demo.size()[0] == 0:
                maildir.deliver(demo.path, DEMO_MESSAGE)
        return ctx

    def filter_launcher(self, quiet: bool = False) -> Launcher:
        """How this process's filters start: through the spawner (ours, or the one our parent
        forked), as `filter_user` if we are still root, else as ourselves; never as the
        --run-as user (without a spawner after a drop, no filter may run)."""
        config = self.config
        spawner = os.environ.get(SPAWNER_ENV)
        if spawner:
            return Launcher(spawner=spawner, quiet=quiet)
        if os.geteuid() == 0:
            return Launcher(identity=config.filter_user, error=config.filter_problem, quiet=quiet)
        if config.run_as is not None:
            return Launcher(error=config.filter_problem or "no filter spawner: filters cannot run as "
                                                             f"{config.run_as.user}, the server's user", quiet=quiet)
        return Launcher(quiet=quiet)

    def start_filter_spawner(self) -> None:
        """Before the drop: fork the root-side filter spawner (geventpop3.process.filter_spawner),
        unless this process is not root, stays root, or a spawner serves us already (a worker)."""
        config = self.config
        if (config.run_as is None or os.geteuid() != 0 or config.filter_user is None
                or os.environ.get(SPAWNER_ENV)):
            return
        inherited = [sock for sockets in self.bound.values() for sock in sockets]
        try:
            self.filter_spawner = filter_spawner.start(config.filter_user, config.run_as.uid, inherited)
        except OSError as exc:
            raise StartupError(f"cannot start the filter spawner: {exc.strerror or exc}") from None

    def configured_users(self, directory: UserDirectory) -> UserDirectory:
        """`directory` with the configured users of the users file as read now (UserError if it cannot be)."""
        self.users.configure(directory, self.users.read())
        return directory

    def instance_name(self) -> str:
        """This instance in a shared store: `instance_name`, else <host>-<POP3 port>."""
        if self.config.instance_name or self.config.state_url is None:
            return self.config.instance_name or ""
        from geventpop3.state.postgres import default_instance_name

        return default_instance_name(self.config.pop3_port)

    def _configure_hasher(self) -> None:
        settings = self.config.settings
        self.hasher.configure(settings.auth_hash_threads, settings.auth_hash_queue, settings.auth_hash_memory * MIB)

    def bind_all(self) -> None:
        """Bind every listener (POP3, MSMP, metrics if asked for); none accepts yet."""
        config = self.config
        try:
            self.bound["pop3"] = listen.open_listeners(config.pop3_addresses, config.pop3_port, "POP3")
            if config.tls is not None and config.pop3s_port:
                self.bound["pop3s"] = listen.open_listeners(config.pop3_addresses, config.pop3s_port, "POP3S")
            if config.admin_socket is not None:
                self.bound["msmp_socket"] = [listen.open_unix_listener(
                    config.admin_socket, "MSMP", self._admin_socket_owner(), config.admin_group is not None,
                    self.start_notes)]
                self.admin_socket_file = (os.getpid(), listen.socket_inode(config.admin_socket))
            if config.admin_port is not None:
                self.bound["msmp"] = listen.open_listeners(config.admin_addresses, config.admin_port, "MSMP",
                                                           defaults=listen.LOOPBACK)
                if not config.admin_tls:
                    config.warnings.extend(_plaintext_admin_warnings(self.bound["msmp"]))
            if config.metrics_port is not None:
                self.bound["metrics"] = listen.open_listeners([config.metrics_address], config.metrics_port,
                                                              "metrics")
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise StartupError(why if why.startswith("cannot ") else "cannot listen: " + why) from None
        self.listening = describe_listeners(self.bound, bool(config.admin_tls))

    def preload(self) -> None:
        """Import now what would otherwise be imported later: before the drop (the dropped
        user may not be able to read the Python installation), and before the keeper is
        forked (its workers then share these pages instead of importing them each)."""
        if self.config.state_url is not None:  # the PostgreSQL modules, read while we still may
            import geventpop3.state.shared  # noqa: F401
        privileges.preload()

    def start_keeper(self, listeners: dict[str, list[socket]], worker: WorkerStart | None = None) -> None:
        """Fork the keeper (geventpop3.process.keeper) now, before the drop: what it keeps of
        root serves only to start workers (`worker`, on `listeners`) and to read the key."""
        self.preload()
        gc.collect()
        gc.freeze()  # what the keeper and its workers share is never written by a collection
        self.start_filter_spawner()  # before the keeper: its workers inherit the name in the environment
        self.keeper = Keeper.start(self, listeners, worker)
        self.keeper.on_gone = self._keeper_gone

    def _keeper_gone(self) -> None:
        """The keeper ended on its own (killed): no worker can start, no key be read again."""
        log.error("the keeper (pid %d) is gone: no worker can be started and no certificate reloaded; stopping",
                  self.keeper.pid if self.keeper is not None else 0)
        self.failed = True
        self.stopping.set()

    def _admin_socket_owner(self) -> tuple[int, int]:
        """Who owns the admin socket: the server's user (--run-as, else whoever starts it), and
        `admin_group` when set (-1: unchanged)."""
        run_as = self.config.run_as
        gid = self.config.admin_group if self.config.admin_group is not None else (run_as.gid if run_as else -1)
        return (run_as.uid if run_as else -1), gid

    def drop_privileges(self) -> None:
        """Become the --run-as user for good, before any Maildir, state or users file is read."""
        identity = self.config.run_as
        if identity is None:
            return
        self.preload()
        self.start_filter_spawner()
        try:
            privileges.drop(identity)
        except privileges.PrivilegeError as exc:
            raise StartupError(str(exc)) from None

    def log_start(self, identity: bool = True) -> None:
        """Once started (a start-up error stays one line): who serves, with a warning if it is
        root (`identity`), the configuration's warnings, the notes about the users file."""
        run_as = self.config.run_as
        if not identity:
            pass
        elif run_as is not None:
            log.info("running as user %s (uid %d, gid %d)", run_as.user, run_as.uid, run_as.gid)
        elif os.geteuid() == 0:
            log.warning(privileges.ROOT_WARNING)
        if self.listening:
            log.info("listening: %s", ", ".join(self.listening))
        for warning in self.config.warnings:
            log.warning("%s", warning)
        for note in self.start_notes:
            log.info("%s", note)
        for note in self.users.notes:
            log.log(logging.INFO if identity else logging.DEBUG, "%s", note)  # a worker's: the supervisor's too

    def serve_pop3(self, max_accept: int | None = None, level: int = logging.INFO) -> None:
        """Start accepting POP3 and POP3S on the sockets bound before the drop."""
        assert self.pop3 is not None
        for service, handler in (("pop3", self.pop3.handle), ("pop3s", self.pop3.handle_tls)):
            for listener in self.bound.pop(service, []):
                server = Pop3Server(listener, handler)
                if max_accept is not None:
                    server.max_accept = max_accept
                server.start()
                self.pop3_servers.append(server)
                log.log(level, "%s listening on %s", service, listen.describe(listener))

    def serve_admin(self, ctx: ServerContext, backend: ManagementBackend | None = None,
                    collectors: Sequence[Any] = (), refresh: Callable[[], None] | None = None) -> None:
        """Start MSMP (over `backend`, else the context's own) and the metrics endpoint
        (`refresh`: called before each scrape, so it shows what already happened)."""
        self.admin_servers = start_admin_servers(ctx, None, 0, spawn=self.admin_sessions,
                                                 listeners=self.bound.pop("msmp", []), reload=self.reload,
                                                 unix_listeners=self.bound.pop("msmp_socket", []),
                                                 server_tls=ctx.tls if self.config.admin_tls else None,
                                                 backend=backend)
        for listener in self.bound.pop("metrics", []):
            self.metrics_servers.append(start_prometheus_server(ctx.metrics, listener, collectors=list(collectors),
                                                                refresh=refresh))
            log.info("prometheus metrics on http://%s/metrics", listen.describe(listener))

    def reload_local(self, users_file: Callable[[], UsersFile | None],
                     certificate: tuple[bytes, bytes] | Literal[False] | None = None,
                     level: int = logging.INFO) -> list[str]:
        """Re-read what can be re-read while running (SIGHUP, MSMP `RELOAD`); the problems, one line each.

        The users file (`users_file()`: read now, or taken from the supervisor): its added,
        changed and removed users take effect for new logins (open sessions go on; users
        added over MSMP stay). The certificate and key: a new context from the same paths,
        swapped in for new connections (POP3S, STLS, MSMP with --admin-tls) only if it
        loads; open sessions keep theirs. A part that fails keeps its current state and is
        logged, one line. `certificate`: the bytes to use (a worker's, from its supervisor),
        False to keep the current one; None: read by the keeper if there is one, else here.
        `level`: of the lines saying what was reloaded (a worker's are DEBUG: its supervisor
        says it once).
        """
        problems: list[str] = []
        if self.config.users_file and self.ctx is not None:
            try:
                added, changed, removed = self.users.configure(self.ctx.users, users_file())
            except UserError as exc:
                problems.append(f"users file not reloaded, the current users stay: {exc}")
            else:
                log.log(level, "users file reloaded: %s: %d users, %d added, %d changed, %d removed",
                        self.config.users_file, len(self.ctx.users), added, changed, removed)
                for note in self.users.notes:
                    log.log(level, "%s", note)
        server_tls = self.config.tls
        if server_tls is not None and certificate is not False:
            try:
                if certificate is not None:
                    server_tls.use(*certificate)
                elif self.keeper is not None:
                    server_tls.use(*self.keeper.certificate())  # read by the privileged side
                else:
                    server_tls.reload()
            except tls.TlsError as exc:
                problems.append(f"certificate not reloaded, the current one stays: {exc}")
            else:
                log.log(level, "certificate reloaded: %s, expires in %d days", server_tls.cert,
                        server_tls.days_left())
        for problem in problems:
            log.error("reload: %s", problem)
        if not problems:
            log.log(level, "reload done")
        return problems

    def _restore_state(self, ctx: ServerContext, store: Store) -> None:
        """Counters and SET values of earlier runs; flags given now still win. A database
        that cannot be read stops the start, as one that cannot be opened does."""
        try:
            ctx.metrics.restore(store.load_counters())
            restore_settings(ctx.settings, store, skip=self.config.explicit)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        persist_settings(ctx.settings, store)
        self.persister = Persister(ctx, store)
        ctx.persister = self.persister
        self.persister.start()
        if self.config.state_url is not None:  # shared with other instances: leases, live settings and users
            from geventpop3.state.shared import SharedState

            ctx.shared = SharedState(ctx, store, skip=self.config.explicit)  # type: ignore[arg-type]
            ctx.shared.start()

    def stop_serving(self) -> None:
        """Stop accepting, end admin and POP3 sessions (no UPDATE without QUIT), then flush state.

        The order matters: every session has ended (and logged its logout) before the
        persister writes its last batch and the store closes.
        """
        log.info("shutting down: %d open sessions", len(self.pop3) if self.pop3 else 0)
        self.close_listeners()
        self.admin_sessions.kill(block=True, timeout=SHUTDOWN_GRACE)
        if self.pop3 is not None:
            self.pop3.shutdown(SHUTDOWN_GRACE)

    def remove_ready_file(self) -> None:
        """No longer serving: a reader of --ready-file must not take the ports."""
        if self.config.ready_file is not None:
            ready.remove(self.config.ready_file)

    def close_state(self) -> None:
        if self.ctx is not None and self.ctx.shared is not None:
            self.ctx.shared.stop()  # after the sessions: gives back the leases they left
        if self.persister is not None:
            self.persister.stop()
        if self.store is not None:
            self.store.close()

    def close_listeners(self) -> None:
        for server in [*self.pop3_servers, *self.admin_servers, *self.metrics_servers]:
            server.close()
        for sockets in self.bound.values():  # bound, but start-up stopped before they served
            for sock in sockets:
                sock.close()
        self.bound.clear()
        pid, inode = self.admin_socket_file
        if self.config.admin_socket is not None and pid == os.getpid():  # never a forked child's
            listen.remove_unix_socket(self.config.admin_socket, inode)

    def _on_setting(self, key: str, old: object, new: object) -> None:
        if key == "log_level":
            logging.getLogger().setLevel(str(new))
        elif key in ("auth_hash_threads", "auth_hash_queue", "auth_hash_memory"):
            self._configure_hasher()


class App(Server):
    """A single process (`--workers 1`): `Server(config, Single())`, as tests and embedders start it."""

    def __init__(self, config: Config) -> None:
        from geventpop3.process.roles import Single

        super().__init__(config, Single())


def _open_warning(path: str, what: str, fix: str) -> list[str]:
    """A warning when others may list or read `path` (an existing directory keeps its mode: the operator's)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return []
    if not mode & 0o007:
        return []
    return [f"{what} {path} is mode {mode:04o}: other users may list or read it; {fix}"]


def _plaintext_admin_warnings(listeners: list[socket]) -> list[str]:
    """A warning per MSMP listener beyond loopback (127.0.0.0/8, ::1) when it speaks plaintext."""
    warnings = []
    for listener in listeners:
        host = str(listener.getsockname()[0])
        address = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            warnings.append(f"MSMP listens on {listen.describe(listener)}, beyond loopback, without --admin-tls: "
                            "admin passwords and commands cross the network in plaintext")
    return warnings


SERVICE_NAMES = {"pop3": "POP3", "pop3s": "POP3S", "msmp_socket": "MSMP socket", "msmp": "MSMP", "metrics": "metrics"}


def describe_listeners(bound: dict[str, list[socket]], admin_tls: bool) -> list[str]:
    """`POP3 on 0.0.0.0:110`, ...: every listener in `bound`, as the start's log line names them."""
    names = []
    for service, sockets in bound.items():
        for sock in sockets:
            suffix = " (TLS)" if service == "msmp" and admin_tls else ""
            names.append(f"{SERVICE_NAMES.get(service, service)} on {listen.describe(sock)}{suffix}")
    return names
