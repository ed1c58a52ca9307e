"""Limits against slow and many connections, in-process over real loopback sockets.

POP3: the login deadline (however the client trickles), the per-source connection cap
(127.0.0.1, 127.0.0.2 and ::1 are three sources), the per-user+source session cap.
MSMP: the connection cap, the login deadline, and the total linger after QUIT.
Timeouts are made short through the settings; waits are polled, never slept.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LineClient, filter_tmp_dir, wait_until
from helpers import ipv6_loopback as _ipv6_loopback

from geventpop3.auth import users
from geventpop3.auth.users import UserDirectory
from geventpop3.mail import maildir
from geventpop3.net import listen
from geventpop3.service.context import ServerContext
from geventpop3.service.filters import FilterRunner
from geventpop3.service.msmp.session import LINGER_SECONDS, start_admin_servers
from geventpop3.service.pop3.session import Pop3Server, Pop3Service, client_host, source_key
from geventpop3.service.setting_checks import checked_settings

CHEAP = (2**8, 8, 1)  # scrypt cost for test accounts
SLACK = 1.0  # seconds a deadline may be late on a busy 2-core machine
TOO_MANY_LOGINS = b"-ERR [IN-USE] Too many logins for this user from your address at once, try again later"
IPV6 = pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6")


@pytest.fixture
def ctx(tmp_path) -> ServerContext:
    root = tmp_path / "mail"
    root.mkdir()
    context = ServerContext(settings=checked_settings(), users=UserDirectory())
    context.users.add_configured([(name, users.hash_password(name + "pw", cost=CHEAP)) for name in ("alice", "bob")])
    context.admins.add_configured([("admin", users.hash_password("pw", cost=CHEAP))])
    context.settings.apply("maildir", str(root), "test")
    context.settings.apply("login_failure_delay", 0.0, "test")
    return context


@pytest.fixture
def pop3_port(ctx: ServerContext) -> Iterator[int]:
    """A POP3 service on 127.0.0.1 (and ::1 where available), one port."""
    service = Pop3Service(ctx)
    hosts = ["127.0.0.1", "::1"] if _ipv6_loopback() else ["127.0.0.1"]
    servers = [Pop3Server(sock, service.handle) for sock in listen.open_listeners(hosts, 0, "POP3")]
    for server in servers:
        server.start()
    yield servers[0].socket.getsockname()[1]
    for server in servers:
        server.close()
    service.shutdown(5)


@pytest.fixture
def admin_port(ctx: ServerContext) -> Iterator[int]:
    servers = start_admin_servers(ctx, ["127.0.0.1"], 0)
    yield servers[0].socket.getsockname()[1]
    for server in servers:
        server.stop(timeout=5)


@pytest.fixture
def admin_both(ctx: ServerContext, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """One MSMP service on 127.0.0.1 (TCP) and on a UNIX socket: (port, path)."""
    path = str(tmp_path / "msmp.sock")
    servers = start_admin_servers(ctx, [], 0, listeners=listen.open_listeners(["127.0.0.1"], 0, "MSMP"),
                                  unix_listeners=[listen.open_unix_listener(path, "MSMP")])
    yield servers[0].socket.getsockname()[1], path
    for server in servers:
        server.stop(timeout=5)


def unix_client(path: str) -> LineClient:
    """A LineClient on a UNIX socket: the class only needs `sock`, a buffer and a greeting."""
    client = LineClient.__new__(LineClient)
    client.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.sock.settimeout(10)
    client.sock.connect(path)
    client._buffer = bytearray()
    client.max_line = None
    client.greeting = client.line()
    return client


def trickle_until_closed(client: LineClient, pause: float = 0.1, limit: float = 10.0) -> tuple[bytes, float]:
    """Send one octet every `pause` s (never a whole line) until the server ends the
    connection; (what it sent, seconds it took). Fails after `limit` s."""
    start = time.monotonic()
    client.sock.settimeout(pause)
    received = b""
    while time.monotonic() - start < limit:
        try:
            client.send(b"X")
        except OSError:  # reset: the server has closed
            return received, time.monotonic() - start
        try:
            data = client.sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - start
        if not data:
            return received, time.monotonic() - start
        received += data
    raise AssertionError(f"still open after {limit} s of trickling: {received!r}")


# -- POP3 login deadline ---------------------------------------------------------

def test_a_trickling_client_is_closed_at_the_login_timeout(ctx: ServerContext, pop3_port: int) -> None:
    ctx.settings.apply("login_timeout", 1.0, "test")
    ctx.settings.apply("idle_timeout", 30.0, "test")  # one octet per 0.1 s is never idle
    logged_in = LineClient(pop3_port)
    assert logged_in.login("alice", "alicepw").startswith(b"+OK")
    client = LineClient(pop3_port)
    received, seconds = trickle_until_closed(client)
    assert received.startswith(b"-ERR Login timeout"), received
    assert 1.0 - 0.1 <= seconds <= 1.0 + SLACK, seconds
    assert ctx.metrics.login_timeouts == 1
    # The deadline is for logging in: a session logged in as long ago goes on.
    assert logged_in.cmd("NOOP") == b"+OK"
    assert logged_in.cmd("QUIT").startswith(b"+OK")


@pytest.mark.slow
def test_a_silent_client_gets_the_login_timeout_before_the_idle_timeout(ctx: ServerContext, pop3_port: int) -> None:
    ctx.settings.apply("login_timeout", 1.0, "test")
    ctx.settings.apply("idle_timeout", 30.0, "test")
    client = LineClient(pop3_port)
    start = time.monotonic()
    assert client.read_until_closed(timeout=1.0 + SLACK).startswith(b"-ERR Login timeout")
    assert time.monotonic() - start >= 0.9


def test_command_lines_now_and_then_do_not_extend_the_deadline(ctx: ServerContext, pop3_port: int) -> None:
    """Whole lines answered every 0.1 s (not only partial ones) do not reset it either."""
    ctx.settings.apply("login_timeout", 1.0, "test")
    client = LineClient(pop3_port)
    start = time.monotonic()

    def closed() -> bool:
        try:
            answer = client.cmd("CAPA")
            if answer.startswith(b"-ERR Login timeout"):
                return True
            assert answer.startswith(b"+OK"), answer
            client.body_lines()
        except (EOFError, OSError):
            return True
        return False

    wait_until(closed, timeout=1.0 + SLACK, interval=0.1)
    assert time.monotonic() - start >= 0.9
    assert ctx.metrics.login_timeouts == 1


# -- POP3 connections per source ---------------------------------------------------

def test_connections_are_capped_per_address(ctx: ServerContext, pop3_port: int) -> None:
    ctx.settings.apply("max_connections_per_ip", 2, "test")
    first = [LineClient(pop3_port) for _ in range(2)]
    assert all(client.greeting.startswith(b"+OK") for client in first)
    over = LineClient(pop3_port, greet=False)
    answer = over.read_until_closed(reset_ok=True)
    assert answer == b"-ERR [SYS/TEMP] Too many connections from your address, try again later\r\n"
    assert ctx.metrics.refused_per_ip == 1
    # Another address is another client: 127.0.0.2 is a different IPv4 address on loopback.
    others = [LineClient(pop3_port, source="127.0.0.2") for _ in range(2)]
    assert all(client.greeting.startswith(b"+OK") for client in others)
    # A connection that ends makes room again (the server closes asynchronously: polled).
    first.pop().cmd("QUIT")

    def accepted_again() -> bool:
        client = LineClient(pop3_port, greet=False)
        line = client.readline()
        first.append(client)
        return line.startswith(b"+OK")

    wait_until(accepted_again)
    assert ctx.metrics.current_connections == 4


@IPV6
def test_ipv6_clients_are_counted_apart_from_ipv4(ctx: ServerContext, pop3_port: int) -> None:
    ctx.settings.apply("max_connections_per_ip", 1, "test")
    held = LineClient(pop3_port)
    assert held.greeting.startswith(b"+OK")
    six = LineClient(pop3_port, host="::1")
    assert six.greeting.startswith(b"+OK")
    assert LineClient(pop3_port, host="::1", greet=False).read_until_closed(reset_ok=True).startswith(
        b"-ERR [SYS/TEMP] Too many connections from your address")


def test_what_the_per_source_limits_count_by() -> None:
    assert client_host(("::ffff:192.0.2.7", 110, 0, 0)) == "192.0.2.7"
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("192.0.2.7") != source_key("192.0.2.8")
    # IPv6: one /64 is one source.
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert source_key("2001:db8:0:1::1") != source_key("2001:db8::1")


# -- POP3 sessions per user and source ---------------------------------------------

@pytest.fixture
def filter_dir() -> Iterator[Path]:
    """Where the gated filter and its marker files live: filters run as nobody under root."""
    with filter_tmp_dir() as path:
        yield path


def test_logins_in_flight_are_capped_per_user_and_address(ctx: ServerContext, pop3_port: int,
                                                          filter_dir: Path) -> None:
    """A login still being prepared (here: its filter run is held at a gate) counts, so a
    burst of parallel logins for one user from one place cannot all run the password check."""
    started, gate = filter_dir / "started", filter_dir / "gate"
    script = filter_dir / "held-filter"
    script.write_text(f"#!/bin/sh\ntouch '{started}'\nwhile [ ! -e '{gate}' ]; do sleep 0.02; done\nexec cat\n")
    script.chmod(0o755)
    ctx.settings.apply("transformer", str(script), "test")
    ctx.settings.apply("max_sessions_per_user_ip", 1, "test")
    ctx.filters = FilterRunner(ctx, None)
    mailbox = maildir.Mailbox(ctx.settings.maildir, "alice")
    mailbox.open()
    maildir.deliver(mailbox.path, b"Subject: held\n\nbody\n")
    first = LineClient(pop3_port)
    assert first.cmd("USER alice") == b"+OK"
    first.send(b"PASS alicepw\r\n")  # its login now waits for the filter
    wait_until(started.exists)
    # Same user, same address: over the cap, refused before the password is checked.
    second = LineClient(pop3_port)
    assert second.login("alice", "alicepw") == TOO_MANY_LOGINS
    assert ctx.metrics.refused_user_ip == 1
    # Same user from another address: not this cap (the mailbox lock answers instead).
    elsewhere = LineClient(pop3_port, source="127.0.0.2")
    assert elsewhere.login("alice", "alicepw") == b"-ERR [IN-USE] Mailbox is in use by another session"
    # Another user from the same address: not this cap.
    bob = LineClient(pop3_port)
    assert bob.login("bob", "bobpw").startswith(b"+OK")
    gate.touch()
    assert first.line().startswith(b"+OK")
    # Once logged in, a session is no longer in flight: only the lock stands in the way.
    assert second.login("alice", "alicepw") == b"-ERR [IN-USE] Mailbox is in use by another session"
    assert first.cmd("QUIT").startswith(b"+OK")
    assert second.login("alice", "alicepw").startswith(b"+OK")
    assert ctx.metrics.refused_user_ip == 1


# -- MSMP ----------------------------------------------------------------------------

def test_admin_connections_are_capped(ctx: ServerContext, admin_port: int) -> None:
    ctx.settings.apply("admin_max_connections", 2, "test")
    held = [LineClient(admin_port) for _ in range(2)]
    assert all(client.greeting.startswith(b"+OK MSMP1") for client in held)
    over = LineClient(admin_port, greet=False)
    assert over.read_until_closed(reset_ok=True) == b"-ERR Too many connections, try again later\r\n"
    assert ctx.metrics.admin_refused == 1
    assert held[0].cmd("QUIT") == b"+OK Bye"

    refused = [over]

    def accepted_again() -> LineClient | None:  # once the QUIT session's linger is over
        client = LineClient(admin_port, greet=False)
        if client.readline().startswith(b"+OK MSMP1"):
            return client
        refused.append(client)
        return None

    admin = wait_until(accepted_again, interval=0.1)
    assert admin.login("admin", "pw") == b"+OK Logged in"
    assert admin.cmd("STAT") == b"+OK"
    assert f"Admin connections refused: {len(refused)}".encode() in admin.body_lines()


def test_an_admin_client_trickling_is_closed_at_the_login_timeout(ctx: ServerContext, admin_port: int) -> None:
    ctx.settings.apply("admin_login_timeout", 1.0, "test")
    logged_in = LineClient(admin_port)
    assert logged_in.login("admin", "pw") == b"+OK Logged in"
    client = LineClient(admin_port)
    received, seconds = trickle_until_closed(client)
    assert received == b"-ERR Login timeout, closing\r\n", received
    assert 1.0 - 0.1 <= seconds <= 1.0 + SLACK, seconds
    assert ctx.metrics.admin_login_timeouts == 1
    # The deadline is for logging in: a session logged in as long ago goes on.
    assert logged_in.cmd("GET admin_login_timeout") == b"+OK 1"
    assert logged_in.cmd("QUIT") == b"+OK Bye"


def test_the_linger_after_quit_ends_in_time_however_the_client_trickles(admin_port: int) -> None:
    client = LineClient(admin_port)
    assert client.cmd("QUIT") == b"+OK Bye"
    start = time.monotonic()
    # The server has sent FIN and now reads what still comes. Send one octet every 0.1 s
    # (the client's pace: each one used to restart the linger's 1 s timer) until the
    # server has closed: then a write is answered with a reset and the next one fails.
    while time.monotonic() - start < LINGER_SECONDS + 5:
        try:
            client.send(b"X")
        except OSError:
            break
        time.sleep(0.1)  # the trickle's pace, not a wait for the server
    seconds = time.monotonic() - start
    assert seconds <= LINGER_SECONDS + SLACK, seconds


TOO_MANY_FROM_SOURCE = b"-ERR Too many connections from your source, try again later\r\n"


def source_client(port: int, source: str) -> LineClient:
    client = LineClient.__new__(LineClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    client._buffer = bytearray()
    client.max_line = None
    client.greeting = client.line()
    return client


def test_one_source_cannot_hold_every_admin_slot(ctx: ServerContext, admin_port: int) -> None:
    """Over TCP: at most admin_max_connections_per_source from one address; another address still gets in."""
    ctx.settings.apply("admin_max_connections", 5, "test")
    ctx.settings.apply("admin_max_connections_per_source", 3, "test")
    held = [source_client(admin_port, "127.0.0.2") for _ in range(3)]
    assert all(client.greeting.startswith(b"+OK MSMP1") for client in held)
    over = source_client(admin_port, "127.0.0.2")
    assert over.greeting == TOO_MANY_FROM_SOURCE[:-2]
    assert ctx.metrics.admin_refused == 1
    admin = source_client(admin_port, "127.0.0.1")
    assert admin.greeting.startswith(b"+OK MSMP1")
    assert admin.login("admin", "pw") == b"+OK Logged in"
    assert held[0].cmd("QUIT") == b"+OK Bye"

    def accepted_again() -> LineClient | None:  # the freed slot, once the QUIT session's linger is over
        client = source_client(admin_port, "127.0.0.2")
        return client if client.greeting.startswith(b"+OK MSMP1") else None

    assert wait_until(accepted_again, interval=0.1).login("admin", "pw") == b"+OK Logged in"


def test_the_socket_has_slots_of_its_own_and_a_cap_per_uid(ctx: ServerContext, admin_both: tuple[int, str]) -> None:
    """A TCP flood that takes every slot does not take the socket's; on the socket the source is the peer uid."""
    admin_port, admin_socket = admin_both
    ctx.settings.apply("admin_max_connections", 3, "test")
    ctx.settings.apply("admin_max_connections_per_source", 2, "test")
    tcp = [source_client(admin_port, f"127.0.0.{n}") for n in (2, 3, 4)]
    assert all(client.greeting.startswith(b"+OK MSMP1") for client in tcp)
    assert source_client(admin_port, "127.0.0.5").greeting.startswith(b"-ERR Too many connections, try")
    local = [unix_client(admin_socket) for _ in range(2)]
    assert all(client.greeting.startswith(b"+OK MSMP1") for client in local)
    assert local[0].login("admin", "pw") == b"+OK Logged in"
    assert local[0].cmd("STAT") == b"+OK"
    over = unix_client(admin_socket)
    assert over.greeting == TOO_MANY_FROM_SOURCE[:-2]
