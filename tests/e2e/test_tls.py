"""TLS and SASL on the real server: implicit TLS, STLS, the plaintext policy, AUTH PLAIN/LOGIN.

Every client verifies the server's certificate against a CA made for this test session.
A client bound to 127.0.0.2 talking to a server on 127.0.0.1 is not local (its
address differs from the server's), so it is the insecure client of the spec.
"""

from __future__ import annotations

import base64
import poplib
import re
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    LineClient,
    ServerProcess,
    TlsFiles,
    admin,
    crlf,
    free_port,
    run_server,
    start_tls,
    started_servers,
    tls_client,
    unique_name,
    wait_until,
)

INSECURE = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
NON_LOCAL = "127.0.0.2"
USERS = {name: f"{name}-pw" for name in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class TlsServer:
    """A running server with a certificate: `server.port` speaks plain POP3 and STLS, `pop3s` implicit TLS."""

    def __init__(self, start: Callable[..., ServerProcess], files: TlsFiles, config: str = "", **kwargs: object):
        self.pop3s = free_port()
        self.files = files
        self.server = start(users=USERS, listen=["127.0.0.1"], config=config,
                            extra_args=files.server_args(self.pop3s), **kwargs)
        wait_until(lambda: _accepts(self.pop3s))

    def plain(self, source: str | None = None) -> LineClient:
        return LineClient(self.server.port, source=source)

    def implicit(self, source: str | None = None, context: ssl.SSLContext | None = None) -> LineClient:
        return tls_client(self.pop3s, self.files, context=context, source=source)

    def stls(self, source: str | None = None) -> LineClient:
        client = self.plain(source)
        assert client.cmd("STLS") == b"+OK Begin TLS negotiation"
        start_tls(client, self.files.client_context())
        return client

    def log(self) -> str:
        return self.server.log()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[TlsServer]:
    """One server for the module; each test uses its own user, so none sees another's mailbox lock."""
    with started_servers(tmp_path_factory.mktemp("tls")) as start:
        yield TlsServer(start, tls_files)


def capabilities(client: LineClient) -> list[bytes]:
    first, body = client.multi("CAPA")
    return body.split(b"\r\n")[:-1]


# -- real clients ---------------------------------------------------------------

def test_poplib_pop3_ssl_verifies_and_retrieves(tls_server: TlsServer) -> None:
    content = b"Subject: over TLS\n\nhello\n.dot line\n"
    tls_server.server.deliver("alice", content)
    session = poplib.POP3_SSL("127.0.0.1", tls_server.pop3s, context=tls_server.files.client_context(), timeout=10)
    capa = session.capa()
    assert "STLS" not in capa and "USER" in capa and capa["SASL"] == ["PLAIN", "LOGIN"]
    session.user("alice")
    session.pass_(USERS["alice"])
    _, lines, _ = session.retr(1)
    assert b"".join(line + b"\r\n" for line in lines) == crlf(content)
    session.dele(1)
    session.quit()
    wait_until(lambda: "tls=TLSv1.3/" in tls_server.log())
    assert re.search(r"pop3 login: user=alice .*mech=user tls=TLSv1\.3/\S+", tls_server.log())


def test_poplib_stls_verifies_and_logs_in(tls_server: TlsServer) -> None:
    session = poplib.POP3("127.0.0.1", tls_server.server.port, timeout=10)
    assert "STLS" in session.capa()
    assert session.stls(context=tls_server.files.client_context()).startswith(b"+OK")
    assert "STLS" not in session.capa()
    session.user("bob")
    assert session.pass_(USERS["bob"]).startswith(b"+OK")
    session.quit()


def test_poplib_refuses_a_server_it_cannot_verify(tls_server: TlsServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL("127.0.0.1", tls_server.pop3s, context=ssl.create_default_context(), timeout=10)


@pytest.mark.external  # curl
def test_curl_over_implicit_tls_and_stls(tls_server: TlsServer) -> None:
    content = b"Subject: curl\n\nfetched by curl\n"
    tls_server.server.deliver("carol", content)
    common = ["curl", "-sS", "--max-time", "20", "--cacert", str(tls_server.files.ca), "-u", f"carol:{USERS['carol']}"]
    implicit = subprocess.run([*common, f"pop3s://127.0.0.1:{tls_server.pop3s}/1"], capture_output=True, timeout=30)
    assert implicit.returncode == 0, implicit.stderr
    assert implicit.stdout == crlf(content)
    stls = subprocess.run([*common, "--ssl-reqd", f"pop3://127.0.0.1:{tls_server.server.port}/1"],
                          capture_output=True, timeout=30)
    assert stls.returncode == 0, stls.stderr
    assert stls.stdout == crlf(content)


@pytest.mark.external  # curl
def test_curl_without_the_ca_fails_verification(tls_server: TlsServer) -> None:
    result = subprocess.run(["curl", "-sS", "--max-time", "20", "-u", f"carol:{USERS['carol']}",
                             f"pop3s://127.0.0.1:{tls_server.pop3s}/"], capture_output=True, timeout=30)
    assert result.returncode == 60, result.stderr  # peer certificate cannot be authenticated


@pytest.mark.external  # openssl
def test_openssl_s_client_starttls_pop3(tls_server: TlsServer) -> None:
    script = f"USER dave\nPASS {USERS['dave']}\nSTAT\nQUIT\n"
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "pop3", "-connect", f"127.0.0.1:{tls_server.server.port}",
         "-CAfile", str(tls_server.files.ca), "-verify_return_error", "-verify_hostname", "localhost",
         "-crlf", "-ign_eof", "-brief"],
        input=script.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert b"Verification: OK" in result.stderr
    assert b"+OK Logged in" in result.stdout and b"+OK Bye" in result.stdout


# -- STLS safety ------------------------------------------------------------------

def test_commands_pipelined_after_stls_are_never_executed(tls_server: TlsServer) -> None:
    client = tls_server.plain()
    client.send(b"STLS\r\nCAPA\r\n")  # one packet: the injection of CVE-2011-0411
    assert client.line() == b"+OK Begin TLS negotiation"
    start_tls(client, tls_server.files.client_context())
    # Had CAPA run inside TLS, its answer would come before this one.
    assert client.cmd("QUIT") == b"+OK Bye"
    client.close()


def test_plaintext_sent_after_stls_before_the_handshake_is_not_executed(tls_server: TlsServer) -> None:
    client = tls_server.plain()
    client.send(b"STLS\r\n")
    assert client.line() == b"+OK Begin TLS negotiation"
    client.send(b"CAPA\r\n")  # sent before the ClientHello: garbage to TLS, never a command
    try:
        start_tls(client, tls_server.files.client_context())
    except (ssl.SSLError, OSError):
        return  # the handshake broke on it and the server closed: safe
    assert client.cmd("QUIT") == b"+OK Bye"


def test_a_user_before_stls_is_forgotten(tls_server: TlsServer) -> None:
    client = tls_server.plain()
    assert client.cmd("USER erin") == b"+OK"
    assert client.cmd("STLS") == b"+OK Begin TLS negotiation"
    start_tls(client, tls_server.files.client_context())
    assert client.cmd(f"PASS {USERS['erin']}") == b"-ERR Send USER first"
    assert client.login("erin", USERS["erin"]).startswith(b"+OK")
    client.cmd("QUIT")


def test_stls_twice_after_login_and_on_pop3s_is_refused(tls_server: TlsServer) -> None:
    client = tls_server.stls()
    assert client.cmd("STLS") == b"-ERR TLS is already active"
    assert b"STLS" not in capabilities(client)
    assert client.login("frank", USERS["frank"]).startswith(b"+OK")
    assert client.cmd("STLS").startswith(b"-ERR")
    client.cmd("QUIT")
    implicit = tls_server.implicit()
    assert implicit.cmd("STLS") == b"-ERR TLS is already active"
    implicit.close()


def test_stls_without_a_certificate_is_refused(server: ServerProcess) -> None:
    with LineClient(server.port) as client:
        assert b"STLS" not in capabilities(client)
        assert client.cmd("STLS") == b"-ERR TLS is not available"
        assert client.login("alice", server.users["alice"]).startswith(b"+OK")  # and plaintext stays allowed


def test_garbage_instead_of_a_handshake_closes_without_an_answer(tls_server: TlsServer) -> None:
    with LineClient(tls_server.pop3s, greet=False) as client:
        client.send(b"USER alice\r\nGET / HTTP/1.0\r\n\r\n" + b"\x00" * 600)
        data = client.read_until_closed(reset_ok=True)
    assert b"+OK" not in data and b"-ERR" not in data  # at most a TLS alert record
    client = tls_server.plain()
    client.send(b"STLS\r\n")
    assert client.line() == b"+OK Begin TLS negotiation"
    client.send(b"\x16\x03\x01\x00\x05hello" * 20)  # a broken ClientHello
    data = client.read_until_closed(reset_ok=True)
    assert b"+OK" not in data and b"-ERR" not in data  # nothing in plaintext after +OK
    wait_until(lambda: tls_server.log().count("pop3 tls handshake failed") >= 2)
    assert "Traceback" not in tls_server.log()


# -- the plaintext policy --------------------------------------------------------

def test_plaintext_login_is_refused_from_a_non_local_address(tls_server: TlsServer) -> None:
    client = tls_server.plain(source=NON_LOCAL)
    capa = capabilities(client)
    assert b"USER" not in capa and b"SASL" in capa and b"STLS" in capa  # SASL with no mechanism, as Dovecot
    assert client.cmd("USER alice") == INSECURE
    assert client.cmd(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + USERS['alice'])}") == INSECURE
    assert client.cmd("AUTH LOGIN") == INSECURE
    assert client.read_until_closed() == b""  # the third failure closes, as for wrong passwords
    log = tls_server.log()
    assert re.search(r"login failed: user=alice rip=127\.0\.0\.2 .*mech=user tls=no reason=insecure", log)
    assert re.search(r"login failed: user=- rip=127\.0\.0\.2 .*mech=plain tls=no reason=insecure", log)


