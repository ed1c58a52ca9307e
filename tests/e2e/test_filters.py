"""External filters with real programs: the runner in-process, then through the real server.

In-process tests drive `FilterRunner.prepare` exactly as a session does at login (real
Maildir, real child processes under gevent); the others start `python -m geventpop3`
and talk POP3 over loopback, so sizes, TOP, failures and the concurrency bound are
checked on the wire.
"""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import gevent.event
import pytest
from helpers import LineClient, ServerProcess, admin, crlf, filter_tmp_dir, wait_until

from admin.client import MsmpError
from geventpop3.auth.users import UserDirectory, hash_password
from geventpop3.core.message import Message
from geventpop3.mail import maildir
from geventpop3.service.context import ServerContext
from geventpop3.service.filters import FAILED_ERROR, STDERR_KEEP, ClientGone, Filter, FilterRunner, Limiter, resolve
from geventpop3.service.setting_checks import checked_settings

ROT23 = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"xyzabcdefghijklmnopqrstuvw")
HAM = b"From: a@example.org\nTo: alice@example.org\nSubject: hello\n\nfirst line\n.leading dot\nlast line\n"


def script(directory: Path, name: str, body: str) -> str:
    """An executable /bin/sh filter; returns its path. Filters (as `nobody` when the tests
    run as root) may also write into `directory`."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Replaces pytest's for this module: filters (as `nobody` when the tests run as root)
    must reach their scripts and the files they write."""
    with filter_tmp_dir() as path:
        yield path


# -- in-process: the runner and the cache --------------------------------------

class Box:
    """A context, a FilterRunner and one user's Maildir: what a login sees."""

    def __init__(self, root: Path, transformer: str = "none", **settings: str) -> None:
        self.root = root
        self.settings = checked_settings()
        for key, value in settings.items():
            self.settings.set(key, value)
        self.ctx = ServerContext(settings=self.settings, users=UserDirectory())
        self.cache = root / "state" / "filtered"
        self.runner = FilterRunner(self.ctx, str(self.cache))
        (root / "mail").mkdir(parents=True, exist_ok=True)
        self.mailbox = maildir.Mailbox(str(root / "mail"), "alice")
        self.mailbox.open()
        self.maildir = self.mailbox.path
        self.use(transformer)

    def use(self, transformer: str) -> None:
        """Set the filter as the config file does (no program check, so broken ones can be tested)."""
        self.settings.apply("transformer", transformer, "test")

    def deliver(self, *contents: bytes) -> list[str]:
        return [maildir.deliver(self.maildir, content) for content in contents]

    def login(self) -> list[Message]:
        messages = self.mailbox.snapshot()
        return self.runner.prepare(messages, user="alice", address="127.0.0.1", port=40000)

    def cached_files(self) -> list[str]:
        return sorted(str(p) for p in self.cache.glob("*/*/*"))  # <user>/<filter>/<entry or temporary>


def read(message: Message) -> bytes:
    with open(message.path, "rb") as handle:
        return handle.read()


@pytest.fixture
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


@pytest.mark.parametrize(("command", "expected"), [
    ("cat", HAM),
    ("tr a-z A-Z", HAM.upper()),
    ("sed -e s/line/LINE/g", HAM.replace(b"line", b"LINE")),
])
def test_simple_programs(box: Box, command: str, expected: bytes) -> None:
    (source,) = box.deliver(HAM)
    box.use(command)
    (message,) = box.login()
    assert message.error is None
    assert read(message) == expected
    assert message.size == len(crlf(expected)) == maildir.crlf_size(message.path)
    assert message.source == source and message.path != source
    assert message.uid == os.path.basename(source)
    with open(source, "rb") as handle:
        assert handle.read() == HAM  # the stored message is never changed
    assert box.ctx.metrics.transformer_runs == 1


def test_script_adding_a_header_and_wc(box: Box, tmp_path: Path) -> None:
    box.deliver(HAM)
    box.use(script(tmp_path, "tag.sh", 'printf "X-Filtered: yes\\n"; exec cat\n'))
    (message,) = box.login()
    assert read(message) == b"X-Filtered: yes\n" + HAM
    box.use("wc")  # the seed's example: the client gets wc's report instead of the mail
    (message,) = box.login()
    assert read(message).split() == [b"7", str(len(HAM.split())).encode(), str(len(HAM)).encode()]


