"""MSMP over real loopback sockets (IPv4 and IPv6), with the real management backend.

The server runs in this process under gevent; the test client uses gevent sockets
directly, so it cooperates with the server whether or not the suite monkey-patches.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator

import pytest
from gevent.event import Event
from helpers import LineClient
from helpers import ipv6_loopback as _ipv6_loopback

from geventpop3 import IMPLEMENTATION
from geventpop3.auth import users
from geventpop3.auth.users import UserDirectory
from geventpop3.core.metrics import AccessEntry
from geventpop3.mail.maildir import Mailbox
from geventpop3.service.context import ServerContext
from geventpop3.service.msmp.session import start_admin_servers
from geventpop3.service.setting_checks import checked_settings
from geventpop3.state import Store, StoreError
from geventpop3.state.persister import Persister
from geventpop3.state.sqlite import SqliteStore

TIMEOUT = 10.0


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6"))]


class Client:
    """An MSMP session as text, on helpers' LineClient: every line within 512 octets."""

    def __init__(self, host: str, port: int) -> None:
        self.wire = LineClient(port, host, timeout=TIMEOUT, greet=False, max_line=512)

    def close(self) -> None:
        self.wire.close()

    def send(self, data: bytes) -> None:
        self.wire.send(data)

    def line(self) -> str:
        return self.wire.line().decode()

    def cmd(self, text: str) -> str:
        return self.wire.cmd(text).decode()

    def body(self) -> list[str]:
        return [line.decode() for line in self.wire.body_lines()]

    def multi(self, text: str) -> list[str]:
        assert self.cmd(text) == "+OK"
        return self.body()

    def login(self) -> None:
        assert self.cmd("USER admin") == "+OK"
        assert self.cmd("PASS pw") == "+OK Logged in"

    def wait_closed(self, deadline: float = TIMEOUT) -> bytes:
        """Everything received until the server closes (or resets); fails past the deadline."""
        return self.wire.read_until_closed(deadline, reset_ok=True)


@pytest.fixture
def ctx(tmp_path) -> ServerContext:
    root = tmp_path / "mail"
    root.mkdir()
    context = ServerContext(settings=checked_settings(), users=UserDirectory())
    context.admins.add_configured([("admin", users.hash_password("pw", cost=(2**8, 8, 1)))])
    context.settings.apply("maildir", str(root), "test")
    context.settings.apply("login_failure_delay", 0.05, "test")
    return context


@pytest.fixture
def servers(ctx: ServerContext) -> Iterator[list]:
    started = start_admin_servers(ctx, [], 0)
    yield started
    for server in started:
        server.stop(timeout=1)


@pytest.fixture
def port(servers: list) -> int:
    return servers[0].server_port


@pytest.fixture
def connect(port: int) -> Iterator:
    clients: list[Client] = []

    def open_client(host: str = "127.0.0.1", login: bool = True) -> Client:
        client = Client(host, port)
        clients.append(client)
        assert client.line() == f"+OK MSMP1 {IMPLEMENTATION} ready"
        if login:
            client.login()
        return client

    yield open_client
    for client in clients:
        client.close()


def test_default_listeners_are_loopback_on_one_port(servers: list) -> None:
    hosts = {server.server_host for server in servers}
    assert "127.0.0.1" in hosts
    if _ipv6_loopback():
        assert "::1" in hosts and len(servers) == 2
    assert len({server.server_port for server in servers}) == 1


def test_explicit_address_list(ctx: ServerContext) -> None:
    started = start_admin_servers(ctx, ["127.0.0.1"], 0)
    try:
        assert len(started) == 1
        client = Client("127.0.0.1", started[0].server_port)
        assert client.line().startswith("+OK MSMP1 ")
        client.close()
    finally:
        for server in started:
            server.stop(timeout=1)


def test_address_in_use_is_an_oserror(ctx: ServerContext, port: int) -> None:
    with pytest.raises(OSError, match="cannot listen for MSMP on 127.0.0.1"):
        start_admin_servers(ctx, ["127.0.0.1"], port)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.slow
