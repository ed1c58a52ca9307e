"""Moving from Dovecot (issue 11, points 5 and 6): the real Dovecot serves a Maildir tree
first, geventpop3 then serves the same tree, and no POP3 client can tell.

The reference is Dovecot itself (dovecot-pop3d, started by tools/dovecot-peer/dovecot-peer-start.sh):
each user's UIDL and LIST as Dovecot answered them, after Dovecot moved new/ to cur/ and
wrote its dovecot-uidlist, must be what geventpop3 answers on the same files. The peer
runs Dovecot's mail processes as `vmail`, so it needs root (as the tests have here and in
CI); without Dovecot or root these tests are skipped with the reason.
"""

from __future__ import annotations

import os
import poplib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, ServerProcess, accepts, crlf, free_port, pop3, retr, wait_until

from geventpop3.mail import dovecot_uidlist

PEER_TOOLS = Path(os.environ.get("DOVECOT_PEER_TOOLS", REPO / "tools" / "dovecot-peer"))
DOVECOT_FORMAT = "%08Xu%08Xv"

# Dovecot itself comes from tools/install-system-deps.sh (CI runs it): missing, the test fails.
pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the Dovecot peer needs root (its mail processes run as vmail)")

# The same file serves both servers: Dovecot's peer script turns `name:password` into
# `name:{PLAIN}password` and passes `{SCHEME}...` entries as they are.
USERS = {"alice": "alicepw", "bob": "bob-pw.2", "carol": "carolpw", "dave": "davepw"}
# How each user's password is stored in the users file: as is (a plain password), or hashed
# by the real `doveadm pw -s SCHEME` (what a Dovecot installation's passwd-file holds).
SCHEMES = {"alice": None, "bob": "SHA512-CRYPT", "carol": "BLF-CRYPT", "dave": "ARGON2ID"}


@dataclass
class Stored:
    """One message file as the test writes it."""

    user: str
    sub: str  # new or cur
    name: str  # the file name, with ,S=/,W= and :2,flags as given
    content: bytes


def _sized(base: str, content: bytes, virtual: int | None = None) -> str:
    """A base name with Dovecot's ,S=<octets on disk>,W=<CRLF octets> (W given: a wrong one)."""
    return f"{base},S={len(content)},W={len(crlf(content)) if virtual is None else virtual}"


def mail_tree(root: Path) -> list[Stored]:
    """Several users with varied messages in new/ and cur/ (dot lines, CRLF and LF files,
    no final line end, a lone CR, names with ,S= and ,W=, an empty mailbox)."""
    big = b"".join(b"line %d of a longer message\n" % i for i in range(6000))
    plan = [
        ("alice", "new", "1733000001.M100P10.mx", b"Subject: plain\n\nhello\n.dot line\n..two dots\n"),
        ("alice", "cur", "1733000002.M200P10.mx:2,S", b"Subject: crlf\r\n\r\nno final line end"),
        ("alice", "new", _sized("1733000003.M300P10.mx", b"Subject: sized\n\nbody\n"), b"Subject: sized\n\nbody\n"),
        ("alice", "cur", _sized("1733000004.M400P10.mx", b"Subject: seen\n\n.\n") + ":2,S",
         b"Subject: seen\n\n.\n"),
        ("alice", "new", "1733000005.M500P10.mx", b"Subject: big\n\n" + big),
        ("bob", "cur", "1733000010.M1P20.mx:2,", b"Subject: lone\n\na\rb\n"),
        ("bob", "new", "1733000011.M2P20.mx", b"Subject: empty body\n\n"),
        # W= wrong but plausible (S= right): Dovecot shows W=, and so does geventpop3.
        ("carol", "new", _sized("1733000020.M1P30.mx", b"Subject: w\n\nwrong W\n", 30), b"Subject: w\n\nwrong W\n"),
        ("carol", "new", "1733000021.M2P30.mx", b"Subject: second\n\nx\n"),
    ]
    stored = []
    for user in USERS:
        for sub in ("cur", "new", "tmp"):
            (root / user / sub).mkdir(parents=True, exist_ok=True)
    for user, sub, name, content in plan:
        (root / user / sub / name).write_bytes(content)
        stored.append(Stored(user, sub, name, content))
    return stored


