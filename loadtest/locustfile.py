"""Locust load test of a POP3 server (geventpop3 or any other) and of geventpop3's MSMP plane.

User classes (what real servers see):
  DownloadDeleteUser  the classic ISP client: login, STAT, RETR all, DELE all, QUIT
  PollerUser          leave-on-server: login, UIDL, RETR only new mail, QUIT, every --poll-interval s
  IdleHolderUser      login, then NOOP every --noop-interval s: holds many sessions open
  AdminWatcherUser    MSMP login, STAT every second, now and then LOGS and SET

Every POP3 step is one Locust request (type POP3: CONNECT, LOGIN, STAT, LIST, UIDL, RETR,
TOP, DELE, NOOP, QUIT); every MSMP command likewise (type MSMP). A whole POP3 session is
also reported as type SESSION, which gives sessions per second; the gates ignore it.

TLS: `--tls implicit` connects with TLS at once (POP3S, RFC 8314; point --host at the
POP3S port), `--tls starttls` sends STLS after the greeting (RFC 2595). The server's
certificate is verified against `--cacert FILE` (default: the system's CAs) and the
host name of --host; the handshake is part of the CONNECT step. MSMP stays plaintext.

Users come from a pool made by `python -m loadtest.setup_pool` (one mailbox each), so no
two simulated users want the same mailbox lock. With --processes N each worker takes
every N-th pool user. Typical use is through `python -m loadtest.run`, or directly:

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host pop3://127.0.0.1:1110 --pool /tmp/pool DownloadDeleteUser
"""

from __future__ import annotations

import contextlib
import json
import random
import ssl
import sys
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from locust import User, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402
from locust.runners import MasterRunner, WorkerRunner  # noqa: E402

from admin.client import MsmpClient, MsmpError  # noqa: E402
from loadtest.pop3_client import Pop3Client, Pop3ConnectionError, Pop3Error  # noqa: E402
from loadtest.setup_pool import Pool, deliver_link, load_pool  # noqa: E402

POOL_ERRORS = (Pop3Error, Pop3ConnectionError, OSError)


# -- options -----------------------------------------------------------------------

@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # noqa: ANN001 - locust's argparse wrapper
    group = parser.add_argument_group("geventpop3 load test")
    group.add_argument("--pool", default="", help="pool directory made by loadtest.setup_pool")
    group.add_argument("--no-refill", action="store_true",
                       help="do not re-deliver mail into the pool's Maildirs (server on another host)")
    group.add_argument("--io-timeout", type=float, default=60.0, help="socket timeout per POP3/MSMP step")
    group.add_argument("--dd-wait", type=float, default=0.0, help="pause between download-and-delete sessions")
    group.add_argument("--poll-interval", type=float, default=60.0, help="seconds between a poller's sessions")
    group.add_argument("--noop-interval", type=float, default=30.0, help="seconds between an idle holder's NOOPs")
    group.add_argument("--msmp", default="", help="MSMP address host:port (default: POP3 host, port 4321)")
    group.add_argument("--msmp-user", default="admin", help="MSMP admin name")
    group.add_argument("--msmp-password", default="", help="MSMP admin password")
    group.add_argument("--watch-interval", type=float, default=1.0, help="seconds between an admin's STATs")
    group.add_argument("--fixed", default="",
                       help="exact user counts, e.g. IdleHolderUser=10000,DownloadDeleteUser=50")
    group.add_argument("--pool-shards", type=int, default=0,
                       help="load generators sharing the pool (default: --processes, else 1)")
    group.add_argument("--reset-when-held", type=int, default=0, metavar="N",
                       help="reset the statistics once N idle sessions are held (single process only): "
                            "the figures then describe the steady state, not the ramp")
    group.add_argument("--summary-file", default="", help="write the suite's own counters here as JSON")
    group.add_argument("--tls", choices=["none", "implicit", "starttls"], default="none",
                       help="POP3 over TLS: implicit (POP3S port) or STLS on the plain port")
    group.add_argument("--cacert", default="", help="CA file the server certificate is verified against")


def _opts(environment):  # noqa: ANN001, ANN202
    return environment.parsed_options


def _split_hostport(text: str, default_port: int) -> tuple[str, int]:
    if "//" not in text:
        text = "//" + text
    parts = urlsplit(text)
    return parts.hostname or "127.0.0.1", parts.port or default_port


# -- the shared state of one load generator process ----------------------------------

