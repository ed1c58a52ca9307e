"""geventpop3.testing.Pop3TestServer: a real server for other projects' tests, driven with poplib."""

from __future__ import annotations

import email.message
import gc
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import REPO, ipv6_loopback, server_env, wait_until

from geventpop3.testing import Pop3TestServer, Pop3TestServerError
from geventpop3.testing import server as testing


def alive(pid: int) -> bool:
    """True while `pid` is a process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def login(server: Pop3TestServer, user: str, pop3: poplib.POP3 | None = None) -> poplib.POP3:
    session = pop3 or poplib.POP3(server.host, server.port, timeout=10)
    session.user(user)
    session.pass_(server.users[user])
    return session


def refused(server: Pop3TestServer, user: str, password: str) -> bool:
    """True if the login is answered -ERR."""
    session = poplib.POP3(server.host, server.port, timeout=10)
    try:
        session.user(user)
        session.pass_(password)
    except poplib.error_proto:
        return True
    finally:
        session.close()
    return False


def uidls(session: poplib.POP3) -> list[str]:
    return [line.decode().split()[1] for line in session.uidl()[1]]


def test_poplib_fetches_what_deliver_stored_and_deletes_it() -> None:
    with Pop3TestServer(users={"alice": "alicepw"}) as server:
        note = email.message.EmailMessage()
        note["Subject"] = "as an EmailMessage"
        note.set_content("third\n")
        delivered = [server.deliver("alice", b"Subject: bytes\n\nfirst\n"),
                     server.deliver("alice", "Subject: text\n\nsecond \u00e9\n"), server.deliver("alice", note)]
        session = login(server, "alice")
        assert uidls(session) == delivered
        assert session.retr(1)[1] == [b"Subject: bytes", b"", b"first"]
        assert session.retr(2)[1][-1] == "second \u00e9".encode()
        assert b"Subject: as an EmailMessage" in session.retr(3)[1]
        session.dele(2)
        session.quit()
        assert list(server.messages("alice")) == [delivered[0], delivered[2]]
        assert server.messages("alice")[delivered[0]] == b"Subject: bytes\n\nfirst\n"
        server.clear("alice")
        assert server.messages("alice") == {}
        wait_until(lambda: any("pop3 logout: user=alice" in line for line in server.log))  # logged after +OK


def test_tls_client_verifies_the_throwaway_ca_on_pop3s_and_stls() -> None:
    with Pop3TestServer(users={"alice": "alicepw"}, tls=True) as server:
        uidl = server.deliver("alice", b"Subject: secret\n\nover TLS\n")
        assert server.ca_path is not None and server.pop3s_port not in (None, server.port)
        implicit = login(server, "alice", poplib.POP3_SSL(server.host, server.pop3s_port,
                                                          context=server.ssl_context(), timeout=10))
        assert uidls(implicit) == [uidl]
        assert implicit.retr(1)[1][-1] == b"over TLS"
        implicit.quit()
        starttls = poplib.POP3(server.host, server.port, timeout=10)
        starttls.stls(context=server.ssl_context())
        assert login(server, "alice", starttls).stat() == (1, len(b"Subject: secret\r\n\r\nover TLS\r\n"))
        starttls.quit()
        with pytest.raises(ssl.SSLCertVerificationError):  # the CA is this server's own, no one else's
            poplib.POP3_SSL(server.host, server.pop3s_port, context=ssl.create_default_context(), timeout=10)


def test_a_pop3s_port_taken_before_the_server_binds_it_is_picked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Port 0 cannot ask for an ephemeral POP3S port (`--pop3s-port 0` is "none"): the
    picked free port can be taken meanwhile; the start is then retried with another one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        pick = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda host: ports.pop(0) if ports else pick(host))
        with Pop3TestServer(tls=True) as server:
            assert server.pop3s_port not in (None, taken.getsockname()[1])
            assert any("in use" in line for line in server.log)
            assert poplib.POP3_SSL(server.host, server.pop3s_port, context=server.ssl_context()).quit()


def test_two_servers_side_by_side_share_nothing() -> None:
    second_host = "::1" if ipv6_loopback() else "127.0.0.1"
    with Pop3TestServer(users={"alice": "one"}) as first, \
            Pop3TestServer(users={"alice": "two"}, host=second_host) as second:
        endpoints = {(server.host, port) for server in (first, second) for port in (server.port, server.admin_port)}
        assert len(endpoints) == 4
        assert first.root != second.root and first.pid != second.pid
        only = first.deliver("alice", b"Subject: first only\n\n.\n")
        assert uidls(login(first, "alice")) == [only]
        assert refused(second, "alice", "one")
        assert uidls(login(second, "alice")) == []
        assert second.messages("alice") == {}


def test_add_user_set_and_clear_bring_the_server_back_to_its_start() -> None:
    with Pop3TestServer(users={"alice": "alicepw", "carol": "carolpw"}) as server:
        server.add_user("bob", "bobpw")
        server.add_user("alice", "changed")
        server.delete_user("carol")
        assert refused(server, "alice", "alicepw") and refused(server, "carol", "carolpw")
        login(server, "alice").quit()
        server.set("idle_timeout", 7)
        server.deliver("bob", b"Subject: x\n\ny\n")
        login(server, "bob").quit()
        with server.admin() as admin:
            assert admin.get("idle_timeout") == "7" and "bob" in admin.list_users()
        server.clear()
        assert server.log == [] and server.messages("bob") == {}
        assert server.users == {"alice": "alicepw", "carol": "carolpw"}
        with server.admin() as admin:
            assert admin.get("idle_timeout") == "600" and admin.list_users() == ["alice", "carol"]
        login(server, "alice").quit()
        login(server, "carol").quit()


def test_faults_tempfail_on_retr_and_a_slow_login() -> None:
    with Pop3TestServer(users={"alice": "alicepw"}, faults=True) as server:
        fine = server.deliver("alice", b"Subject: fine\n\nok\n")
        broken = server.deliver("alice", b"Subject: broken\n\nnever\n", fault="tempfail")
        session = login(server, "alice")
        assert uidls(session) == [fine, broken]
        assert session.retr(1)[1][-1] == b"ok"
        with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
            session.retr(2)
        session.quit()
        assert list(server.messages("alice")) == [fine, broken]
        server.deliver("alice", b"Subject: slow\n\nslow\n", fault="slow:0.4")
        started = time.monotonic()
        login(server, "alice").quit()
        assert time.monotonic() - started >= 0.4
        with pytest.raises(ValueError, match="unknown fault"):
            server.deliver("alice", b"x\n", fault="explode")
    with Pop3TestServer() as plain, pytest.raises(Pop3TestServerError, match="faults=True"):
        plain.deliver("alice", b"x\n", fault="tempfail")


def test_a_server_that_cannot_start_says_why_and_leaves_nothing() -> None:
    def directories() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob("pop3testserver-*"))

    before = directories()
    with pytest.raises(Pop3TestServerError, match="unknown key 'no_such_setting'") as failed:
        Pop3TestServer(settings={"no_such_setting": 1})
    assert "Traceback" not in str(failed.value)
    assert directories() <= before


def test_stop_ends_the_process_and_removes_the_directory_also_when_forgotten() -> None:
    server = Pop3TestServer()
    pid, root = server.pid, server.root
    assert alive(pid) and root.is_dir()
    server.stop()
    server.stop()
    assert not alive(pid) and not root.exists()
    forgotten = Pop3TestServer()
    pid, root = forgotten.pid, forgotten.root
    del forgotten
    gc.collect()
    assert not alive(pid) and not root.exists()


SCRIPT = """
import sys, time
from geventpop3.testing import Pop3TestServer
with Pop3TestServer(users={"alice": "pw"}) as server:
    print(server.pid, server.root, "gevent" in sys.modules, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["KeyboardInterrupt", "SIGKILL"])
def test_a_test_process_that_is_interrupted_or_killed_leaves_no_server(sig: int) -> None:
    """Ctrl-C: the with block stops the server and removes its directory. SIGKILL of the test
    process: the server gets SIGTERM from the kernel (Linux) and exits; the directory stays."""
    host = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO, env=server_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = host.stdout, host.stderr
        assert stdout is not None and stderr is not None
        pid, root, gevent_imported = stdout.readline().split()
        assert gevent_imported == "False" and alive(int(pid))
        host.send_signal(sig)
        host.wait(20)
        wait_until(lambda: not alive(int(pid)))
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in stderr.read()
            assert not Path(root).exists()
        else:
            shutil.rmtree(root)  # nobody was left to remove it
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_deliver_returns_the_uidl_clients_see_also_with_dovecots_uidl_format() -> None:
    with Pop3TestServer(users={"alice": "alicepw"}, settings={"uidl_format": "%08Xu%08Xv"}) as server:
        uidl = server.deliver("alice", b"Subject: after a migration\n\n.\n")
        session = login(server, "alice")
        assert uidls(session) == [uidl] == list(server.messages("alice"))
        session.quit()
