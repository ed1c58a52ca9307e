"""fetchmail, mpop, getmail6 and curl over implicit TLS and STLS, certificate verification on.

Each client trusts only a CA made for this module and fetches from a server started
here; what it delivers is compared with what was stored. Each also gets a negative
test: trusting another CA, it must fail (non-zero exit), deliver nothing, and never
send a user name (the server logs no login attempt for that user), so a client that
silently skips verification or falls back to plaintext fails the test.

The clients run on 127.0.0.1, a local client, which the plaintext policy lets log in
without TLS: the `tls=TLSv1.x` in the server's login line is what proves they spoke TLS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from helpers import (
    LOOPBACKS,
    ServerProcess,
    TlsFiles,
    accepts,
    crlf,
    free_port,
    getmail_destination,
    started_servers,
    wait_until,
)

CLIENT_TIMEOUT = 60
MESSAGES = [
    b"From: a@example.org\nSubject: lf\n\nbody\n.dot line\n..two dots\n.\nend\n",
    b"From: b@example.org\r\nSubject: crlf\r\n\r\nbody\r\n.\r\n\r\n",
    b"From: c@example.org\nSubject: 8bit\n\n" + bytes(range(128, 256)) + b"\n\xc3\xa9t\xe9\n",
    b"From: d@example.org\nSubject: no final newline\n\nlast line",
]
# One user per test: the tests share one server and tell their logins apart in its log.
USERS = {name: f"{name}-secret" for name in (
    "fm_ssl", "fm_stls", "fm_bad_ssl", "fm_bad_stls", "mp_ssl", "mp_stls", "mp_bad_ssl", "mp_bad_stls",
    "gm_ssl", "gm_bad", "big_mpop", "big_curl")}


def require(program: str) -> str:
    path = shutil.which(program)
    assert path, f"{program} is not installed (tools/install-system-deps.sh or the test extras install it)"
    return path


def lf(content: bytes) -> bytes:
    """What a client that stores with local (LF) line ends writes for a stored message."""
    return crlf(content).replace(b"\r\n", b"\n")


def strip_header(message: bytes, name: bytes) -> bytes:
    """The message without the header field `name` (and its folded lines) a client put in front."""
    assert message.startswith(name + b":"), message[:200]
    lines = message.split(b"\n")
    end = 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\n".join(lines[end:])


def big_message() -> bytes:
    """1 MiB of whole CRLF lines, many starting with one or more dots, some a lone dot."""
    lines = [b"Subject: big", b""] + [b"." * (i % 4) + (b"line %d" % i if i % 7 else b"") for i in range(120_000)]
    joined = b"\r\n".join(lines)
    content = joined[: joined.rindex(b"\r\n", 0, 1 << 20) + 2]
    assert len(content) > 1_048_000 and b"\r\n.\r\n" in content and b"\r\n..\r\n" in content
    return content


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, capture_output=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL,
                          **kwargs)  # type: ignore[call-overload]


# -- the server and its certificates ------------------------------------------------

@dataclass(frozen=True)
class Tls:
    server: ServerProcess
    pop3s: int  # implicit TLS; server.port speaks plain POP3 with STLS
    files: TlsFiles
    stranger_ca: Path  # a CA that did not sign the server's certificate

    def mailbox(self, user: str, messages: list[bytes] = MESSAGES) -> None:
        for content in messages:
            self.server.deliver(user, content)

    def login_line(self, user: str) -> str:
        """The server's log line for `user`'s successful login (waited for: it is written after the answer)."""
        pattern = re.compile(rf"pop3 login: user={user} .*")
        return wait_until(lambda: (found := pattern.search(self.server.log())) and found.group(0))

    def never_tried(self, user: str) -> None:
        """The client never sent `user`'s name (no login, no failed login in the log); its mail is all there."""
        assert f"user={user} " not in self.server.log()
        assert len(self.server.message_files(user)) == len(MESSAGES)


