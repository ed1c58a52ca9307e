"""Certificate reload (SIGHUP, MSMP RELOAD) and the certificate's expiry in STAT, the shell and metrics.

One throw-away CA per test issues certificates with known serials and notAfter dates;
the server's files are replaced by rename, as certbot does, and every client verifies
the server against that CA. Which certificate a connection got is told by its serial.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import re
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from helpers import (
    ADMIN,
    REPO,
    LineClient,
    ServerProcess,
    admin,
    filter_tmp_dir,
    free_port,
    start_tls,
    wait_until,
)

from admin.client import MsmpClient

USERS = {"alice": "alice-pw", "bob": "bob-pw"}
NOBODY = pwd.getpwnam("nobody")


class Certificates:
    """A CA and the server's certificate files; `install` puts a new leaf in place by rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        self._count = 0

    def issue(self, days: float, *names: str) -> trustme.LeafCert:
        """A leaf valid for `days` (and half a day more, so whole days are unambiguous)."""
        not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days, hours=12)
        return self.ca.issue_cert(*(names or ("localhost", "127.0.0.1", "::1")), not_after=not_after)

    def install(self, leaf: trustme.LeafCert, key_pem: bytes | None = None) -> int:
        """Write `leaf` (with `key_pem` instead of its own key if given) over the served files; its serial."""
        self._count += 1
        for path, data, mode in ((self.cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems), 0o644),
                                 (self.key, key_pem if key_pem is not None else leaf.private_key_pem.bytes(), 0o600)):
            fresh = path.with_name(f"{path.name}.{self._count}")
            fresh.write_bytes(data)
            fresh.chmod(mode)
            os.replace(fresh, path)  # the rename a renewal does
        return serial(leaf)

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def server_args(self, pop3s_port: int) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--pop3s-port", str(pop3s_port)]


def serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


def served_serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class ReloadServer:
    """A server with POP3 (STLS), POP3S on `pop3s` and MSMP, serving `certs`."""

    def __init__(self, server: ServerProcess, certs: Certificates, pop3s: int) -> None:
        self.server, self.certs, self.pop3s = server, certs, pop3s

    def implicit(self) -> LineClient:
        client = LineClient(self.pop3s, greet=False)
        start_tls(client, self.certs.context())
        client.greeting = client.line()
        return client

    def stls(self) -> LineClient:
        client = LineClient(self.server.port)
        assert client.cmd("STLS") == b"+OK Begin TLS negotiation"
        start_tls(client, self.certs.context())
        return client

    def new_serials(self) -> tuple[int, int]:
        """The serials a new POP3S and a new STLS connection get."""
        found = []
        for client in (self.implicit(), self.stls()):
            with client:
                assert isinstance(client.sock, ssl.SSLSocket)
                found.append(served_serial(client.sock))
                assert client.cmd("QUIT") == b"+OK Bye"
        return found[0], found[1]

    def stat(self) -> dict[str, str]:
        with admin(self.server) as client:
            return client.stat()


def serve(start: Callable[..., ServerProcess], certs: Certificates, extra: list[str] | None = None) -> ReloadServer:
    pop3s = free_port()
    server = start(users=USERS, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                   extra_args=certs.server_args(pop3s) + (extra or []))
    return ReloadServer(server, certs, pop3s)


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    (tmp_path / "tls").mkdir()
    return Certificates(tmp_path / "tls")


@pytest.fixture
def start(start_server: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    return start_server


def test_reload_over_msmp_new_connections_get_the_new_certificate_open_sessions_keep_theirs(
        start: Callable[..., ServerProcess], certs: Certificates) -> None:
    first = certs.install(certs.issue(30))
    running = serve(start, certs)
    assert running.new_serials() == (first, first)
    assert running.stat()["Certificate expires in days"] == "30"
    running.server.deliver("alice", b"Subject: across a reload\n\nbody\n")
    held = running.implicit()  # opened before the reload, logged in across it
    assert held.login("alice", USERS["alice"]).startswith(b"+OK")

    second = certs.install(certs.issue(90))
    with admin(running.server) as client:
        assert client.command("RELOAD").text == "Reloaded"
        assert client.stat()["Certificate expires in days"] == "90"
    assert running.new_serials() == (second, second)

    assert isinstance(held.sock, ssl.SSLSocket) and served_serial(held.sock) == first
    assert held.cmd("STAT").startswith(b"+OK 1 ")
    assert b"across a reload" in held.multi("RETR 1")[1]
    assert held.cmd("QUIT").startswith(b"+OK")
    held.close()
    log = running.server.log()
    assert re.search(r"INFO certificate reloaded: \S+cert\.pem, expires in 90 days", log)
    assert "Traceback" not in log


def test_sighup_reloads_the_certificate(start: Callable[..., ServerProcess], certs: Certificates) -> None:
    first = certs.install(certs.issue(10))
    running = serve(start, certs)
    held = running.stls()
    assert held.login("bob", USERS["bob"]).startswith(b"+OK")
    second = certs.install(certs.issue(200))
    assert running.server.process is not None
    running.server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "certificate reloaded" in running.server.log())
    assert running.new_serials() == (second, second)
    assert running.stat()["Certificate expires in days"] == "200"
    assert isinstance(held.sock, ssl.SSLSocket) and served_serial(held.sock) == first
    assert held.cmd("NOOP") == b"+OK"
    assert held.cmd("QUIT").startswith(b"+OK")
    held.close()
    assert running.server.running