def test_auth_alone_lists_no_mechanism_where_plaintext_is_refused(tls_server: TlsServer) -> None:
    client = tls_server.plain(source=NON_LOCAL)
    assert client.multi("AUTH") == (b"+OK", b"")
    local = tls_server.plain()
    assert local.multi("AUTH") == (b"+OK", b"PLAIN\r\nLOGIN\r\n")
    client.close()
    local.close()


def test_a_non_local_client_may_log_in_after_stls(tls_server: TlsServer) -> None:
    client = tls_server.stls(source=NON_LOCAL)
    assert b"USER" in capabilities(client)
    assert client.login("grace", USERS["grace"]).startswith(b"+OK")
    client.cmd("QUIT")
    implicit = tls_server.implicit(source=NON_LOCAL)
    assert implicit.cmd(f"AUTH PLAIN {b64(chr(0) + 'grace' + chr(0) + USERS['grace'])}").startswith(b"+OK")
    implicit.cmd("QUIT")


def test_trusted_networks_and_plaintext_auth_always(start_server: Callable[..., ServerProcess],
                                                    tls_files: TlsFiles) -> None:
    trusted = TlsServer(start_server, tls_files, config='trusted_networks = ["10.0.0.0/8", "127.0.0.2/32"]\n')
    client = trusted.plain(source=NON_LOCAL)
    assert b"USER" in capabilities(client)
    assert client.login("alice", USERS["alice"]).startswith(b"+OK")
    client.cmd("QUIT")
    assert trusted.plain(source="127.0.0.3").cmd("USER bob") == INSECURE
    always = TlsServer(start_server, tls_files, config='plaintext_auth = "always"\n')
    client = always.plain(source=NON_LOCAL)
    assert client.login("bob", USERS["bob"]).startswith(b"+OK")
    client.cmd("QUIT")