@contextmanager
def migration_dir() -> Iterator[Path]:
    """A directory Dovecot's vmail processes can reach (pytest's tmp_path is below a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="geventpop3-dovecot-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def dovecot(mailroot: Path, users_file: Path, uidl_format: str, save_uidl: bool = False) -> Iterator[int]:
    """The real Dovecot serving `mailroot` on a free port, stopped (and gone) on exit."""
    port = free_port()
    env = dict(os.environ, UIDL_FORMAT=uidl_format, POP3_SAVE_UIDL="yes" if save_uidl else "no")
    output = mailroot.parent / f"dovecot-{port}.out"  # a file, not a pipe: the daemon keeps its stdout open
    with open(output, "wb") as out:
        subprocess.run([str(PEER_TOOLS / "dovecot-peer-start.sh"), str(port), str(mailroot), str(users_file)],
                       env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60, check=True)
    run = Path(output.read_text().strip().splitlines()[-1])
    pid_file = run / "base" / "master.pid"
    master = None
    try:
        wait_until(lambda: accepts("127.0.0.1", port) and pid_file.exists(), timeout=20)
        master = int(pid_file.read_text())
        yield port
    finally:
        subprocess.run([str(PEER_TOOLS / "dovecot-peer-stop.sh"), str(run)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        wait_until(lambda: not _alive(master), timeout=30)  # every write of Dovecot's is done
        shutil.rmtree(run, ignore_errors=True)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


Listing = tuple[list[bytes], list[bytes]]  # UIDL lines, LIST lines (as "n value")


def listings(port: int) -> dict[str, Listing]:
    """Each user's UIDL and LIST answers, through poplib, from the server on `port`."""
    found = {}
    for user, password in USERS.items():
        session = poplib.POP3("127.0.0.1", port, timeout=30)
        try:
            session.user(user)
            session.pass_(password)
            found[user] = (session.uidl()[1], session.list()[1])
        finally:
            session.quit()
    return found


def geventpop3_on(root: Path, users_file: Path, uidl_format: str | None) -> ServerProcess:
    config = f'uidl_format = "{uidl_format}"\n' if uidl_format else ""
    return ServerProcess(root, users={}, config=config, admin=False, listen=["127.0.0.1"],
                         extra_args=["--users-file", str(users_file)])


def write_users(directory: Path) -> Path:
    lines = ["# the users file both servers read\n"]
    for user, password in USERS.items():
        scheme = SCHEMES[user]
        if scheme is not None:
            password = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True,
                                      text=True, check=True, timeout=30).stdout.strip()
            assert password.startswith(f"{{{scheme}}}"), password
        lines.append(f"{user}:{password}\n")
    path = directory / "users"
    path.write_text("".join(lines))
    return path


def uidlist_of(mailroot: Path, user: str) -> bytes:
    return (mailroot / user / dovecot_uidlist.NAME).read_bytes()


