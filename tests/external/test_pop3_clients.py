"""Real POP3 clients against the real server: what they retrieve is byte for byte what was delivered.

poplib, curl, getmail6 and fetchmail each fetch the same set of awkward messages
(LF and CRLF files, lines starting with '.', 8-bit bytes, no final newline). curl,
getmail and fetchmail are required: a missing one fails the test, it is not skipped.
"""

from __future__ import annotations

import os
import poplib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ServerProcess, getmail_destination

MESSAGES = [
    b"From: a@example.org\nTo: alice@example.org\nSubject: lf\n\nbody\n.dot line\n..two dots\n.\nend\n",
    b"From: b@example.org\r\nSubject: crlf\r\n\r\nbody\r\n.dot\r\n.\r\n\r\n",
    b"From: c@example.org\nSubject: 8bit\n\n" + bytes(range(128, 256)) + b"\n\xc3\xa9t\xe9 \xff\xfe\n",
    b"From: d@example.org\nSubject: no final newline\n\nlast line without newline",
    b"From: e@example.org\nSubject: long\n\n"
    + b"".join(b".%05d a line that starts with a dot\n" % i if i % 2 else b"%05d plain\r\n" % i for i in range(20000)),
]
CLIENT_TIMEOUT = 60


def crlf(content: bytes) -> bytes:
    """What RETR must send for a stored message (before dot-stuffing)."""
    text = content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text if text.endswith(b"\r\n") else text + b"\r\n"


def lf(content: bytes) -> bytes:
    """What a client that stores with local (LF) line ends must write."""
    return crlf(content).replace(b"\r\n", b"\n")


def require(program: str) -> str:
    path = shutil.which(program)
    assert path, f"{program} is not installed (needed by this test; .ci/run installs it)"
    return path


@pytest.fixture
def mailbox(server: ServerProcess) -> ServerProcess:
    """The server with MESSAGES delivered to alice, in order."""
    for content in MESSAGES:
        server.deliver("alice", content)
    return server


def strip_header(message: bytes, name: bytes) -> bytes:
    """Remove the first header field `name` (with its folded lines) that a client prepended."""
    assert message.startswith(name + b":"), message[:200]
    lines = message.split(b"\n")
    end = 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"\n".join(lines[end:])


# -- poplib --------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_poplib_retrieves_exact_bytes(mailbox: ServerProcess, host: str) -> None:
    client = poplib.POP3(host, mailbox.port, timeout=CLIENT_TIMEOUT)
    assert client.getwelcome().startswith(b"+OK")
    caps = client.capa()
    for capability in ("TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION"):
        assert capability in caps
    client.user("alice")
    client.pass_("alicepw")
    count, total = client.stat()
    assert count == len(MESSAGES)
    assert total == sum(len(crlf(m)) for m in MESSAGES)
    _, listing, _ = client.list()
    assert listing == [b"%d %d" % (i + 1, len(crlf(m))) for i, m in enumerate(MESSAGES)]
    _, uids, _ = client.uidl()
    assert [u.split()[1].decode() for u in uids] == [
        os.path.basename(p).split(":")[0] for p in sorted(mailbox.message_files("alice"))
    ]
    for number, content in enumerate(MESSAGES, 1):
        _, lines, _ = client.retr(number)
        assert b"".join(line + b"\r\n" for line in lines) == crlf(content)
    _, lines, _ = client.top(1, 0)
    assert lines == crlf(MESSAGES[0]).split(b"\r\n\r\n")[0].split(b"\r\n") + [b""]
    client.dele(2)
    with pytest.raises(poplib.error_proto, match="deleted"):
        client.retr(2)
    assert client.quit().startswith(b"+OK")
    remaining = mailbox.message_files("alice")
    assert len(remaining) == len(MESSAGES) - 1


def test_poplib_wrong_password(mailbox: ServerProcess) -> None:
    client = poplib.POP3("::1", mailbox.port, timeout=CLIENT_TIMEOUT)
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("not-the-password")
    client.close()


# -- curl ----------------------------------------------------------------------

def curl(*args: str) -> bytes:
    result = subprocess.run([require("curl"), "-sS", "--max-time", str(CLIENT_TIMEOUT), *args],
                            capture_output=True, timeout=CLIENT_TIMEOUT + 10)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_curl_retrieves_exact_bytes(mailbox: ServerProcess, host: str) -> None:
    base = f"pop3://alice:alicepw@{host}:{mailbox.port}"
    for number, content in enumerate(MESSAGES, 1):
        assert curl(f"{base}/{number}") == crlf(content)
    expected_list = b"".join(b"%d %d\r\n" % (i + 1, len(crlf(m))) for i, m in enumerate(MESSAGES))
    assert curl("-l", f"{base}/") == expected_list
    uids = [os.path.basename(p).split(":")[0] for p in sorted(mailbox.message_files("alice"))]
    assert curl("-X", "UIDL", f"{base}/") == b"".join(b"%d %s\r\n" % (i + 1, u.encode()) for i, u in enumerate(uids))
    assert curl("-X", "TOP 2 0", f"{base}/") == b"From: b@example.org\r\nSubject: crlf\r\n\r\n"