def test_trusted_networks_can_be_set_over_msmp(tls_server: TlsServer) -> None:
    with admin(tls_server.server) as msmp:
        msmp.set("trusted_networks", "127.0.0.2/32,192.0.2.0/24")
        try:
            assert msmp.get("trusted_networks") == "127.0.0.2/32,192.0.2.0/24"
            client = tls_server.plain(source=NON_LOCAL)
            assert client.login("heidi", USERS["heidi"]).startswith(b"+OK")
            client.cmd("QUIT")
        finally:
            msmp.set("trusted_networks", "none")
        assert tls_server.plain(source=NON_LOCAL).cmd("USER heidi") == INSECURE


# -- SASL ---------------------------------------------------------------------------

@pytest.fixture
def sasl_user(tls_server: TlsServer) -> Iterator[tuple[str, str]]:
    """A fresh user (added over MSMP) so each SASL test has its own mailbox."""
    name, password = unique_name("sasl"), "s3cret-pw"
    with admin(tls_server.server) as msmp:
        msmp.add_user(name, password)
    yield name, password


def test_auth_plain_with_an_initial_response(tls_server: TlsServer, sasl_user: tuple[str, str]) -> None:
    name, password = sasl_user
    client = tls_server.implicit()
    assert client.cmd(f"AUTH PLAIN {b64(chr(0) + name + chr(0) + password)}").startswith(b"+OK Logged in")
    assert client.cmd("AUTH PLAIN").startswith(b"-ERR")  # AUTH in TRANSACTION
    assert client.cmd("QUIT").startswith(b"+OK")
    wait_until(lambda: re.search(rf"pop3 login: user={name} .*mech=plain tls=TLSv1\.3/", tls_server.log()))


