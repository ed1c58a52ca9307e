"""admin.client against the real server, started as a subprocess the way users start it.

The server is conftest's module-wide `msmp_server`. A few tests use a
scripted peer on a loopback socket for what the real server never sends (dot-stuffed
data, silence, a foreign greeting); the client itself is never mocked.
"""

from __future__ import annotations

import poplib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ADMIN as ADMIN_ACCOUNT
from helpers import REPO, ServerProcess, free_port, ipv6_loopback, started_servers, unique_name, wait_until

from admin.client import (
    MsmpAuthError,
    MsmpClient,
    MsmpConnectionError,
    MsmpError,
    MsmpProtocolError,
    MsmpTimeout,
    parse_user_line,
)

ADMIN, ADMIN_PASSWORD = ADMIN_ACCOUNT
ALICE, ALICE_PASSWORD = "alice", "alicepw"


@pytest.fixture
def admin(msmp_server: ServerProcess) -> Iterator[MsmpClient]:
    client = msmp_server.admin_client()
    yield client
    client.close()


# -- the real server ----------------------------------------------------------------------


def test_connect_reads_greeting(msmp_server: ServerProcess) -> None:
    client = msmp_server.msmp_client()
    try:
        greeting = client.connect()
        assert greeting.startswith("MSMP1")
        assert client.connected
    finally:
        client.close()
    assert not client.connected


def test_commands_before_login_are_refused(msmp_server: ServerProcess) -> None:
    with msmp_server.msmp_client() as client:
        response = client.command("STAT")
        assert not response.ok
        assert response.text == "Not authenticated"
        assert response.lines == []
        with pytest.raises(MsmpError, match="Not authenticated"):
            client.list_users()
        assert client.help()  # allowed before login


def test_wrong_password_raises_auth_error(msmp_server: ServerProcess) -> None:
    with msmp_server.msmp_client() as client:
        with pytest.raises(MsmpAuthError) as info:
            client.login(ADMIN, "wrong")
        assert info.value.text == "Invalid credentials"
        client.login(ADMIN, ADMIN_PASSWORD)  # after a failure the client may start again
        assert "Total connections" in client.stat()


def test_pop3_user_cannot_log_in(msmp_server: ServerProcess) -> None:
    with msmp_server.msmp_client() as client, pytest.raises(MsmpAuthError):
        client.login(ALICE, ALICE_PASSWORD)


def test_stat_parses_required_lines(admin: MsmpClient) -> None:
    stats = admin.stat()
    for name in ("Total connections", "Current connections", "Historical maximum traffic",
                 "Total transferred bytes"):
        assert stats[name].isdigit(), (name, stats)


def test_user_lifecycle(admin: MsmpClient, msmp_server: ServerProcess) -> None:
    name = unique_name("bob")
    assert name not in admin.list_users()
    assert admin.add_user(name, "s3cret") == "Added user"
    assert admin.add_user(name, "other") == "Updated password"
    assert name in admin.list_users()
    assert ALICE in admin.list_users()
    info = admin.user_info(name)
    assert info["name"] == name
    assert info["logs"].isdigit()
    assert info["line"].startswith(f"{name} ")
    assert admin.delete_user(name) == "Deleted user"
    assert name not in admin.list_users()
    with pytest.raises(MsmpError, match="User does not exist"):
        admin.user_info(name)
    with pytest.raises(MsmpError, match="User does not exist"):
        admin.delete_user(name)


def test_unsafe_user_name(admin: MsmpClient) -> None:
    with pytest.raises(MsmpError) as info:
        admin.add_user("../etc", "pw")
    assert info.value.text == "Unsafe username"
    assert info.value.command == "ADD"


def test_get_and_set(admin: MsmpClient) -> None:
    old = admin.get("transformer_timeout")
    try:
        assert admin.set("transformer_timeout", "12.5") == "Changed value"
        assert admin.get("transformer_timeout") == "12.5"
        with pytest.raises(MsmpError, match="Invalid value"):
            admin.set("transformer_timeout", "soon")
    finally:
        admin.set("transformer_timeout", old)
    assert admin.get("transformer_timeout") == old
    with pytest.raises(MsmpError, match="Invalid key"):
        admin.get("no_such_key")


def test_multiline_only_on_ok(admin: MsmpClient) -> None:
    """-ERR to a multi-line command has no body: the next command must still line up."""
    response = admin.command("LIST nosuchuser")
    assert not response.ok and response.lines == []
    response = admin.command("LOGS ../x")
    assert not response.ok and response.lines == []
    assert admin.get("transformer")  # still in step


def test_command_returns_errors_without_raising(admin: MsmpClient) -> None:
    response = admin.command("FROB")
    assert (response.ok, response.text) == (False, "Unknown command")
    response = admin.command("get maildir")  # keywords are case-insensitive
    assert response.ok and response.text == str(admin.get("maildir"))


def test_help_and_capa(admin: MsmpClient) -> None:
    assert any(line.startswith("STAT") for line in admin.help())
    capa = admin.capa()
    assert "MSMP1" in capa


def test_pipeline_answers_in_order(admin: MsmpClient) -> None:
    responses = admin.pipeline(["GET transformer", "LIST", "FROB", "STAT"])
    assert [r.ok for r in responses] == [True, True, False, True]
    assert ALICE in responses[1].lines
    assert any(line.startswith("Total connections:") for line in responses[3].lines)