def certificate_files(directory: Path) -> TlsFiles:
    """Like helpers.make_tls_files, with a subject common name: fetchmail's `sslcertck` refuses a
    certificate without one even when a subjectAltName matches (its verify callback, 6.4)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1", common_name="localhost")
    files = TlsFiles(directory / "ca.pem", directory / "cert.pem", directory / "key.pem", directory / "unused.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(files.cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tls]:
    root = tmp_path_factory.mktemp("tls-clients")
    files = certificate_files(root / "certs")
    stranger_ca = root / "stranger-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger_ca))
    pop3s = free_port()
    with started_servers(root) as start:
        server = start(users=USERS, extra_args=files.server_args(pop3s))
        wait_until(lambda: all(accepts(host, pop3s) for host in LOOPBACKS))
        yield Tls(server, pop3s, files, stranger_ca)


# -- fetchmail ------------------------------------------------------------------------

MDA_SCRIPT = """\
import os, sys, time
data = sys.stdin.buffer.read()
name = os.path.join(sys.argv[1], f"{time.time_ns()}.{os.getpid()}")
with open(name + ".tmp", "wb") as handle:
    handle.write(data)
os.rename(name + ".tmp", name)
"""


def fetchmail(tmp_path: Path, tls: Tls, user: str, implicit: bool, ca: Path) -> tuple[int, str, list[bytes]]:
    """fetchmail with `sslcertck` trusting only `ca`: (exit status, its output, the messages its MDA got).

    Implicit TLS: `ssl` on the POP3S port, the CA as `sslcertfile`. STLS: `sslproto 'tls1.2+'`
    without `ssl` on the plain port (fetchmail then requires STLS), the CA in a hashed
    `sslcertpath` directory (openssl rehash), so both ways of naming a CA are covered.
    """
    home = tmp_path / "fetchmail"
    out = home / "out"
    out.mkdir(parents=True)
    (home / "mda.py").write_text(MDA_SCRIPT)
    if implicit:
        where, trust = f"port {tls.pop3s}", f"ssl sslcertfile {ca}"
    else:
        certs = home / "certs"
        certs.mkdir()
        shutil.copy(ca, certs / "ca.pem")
        rehash = run([require("openssl"), "rehash", str(certs)])
        assert rehash.returncode == 0, rehash.stderr
        where, trust = f"port {tls.server.port}", f"sslcertpath {certs}"
    rcfile = home / "fetchmailrc"
    rcfile.write_text(
        "set no syslog\n"
        f"poll localhost protocol pop3 {where} timeout {CLIENT_TIMEOUT // 2}\n"
        f'  user "{user}" there with password "{USERS[user]}" is "root" here\n'
        f"  keep fetchall no rewrite {trust} sslproto 'tls1.2+' sslcertck\n"
        f'  mda "{sys.executable} {home / "mda.py"} {out}"\n'
    )
    rcfile.chmod(0o600)  # fetchmail refuses a password file others can read
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    result = run([require("fetchmail"), "-f", str(rcfile), "--nosyslog", "--nodetach", "-v"], env=env)
    output = (result.stdout + result.stderr).decode(errors="replace")
    delivered = [(out / name).read_bytes() for name in sorted(os.listdir(out)) if not name.endswith(".tmp")]
    return result.returncode, output, delivered


@pytest.mark.parametrize(("user", "implicit"), [("fm_ssl", True), ("fm_stls", False)])
def test_fetchmail_verifies_and_retrieves(tls: Tls, tmp_path: Path, user: str, implicit: bool) -> None:
    tls.mailbox(user)
    code, output, delivered = fetchmail(tmp_path, tls, user, implicit, tls.files.ca)
    assert code == 0, output
    assert sorted(strip_header(message, b"Received") for message in delivered) == sorted(map(lf, MESSAGES))
    assert re.search(r"mech=user tls=TLSv1\.[23]/", tls.login_line(user))
    assert len(tls.server.message_files(user)) == len(MESSAGES)  # `keep`


@pytest.mark.parametrize(("user", "implicit"), [("fm_bad_ssl", True), ("fm_bad_stls", False)])
def test_fetchmail_refuses_a_certificate_from_another_ca(tls: Tls, tmp_path: Path, user: str,
                                                          implicit: bool) -> None:
    tls.mailbox(user)
    code, output, delivered = fetchmail(tmp_path, tls, user, implicit, tls.stranger_ca)
    assert code != 0, output
    assert "certificate verify failed" in output
    assert delivered == []
    tls.never_tried(user)


# -- mpop -----------------------------------------------------------------------------

def mpop(tmp_path: Path, tls: Tls, user: str, implicit: bool, ca: Path, auth: str,
         delivery: str) -> subprocess.CompletedProcess[bytes]:
    """mpop with `tls on`, trusting only `ca`; `delivery` is `maildir DIR` or `mbox FILE`."""
    rcfile = tmp_path / "mpoprc"
    rcfile.write_text(
        "account test\n"
        "host 127.0.0.1\n"
        f"port {tls.pop3s if implicit else tls.server.port}\n"
        "tls on\n"
        f"tls_starttls {'off' if implicit else 'on'}\n"
        f"tls_trust_file {ca}\n"
        f"auth {auth}\n"
        f"user {user}\n"
        f"password {USERS[user]}\n"
        f"delivery {delivery}\n"
        "keep on\n"
        "received_header off\n"
        f"uidls_file {tmp_path / 'uidls'}\n"
        f"timeout {CLIENT_TIMEOUT // 2}\n"
    )
    rcfile.chmod(0o600)  # mpop refuses a password file others can read
    return run([require("mpop"), "-C", str(rcfile), "--half-quiet", "test"], env=dict(os.environ, HOME=str(tmp_path)))


def maildir_in(tmp_path: Path) -> Path:
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    return maildir


def maildir_messages(maildir: Path) -> list[bytes]:
    return [(maildir / "new" / name).read_bytes() for name in sorted(os.listdir(maildir / "new"))]


def mbox_messages(mbox: bytes) -> list[bytes]:
    """The messages of an mbox as mpop writes it: a `From ` line before each, a blank line after."""
    parts = re.split(rb"^From MAILER-DAEMON [^\n]*\n", mbox, flags=re.MULTILINE)
    assert parts[0] == b"", mbox[:200]
    assert all(part.endswith(b"\n\n") for part in parts[1:])
    return [part[:-1] for part in parts[1:]]


def test_mpop_implicit_tls_auth_plain_into_a_maildir(tls: Tls, tmp_path: Path) -> None:
    user = "mp_ssl"
    tls.mailbox(user)
    maildir = maildir_in(tmp_path)
    result = mpop(tmp_path, tls, user, implicit=True, ca=tls.files.ca, auth="plain", delivery=f"maildir {maildir}")
    assert result.returncode == 0, result.stderr
    assert sorted(maildir_messages(maildir)) == sorted(map(lf, MESSAGES))
    assert re.search(r"mech=plain tls=TLSv1\.[23]/", tls.login_line(user))


def test_mpop_stls_auth_user_into_an_mbox(tls: Tls, tmp_path: Path) -> None:
    user = "mp_stls"
    tls.mailbox(user)
    mbox = tmp_path / "mbox"
    result = mpop(tmp_path, tls, user, implicit=False, ca=tls.files.ca, auth="user", delivery=f"mbox {mbox}")
    assert result.returncode == 0, result.stderr
    assert sorted(mbox_messages(mbox.read_bytes())) == sorted(map(lf, MESSAGES))
    assert re.search(r"mech=user tls=TLSv1\.[23]/", tls.login_line(user))


@pytest.mark.parametrize(("user", "implicit"), [("mp_bad_ssl", True), ("mp_bad_stls", False)])
def test_mpop_refuses_a_certificate_from_another_ca(tls: Tls, tmp_path: Path, user: str, implicit: bool) -> None:
    tls.mailbox(user)
    maildir = maildir_in(tmp_path)
    result = mpop(tmp_path, tls, user, implicit, tls.stranger_ca, auth="plain", delivery=f"maildir {maildir}")
    assert result.returncode != 0
    assert b"certificate verification failed" in result.stderr, result.stderr
    assert maildir_messages(maildir) == []
    tls.never_tried(user)


def test_a_1_mib_message_with_dot_lines_through_mpop_over_tls(tls: Tls, tmp_path: Path) -> None:
    user = "big_mpop"
    content = big_message()
    tls.mailbox(user, [content])
    maildir = maildir_in(tmp_path)
    result = mpop(tmp_path, tls, user, implicit=True, ca=tls.files.ca, auth="plain", delivery=f"maildir {maildir}")
    assert result.returncode == 0, result.stderr
    assert maildir_messages(maildir) == [content.replace(b"\r\n", b"\n")]


# -- curl -----------------------------------------------------------------------------

def test_a_1_mib_message_with_dot_lines_through_curl_over_stls(tls: Tls) -> None:
    user = "big_curl"
    content = big_message()
    tls.mailbox(user, [content])
    result = run([require("curl"), "-sS", "--max-time", str(CLIENT_TIMEOUT), "--ssl-reqd", "--cacert",
                  str(tls.files.ca), "-u", f"{user}:{USERS[user]}", f"pop3://localhost:{tls.server.port}/1"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == content
    assert re.search(r"tls=TLSv1\.[23]/", tls.login_line(user))


# -- getmail6 -------------------------------------------------------------------------

@pytest.fixture
def getmail_maildir() -> Iterator[tuple[Path, str | None]]:
    with getmail_destination() as destination:
        yield destination


def getmail(tmp_path: Path, tls: Tls, user: str, ca: Path, maildir: Path,
            deliver_as: str | None) -> subprocess.CompletedProcess[bytes]:
    """getmail6's SimplePOP3SSLRetriever (implicit TLS: getmail has no STLS for POP3) with `ca_certs`."""
    rc_dir = tmp_path / "getmail"
    rc_dir.mkdir()
    (rc_dir / "getmailrc").write_text(
        "[retriever]\n"
        "type = SimplePOP3SSLRetriever\n"
        "server = 127.0.0.1\n"
        f"port = {tls.pop3s}\n"
        f"username = {user}\n"
        f"password = {USERS[user]}\n"
        f"ca_certs = {ca}\n"
        f"timeout = {CLIENT_TIMEOUT // 2}\n"
        "\n[destination]\n"
        "type = Maildir\n"
        f"path = {maildir}/\n"
        + (f"user = {deliver_as}\n" if deliver_as else "")
        + "\n[options]\n"
        "read_all = true\n"
        "delete = false\n"
        "delivered_to = false\n"
        "received = false\n"
        "verbose = 0\n"
    )
    return run([require("getmail"), "--getmaildir", str(rc_dir), "--rcfile", "getmailrc"])