def test_auth_plain_with_a_continuation_and_the_same_authzid(tls_server: TlsServer,
                                                             sasl_user: tuple[str, str]) -> None:
    name, password = sasl_user
    client = tls_server.stls()
    assert client.cmd("AUTH PLAIN") == b"+ "
    assert client.cmd(b64(name + chr(0) + name + chr(0) + password)).startswith(b"+OK Logged in")
    client.cmd("QUIT")


def test_auth_login(tls_server: TlsServer, sasl_user: tuple[str, str]) -> None:
    name, password = sasl_user
    client = tls_server.implicit()
    assert client.cmd("auth login") == b"+ VXNlcm5hbWU6"
    assert client.cmd(b64(name)) == b"+ UGFzc3dvcmQ6"
    assert client.cmd(b64(password)).startswith(b"+OK Logged in")
    client.cmd("QUIT")
    wait_until(lambda: f"user={name} " in tls_server.log() and "mech=login" in tls_server.log())


@pytest.mark.parametrize(("exchange", "answer"), [
    (["AUTH PLAIN", "*"], b"-ERR Authentication cancelled"),
    (["AUTH LOGIN", "*"], b"-ERR Authentication cancelled"),
    (["AUTH PLAIN not!base64"], b"-ERR Invalid base64 data"),
    (["AUTH LOGIN", "%%%"], b"-ERR Invalid base64 data"),
    ([f"AUTH PLAIN {b64('no nul bytes')}"], b"-ERR Malformed authentication data"),
    ([f"AUTH PLAIN {b64('admin' + chr(0) + 'NAME' + chr(0) + 'PASSWORD')}"],
     b"-ERR [AUTH] Authorization identity must equal the authentication identity"),
    (["AUTH CRAM-MD5"], b"-ERR Unsupported authentication mechanism"),
])
def test_sasl_errors_stay_in_authorization(tls_server: TlsServer, sasl_user: tuple[str, str], exchange: list[str],
                                           answer: bytes) -> None:
    name, password = sasl_user
    client = tls_server.implicit()
    *challenges, last = [line.replace("NAME", name).replace("PASSWORD", password) for line in exchange]
    for line in challenges:
        assert client.cmd(line).startswith(b"+ ")
    assert client.cmd(last) == answer
    # Still in AUTHORIZATION, and these did not count as failed logins (more than max_login_failures here).
    for _ in range(3):
        assert client.cmd("AUTH XOAUTH2").startswith(b"-ERR")
    assert client.cmd(f"AUTH PLAIN {b64(chr(0) + name + chr(0) + password)}").startswith(b"+OK Logged in")
    client.cmd("QUIT")