def test_logs_show_a_pop3_login(admin: MsmpClient, msmp_server: ServerProcess) -> None:
    pop = poplib.POP3("127.0.0.1", msmp_server.port, timeout=10)
    try:
        pop.user(ALICE)
        pop.pass_(ALICE_PASSWORD)
    finally:
        pop.quit()
    entries = wait_until(lambda: [e for e in admin.logs(ALICE) if " login" in e], timeout=15)
    assert "IP: 127.0.0.1" in entries[-1]
    assert len(admin.logs(ALICE, 1)) == 1
    with pytest.raises(MsmpError):
        admin.logs("../etc")


def test_quit_closes(msmp_server: ServerProcess) -> None:
    client = msmp_server.admin_client()
    assert client.quit() == "Bye"
    assert not client.connected
    assert client.quit() == ""  # twice is harmless
    with pytest.raises(MsmpConnectionError):
        client.command("STAT")


def test_context_manager_quits(msmp_server: ServerProcess) -> None:
    with msmp_server.msmp_client() as client:
        client.login(ADMIN, ADMIN_PASSWORD)
        assert client.list_users()
    assert not client.connected


def test_command_must_be_one_line(admin: MsmpClient) -> None:
    with pytest.raises(ValueError):
        admin.command("GET maildir\r\nDELE alice")
    assert ALICE in admin.list_users()


def test_connection_refused() -> None:
    client = MsmpClient("127.0.0.1", free_port(), timeout=5)
    with pytest.raises(MsmpConnectionError, match="cannot connect"):
        client.connect()
    assert isinstance(MsmpConnectionError("x"), ConnectionError)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6(tmp_path: Path) -> None:
    with started_servers(tmp_path) as start:
        server = start(users={ALICE: ALICE_PASSWORD}, listen=["127.0.0.1"], admin_listen=["::1"])
        with MsmpClient("::1", server.admin_port) as client:
            client.login(ADMIN, ADMIN_PASSWORD)
            assert "Total connections" in client.stat()
            assert client.where == f"[::1]:{server.admin_port}"


def test_works_under_gevent_monkey_patching(msmp_server: ServerProcess) -> None:
    """Locust monkey-patches: several greenlets each drive their own client at once."""
    script = f"""
from gevent import monkey; monkey.patch_all()
import gevent
from admin.client import MsmpClient

def work(i):
    with MsmpClient("127.0.0.1", {msmp_server.admin_port}) as client:
        client.login({ADMIN!r}, {ADMIN_PASSWORD!r})
        return [client.stat()["Total connections"] for _ in range(5)] and client.list_users()

jobs = [gevent.spawn(work, i) for i in range(8)]
gevent.joinall(jobs, timeout=30, raise_error=True)
assert all({ALICE!r} in job.value for job in jobs), [job.value for job in jobs]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- a scripted peer, for what the real server never sends ---------------------------------


Script = list[bytes | None]


@pytest.fixture
def scripted_peer() -> Iterator[Callable[[Script], int]]:
    """Serve one connection from a script: bytes are sent as one write each, None reads a command."""
    sockets: list[socket.socket] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()

    def serve(listener: socket.socket, script: Script) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            try:
                for chunk in script:
                    if chunk is None:
                        conn.recv(4096)
                    else:
                        conn.sendall(chunk)
                stop.wait(10)  # stay open (silent) until the test is over
            except OSError:
                pass

    def start(script: Script) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sockets.append(listener)
        thread = threading.Thread(target=serve, args=(listener, script), daemon=True)
        thread.start()
        threads.append(thread)
        return listener.getsockname()[1]

    yield start
    stop.set()
    for thread in threads:
        thread.join(5)
    for sock in sockets:
        sock.close()


def test_dot_unstuffing(scripted_peer: Callable[[Script], int]) -> None:
    port = scripted_peer([b"+OK MSMP1 test ready\r\n", None, b"+OK\r\n..hidden\r\nplain\r\n...\r\n.\r\n",
                          None, b"+OK Bye\r\n"])
    with MsmpClient("127.0.0.1", port, timeout=5) as client:
        response = client.command("HELP")
        assert response.lines == [".hidden", "plain", ".."]


def test_bare_lf_and_split_writes(scripted_peer: Callable[[Script], int]) -> None:
    port = scripted_peer([b"+OK MSMP1 ", b"ready\n", None, b"+OK 4", b"2\n", None, b"+OK Bye\n"])
    with MsmpClient("127.0.0.1", port, timeout=5) as client:
        assert client.greeting == "MSMP1 ready"
        assert client.get("answer") == "42"


def test_timeout(scripted_peer: Callable[[Script], int]) -> None:
    port = scripted_peer([b"+OK MSMP1 test ready\n"])  # then silence
    client = MsmpClient("127.0.0.1", port, timeout=0.3)
    client.connect()
    with pytest.raises(MsmpTimeout) as info:
        client.command("STAT")
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, TimeoutError)
    assert not client.connected


def test_not_an_msmp_server(scripted_peer: Callable[[Script], int]) -> None:
    port = scripted_peer([b"SSH-2.0-OpenSSH_9.6\r\n"])
    with pytest.raises(MsmpProtocolError):
        MsmpClient("127.0.0.1", port, timeout=5).connect()


def test_parse_user_line() -> None:
    info = parse_user_line("alice 3 logs messages=2 octets=1024 logged-in=no")
    assert info == {"name": "alice", "logs": "3", "messages": "2", "octets": "1024", "logged-in": "no"}