def test_every_command(ctx: ServerContext, connect, host: str) -> None:
    client = connect(host, login=False)
    assert client.cmd("STAT") == "-ERR Not authenticated"
    assert "QUIT" in " ".join(client.multi("HELP"))
    assert client.multi("CAPA")[0] == "MSMP1"
    client.login()
    root = ctx.settings.maildir

    assert client.cmd("ADD bob s3cret") == "+OK Added user"
    for sub in ("cur", "new", "tmp"):
        assert os.path.isdir(os.path.join(root, "bob", sub))
    assert stat.S_IMODE(os.stat(os.path.join(root, "bob")).st_mode) & 0o077 == 0
    assert ctx.users.verify("bob", "s3cret")
    assert client.cmd("ADD bob n3w") == "+OK Updated password"
    assert ctx.users.verify("bob", "n3w") and not ctx.users.verify("bob", "s3cret")
    assert client.cmd("ADD ../evil pw") == "-ERR Unsafe username"
    assert client.cmd("ADD carol " + "p" * 101) == "-ERR Invalid password"

    assert client.multi("LIST") == ["bob"]
    with open(os.path.join(root, "bob", "new", "1.msg"), "wb") as handle:
        handle.write(b"Subject: hi\r\n\r\nbody\r\n")
    ctx.access_log.record(AccessEntry(time.time(), "bob", "127.0.0.1", 5000, "login"))
    assert client.multi("LIST bob") == ["bob 1 logs messages=1 octets=21 logged-in=no"]
    assert client.cmd("LIST nobody") == "-ERR User does not exist"

    logs = client.multi("LOGS bob")
    assert len(logs) == 1 and logs[0].endswith("IP: 127.0.0.1 port=5000 login")
    assert client.multi("LOGS bob 5") == logs
    assert client.cmd("LOGS nobody") == "-ERR Invalid user"
    ctx.access_log.record(AccessEntry(time.time(), "x@y", "::1", 5001, "login-failed", detail="reason=auth"))
    assert client.cmd("LOGS x@y") == "-ERR Invalid user"  # no bucket per made-up name
    assert client.multi("LOGS -unknown-")[0].endswith("IP: ::1 port=5001 login-failed reason=auth tried=x@y")

    assert client.cmd("SET idle_timeout 42") == "+OK Changed value"
    assert client.cmd("GET idle_timeout") == "+OK 42"
    assert ctx.settings.idle_timeout == 42.0
    assert client.cmd("SET idle_timeout 0") == "-ERR Invalid value: must be between 1 and 86400"
    assert client.cmd("SET maildir /no/such/dir") == "-ERR Invalid value: not an existing directory"
    assert client.cmd("GET nokey") == "-ERR Invalid key"
    assert client.cmd("GET maildir") == f"+OK {root}"

    stats = client.multi("STAT")
    assert stats[:4] == ["Total connections: 0", "Current connections: 0",
                         "Historical maximum traffic: 0", "Total transferred bytes: 0"]

    assert client.cmd("DELE bob") == "+OK Deleted user"
    assert "bob" not in ctx.users
    assert client.cmd("DELE bob") == "-ERR User does not exist"
    assert client.cmd("FROB") == "-ERR Unknown command"
    assert client.cmd("GET") == "-ERR Syntax error"
    assert client.cmd("QUIT") == "+OK Bye"
    assert client.wait_closed() == b""


def test_dele_keeps_the_mail_aside(ctx: ServerContext, connect) -> None:
    client = connect()
    root = ctx.settings.maildir
    assert client.cmd("ADD bob pw") == "+OK Added user"
    message = os.path.join(root, "bob", "cur", "1.msg:2,S")
    with open(message, "wb") as handle:
        handle.write(b"keep me\r\n")
    assert client.cmd("DELE bob") == "+OK Deleted user"
    assert not os.path.exists(os.path.join(root, "bob"))
    (kept,) = os.listdir(os.path.join(root, ".deleted"))
    assert kept.startswith("bob.") and len(kept) == len("bob.") + 14
    with open(os.path.join(root, ".deleted", kept, "cur", "1.msg:2,S"), "rb") as handle:
        assert handle.read() == b"keep me\r\n"
    # A new bob starts empty; a second delete in the same second does not collide.
    assert client.cmd("ADD bob pw") == "+OK Added user"
    assert client.multi("LIST bob") == ["bob 0 logs messages=0 octets=0 logged-in=no"]
    assert client.cmd("DELE bob") == "+OK Deleted user"
    assert len(os.listdir(os.path.join(root, ".deleted"))) == 2


def test_dele_refuses_a_logged_in_user(ctx: ServerContext, connect) -> None:
    client = connect()
    assert client.cmd("ADD bob pw") == "+OK Added user"
    ctx.logged_in["bob"] = 1
    assert client.multi("LIST bob") == ["bob 0 logs messages=0 octets=0 logged-in=yes"]
    assert client.cmd("DELE bob") == "-ERR User is currently logged in"
    ctx.logged_in.pop("bob")
    # The cross-process mailbox lock counts too (another server process).
    mailbox = Mailbox(ctx.settings.maildir, "bob")
    assert mailbox.lock()
    try:
        assert client.cmd("DELE bob") == "-ERR User is currently logged in"
    finally:
        mailbox.release()
    assert client.cmd("DELE bob") == "+OK Deleted user"