class Suite:
    """The pool, split among users (and among worker processes), and the suite's own counters."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.free: dict[str, deque[str]] = {}
        self.split_done = False
        self.environment = None
        self.refill = True
        self.counters = {"held": 0, "held_max": 0, "idle_logged_in": 0, "idle_noop_ok": 0,
                         "idle_reconnects": 0, "sessions_dd": 0, "sessions_poll": 0,
                         "messages_retrieved": 0, "pool_exhausted": 0}
        self.noop_users: set[int] = set()
        self.held_at_stop: int | None = None
        self.spawn_complete_at: float | None = None
        self.held_complete_at: float | None = None
        self.stopping_at: float | None = None
        self.worker_reports: dict[str, dict] = {}
        self.ssl_context: ssl.SSLContext | None = None
        self.starttls = False

    def setup(self, environment) -> None:  # noqa: ANN001
        opts = _opts(environment)
        if not opts.pool:
            raise SystemExit("locustfile: --pool DIR is required (python -m loadtest.setup_pool makes one)")
        self.pool = load_pool(opts.pool)
        if opts.tls != "none":
            # One context for every user: the CA file is read once. No session resumption: every
            # CONNECT is a full handshake, the worst case for the server.
            try:
                self.ssl_context = ssl.create_default_context(cafile=opts.cacert or None)
            except OSError as exc:
                raise SystemExit(f"locustfile: --cacert {opts.cacert}: {exc}") from None
            self.starttls = opts.tls == "starttls"
        self.refill = not opts.no_refill
        self.environment = environment

    def _split(self) -> None:
        """This process's share of the pool; a worker learns its index only once the master
        acknowledged it, so this runs at the first take(), not at init."""
        assert self.pool is not None
        opts = _opts(self.environment)
        index, shards = 0, 1
        runner = self.environment.runner
        if isinstance(runner, WorkerRunner):
            index = max(runner.worker_index, 0)
            shards = opts.pool_shards or getattr(opts, "processes", 0) or 1
        self.free = {group: deque(names[index::shards]) for group, names in self.pool.users.items()}
        self.split_done = True

    def take(self, group: str) -> str | None:
        if not self.split_done:
            self._split()
        names = self.free.get(group)
        if not names:
            self.counters["pool_exhausted"] += 1
            return None
        return names.popleft()

    def give_back(self, group: str, name: str) -> None:
        self.free[group].append(name)

    def held_changed(self, delta: int) -> None:
        c = self.counters
        c["held"] += delta
        c["held_max"] = max(c["held_max"], c["held"])

    def snapshot(self) -> dict:
        data = dict(self.counters)
        data["idle_noop_ok"] = len(self.noop_users)
        data["held_at_stop"] = self.held_at_stop
        return data


SUITE = Suite()


@events.init.add_listener
def _init(environment, **_kwargs) -> None:  # noqa: ANN001
    opts = _opts(environment)
    if opts is None:
        return
    for item in filter(None, (part.strip() for part in opts.fixed.split(","))):
        name, _, count = item.partition("=")
        for cls in environment.user_classes:
            if cls.__name__ == name.strip():
                cls.fixed_count = int(count)
    if not isinstance(environment.runner, MasterRunner):
        SUITE.setup(environment)


@events.spawning_complete.add_listener
def _spawned(user_count: int, **_kwargs) -> None:
    SUITE.spawn_complete_at = time.time()


@events.test_stopping.add_listener
def _stopping(**_kwargs) -> None:
    SUITE.held_at_stop = SUITE.counters["held"]  # sessions still held when the run time was up
    SUITE.stopping_at = time.time()


@events.report_to_master.add_listener
def _report(client_id: str, data: dict) -> None:
    data["loadtest"] = SUITE.snapshot()


@events.worker_report.add_listener
def _worker_report(client_id: str, data: dict) -> None:
    if "loadtest" in data:
        SUITE.worker_reports[client_id] = data["loadtest"]
        held = sum(r["held"] for r in SUITE.worker_reports.values())
        SUITE.counters["held_max"] = max(SUITE.counters["held_max"], held)


@events.quitting.add_listener
def _quitting(environment, **_kwargs) -> None:  # noqa: ANN001
    opts = _opts(environment)
    if opts is None or not opts.summary_file or isinstance(environment.runner, WorkerRunner):
        return
    if SUITE.worker_reports:  # the master of --processes: add up the workers
        summary = {key: sum(r.get(key) or 0 for r in SUITE.worker_reports.values())
                   for key in next(iter(SUITE.worker_reports.values()))}
        summary["held_max"] = max(SUITE.counters["held_max"], summary.get("held_max", 0))
    else:
        summary = SUITE.snapshot()
    summary["spawn_complete_at"] = SUITE.spawn_complete_at
    summary["held_complete_at"] = SUITE.held_complete_at
    summary["stopping_at"] = SUITE.stopping_at
    Path(opts.summary_file).write_text(json.dumps(summary, indent=1))


# -- users ---------------------------------------------------------------------------

class Pop3User(User):
    """A simulated POP3 client bound to one pool mailbox for its whole life."""

    abstract = True
    group = ""

    def on_start(self) -> None:
        opts = _opts(self.environment)
        self.pop3_host, self.pop3_port = _split_hostport(self.host or "127.0.0.1", 110)
        self.timeout = opts.io_timeout
        name = SUITE.take(self.group)
        if name is None:
            self._fire("POOL", "exhausted", 0.0, 0, RuntimeError(f"pool group {self.group!r} exhausted"))
            raise StopUser()
        self.name = name
        assert SUITE.pool is not None
        self.password = SUITE.pool.passwords[name]
        self.client: Pop3Client | None = None

    def on_stop(self) -> None:
        self._drop()
        if getattr(self, "name", None):
            SUITE.give_back(self.group, self.name)
            self.name = ""

    def _fire(self, kind: str, name: str, seconds: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(request_type=kind, name=name, response_time=seconds * 1000.0,
                                             response_length=length, exception=exc, context={})

    def _step(self, name: str, seconds: float, length: int, exc: BaseException | None) -> None:
        self._fire("POP3", name, seconds, length, exc)

    def _open(self) -> Pop3Client:
        client = Pop3Client(self.pop3_host, self.pop3_port, self.timeout, on_step=self._step,
                            ssl_context=SUITE.ssl_context, starttls=SUITE.starttls)
        self.client = client
        client.connect()
        client.login(self.name, self.password)
        return client

    def _drop(self) -> None:
        if self.client is not None:
            if self.client.connected:
                with contextlib.suppress(POOL_ERRORS):
                    self.client.quit()
            self.client.close()
            self.client = None

    def _refill(self, count: int | None = None) -> None:
        pool = SUITE.pool
        if not SUITE.refill or pool is None:
            return
        try:
            if count is None:
                pool.refill(self.name)
            else:
                for _ in range(count):
                    deliver_link(pool.maildir / self.name, random.choice(pool.corpus))
        except OSError:
            pass  # a pool on another host: nothing to refill here


class DownloadDeleteUser(Pop3User):
    """The classic ISP profile: fetch everything, delete it on the server, hang up."""

    group = "dd"
    weight = 5

    def wait_time(self) -> float:
        return _opts(self.environment).dd_wait

    @task
    def session(self) -> None:
        start = time.perf_counter()
        received = 0
        try:
            client = self._open()
            count, _ = client.stat()
            for number in range(1, count + 1):
                received += len(client.retr(number))
            for number in range(1, count + 1):
                client.dele(number)
            client.quit()
        except POOL_ERRORS as exc:
            self._drop()
            self._fire("SESSION", "download-and-delete", time.perf_counter() - start, received, exc)
            return
        finally:
            self.client = None
        SUITE.counters["sessions_dd"] += 1
        SUITE.counters["messages_retrieved"] += count
        self._fire("SESSION", "download-and-delete", time.perf_counter() - start, received, None)
        self._refill()  # the MTA delivers the next batch (not timed)


class PollerUser(Pop3User):
    """Leave-on-server: remember UIDs, fetch only new mail; trim old mail as 'keep N days' would."""

    group = "poll"
    weight = 3
    keep = 40  # past this many messages, the oldest are deleted back down to `keep - 10`

    def on_start(self) -> None:
        super().on_start()
        self.seen: set[str] = set()
        self.first = True

    def wait_time(self) -> float:
        interval = _opts(self.environment).poll_interval
        return random.uniform(0.8 * interval, 1.2 * interval)

    @task
    def session(self) -> None:
        start = time.perf_counter()
        received = 0
        try:
            client = self._open()
            listing = client.uidl()
            for number, uid in listing:
                if uid not in self.seen:
                    received += len(client.retr(number))
                    self.seen.add(uid)
            excess = len(listing) - self.keep
            if excess > 0:
                for number, uid in listing[:excess + 10]:
                    client.dele(number)
                    self.seen.discard(uid)
            client.quit()
        except POOL_ERRORS as exc:
            self._drop()
            self._fire("SESSION", "poll", time.perf_counter() - start, received, exc)
            return
        finally:
            self.client = None
        SUITE.counters["sessions_poll"] += 1
        self._fire("SESSION", "poll", time.perf_counter() - start, received, None)
        self._refill(count=random.randint(1, 3))  # new mail for the next poll (not timed)


class IdleHolderUser(Pop3User):
    """Logs in once and keeps the session open with a slow NOOP, as a mail client left open does."""

    group = "idle"
    weight = 2

    def wait_time(self) -> float:
        interval = _opts(self.environment).noop_interval
        return random.uniform(0.5 * interval, 1.5 * interval)

    @task
    def hold(self) -> None:
        try:
            if self.client is None or not self.client.connected:
                if self.client is not None:
                    SUITE.counters["idle_reconnects"] += 1
                self.client = None
                self._open()
                SUITE.counters["idle_logged_in"] += 1
                SUITE.held_changed(+1)
                self._holding = True
                self._maybe_reset()
            assert self.client is not None
            self.client.noop()
            SUITE.noop_users.add(id(self))
        except POOL_ERRORS:
            self._release_hold()
            if self.client is not None:
                self.client.close()

    def _maybe_reset(self) -> None:
        target = _opts(self.environment).reset_when_held
        if target and SUITE.held_complete_at is None and SUITE.counters["held"] >= target:
            SUITE.held_complete_at = time.time()
            if not isinstance(self.environment.runner, WorkerRunner):
                self.environment.stats.reset_all()

    def _release_hold(self) -> None:
        if getattr(self, "_holding", False):
            self._holding = False
            SUITE.held_changed(-1)

    def on_stop(self) -> None:
        self._release_hold()
        super().on_stop()


class AdminWatcherUser(User):
    """An operator's live view: MSMP STAT every second, LOGS and a SET now and then."""

    fixed_count = 1
    weight = 1

    def wait_time(self) -> float:
        return _opts(self.environment).watch_interval

    def on_start(self) -> None:
        opts = _opts(self.environment)
        pop3_host, _ = _split_hostport(self.host or "127.0.0.1", 110)
        self.msmp_host, self.msmp_port = _split_hostport(opts.msmp or pop3_host, 4321)
        self.user, self.password = opts.msmp_user, opts.msmp_password
        self.client: MsmpClient | None = None
        self.value: str | None = None
        self.ticks = 0

    def on_stop(self) -> None:
        if self.client is not None:
            self.client.__exit__(None, None, None)
            self.client = None

    def _call(self, name: str, function, *args):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        try:
            result = function(*args)
        except (MsmpError, OSError) as exc:
            self.environment.events.request.fire(request_type="MSMP", name=name,
                                                 response_time=(time.perf_counter() - start) * 1000.0,
                                                 response_length=0, exception=exc, context={})
            if not isinstance(exc, MsmpError) and self.client is not None:
                self.client.close()
                self.client = None
            raise
        length = sum(len(str(k)) + len(str(v)) + 4 for k, v in result.items()) if isinstance(result, dict) \
            else sum(len(line) + 2 for line in result) if isinstance(result, list) else len(str(result or ""))
        self.environment.events.request.fire(request_type="MSMP", name=name,
                                             response_time=(time.perf_counter() - start) * 1000.0,
                                             response_length=length, exception=None, context={})
        return result

    @task
    def watch(self) -> None:
        try:
            if self.client is None:
                self.client = MsmpClient(self.msmp_host, self.msmp_port, timeout=_opts(self.environment).io_timeout)
                self._call("CONNECT", self.client.connect)
                self._call("LOGIN", self.client.login, self.user, self.password)
            client = self.client
            self.ticks += 1
            self._call("STAT", client.stat)
            if self.ticks % 10 == 0 and SUITE.pool is not None:
                group = random.choice([g for g, names in SUITE.pool.users.items() if names])
                self._call("LOGS", client.logs, random.choice(SUITE.pool.users[group]), 20)
            if self.ticks % 30 == 0:
                if self.value is None:
                    self.value = self._call("GET", client.get, "idle_timeout")
                self._call("SET", client.set, "idle_timeout", self.value)  # the same value: a no-op change
            if self.ticks % 60 == 0:
                self._call("LIST", client.list_users)
        except (MsmpError, OSError):
            pass  # reported by _call; a lost connection reconnects on the next tick