def test_a_wrong_password_over_sasl_fails_like_pass(tls_server: TlsServer, sasl_user: tuple[str, str]) -> None:
    name, _ = sasl_user
    client = tls_server.implicit()
    assert client.cmd(f"AUTH PLAIN {b64(chr(0) + name + chr(0) + 'wrong')}") == \
        b"-ERR [AUTH] Invalid user name or password"
    assert client.cmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert client.cmd(b64(name)) == b"+ UGFzc3dvcmQ6"
    assert client.cmd(b64("wrong")) == b"-ERR [AUTH] Invalid user name or password"
    assert client.login(name, "wrong") == b"-ERR [AUTH] Invalid user name or password"
    assert client.read_until_closed() == b""  # the shared failure limit (3)
    wait_until(lambda: len(re.findall(rf"login failed: user={name} .*reason=auth", tls_server.log())) == 3)


# -- versions and volume --------------------------------------------------------------

def test_tls_1_2_and_tls_1_3(tls_server: TlsServer) -> None:
    client = tls_server.implicit(context=tls_server.files.client_context(maximum=ssl.TLSVersion.TLSv1_2))
    assert client.sock.version() == "TLSv1.2"
    client.close()
    client = tls_server.implicit()
    assert client.sock.version() == "TLSv1.3"
    client.close()


def test_tls_min_version_1_3_refuses_tls_1_2(start_server: Callable[..., ServerProcess], tls_files: TlsFiles) -> None:
    strict = TlsServer(start_server, tls_files, config='tls_min_version = "TLSv1.3"\n')
    with pytest.raises(ssl.SSLError):
        strict.implicit(context=tls_files.client_context(maximum=ssl.TLSVersion.TLSv1_2))
    client = strict.implicit()
    assert client.sock.version() == "TLSv1.3"
    client.close()


def test_a_1_mib_message_with_dot_lines_is_byte_exact_over_tls(tls_server: TlsServer) -> None:
    lines = [b"Subject: big", b""] + [b"." * (i % 5) + b"line %d" % i for i in range(100_000)]
    joined = b"\r\n".join(lines)
    content = joined[: joined.rindex(b"\r\n", 0, 1 << 20) + 2]  # 1 MiB of whole lines, dot lines included
    assert len(content) > 1_048_000
    name = "bob"
    tls_server.server.deliver(name, content)
    client = tls_server.implicit()
    assert client.login(name, USERS[name]).startswith(b"+OK")
    _, listing = client.multi("LIST")
    number = listing.split(b"\r\n")[-2].split()[0].decode()
    _, body = client.multi(f"RETR {number}")
    assert body == content
    assert client.cmd(f"DELE {number}").startswith(b"+OK")
    client.cmd("QUIT")


# -- start-up ----------------------------------------------------------------------------

def test_start_up_errors_are_one_line_and_exit_2(tmp_path: Path, tls_files: TlsFiles) -> None:
    base = ["-d", str(tmp_path / "mail"), "--no-state", "-l", "127.0.0.1", "-p", "0", "-P", "0"]
    cases = {
        "needs a certificate": [*base, "--pop3s-port", "9995"],
        "do not load as a pair": [*base, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.other_key)],
        "no such file": [*base, "--tls-cert", str(tmp_path / "missing.pem")],
    }
    for needle, args in cases.items():
        result = run_server(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_key_readable_by_others_is_a_warning(start_server: Callable[..., ServerProcess], tls_files: TlsFiles,
                                               tmp_path: Path) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(tls_files.key.read_bytes() + tls_files.cert.read_bytes())
    combined.chmod(0o644)
    server = start_server(extra_args=["--tls-cert", str(combined), "--pop3s-port", "0"], listen=["127.0.0.1"])
    assert re.search(r"WARNING TLS key \S+combined.pem is readable by others .*mode 0644", server.log())
    client = LineClient(server.port)
    assert client.cmd("STLS") == b"+OK Begin TLS negotiation"
    start_tls(client, tls_files.client_context())
    assert client.cmd("QUIT") == b"+OK Bye"
