"""External mail filters ("transformers"): every message of a snapshot, through a program.

Sizes rule: at login, before `+OK`, every message of the snapshot that has no cached
output is filtered (in parallel, at most `transformer_concurrency` filter processes
in the whole server), so STAT, LIST, RETR and TOP all see the filtered message and
its exact size. The output is cached under the state directory, keyed by (UIDL, size
of the original, filter identity = hash of the argv chain): a message is filtered
once per filter, and a second login only lists one directory.

No pipe carries a message: the filter's stdin is the stored file itself (opened
read-only) and its stdout a spool file beside the cache, so a message of any size can
neither deadlock nor pass through the server's memory. Only stderr is a pipe, drained
by a greenlet that keeps the first 4 KiB for the log. A spool file becomes a cache
entry (by rename) only after the filter exited 0 with a non-empty output; every other
outcome removes it.

Bounds: a filter never runs as the server (geventpop3.service.sandbox): while the server
started as root, it runs as `filter_user`, started by the root-side filter spawner
(geventpop3.process.filter_spawner) the runner asks over a UNIX socket, passing the
stored message, the spool file and a stderr pipe as descriptors (`Launcher.spawner`);
a server that stays root starts it itself as `filter_user`; a server that never was
root runs it as its own user (a developer's run, logged once). Either way it gets
PR_SET_NO_NEW_PRIVS, an empty working directory and its rlimits, RLIMIT_FSIZE at
`transformer_max_output` + 1 so an output past the cap is cut by the kernel (SIGXFSZ,
or EFBIG where the signal is ignored) and the filter fails; descendants that escaped its
process group are killed when it ends (`geventpop3.service.reaper`, in whichever process
started it); and `prepare()` stops at once, killing the filters it started, when the
client that is logging in goes away.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from subprocess import PIPE, SubprocessError, TimeoutExpired
from typing import IO, TYPE_CHECKING

import gevent
from gevent import socket
from gevent.event import Event
from gevent.fileobject import FileObjectPosix
from gevent.pool import Pool
from gevent.subprocess import Popen

from geventpop3.core.message import Message
from geventpop3.core.names import valid_username
from geventpop3.mail.maildir import crlf_size, open_regular
from geventpop3.service import privileges, reaper
from geventpop3.service.privileges import Identity, PrivilegeError
from geventpop3.service.sandbox import Sandbox, empty_dir

if TYPE_CHECKING:
    from geventpop3.core.settings import Settings
    from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)

STDERR_KEEP = 4096  # bytes of a filter's stderr kept for the log
STDERR_GRACE = 1.0  # seconds to wait for stderr EOF after the filter exited
THREADPOOL_BYTES = 1 << 20  # outputs past this are sized and synced off the event loop
TEMP_PREFIX = ".tmp-"
ENV_PASSED = ("PATH", "LANG", "HOME")
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
BOOT_MARK = ".boot-id"  # in the cache root: the boot its entries were written in
FAILED_ERROR = "message filter failed, try again later"
CLIENT_POLL = 0.2  # seconds between checks that the client logging in is still there
TOO_LARGE = "output over transformer_max_output"

SPAWNER_ENV = "GEVENTPOP3_FILTER_SPAWNER"  # the spawner's abstract socket name, for the workers
SPAWNER_GRACE = 10.0  # seconds past the timeout to wait for the spawner's answer
MESSAGE_MAX = 1 << 16  # bytes of one spawner message
FD_COUNT = 3  # stdin, stdout, stderr

# Filters running now in this process, token -> pid: their orphans are theirs to clean up.
_running: dict[str, int] = {}


class ClientGone(ConnectionError):
    """The client went away during its login while its mail was being filtered."""


class FilterFailed(Exception):
    """One run went wrong; `kind` says how (exit code 1, timeout, not found, empty output...)."""

    def __init__(self, kind: str, stderr: bytes = b"") -> None:
        super().__init__(kind)
        self.kind = kind
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class Filter:
    """What the `transformer` setting names, resolved to the programs to run in order."""

    name: str
    steps: tuple[tuple[str, ...], ...]
    identity: str  # names the cache: same argv chain, same cache

    @classmethod
    def of(cls, name: str, steps: Sequence[Sequence[str]]) -> Filter:
        argvs = tuple(tuple(argv) for argv in steps)
        if not argvs or not all(argvs):
            raise ValueError("empty command")
        digest = hashlib.sha256(json.dumps(argvs).encode()).hexdigest()[:32]
        return cls(name, argvs, digest)


def resolve(settings: Settings, value: str) -> Filter | None:
    """The filter `value` names: `none`, a chain or named command of the config file, or a command line.

    A chain (`settings.filter_chains`: name -> names of commands) runs its
    commands in order, each reading the previous one's output. Chains and commands
    were checked once, when the config file was read (config.filters_from_file).
    """
    if value == "none":
        return None
    named = settings.named_filters
    chains = settings.filter_chains
    if value in chains:
        return Filter.of(value, [named[step] for step in chains[value]])
    if value in named:
        return Filter.of(value, [named[value]])
    return Filter.of(value, [shlex.split(value)])


def filter_env(user: str, uid: str, address: str, port: int) -> dict[str, str]:
    """The filter's whole environment: built from scratch so no secret of the server leaks."""
    env = {name: os.environ[name] for name in ENV_PASSED if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env["GEVENTPOP3_USER"] = user
    env["GEVENTPOP3_UIDL"] = uid
    env["GEVENTPOP3_CLIENT_ADDRESS"] = address
    env["GEVENTPOP3_CLIENT_PORT"] = str(port)
    return env


class Limiter:
    """A counting semaphore whose size can change while greenlets wait on it.

    A release wakes as many waiters as there are free slots; a waiter killed after its
    wake-up but before it ran (a session ended by shutdown) hands the wake-up on, or
    the slot meant for it would stay free while the others wait.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[Event] = deque()

    def __enter__(self) -> Limiter:
        while self.active >= self.limit:
            waiter = Event()
            self._waiters.append(waiter)
            try:
                waiter.wait()
            except BaseException:
                self._waiters.remove(waiter)
                if waiter.is_set():
                    self._wake()
                raise
            self._waiters.remove(waiter)
        self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        for waiter in list(self._waiters)[: max(self.limit - self.active, 0)]:
            waiter.set()


def _drain(pipe: IO[bytes]) -> bytes:
    """Read a pipe to its end (so the writer never blocks), keeping only the first bytes."""
    kept = bytearray()
    while True:
        chunk = pipe.read(65536)
        if not chunk:
            return bytes(kept)
        if len(kept) < STDERR_KEEP:
            kept += chunk[: STDERR_KEEP - len(kept)]


def kill_group(proc: Popen[bytes]) -> None:
    """SIGKILL the filter and whatever it started (it leads its own session), then reap it."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()


@dataclass(frozen=True)
class Launcher:
    """How this process starts filters: through the root-side spawner, or itself as a user (or as ours).

    `spawner`: the filter spawner's abstract socket name; `identity`: the user to switch
    to when starting a filter here (only a root process can); `error`: no filter may run
    (the reason, one line)."""

    spawner: str | None = None
    identity: Identity | None = None
    error: str | None = None
    quiet: bool = False  # say nothing at start (a worker: its supervisor said it)


@dataclass(frozen=True)
class ChildLimits:
    """What bounds one filter process: its output cap, the user it runs as (None: ours), how it starts."""

    max_output: int
    identity: Identity | None = None
    token: str = field(default_factory=lambda: os.urandom(8).hex())
    spawner: str | None = None  # set: the spawner starts it (as its filter user), not this process


def _start(argv: Sequence[str], stdin: int, out_fd: int, env: dict[str, str],
           limits: ChildLimits, timeout: float) -> Popen[bytes]:
    try:
        return Popen(list(argv), stdin=stdin, stdout=out_fd, stderr=PIPE, env=env, close_fds=True,
                     start_new_session=True, cwd=empty_dir(),
                     preexec_fn=Sandbox(limits.max_output, timeout, limits.identity))
    except FileNotFoundError:
        raise FilterFailed("not found") from None
    except PermissionError:
        raise FilterFailed("not executable") from None
    except OSError as exc:
        raise FilterFailed(f"cannot start: {exc.strerror or exc}") from None
    except SubprocessError as exc:  # preexec_fn failed: the limits or the user switch
        raise FilterFailed(f"cannot start: {exc}") from None


def _spawner_call(sock: socket.socket, timeout: float) -> dict[str, object]:
    """One JSON message from the spawner; FilterFailed if it went away or said nothing in time."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(MESSAGE_MAX)
    except OSError:  # socket.timeout among them
        raise FilterFailed("filter spawner did not answer") from None
    try:
        answer = json.loads(data) if data else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise FilterFailed("filter spawner unavailable")
    error = answer.get("error")
    if isinstance(error, str):
        raise FilterFailed(error)
    return answer


def _run_remote(argv: Sequence[str], stdin: int, out_fd: int, env: dict[str, str], timeout: float,
                limits: ChildLimits) -> tuple[int, str | None, gevent.Greenlet[..., bytes]]:
    """Ask the spawner to run `argv`: (exit status as Popen's returncode, "timeout" or None, the stderr reader).

    The spawner starts the filter as its user with our descriptors, kills its group on
    timeout or when this connection closes (a session killed meanwhile: the socket is
    closed at once), cleans up what it left and answers the exit status. Its stderr is a
    pipe of ours, drained meanwhile as a filter started here is."""
    assert limits.spawner is not None
    err_read, err_write = os.pipe()
    pipe = FileObjectPosix(err_read, "rb", close=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader: gevent.Greenlet[..., bytes] | None = None
    try:
        try:
            sock.settimeout(SPAWNER_GRACE)
            sock.connect("\0" + limits.spawner)
            request = json.dumps({"argv": list(argv), "env": env, "max_output": limits.max_output,
                                  "timeout": timeout}).encode()
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      struct.pack(f"{FD_COUNT}i", stdin, out_fd, err_write))])
        except OSError as exc:
            raise FilterFailed(f"filter spawner unavailable: {exc.strerror or exc}") from None
        finally:
            os.close(err_write)  # the filter holds it now: EOF once it and its descendants are done
        reader = gevent.spawn(_drain, pipe)
        _spawner_call(sock, SPAWNER_GRACE)  # started
        done = _spawner_call(sock, timeout + SPAWNER_GRACE)
        code = done.get("exit")
        if not isinstance(code, int):
            raise FilterFailed("filter spawner unavailable")
        reader.join(timeout=STDERR_GRACE)  # the spawner killed the whole tree: EOF comes at once
        return code, "timeout" if done.get("timeout") else None, reader
    finally:  # also when the session is killed: closing the socket makes the spawner kill the filter
        sock.close()
        if reader is not None:
            reader.kill()
        pipe.close()


def _run_local(argv: Sequence[str], source: str, output: str, env: dict[str, str], timeout: float,
               limits: ChildLimits, source_id: int) -> tuple[int, str | None, gevent.Greenlet[..., bytes]]:
    """Start the filter here (as `limits.identity` if root, else as ourselves) and wait for it."""
    _running[limits.token] = 0  # from the fork on, its processes carry the token: leave them alone
    try:
        with open_regular(source, source_id) as stdin:
            out_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                proc = _start(argv, stdin.fd, out_fd, env, limits, timeout)
            finally:
                os.close(out_fd)
    except BaseException:
        del _running[limits.token]
        raise
    _running[limits.token] = proc.pid
    assert proc.stderr is not None
    reader = gevent.spawn(_drain, proc.stderr)
    kind = None
    try:
        try:
            code = proc.wait(timeout=timeout)
        except TimeoutExpired:
            kill_group(proc)
            kind = "timeout"
            code = proc.returncode
        reader.join(timeout=STDERR_GRACE)  # a grandchild may still hold stderr open
    finally:  # also when the session was killed (shutdown, client gone): never leave a child behind
        kill_group(proc)  # nothing it left behind may write into the output after this
        reader.kill()
        proc.stderr.close()
        del _running[limits.token]
        reaper.kill_leftovers(set(_running.values()), set(_running), tokenless=0 not in _running.values())
    return code, kind, reader


def run_program(argv: Sequence[str], source: str, output: str, env: dict[str, str], timeout: float,
                limits: ChildLimits, source_id: int = 0) -> None:
    """Run one filter: `source` on stdin, stdout into the new file `output`; raise FilterFailed.

    `source` is opened as RETR opens mail (never through a link, only a regular file,
    with `source_id` only the file the snapshot saw), `output` is created new, never
    through a planted link."""
    env = dict(env)
    env[reaper.FILTER_TOKEN_VAR] = limits.token
    if limits.identity is not None:
        env["HOME"] = limits.identity.home
    if limits.spawner is not None:
        with open_regular(source, source_id) as stdin:
            out_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                code, kind, reader = _run_remote(argv, stdin.fd, out_fd, env, timeout, limits)
            finally:
                os.close(out_fd)
    else:
        code, kind, reader = _run_local(argv, source, output, env, timeout, limits, source_id)
    stderr = reader.value or b""
    if kind is None and (code == -signal.SIGXFSZ or os.stat(output).st_size > limits.max_output):
        kind = TOO_LARGE
    if kind is None and code != 0:
        kind = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if kind is None and os.stat(output).st_size == 0:
        kind = "empty output"
    if kind is not None:
        raise FilterFailed(kind, stderr)
    if stderr:
        log.info("transformer stderr: argv0=%s stderr=%r", argv[0], stderr)


def _watch_client(client_gone: Callable[[], bool], gone: Event) -> None:
    """Set `gone` once the client has left (polled: a login may be pipelined behind data)."""
    while not client_gone():
        gevent.sleep(CLIENT_POLL)
    gone.set()


def _seal(path: str, sync: bool) -> int:
    """Sync a finished output to disk if asked and return its CRLF size (what RETR sends)."""
    if sync:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return crlf_size(path)


def boot_id() -> str | None:
    """This boot of the machine (Linux); None where the system does not say."""
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as handle:
            return handle.read().strip() or None
    except (OSError, ValueError):
        return None


def _entry_name(uid: str, source_size: int, size: int) -> str:
    return f"{uid}.{source_size}.{size}"


def _parse_entry(name: str) -> tuple[str, int, int] | None:
    parts = name.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or name.startswith("."):
        return None
    return parts[0], int(parts[1]), int(parts[2])


class FilterRunner:
    """The server's filter runner and output cache; `ctx.filters` of the sessions."""

    def __init__(self, ctx: ServerContext, cache_dir: str | None, launcher: Launcher | None = None) -> None:
        """`cache_dir`: normally <state-dir>/filtered; None (no state dir) uses a private temporary one.
        `launcher`: how filters start (the server's choice); None: as this process can, by itself."""
        self.ctx = ctx
        try:
            if cache_dir is None:  # --no-state: a private cache that goes with the process
                self.cache_dir = tempfile.mkdtemp(prefix="geventpop3-filtered-")
                atexit.register(shutil.rmtree, self.cache_dir, True)
            else:
                self.cache_dir = os.path.abspath(cache_dir)
                os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        except OSError as exc:  # filters still work, only the cache does not outlive the process
            self.cache_dir = tempfile.mkdtemp(prefix="geventpop3-filtered-")
            atexit.register(shutil.rmtree, self.cache_dir, True)
            log.warning("transformer cache in %s (%s): outputs will not be kept across restarts", self.cache_dir,
                        getattr(exc, "strerror", None) or exc)
        self.sync = not self._same_boot()
        self.limiter = Limiter(ctx.settings.transformer_concurrency)
        self.launcher = launcher if launcher is not None else self._default_launcher()
        if self.launcher.spawner is None:
            reaper.become_subreaper()  # escaped descendants of filters are adopted by us, then killed
        if self.launcher.quiet:
            pass
        elif self.launcher.error is not None:
            log.error("%s: every filter run will fail", self.launcher.error)
        elif self.launcher.spawner is None and self.launcher.identity is None:
            log.info("filters run as the server's own user (it was not started as root): they can read what "
                     "it reads; start as root with --run-as for a filter_user of their own (docs/filters.md)")
        ctx.settings.subscribe(self._on_setting)

    @staticmethod
    def _default_launcher() -> Launcher:
        """Without the server's word: as the default filter user when root, else as ourselves."""
        try:
            return Launcher(identity=privileges.filter_identity())
        except PrivilegeError as exc:
            return Launcher(error=str(exc))

    def _same_boot(self) -> bool:
        """Empty the cache if it was written before the last boot; True if entries need no fsync.

        Only an OS crash or power loss can tear a file that was written and renamed
        without fsync, and either means a new boot: so entries of earlier boots are
        dropped (in the background) and new ones skip the fsync that would otherwise
        cost about a third of a filter run. Without a boot id, every entry is synced.
        """
        current = boot_id()
        if current is None:
            return False
        mark = os.path.join(self.cache_dir, BOOT_MARK)
        try:
            with open_regular(mark) as handle:
                if handle.read(64).decode("ascii").strip() == current:
                    return True
        except (OSError, ValueError):
            pass
        trash = os.path.join(self.cache_dir, f".trash-{os.urandom(6).hex()}")
        try:
            with os.scandir(self.cache_dir) as entries:
                stale = [entry.path for entry in entries if not entry.name.startswith(".")]
            if stale:
                os.mkdir(trash, 0o700)
                for path in stale:
                    os.rename(path, os.path.join(trash, os.path.basename(path)))
            for entry in os.listdir(self.cache_dir):
                if entry.startswith(".trash-"):  # this one, and any a crash left behind
                    gevent.get_hub().threadpool.spawn(shutil.rmtree, os.path.join(self.cache_dir, entry), True)
            temp = f"{mark}.{os.urandom(8).hex()}.tmp"  # a new file, never through a planted link
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(current + "\n")
            os.replace(temp, mark)
        except OSError as exc:
            log.warning("transformer cache %s: cannot start a new boot epoch (%s), syncing every entry",
                        self.cache_dir, exc.strerror or exc)
            return False
        return True

    def _on_setting(self, key: str, old: object, new: object) -> None:
        if key == "transformer_concurrency" and isinstance(new, int):
            self.limiter.resize(new)

    # -- login ---------------------------------------------------------------
    def prepare(self, messages: list[Message], *, user: str, address: str, port: int,
                client_gone: Callable[[], bool] | None = None) -> list[Message]:
        """The snapshot as the session must see it: each message filtered, failed, or passed through.

        Called at login with the mailbox lock held, so nobody else touches this user's cache.
        `client_gone` is polled while filters run: once it says True, no filter starts,
        the running ones are killed and ClientGone is raised, so the caller can release
        the lock at once instead of filtering a whole mailbox for nobody.
        """
        settings = self.ctx.settings
        try:
            flt = resolve(settings, settings.transformer)
        except ValueError as exc:
            log.error("transformer %r unusable: %s", settings.transformer, exc)
            return [self._failed(message, user, "unusable", None, quiet=True) for message in messages]
        if flt is None:
            return messages
        if not valid_username(user):
            raise ValueError("unsafe user name")
        user_root = os.path.join(self.cache_dir, user)
        directory = os.path.join(user_root, flt.identity)
        try:
            for level in (user_root, directory):  # each 0700 (makedirs gives parents the umask's mode)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(level, 0o700)
            self._drop_other_filters(user_root, flt.identity)
            cached = self._scan(directory, messages)
        except OSError as exc:  # the cache is unusable (disk full, permissions): the login still works
            log.error("transformer cache %s unusable: %s", directory, exc.strerror or exc)
            return [self._failed(message, user, "spool error", flt, quiet=True) for message in messages]

        result: list[Message] = list(messages)
        misses: list[int] = []
        for index, message in enumerate(messages):
            hit = cached.get((message.uid, message.size))
            if hit is not None:
                result[index] = replace(message, path=hit[0], size=hit[1])
                self.ctx.metrics.transformer_cache_hits += 1
            else:
                misses.append(index)
        if misses:
            def work(index: int) -> tuple[int, Message]:
                return index, self._filter_message(flt, messages[index], directory, user, address, port)

            self._run_all(work, misses, result, client_gone)
        return result

    def _run_all(self, work: Callable[[int], tuple[int, Message]], misses: list[int], result: list[Message],
                 client_gone: Callable[[], bool] | None) -> None:
        """Filter the misses in parallel into `result`; stop everything if the client goes away."""
        pool = Pool(max(1, min(len(misses), self.limiter.limit)))

        def run() -> None:
            results = pool.imap_unordered(work, misses)
            try:
                for index, message in results:
                    result[index] = message
            finally:  # if the login is abandoned (shutdown, client gone), so are its filters:
                results.kill()  # first what starts them (it is a greenlet of its own), then the running ones
                pool.kill()

        over = Event()  # set when the filters are done, or the client is gone
        runner = gevent.spawn(run)
        runner.link(lambda _: over.set())
        watcher = gevent.spawn(_watch_client, client_gone, over) if client_gone is not None else None
        try:
            over.wait()
            if not runner.ready():
                runner.kill()  # waits until every filter of this login is dead and its slot free
                raise ClientGone("client gone while its mail was being filtered")
            runner.get()
        finally:
            if watcher is not None:
                watcher.kill()
            runner.kill()

    def _drop_other_filters(self, user_root: str, identity: str) -> None:
        """A user's outputs of earlier filters are useless now: the cache holds one filter per user."""
        with contextlib.suppress(OSError), os.scandir(user_root) as entries:
            for entry in entries:
                if entry.name != identity:
                    shutil.rmtree(entry.path, ignore_errors=True)

    def _scan(self, directory: str, messages: list[Message]) -> dict[tuple[str, int], tuple[str, int]]:
        """Cached outputs still wanted, by (uid, source size); removes the others and stale temporaries."""
        wanted = {(message.uid, message.size) for message in messages}
        found: dict[tuple[str, int], tuple[str, int]] = {}
        with os.scandir(directory) as entries:
            for entry in entries:
                parsed = _parse_entry(entry.name)
                if parsed is not None and (key := parsed[:2]) in wanted and key not in found:
                    found[key] = (entry.path, parsed[2])
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        return found

    # -- one message ---------------------------------------------------------
    def _filter_message(self, flt: Filter, message: Message, directory: str, user: str, address: str,
                        port: int) -> Message:
        try:
            env = filter_env(user, message.uidl or message.uid, address, port)  # the UIDL the client sees
            path, size = self._run_chain(flt, message, directory, env)
        except FilterFailed as failure:
            return self._failed(message, user, failure.kind, flt, failure.stderr)
        return replace(message, path=path, size=size)

    def _run_chain(self, flt: Filter, message: Message, directory: str, env: dict[str, str]) -> tuple[str, int]:
        settings = self.ctx.settings
        metrics = self.ctx.metrics
        temps: list[str] = []
        current = message.source
        try:
            for argv in flt.steps:
                output = os.path.join(directory, TEMP_PREFIX + os.urandom(8).hex())
                temps.append(output)
                with self.limiter:
                    started = time.monotonic()
                    metrics.transformer_runs += 1
                    try:
                        launcher = self.launcher
                        if launcher.error is not None:
                            raise FilterFailed(launcher.error)
                        limits = ChildLimits(settings.transformer_max_output, launcher.identity,
                                             spawner=launcher.spawner)
                        source_id = message.file_id if current == message.source else 0
                        run_program(argv, current, output, env, settings.transformer_timeout, limits, source_id)
                    except FilterFailed as failure:
                        metrics.transformer_failures += 1
                        if failure.kind == "timeout":
                            metrics.transformer_timeouts += 1
                        raise
                    except OSError as exc:  # the stored message vanished, the spool is unwritable...
                        metrics.transformer_failures += 1
                        raise FilterFailed(f"spool error: {exc.strerror or exc}") from None
                    finally:
                        metrics.transformer_seconds += time.monotonic() - started
                current = output
            try:
                if os.stat(current).st_size > THREADPOOL_BYTES:
                    size = gevent.get_hub().threadpool.apply(_seal, (current, self.sync))
                else:
                    size = _seal(current, self.sync)
                final = os.path.join(directory, _entry_name(message.uid, message.size, size))
                os.replace(current, final)
            except OSError as exc:
                raise FilterFailed(f"spool error: {exc.strerror or exc}") from None
            temps.remove(current)
            return final, size
        finally:
            for temp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

    def _failed(self, message: Message, user: str, kind: str, flt: Filter | None, stderr: bytes = b"",
                quiet: bool = False) -> Message:
        policy = self.ctx.settings.transformer_failure
        if not quiet:
            log.warning("transformer failed: user=%s uid=%s filter=%s kind=%s policy=%s stderr=%r", user,
                        message.uid, flt.name if flt else "-", kind, policy, stderr)
        if policy == "passthrough":
            return message  # the original file and its size
        return replace(message, error=FAILED_ERROR)