@pytest.mark.parametrize(("body", "kind"), [
    ("cat >/dev/null; exit 1\n", "exit code 1"),
    ("head -c 20; exit 3\n", "exit code 3"),  # writes half, then dies
    ("head -c 20; kill -9 $$\n", "killed by signal 9"),
    ("cat >/dev/null\n", "empty output"),  # writes nothing
    ("exit 0\n", "empty output"),  # reads nothing, writes nothing
])
def test_failures_never_reach_the_client(box: Box, tmp_path: Path, body: str, kind: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    (source,) = box.deliver(HAM)
    box.use(script(tmp_path, "bad.sh", body))
    (message,) = box.login()
    assert message.error == FAILED_ERROR
    assert message.path == source and message.size == len(crlf(HAM))  # STAT stays sane
    assert box.ctx.metrics.transformer_failures == 1
    assert box.cached_files() == []  # partial output is never kept, temporaries are gone
    assert f"kind={kind}" in caplog.text and "user=alice" in caplog.text


def test_a_message_swapped_for_a_link_after_the_snapshot_is_never_fed_to_the_filter(box: Box, tmp_path: Path) -> None:
    """The filter's input is opened as RETR opens mail: no link is followed, only the file
    the snapshot saw is read (a hostile local user could swap it in between)."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:SECRET-HASH:19000:0:99999:7:::\n")
    (source,) = box.deliver(HAM)
    box.use("cat")
    messages = box.mailbox.snapshot()
    os.unlink(source)
    os.symlink(secret, source)
    (message,) = box.runner.prepare(messages, user="alice", address="127.0.0.1", port=40000)
    assert message.error == FAILED_ERROR
    assert all(b"SECRET" not in Path(path).read_bytes() for path in box.cached_files())


def test_reads_nothing_but_writes_a_message(box: Box, tmp_path: Path) -> None:
    box.deliver(HAM * 10_000)  # far bigger than a pipe: the filter never reads it
    box.use(script(tmp_path, "replace.sh", 'printf "Subject: replaced\\n\\nnothing\\n"\n'))
    (message,) = box.login()
    assert read(message) == b"Subject: replaced\n\nnothing\n"


def test_program_not_found(box: Box, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box.deliver(HAM)
    box.use(str(tmp_path / "no-such-filter"))
    (message,) = box.login()
    assert message.error == FAILED_ERROR
    assert "kind=not found" in caplog.text


def test_timeout_kills_the_filter_and_its_children(tmp_path: Path) -> None:
    box = Box(tmp_path, transformer_timeout="0.3")
    pids = tmp_path / "pids"
    box.deliver(HAM)
    box.use(script(tmp_path, "hang.sh", f"sleep 30 & echo $! > {pids}; wait\n"))
    started = time.monotonic()
    (message,) = box.login()
    assert time.monotonic() - started < 5
    assert message.error == FAILED_ERROR
    assert box.ctx.metrics.transformer_timeouts == 1 and box.ctx.metrics.transformer_failures == 1
    child = int(pids.read_text())
    wait_until(lambda: not os.path.exists(f"/proc/{child}") or "State:\tZ" in Path(f"/proc/{child}/status").read_text())
    assert box.cached_files() == []


def test_passthrough_policy_sends_the_original(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Box(tmp_path, transformer_failure="passthrough")
    (source,) = box.deliver(HAM)
    box.use("false")
    (message,) = box.login()
    assert message.error is None and message.path == source and message.size == len(crlf(HAM))
    assert "policy=passthrough" in caplog.text


def test_environment_has_context_and_nothing_else(box: Box, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEVENTPOP3_TEST_SECRET", "hunter2")
    (source,) = box.deliver(HAM)
    box.use(script(tmp_path, "env.sh", "cat >/dev/null; env\n"))
    (message,) = box.login()
    env = dict(line.split("=", 1) for line in read(message).decode().splitlines())
    env.pop("PWD", None)  # the shell adds these itself
    env.pop("SHLVL", None)
    env.pop("_", None)
    assert env.pop("GEVENTPOP3_USER") == "alice"
    assert env.pop("GEVENTPOP3_UIDL") == os.path.basename(source)
    assert env.pop("GEVENTPOP3_CLIENT_ADDRESS") == "127.0.0.1"
    assert env.pop("GEVENTPOP3_CLIENT_PORT") == "40000"
    assert len(env.pop("GEVENTPOP3_FILTER_ID")) == 16  # marks this run's processes (geventpop3.service.reaper)
    assert set(env) <= {"PATH", "LANG", "HOME"}
    assert "hunter2" not in read(message).decode()


def test_stderr_is_logged_bounded_and_never_blocks(box: Box, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    box.deliver(HAM)
    # 1 MiB on stderr: more than a pipe holds, so an undrained pipe would hang the filter.
    box.use(script(tmp_path, "noisy.sh", "head -c 1048576 /dev/zero | tr '\\0' E >&2; cat; exit 2\n"))
    (message,) = box.login()
    assert message.error == FAILED_ERROR
    (record,) = [r for r in caplog.records if "transformer failed" in r.getMessage()]
    assert "E" * STDERR_KEEP in record.getMessage() and "E" * (STDERR_KEEP + 1) not in record.getMessage()


def test_cache_hit_on_second_login_and_cleanup(box: Box) -> None:
    first, second = box.deliver(HAM, HAM.replace(b"hello", b"again"))
    box.use("tr a-z A-Z")
    messages = box.login()
    assert box.ctx.metrics.transformer_runs == 2
    mtimes = {m.path: os.stat(m.path).st_mtime_ns for m in messages}
    again = box.login()
    assert [(m.path, m.size) for m in again] == [(m.path, m.size) for m in messages]
    assert box.ctx.metrics.transformer_runs == 2 and box.ctx.metrics.transformer_cache_hits == 2
    assert {m.path: os.stat(m.path).st_mtime_ns for m in again} == mtimes
    os.unlink(first)  # deleted by a session: its output goes at the next login
    (left,) = box.login()
    assert box.cached_files() == [left.path] and read(left) == HAM.replace(b"hello", b"again").upper()
    box.use("tr a-z x-za-w")  # another filter: its own cache, the old one is dropped
    (other,) = box.login()
    assert box.cached_files() == [other.path] and read(other) == HAM.replace(b"hello", b"again").translate(ROT23)


def test_cache_survives_a_restart_but_not_a_reboot(box: Box) -> None:
    box.deliver(HAM)
    box.use("cat")
    (message,) = box.login()
    assert box.runner.sync is False  # this boot's entries need no fsync
    box.runner = FilterRunner(box.ctx, str(box.cache))  # a server restart, same boot
    assert box.login() == [message] and box.ctx.metrics.transformer_runs == 1
    (box.cache / ".boot-id").write_text("an-earlier-boot\n")  # entries may be torn by a crash
    box.runner = FilterRunner(box.ctx, str(box.cache))
    wait_until(lambda: not Path(message.path).exists() and not list(box.cache.glob(".trash-*")))
    (again,) = box.login()
    assert box.ctx.metrics.transformer_runs == 2 and read(again) == HAM


def test_unwritable_cache_fails_the_messages_not_the_login(box: Box) -> None:
    (source,) = box.deliver(HAM)
    box.use("cat")
    (box.cache / "alice").write_text("not a directory")  # makedirs of alice/<filter> fails
    (message,) = box.login()
    assert message.error == FAILED_ERROR and message.path == source


def test_stale_temporaries_are_removed(box: Box) -> None:
    box.deliver(HAM)
    box.use("cat")
    (message,) = box.login()
    stale = Path(message.path).parent / ".tmp-leftover-of-a-crash"
    stale.write_bytes(b"partial")
    box.login()
    assert not stale.exists()


def test_chain_runs_in_order(box: Box) -> None:
    box.deliver(HAM)
    box.settings.named_filters.update(upper=["tr", "a-z", "A-Z"], tag=["sed", "-e", "1i X-Tag: t"])
    box.settings.filter_chains = {"both": ["upper", "tag"]}
    box.use("both")
    (message,) = box.login()
    assert read(message) == b"X-Tag: t\n" + HAM.upper()
    assert box.ctx.metrics.transformer_runs == 2
    assert box.cached_files() == [message.path]
    # A chain naming a missing command never gets this far: the config file is refused
    # at start (tests/e2e/test_cli.py::test_invalid_config_values).


def test_filter_identity_and_resolution() -> None:
    settings = checked_settings()
    settings.named_filters["spam"] = ["spamc", "-x"]
    assert resolve(settings, "none") is None
    assert resolve(settings, "spam") == Filter.of("spam", [["spamc", "-x"]])
    assert resolve(settings, "spamc -x").identity == resolve(settings, "spam").identity  # same argv, same cache
    assert resolve(settings, "spamc").identity != resolve(settings, "spam").identity
    with pytest.raises(ValueError):
        resolve(settings, "'unbalanced")


def test_concurrency_setting_resizes_the_bound(box: Box) -> None:
    assert box.runner.limiter.limit == 4
    box.settings.set("transformer_concurrency", "9")
    assert box.runner.limiter.limit == 9


def test_limiter_passes_on_the_wake_up_of_a_killed_waiter() -> None:
    """Regression: a waiter woken by a release but killed before it ran took the free
    slot with it, and the next waiter slept although nobody held the limiter."""
    limiter = Limiter(1)
    entered: list[str] = []

    def take(name: str) -> None:
        with limiter:
            entered.append(name)

    limiter.__enter__()  # the test holds the only slot
    first, second = gevent.spawn(take, "first"), gevent.spawn(take, "second")
    try:
        wait_until(lambda: len(limiter._waiters) == 2)
        first.kill(block=False)  # shutdown kills a session; the kill lands before...
        limiter.__exit__(None, None, None)  # ...the wake-up this release gives it
        wait_until(lambda: entered == ["second"], timeout=5)
        second.join(5)
        assert first.dead and second.successful() and limiter.active == 0
    finally:
        gevent.killall([first, second])


def test_killed_login_kills_its_filters(box: Box, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    pids.chmod(0o777)  # filters may run as nobody
    box.deliver(HAM, HAM)
    box.use(script(tmp_path, "hang.sh", f"echo $$ > {pids}/$$; exec sleep 30\n"))
    login = gevent.spawn(box.login)
    wait_until(lambda: len(list(pids.iterdir())) == 2)
    login.kill()  # what shutdown does to a session in the middle of its login
    for pid_file in pids.iterdir():
        pid = int(pid_file.read_text())
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"))
    assert box.cached_files() == []


# -- through the real server -----------------------------------------------------

class Pop3(LineClient):
    """A logged-in POP3 session on helpers' LineClient, which shows exact wire octets."""

    def __init__(self, port: int, user: str = "alice", password: str = "alicepw") -> None:
        super().__init__(port, timeout=30)
        self.file = self  # readline() as on the socket file this client once read from
        assert self.greeting.startswith(b"+OK")
        self.greeting = self.login(user, password)
        assert self.greeting.startswith(b"+OK"), self.greeting

    def multi(self, text: str) -> bytes | None:  # type: ignore[override]
        """The body (un-dot-stuffed, CRLF kept), or None after an -ERR (kept in self.error)."""
        first = self.cmd(text)
        if first.startswith(b"-ERR"):
            self.error = first
            return None
        return self.body()

    def close(self) -> None:
        """QUIT, then wait for the server to close: it releases the mailbox lock just before."""
        assert self.cmd("QUIT").startswith(b"+OK")
        assert self.read_until_closed(timeout=30) == b""
        super().close()


def test_sizes_uidl_top_and_stored_files_on_the_wire(start_server: Callable[..., ServerProcess],
                                                      tmp_path: Path) -> None:
    tag = script(tmp_path, "tag.sh", 'printf "X-Filtered: yes\\n"; sed -e "s/line/LINE/"\n')
    server = start_server(extra_args=["-t", tag])
    contents = [HAM, b"Subject: two\r\n\r\n.\r\nline\r\n", b"Subject: three\n\nno final newline"]
    for content in contents:
        server.deliver("alice", content)
    files = {path: Path(path).read_bytes() for path in server.message_files("alice")}
    uids = sorted(os.path.basename(path) for path in files)
    expected = [crlf(b"X-Filtered: yes\n" + b"\n".join(x.replace(b"line", b"LINE", 1) for x in c.split(b"\n")))
                for c in contents]

    client = Pop3(server.port)
    assert client.cmd("STAT") == f"+OK 3 {sum(map(len, expected))}".encode()
    assert client.multi("LIST") == b"".join(f"{i} {len(e)}\r\n".encode() for i, e in enumerate(expected, 1))
    assert client.multi("UIDL") == b"".join(f"{i} {u}\r\n".encode() for i, u in enumerate(uids, 1))
    for number, body in enumerate(expected, 1):
        assert client.multi(f"RETR {number}") == body
    assert client.multi("TOP 1 1") == b"X-Filtered: yes\r\n" + crlf(HAM.split(b"\n\n")[0]) + b"\r\nfirst LINE\r\n"
    client.close()
    assert {path: Path(path).read_bytes() for path in server.message_files("alice")} == files


@pytest.mark.slow
def test_failures_and_timeouts_answer_temp_and_the_session_goes_on(start_server: Callable[..., ServerProcess],
                                                                    tmp_path: Path) -> None:
    picky = script(tmp_path, "picky.sh", """\
        data=$(cat)
        case "$data" in
          *FAIL*) echo "no thanks" >&2; exit 1 ;;
          *SLOW*) exec sleep 30 ;;
        esac
        printf '%s\\n' "$data"
    """)
    config = f'transformer_timeout = 1\ntransformer = "picky"\n[transformers.picky]\ncommand = ["{picky}"]\n'
    server = start_server(config=config)
    for content in (HAM, b"Subject: FAIL\n\nx\n", b"Subject: SLOW\n\nx\n"):
        server.deliver("alice", content)
    client = Pop3(server.port)
    assert client.multi("RETR 1") == crlf(HAM)
    for number in (2, 3):
        assert client.multi(f"RETR {number}") is None
        assert client.error.startswith(b"-ERR [SYS/TEMP]")
        assert client.multi(f"TOP {number} 0") is None
    assert client.cmd("STAT").startswith(b"+OK 3 ")
    assert client.multi("RETR 1") == crlf(HAM)  # the session goes on
    client.close()
    with admin(server) as msmp:
        stats = msmp.stat()
        assert stats["Transformer failures"] == "2" and stats["Transformer timeouts"] == "1"
        wait_until(lambda: any("filter_failures=2" in line for line in msmp.logs("alice")))
    assert "kind=timeout" in server.log() and "kind=exit code 1" in server.log() and "no thanks" in server.log()


def test_passthrough_policy_on_the_wire(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(config='transformer_failure = "passthrough"\n', extra_args=["-t", "false"])
    server.deliver("alice", HAM)
    client = Pop3(server.port)
    assert client.multi("RETR 1") == crlf(HAM)
    client.close()


def test_cache_hit_on_second_session_and_set_applies_to_new_sessions(start_server: Callable[..., ServerProcess],
                                                                       tmp_path: Path) -> None:
    server = start_server()
    server.deliver("alice", HAM)
    server.deliver("bob", HAM)
    upper = script(tmp_path, "upper.sh", "exec tr a-z A-Z\n")
    with admin(server) as msmp:
        old = Pop3(server.port, "bob", "bobpw")  # logged in before the change: keeps its (no) filter
        msmp.set("transformer", upper)
        with pytest.raises(MsmpError, match="not found"):
            msmp.set("transformer", str(tmp_path / "missing"))
        for _ in range(2):
            client = Pop3(server.port)
            assert client.multi("RETR 1") == crlf(HAM.upper())
            client.close()
        stats = msmp.stat()
        assert stats["Transformer runs"] == "1" and stats["Transformer cache hits"] == "1"
        assert old.multi("RETR 1") == crlf(HAM)
        old.close()
        assert msmp.get("transformer") == upper


@pytest.mark.slow
def test_64_mib_through_cat_no_deadlock_bounded_memory(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(extra_args=["-t", "cat"])
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-+\n"  # 76 octets
    count = 64 * 1024 * 1024 // len(line)
    server.deliver("alice", b"Subject: big\n\n" + line * count)
    expected = len(b"Subject: big\r\n\r\n") + count * (len(line) + 1)
    status = Path(f"/proc/{server.process.pid}/status")

    def hwm() -> int:
        return int(next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:")).split()[1])

    before = hwm()
    client = Pop3(server.port)
    assert client.cmd("LIST 1") == f"+OK 1 {expected}".encode()
    client.sock.sendall(b"RETR 1\r\n")
    assert client.line() == f"+OK {expected} octets".encode()
    received = 0
    while (chunk := client.file.readline()) != b".\r\n":
        received += len(chunk)
    assert received == expected
    client.close()
    after = hwm()
    assert after - before < 32 * 1024, (before, after)  # KiB: far less than the 64 MiB message


@pytest.mark.slow
def test_fifty_sessions_through_a_slow_filter_never_exceed_the_bound(start_server: Callable[..., ServerProcess],
                                                                      tmp_path: Path) -> None:
    running = tmp_path / "running"
    running.mkdir()
    running.chmod(0o777)  # filters may run as nobody
    seen = tmp_path / "seen"
    slow = script(tmp_path, "slow.sh", f"""\
        touch {running}/$$
        ls {running} | wc -l >> {seen}
        sleep 0.1
        tr a-z A-Z
        rm {running}/$$
    """)
    digest = hash_password("pw")
    users = {f"user{i}": "pw" for i in range(50)}
    server = start_server(users={name: digest for name in users}, extra_args=["-t", slow],
                          config="transformer_concurrency = 4\n")
    for i, name in enumerate(users):
        server.deliver(name, HAM.replace(b"hello", f"hello {i}".encode()))

    def session(i: int) -> bytes | None:
        client = Pop3(server.port, f"user{i}", "pw")
        body = client.multi("RETR 1")
        client.close()
        return body

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        bodies = list(pool.map(session, range(50)))
    assert bodies == [crlf(HAM.replace(b"hello", f"hello {i}".encode()).upper()) for i in range(50)]
    counts = [int(x) for x in seen.read_text().split()]
    assert len(counts) == 50 and max(counts) <= 4
    assert max(counts) >= 2  # they did run in parallel


@pytest.mark.parametrize("body", [
    "head -c 3000000 /dev/zero\n",  # killed by SIGXFSZ at the cap
    "trap '' XFSZ; head -c 3000000 /dev/zero; exit 0\n",  # ignores it: EFBIG, then claims success
])
def test_output_over_the_cap_fails_the_filter(tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture) -> None:
    box = Box(tmp_path, transformer_max_output="1048576")
    (source,) = box.deliver(HAM)
    box.use(script(tmp_path, "big.sh", body))
    (message,) = box.login()
    assert message.error == FAILED_ERROR and message.path == source
    assert "kind=output over transformer_max_output" in caplog.text
    assert box.cached_files() == []  # the partial output is gone
    box.settings.set("transformer_max_output", "4000000")  # a cap above the output: the same filter passes
    (message,) = box.login()
    assert message.error is None and os.stat(message.path).st_size == 3_000_000


def test_filters_never_run_as_root(box: Box, tmp_path: Path) -> None:
    box.deliver(HAM)
    box.use(script(tmp_path, "id.sh", "id -u; id -g; id -G; cat\n"))
    (message,) = box.login()
    uid, gid, groups = read(message).decode().splitlines()[:3]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        assert int(uid) == nobody.pw_uid != 0 and int(gid) != 0 and groups.split() == [gid]
    else:
        assert (int(uid), int(gid)) == (os.geteuid(), os.getegid())


def test_a_client_gone_stops_the_login_and_kills_its_filters(tmp_path: Path) -> None:
    box = Box(tmp_path, transformer_concurrency="1")
    pids = tmp_path / "pids"
    pids.mkdir()
    pids.chmod(0o777)  # filters may run as nobody
    box.deliver(*[HAM] * 10)
    box.use(script(tmp_path, "slow.sh", f"echo $$ > {pids}/$$; exec sleep 30\n"))
    gone = gevent.event.Event()
    login = gevent.spawn(box.runner.prepare, box.mailbox.snapshot(), user="alice", address="127.0.0.1", port=1,
                         client_gone=gone.is_set)
    wait_until(lambda: any(pids.iterdir()))
    gone.set()
    login.join(5)
    assert isinstance(login.exception, ClientGone)
    started = [int(path.name) for path in pids.iterdir()]
    assert len(started) == 1 and box.runner.limiter.active == 0  # no other filter started, the slot is free
    wait_until(lambda: not os.path.exists(f"/proc/{started[0]}"))
    assert box.cached_files() == []