def test_a_new_certificate_that_does_not_load_keeps_the_old_one(start: Callable[..., ServerProcess],
                                                                certs: Certificates) -> None:
    first = certs.install(certs.issue(30))
    running = serve(start, certs)
    other_key = certs.issue(5).private_key_pem.bytes()
    certs.install(certs.issue(60), key_pem=other_key)  # a key that is not the certificate's
    with admin(running.server) as client:
        answer = client.command("RELOAD")
        assert not answer.ok
        assert re.fullmatch(r"certificate not reloaded, the current one stays: certificate \S+ and key \S+ "
                            r"do not load as a pair: .+", answer.text), answer.text
        assert client.stat()["Certificate expires in days"] == "30"
    assert running.new_serials() == (first, first)

    assert running.server.process is not None
    running.server.process.send_signal(signal.SIGHUP)  # the same through the signal: logged, old one kept
    wait_until(lambda: running.server.log().count("ERROR reload: certificate not reloaded") == 2)
    assert running.new_serials() == (first, first)

    certs.key.write_text("not a key\n")
    os.remove(certs.cert)  # a renewal caught half-way: the certificate gone
    with admin(running.server) as client:
        answer = client.command("RELOAD")
        assert not answer.ok and "no such file" in answer.text, answer.text
    assert running.new_serials() == (first, first)
    errors = [line for line in running.server.log().splitlines() if "ERROR reload:" in line]
    assert len(errors) == 3
    assert "Traceback" not in running.server.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server must start as root to drop to nobody")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_root_only_key_serves_and_a_sighup_with_a_new_root_only_pair_serves_the_new_one(
        workers: int) -> None:
    """The key stays root:root 0600 throughout: the keeper (geventpop3.process.keeper) reads it at
    every reload and hands it to the server processes, which run as nobody and cannot read it."""
    with filter_tmp_dir() as root:
        (root / "tls").mkdir()
        certs = Certificates(root / "tls")
        first = certs.install(certs.issue(30))  # the key root:root 0600, in a 0700 directory of root's
        (root / "tls").chmod(0o700)
        for path in [root, *root.rglob("*")]:
            if path.parent != certs.directory and path != certs.directory:
                os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        group = grp.getgrgid(NOBODY.pw_gid).gr_name
        pop3s = free_port()
        server = ServerProcess(root / "server", users=USERS, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                               workers=workers,
                               extra_args=[*certs.server_args(pop3s), "--run-as", "nobody", "--run-as-group", group])
        for path in [server.root, *server.root.rglob("*")]:
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        running = ReloadServer(server.start(), certs, pop3s)
        try:
            assert running.new_serials() == (first, first)
            second = certs.install(certs.issue(60))
            assert os.stat(certs.key).st_uid == 0 and os.stat(certs.key).st_mode & 0o777 == 0o600
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload done in 2 workers" in server.log() if workers > 1
                       else "INFO reload done" in server.log())
            assert "reload:" not in server.log()
            for _ in range(4):  # whichever worker takes it
                assert running.new_serials() == (second, second)
            with admin(server) as client:
                assert client.command("RELOAD").ok
            assert "Traceback" not in server.log()
        finally:
            server.stop()


def test_expiry_in_the_admin_shell_and_on_the_metrics_endpoint(start: Callable[..., ServerProcess],
                                                               certs: Certificates, tmp_path: Path) -> None:
    leaf = certs.issue(45)
    certs.install(leaf)
    metrics_port = free_port()
    running = serve(start, certs, extra=["--metrics-port", str(metrics_port)])
    env = {**os.environ, "GEVENTPOP3_ADMIN_PASSWORD": ADMIN[1], "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    base = [sys.executable, "-m", "admin", "-L", "127.0.0.1", "-P", str(running.server.admin_port), "-u", ADMIN[0]]
    shown = subprocess.run([*base, "STAT"], env=env, capture_output=True, text=True, timeout=60, cwd=REPO,
                           stdin=subprocess.DEVNULL)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^Certificate expires in days\s+45$", shown.stdout, re.M), shown.stdout

    def gauge() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        found = re.search(r"^geventpop3_tls_certificate_expiry_seconds (\S+)$", text, re.M)
        assert found, text
        return float(found.group(1))

    expected = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).not_valid_after_utc.timestamp()
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert abs(gauge() - (expected - now)) < 60
    certs.install(certs.issue(3))
    with admin(running.server) as client:
        client.reload()
    assert 3 * 86400 < gauge() < 4 * 86400


def test_no_certificate_no_expiry_line(server: ServerProcess) -> None:
    with admin(server) as client:
        assert "Certificate expires in days" not in client.stat()
        assert client.command("RELOAD").text == "Reloaded"  # nothing to reload is no problem


def test_the_live_view_flags_a_certificate_close_to_its_end(start: Callable[..., ServerProcess],
                                                            certs: Certificates) -> None:
    import io

    from admin.shell import live_view

    certs.install(certs.issue(5))
    running = serve(start, certs)
    out = io.StringIO()
    client = MsmpClient("127.0.0.1", running.server.admin_port)
    client.login(*ADMIN)
    try:
        live_view(client, out, interval=0.05, limit=1)
    finally:
        client.quit()
    assert re.search(r"^Certificate expires in days:\s+5\s+renew soon$", out.getvalue(), re.M), out.getvalue()