def test_curl_dele_and_bad_password(mailbox: ServerProcess) -> None:
    base = f"pop3://alice:alicepw@127.0.0.1:{mailbox.port}"
    first = mailbox.message_files("alice")[0]
    curl("-X", "DELE 1", "-I", f"{base}/")
    assert not os.path.exists(first)
    assert curl("-l", f"{base}/").startswith(b"1 %d\r\n" % len(crlf(MESSAGES[1])))
    result = subprocess.run([require("curl"), "-sS", f"pop3://alice:wrong@127.0.0.1:{mailbox.port}/1"],
                            capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 67  # CURLE_LOGIN_DENIED
    assert len(mailbox.message_files("alice")) == len(MESSAGES) - 1


# -- getmail6 ------------------------------------------------------------------

@pytest.fixture
def maildir_destination() -> Iterator[tuple[Path, str | None]]:
    with getmail_destination() as destination:
        yield destination


def run_getmail(tmp_path: Path, port: int, dest: Path, user: str | None, delete: bool) -> None:
    rc_dir = tmp_path / "getmail"
    rc_dir.mkdir(exist_ok=True)
    (rc_dir / "getmailrc").write_text(
        "[retriever]\n"
        "type = SimplePOP3Retriever\n"
        "server = 127.0.0.1\n"
        f"port = {port}\n"
        "username = alice\n"
        "password = alicepw\n"
        "\n[destination]\n"
        "type = Maildir\n"
        f"path = {dest}/\n"
        + (f"user = {user}\n" if user else "")
        + "\n[options]\n"
        "read_all = true\n"
        f"delete = {str(delete).lower()}\n"
        "delivered_to = false\n"
        "received = false\n"
        "verbose = 0\n"
    )
    result = subprocess.run([require("getmail"), "--getmaildir", str(rc_dir), "--rcfile", "getmailrc"],
                            capture_output=True, timeout=CLIENT_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


def read_maildir(dest: Path) -> list[bytes]:
    return [(dest / "new" / name).read_bytes() for name in os.listdir(dest / "new")]


def test_getmail_retrieves_exact_bytes_then_deletes(
    mailbox: ServerProcess, tmp_path: Path, maildir_destination: tuple[Path, str | None]
) -> None:
    dest, user = maildir_destination
    run_getmail(tmp_path, mailbox.port, dest, user, delete=False)
    got = [strip_header(m, b"Return-Path") for m in read_maildir(dest)]
    assert sorted(got) == sorted(lf(m) for m in MESSAGES)
    assert len(mailbox.message_files("alice")) == len(MESSAGES)

    for name in os.listdir(dest / "new"):
        os.unlink(dest / "new" / name)
    run_getmail(tmp_path, mailbox.port, dest, user, delete=True)
    got = [strip_header(m, b"Return-Path") for m in read_maildir(dest)]
    assert sorted(got) == sorted(lf(m) for m in MESSAGES)
    assert mailbox.message_files("alice") == []


# -- fetchmail -----------------------------------------------------------------

MDA_SCRIPT = """\
import os, sys, time
data = sys.stdin.buffer.read()
name = os.path.join(sys.argv[1], f"{time.time_ns()}.{os.getpid()}")
with open(name + ".tmp", "wb") as handle:
    handle.write(data)
os.rename(name + ".tmp", name)
"""


def run_fetchmail(tmp_path: Path, port: int, keep: bool) -> list[bytes]:
    """Fetch alice's mail with fetchmail into a fresh directory; one file per message."""
    home = tmp_path / "fetchmail"
    out = home / ("kept" if keep else "flushed")
    out.mkdir(parents=True)
    mda = home / "mda.py"
    mda.write_text(MDA_SCRIPT)
    rcfile = home / "fetchmailrc"
    rcfile.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 protocol pop3 port {port}\n"
        '  user "alice" there with password "alicepw" is "root" here\n'
        f"  {'keep' if keep else 'nokeep'} fetchall no rewrite sslproto ''\n"
        f'  mda "{sys.executable} {mda} {out}"\n'
    )
    rcfile.chmod(0o600)
    env = dict(os.environ, HOME=str(home), FETCHMAILHOME=str(home))
    result = subprocess.run(
        [require("fetchmail"), "-f", str(rcfile), "--nosyslog", "--nodetach", "-v"],
        capture_output=True, env=env, timeout=CLIENT_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [(out / name).read_bytes() for name in os.listdir(out) if not name.endswith(".tmp")]


def test_fetchmail_retrieves_exact_bytes_keep_then_delete(mailbox: ServerProcess, tmp_path: Path) -> None:
    expected = sorted(lf(m) for m in MESSAGES)
    kept = run_fetchmail(tmp_path, mailbox.port, keep=True)
    assert sorted(strip_header(m, b"Received") for m in kept) == expected
    assert len(mailbox.message_files("alice")) == len(MESSAGES)

    flushed = run_fetchmail(tmp_path, mailbox.port, keep=False)
    assert sorted(strip_header(m, b"Received") for m in flushed) == expected
    assert mailbox.message_files("alice") == []