def test_dovecot_default_uidls_and_sizes_carry_over() -> None:
    """pop3_uidl_format = %08Xu%08Xv (Dovecot's default) -> uidl_format = "%08Xu%08Xv"."""
    with migration_dir() as root:
        mailroot = root / "mail"
        stored = mail_tree(mailroot)
        users_file = write_users(root)
        with dovecot(mailroot, users_file, DOVECOT_FORMAT) as port:
            before = listings(port)
        for user in USERS:  # what a migration finds: Dovecot moved new/ to cur/ and wrote its list
            assert not os.listdir(mailroot / user / "new")
            assert uidlist_of(mailroot, user).startswith(b"3 V")
        assert all(re.fullmatch(rb"\d+ [0-9a-f]{16}", line) for uidl, _ in before.values() for line in uidl)
        assert len(before["alice"][0]) == 5 and before["dave"] == ([], [])

        server = geventpop3_on(root, users_file, DOVECOT_FORMAT).start()
        try:
            assert listings(server.port) == before  # every user, same password, same UIDL and LIST
            check_sizes(server, stored, before)

            new_file = server.deliver("alice", b"Subject: after the move\n\nnew\n")
            session = pop3(server, "alice", USERS["alice"])
            uidl = session.uidl()[1]
            session.quit()
            assert uidl[:-1] == before["alice"][0]
            assert uidl[-1] == b"6 " + os.path.basename(new_file).encode()  # not in dovecot-uidlist: %f
            again = pop3(server, "alice", USERS["alice"])
            assert again.uidl()[1] == uidl  # a second session: the same UIDLs
            again.quit()
        finally:
            server.stop()


def check_sizes(server: ServerProcess, stored: list[Stored], before: dict[str, Listing]) -> None:
    """RETR sends each file's bytes (CRLF) whatever LIST says; LIST is Dovecot's size: W= from the
    name, checked here once against the CRLF size, or Dovecot's own count (which leaves out the
    CRLF POP3 adds to a file without a final line end)."""
    for user in USERS:
        by_bytes = {crlf(item.content): item for item in stored if item.user == user}
        session = pop3(server, user, USERS[user])
        try:
            for number, line in enumerate(before[user][1], 1):
                listed = int(line.split()[1])
                item = by_bytes[retr(session, number)]  # byte-exact: one of the user's files
                sent = len(crlf(item.content))
                named = dict(re.findall(r",([SW])=(\d+)", item.name))
                if "W" in named:
                    assert listed == int(named["W"])  # as Dovecot: a plausible W= is trusted
                    if user != "carol":  # carol's W= is wrong on purpose: LIST 30, RETR what the file holds
                        assert int(named["W"]) == sent and int(named["S"]) == len(item.content)
                else:
                    assert listed == (sent if item.content.endswith(b"\n") else sent - 2)
        finally:
            session.quit()


def test_saved_pop3_uidls_win_over_both_formats() -> None:
    """pop3_save_uidl = yes: Dovecot keeps the UIDLs it showed (`P`), and they win, whatever
    the format. The real migration case: UIDLs saved under one format, then the format changed."""
    with migration_dir() as root:
        mailroot = root / "mail"
        mail_tree(mailroot)
        users_file = write_users(root)
        with dovecot(mailroot, users_file, DOVECOT_FORMAT, save_uidl=True) as port:
            first = listings(port)  # UIDL saves each message's UIDL as P<uidl>
        late = mailroot / "bob" / "new" / "1733000099.M9P40.mx"
        late.write_bytes(b"Subject: between the runs\n\nlate\n")
        with dovecot(mailroot, users_file, "%f", save_uidl=True) as port:
            before = listings(port)  # the saved ones, and %f for the late one (saved as an empty P)
        assert {u: uidl for u, (uidl, _) in before.items() if u != "bob"} == \
               {u: uidl for u, (uidl, _) in first.items() if u != "bob"}
        assert before["bob"][0][:-1] == first["bob"][0] and before["bob"][0][-1].endswith(b" " + late.name.encode())
        alice_list = uidlist_of(mailroot, "alice")
        assert len(re.findall(rb" P[0-9a-f]{16} ", alice_list)) == 5
        assert re.search(rb" P :" + re.escape(late.name.encode()) + rb"\n", uidlist_of(mailroot, "bob"))

        server = geventpop3_on(root, users_file, None).start()  # uidl_format = "%f", the default
        try:
            assert listings(server.port) == before
            server.stop()
            server.args += ["--uidl-format", DOVECOT_FORMAT]
            server.start()
            assert listings(server.port) == before
        finally:
            server.stop()