def test_user_limit(ctx: ServerContext, connect) -> None:
    client = connect()
    assert client.cmd("SET user_limit 1") == "+OK Changed value"
    assert client.cmd("ADD bob pw") == "+OK Added user"
    assert client.cmd("ADD carol pw") == "-ERR User limit reached"
    assert client.cmd("ADD bob pw2") == "+OK Updated password"
    assert not os.path.exists(os.path.join(ctx.settings.maildir, "carol"))


@pytest.mark.parametrize("host", HOSTS)
def test_pipelining(connect, host: str) -> None:
    client = connect(host, login=False)
    client.send(b"USER admin\r\nPASS pw\r\nADD bob pw\r\nLIST\r\nGET transformer\r\nQUIT\r\nSTAT\r\n")
    assert client.line() == "+OK"
    assert client.line() == "+OK Logged in"
    assert client.line() == "+OK Added user"
    assert client.line() == "+OK"
    assert client.body() == ["bob"]
    assert client.line() == "+OK none"
    assert client.line() == "+OK Bye"
    assert client.wait_closed() == b""  # nothing after QUIT, not even STAT


def test_overlong_line_and_binary_junk(connect) -> None:
    client = connect()
    client.send(b"ADD bob " + b"x" * 1000 + b"\r\n")
    assert client.line() == "-ERR Line too long"
    client.send(b"\xff\xfe\x00junk\x80\r\n")
    assert client.line().startswith("-ERR Invalid command")
    client.send(bytes(range(10)) + bytes(range(11, 256)) + b"\n")
    assert client.line().startswith("-ERR")
    assert client.cmd("GET transformer") == "+OK none"


@pytest.mark.slow
def test_failed_logins_are_delayed_and_the_third_closes(ctx: ServerContext, connect) -> None:
    client = connect(login=False)
    for attempt in range(3):
        assert client.cmd("USER admin" if attempt else "USER nobody") == "+OK"
        started = time.monotonic()
        assert client.cmd("PASS wrong") == "-ERR Invalid credentials"
        assert time.monotonic() - started >= 0.05 * 0.9
    assert client.wait_closed() == b""


def test_pipelined_failures_are_each_delayed(ctx: ServerContext, connect) -> None:
    ctx.settings.apply("login_failure_delay", 0.1, "test")
    client = connect(login=False)
    started = time.monotonic()
    client.send(b"USER a\r\nPASS b\r\n" * 3 + b"USER admin\r\nPASS pw\r\n")
    assert client.wait_closed() == b"+OK\r\n-ERR Invalid credentials\r\n" * 3
    assert time.monotonic() - started >= 0.3 * 0.9


def test_idle_timeout_closes_the_session(ctx: ServerContext, connect) -> None:
    client = connect()
    assert client.cmd("SET admin_idle_timeout 1") == "+OK Changed value"
    started = time.monotonic()
    assert client.wait_closed(deadline=5) == b"-ERR Idle timeout, closing\r\n"
    assert time.monotonic() - started >= 0.9


def test_many_sessions_at_once(ctx: ServerContext, connect) -> None:
    ctx.settings.apply("admin_max_connections_per_source", 10, "test")  # all from 127.0.0.1
    clients = [connect() for _ in range(10)]
    for number, client in enumerate(clients):
        client.send(f"ADD user{number} pw\r\n".encode())
    assert all(client.line() == "+OK Added user" for client in clients)
    assert len(clients[0].multi("LIST")) == 10


def test_host_name_binds_what_it_resolves_to(ctx: ServerContext) -> None:
    started = start_admin_servers(ctx, ["localhost"], 0)
    try:
        assert started and {server.server_host for server in started} <= {"127.0.0.1", "::1"}
        assert len({server.server_port for server in started}) == 1
    finally:
        for server in started:
            server.stop(timeout=1)


def test_list_and_logs_with_the_persistent_store(ctx: ServerContext, connect, tmp_path) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    ctx.persister = Persister(ctx, store)  # not started: LIST and LOGS flush themselves
    try:
        client = connect()
        assert client.cmd("ADD bob pw") == "+OK Added user"
        now = time.time()
        for number in range(5):
            ctx.access_log.record(AccessEntry(now + number, "bob", "::1", 6000 + number, "login"))
        assert client.multi("LIST bob") == ["bob 5 logs messages=0 octets=0 logged-in=no"]
        assert store.access_count("bob") == 5  # flushed by LIST
        ctx.access_log.record(AccessEntry(now + 9, "bob", "::1", 6009, "logout", retr=1, bytes=10))
        logs = client.multi("LOGS bob 3")
        assert [line.split(" port=")[1].split()[0] for line in logs] == ["6003", "6004", "6009"]
        assert "logout retr=1 dele=0" in logs[-1]
        # Entries of a deleted user stay readable; a name never seen is an error.
        assert client.cmd("DELE bob") == "+OK Deleted user"
        assert len(client.multi("LOGS bob")) == 6
        assert client.cmd("LOGS ghost") == "-ERR Invalid user"
    finally:
        store.close()