def test_getmail_pop3_ssl_verifies_and_retrieves(tls: Tls, tmp_path: Path,
                                                 getmail_maildir: tuple[Path, str | None]) -> None:
    user = "gm_ssl"
    tls.mailbox(user)
    maildir, deliver_as = getmail_maildir
    result = getmail(tmp_path, tls, user, tls.files.ca, maildir, deliver_as)
    assert result.returncode == 0, result.stdout + result.stderr
    delivered = [strip_header(message, b"Return-Path") for message in maildir_messages(maildir)]
    assert sorted(delivered) == sorted(map(lf, MESSAGES))
    assert re.search(r"tls=TLSv1\.[23]/", tls.login_line(user))


def test_getmail_refuses_a_certificate_from_another_ca(tls: Tls, tmp_path: Path,
                                                       getmail_maildir: tuple[Path, str | None]) -> None:
    user = "gm_bad"
    tls.mailbox(user)
    maildir, deliver_as = getmail_maildir
    result = getmail(tmp_path, tls, user, tls.stranger_ca, maildir, deliver_as)
    assert result.returncode != 0, result.stdout + result.stderr
    assert b"CERTIFICATE_VERIFY_FAILED" in result.stdout + result.stderr
    assert maildir_messages(maildir) == []
    tls.never_tried(user)