class HeldStore:
    """The real SQLite store, with user deletes held open until released: the window in
    which a DELE waits for the disk while POP3 logins go on."""

    def __init__(self, store: Store, fail: bool = False) -> None:
        self.store = store
        self.fail = fail
        self.entered = Event()
        self.release = Event()

    def load_users(self) -> dict[str, str]:
        return self.store.load_users()

    def save_user(self, name: str, password_hash: str) -> None:
        self.store.save_user(name, password_hash)

    def delete_user(self, name: str) -> None:
        self.entered.set()
        assert self.release.wait(TIMEOUT)
        if self.fail:
            raise StoreError("disk full")
        self.store.delete_user(name)


@pytest.fixture
def held_store(ctx: ServerContext, tmp_path) -> Iterator[HeldStore]:
    store = SqliteStore(str(tmp_path / "state.db"))
    held = HeldStore(store)
    ctx.users = UserDirectory(held)
    yield held
    store.close()


def _add_bob_with_mail(ctx: ServerContext, client: Client) -> str:
    assert client.cmd("ADD bob pw") == "+OK Added user"
    message = os.path.join(ctx.settings.maildir, "bob", "cur", "1.msg:2,S")
    with open(message, "wb") as handle:
        handle.write(b"keep me\r\n")
    assert ctx.users.verify("bob", "pw")  # a POP3 login: its password is now cached
    return message


def test_no_pop3_login_while_dele_writes_the_store(ctx: ServerContext, connect, held_store: HeldStore) -> None:
    """Regression: the user could still log in while DELE waited for the store, and the
    POP3 session then recreated an empty Maildir for a user whose mail was moved aside."""
    client = connect()
    _add_bob_with_mail(ctx, client)
    client.send(b"DELE bob\r\n")
    assert held_store.entered.wait(TIMEOUT)
    assert not ctx.users.verify("bob", "pw")  # a POP3 login now is refused
    assert "bob" not in ctx.users
    held_store.release.set()
    assert client.line() == "+OK Deleted user"
    root = ctx.settings.maildir
    assert not os.path.exists(os.path.join(root, "bob"))
    (kept,) = os.listdir(os.path.join(root, ".deleted"))
    assert os.listdir(os.path.join(root, ".deleted", kept, "cur")) == ["1.msg:2,S"]
    assert held_store.store.load_users() == {}


def test_dele_with_the_store_failing_keeps_the_user_and_its_mail(ctx: ServerContext, connect,
                                                                 held_store: HeldStore) -> None:
    """Regression: the Maildir was moved aside before the store failed, leaving a user without mail."""
    held_store.fail = True
    held_store.release.set()
    client = connect()
    message = _add_bob_with_mail(ctx, client)
    assert client.cmd("DELE bob") == "-ERR Cannot delete user, state database unavailable"
    assert "bob" in ctx.users and ctx.users.verify("bob", "pw")
    with open(message, "rb") as handle:
        assert handle.read() == b"keep me\r\n"
    attic = os.path.join(ctx.settings.maildir, ".deleted")
    assert not os.path.exists(attic) or not os.listdir(attic)  # the one copy is back in place
    assert list(held_store.store.load_users()) == ["bob"]


@pytest.mark.slow
def test_answers_before_a_failed_login_go_out_before_its_delay(ctx: ServerContext, connect) -> None:
    """The session flushes what is queued, waits the Delayed's seconds, then sends it."""
    ctx.settings.apply("login_failure_delay", 2.0, "test")
    client = connect(login=False)
    started = time.monotonic()
    client.send(b"CAPA\r\nUSER admin\r\nPASS wrong\r\nUSER admin\r\nPASS pw\r\n")
    assert client.line() == "+OK"
    assert client.body()[0] == "MSMP1"
    assert client.line() == "+OK"
    assert time.monotonic() - started < 1.5  # not held back by the delay that follows
    assert client.line() == "-ERR Invalid credentials"
    assert time.monotonic() - started >= 2.0 * 0.9
    assert client.line() == "+OK"
    assert client.line() == "+OK Logged in"
