"""Filters in their own identity (issue 21, point 3), and the modes of what the server creates.

Real servers started as root: with `--run-as daemon` the filter is started by the
root-side filter spawner as `nobody` (the default filter user here); a server that stays
root starts it as `nobody` itself. A probe filter (a /bin/sh script written here) tries
to open another user's Maildir, plant a message in it, open the state database, a
root-only key and /proc/<pid>/mem of every server process, and reports each attempt on
stdout, which becomes the message the test retrieves.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import pwd
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LineClient, ServerProcess, chown_tree, filter_tmp_dir, run_server, wait_until

from geventpop3.mail import maildir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="filter identities need a server started as root")

DAEMON = pwd.getpwnam("daemon") if os.geteuid() == 0 else None
NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
HAM = b"Subject: hello\n\nbody\n"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Replaces pytest's: the dropped server and the filters must reach their directories and scripts."""
    with filter_tmp_dir() as path:
        yield path



def give_to_daemon(tmp_path: Path) -> None:
    """The directories start_server will use (tmp_path/server0), owned by daemon, who serves."""
    assert DAEMON is not None
    (tmp_path / "server0" / "mail").mkdir(parents=True, exist_ok=True)
    chown_tree(tmp_path, DAEMON.pw_uid, DAEMON.pw_gid)


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants, from /proc."""
    found = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    found += tree(int(child))
    return found


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting to be collected."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat_line[stat_line.rfind(")") + 2:][:1] in ("Z", "X")


def probe(directory: Path, opens: dict[str, Path], writes: dict[str, Path], pid_file: Path) -> str:
    """The probe filter: one line per attempt, `NAME open` or `NAME denied`, then who and where it is.
    The server's processes are in `pid_file`, written once it runs: `mem-PID` for each."""
    lines = ["#!/bin/sh", "cat >/dev/null", 'echo "Subject: probe"', "echo",
             f'for pid in $(cat "{pid_file}"); do',
             '  if (exec 3<"/proc/$pid/mem") 2>/dev/null; then echo "mem-$pid open"; else echo "mem-$pid denied"; fi',
             "done"]
    for name, path in opens.items():
        lines.append(f'if (exec 3<"{path}") 2>/dev/null; then echo "{name} open"; else echo "{name} denied"; fi')
    for name, path in writes.items():
        lines.append(f'if (exec 3>"{path}") 2>/dev/null; then echo "{name} open"; else echo "{name} denied"; fi')
    lines += ['echo "uid $(id -u) groups $(id -G)"', "grep NoNewPrivs /proc/self/status",
              'echo "cwd $(ls -A | wc -l) $(pwd)"']
    script = directory / "probe.sh"
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return str(script)


def retrieve(server: ServerProcess, user: str, password: str) -> str:
    with LineClient(server.port, timeout=30) as client:
        assert client.login(user, password).startswith(b"+OK")
        body = client.multi("RETR 1")[1]
        assert client.cmd("QUIT").startswith(b"+OK")
    return body.decode()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


SETUPS = {
    "run-as, 1 worker": (["--run-as", "daemon", "--run-as-group", "daemon"], 1),
    "run-as, 2 workers": (["--run-as", "daemon", "--run-as-group", "daemon"], 2),
    "root, 2 workers": ([], 2),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_filter_can_reach_nothing_but_its_message(start_server: Callable[..., ServerProcess], tmp_path: Path,
                                                    setup: str) -> None:
    assert DAEMON is not None and NOBODY is not None
    args, workers = SETUPS[setup]
    run_as = bool(args)
    fresh = tmp_path / "fresh"  # the server creates the Maildir root and the state directory in here
    fresh.mkdir()
    if run_as:
        give_to_daemon(tmp_path)
    mail, state = fresh / "mail", fresh / "state"
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chown(key, 0, 0)
    key.chmod(0o600)
    users = tmp_path / "users"  # as deploy.md says: the server user's, 0600
    users.write_text("dave:davepw\n")
    users.chmod(0o600)
    if run_as:
        os.chown(users, DAEMON.pw_uid, DAEMON.pw_gid)
    pid_file = tmp_path / "pids"
    bob_message = mail / "bob" / "new" / "1.M1P1.host"  # delivered once the server made the root
    opens = {"maildir": bob_message, "listing": mail / "bob" / "new", "state": state / "geventpop3.db", "key": key,
             "users": users}
    script = probe(tmp_path, opens, {"plant": mail / "bob" / "new" / "planted", "root": mail / "planted"}, pid_file)
    server = start_server(workers=workers, extra_args=[*args, "-d", str(mail), "--state-dir", str(state),
                                                       "--users-file", str(users), "-t", script])
    assert server.process is not None
    maildir.deliver(str(mail / "bob"), b"Subject: bob's\n\nsecret\n")
    next((mail / "bob" / "new").iterdir()).rename(bob_message)
    maildir.deliver(str(mail / "alice"), HAM)
    if run_as:
        chown_tree(mail, DAEMON.pw_uid, DAEMON.pw_gid)
    pids = tree(server.process.pid)
    assert len(pids) >= 2  # with --run-as the spawner, with workers the workers
    pid_file.write_text(" ".join(map(str, pids)) + "\n")
    report = retrieve(server, "alice", "alicepw")

    for pid in pids:
        assert f"mem-{pid} denied" in report, report
    for name in [*opens, "plant", "root"]:
        assert f"{name} denied" in report, report
    nogroup = NOBODY.pw_gid
    assert f"uid {NOBODY.pw_uid} groups {nogroup}\r\n" in report
    assert re.search(r"NoNewPrivs:\s+1", report)
    assert re.search(r"cwd 0 /\S+", report)  # an empty directory
    assert not (mail / "bob" / "new" / "planted").exists()

    # What the server created: nothing for others to read.
    assert mode(mail) == 0o700
    assert mode(state) == 0o700
    for name in ("geventpop3.db", "geventpop3.db-wal", "geventpop3.db-shm"):
        if (state / name).exists():
            assert mode(state / name) == 0o600, name
    assert mode(state / "filtered") == 0o700
    for path in (state / "filtered").rglob("*"):
        assert mode(path) & 0o077 == 0, path
    log = server.log()
    assert "Traceback" not in log


def spawner_name(server_pid: int) -> str:
    """The abstract socket of the server's filter spawner, from /proc/net/unix."""
    pids = set(tree(server_pid))
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("@geventpop3-filter-"):
            owner = int(fields[7].split("-")[2])
            if owner in pids:
                return fields[7][1:]
    raise AssertionError("no filter spawner socket")


def test_the_spawner_serves_only_the_server_user(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    assert DAEMON is not None
    give_to_daemon(tmp_path)
    server = start_server(extra_args=["--run-as", "daemon", "--run-as-group", "daemon"])
    assert server.process is not None
    name = spawner_name(server.process.pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:  # root here: not the server's user
        sock.settimeout(10)
        sock.connect("\0" + name)
        with open(os.devnull, "rb") as null:
            fd = null.fileno()
            request = json.dumps({"argv": ["/bin/true"], "env": {}, "max_output": 10, "timeout": 5}).encode()
            fds = array.array("i", [fd, fd, fd]).tobytes()
            try:
                sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                answer = sock.recv(4096)
            except (BrokenPipeError, ConnectionResetError):  # closed before or with the request unread
                answer = b""
        assert answer == b""  # closed without an answer
    wait_until(lambda: "filter spawner: refused a connection from uid 0" in server.log())
    roots = [pid for pid in tree(server.process.pid) if os.stat(f"/proc/{pid}").st_uid == 0]
    spawners = [pid for pid in roots if Path(f"/proc/{pid}/comm").read_text().strip() == "gp3-filterspawn"]
    assert roots == spawners and len(spawners) == 1  # the only root process: it reads no network input
    assert os.stat(f"/proc/{server.process.pid}").st_uid == DAEMON.pw_uid
    server.stop()
    wait_until(lambda: gone(spawners[0]), timeout=10)  # it ends with the server


def test_the_spawner_kills_a_filter_whose_login_is_abandoned_and_what_it_left(
        start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    assert DAEMON is not None
    pids = tmp_path / "pids"
    pids.mkdir(mode=0o777)
    pids.chmod(0o777)
    script = tmp_path / "stuck.sh"
    script.write_text(f"#!/bin/sh\nsetsid sh -c 'echo $$ > {pids}/escaped; exec sleep 120' &\n"
                      f"echo $$ > {pids}/filter\nexec sleep 120\n")
    script.chmod(0o755)
    give_to_daemon(tmp_path)
    server = start_server(extra_args=["--run-as", "daemon", "--run-as-group", "daemon", "-t", str(script)])
    server.deliver("alice", HAM)
    chown_tree(server.maildir, DAEMON.pw_uid, DAEMON.pw_gid)
    client = LineClient(server.port, timeout=30)
    client.cmd("USER alice")
    client.send(b"PASS alicepw\r\n")
    wait_until(lambda: (pids / "filter").exists() and (pids / "escaped").exists()
               and (pids / "escaped").read_text().strip() != "")
    filter_pid, escaped_pid = (int((pids / name).read_text()) for name in ("filter", "escaped"))
    client.close()  # the login is abandoned: the worker closes its spawner connection, the spawner kills
    wait_until(lambda: gone(filter_pid) and gone(escaped_pid), timeout=15)


@pytest.mark.parametrize(("args", "message"), [
    (["--filter-user", "root"], "--filter-user root: filters never run as root"),
    (["--filter-user", "0"], "filters never run as root"),
    (["--run-as", "daemon", "--filter-user", "daemon"], "--filter-user daemon: that is the server's own user"),
    (["--run-as", "nobody", "-t", "cat"], "filters would run as nobody, the server's own user"),
    (["--filter-user", "no-such-user-xyz"], "unknown user 'no-such-user-xyz' for --filter-user"),
])
def test_a_filter_user_that_is_root_or_the_server_is_refused(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_server("-p", "0", "-P", "0", "-d", str(tmp_path / "mail"), "--no-state", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_the_spawner_enforces_the_timeout_and_reports_stderr(start_server: Callable[..., ServerProcess],
                                                            tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir(mode=0o777)
    pids.chmod(0o777)
    script = tmp_path / "slow.sh"
    script.write_text(f"#!/bin/sh\necho $$ > {pids}/filter\necho complaint >&2\nexec sleep 120\n")
    script.chmod(0o755)
    give_to_daemon(tmp_path)
    server = start_server(config="transformer_timeout = 1\n",
                          extra_args=["--run-as", "daemon", "--run-as-group", "daemon", "-t", str(script)])
    server.deliver("alice", HAM)
    assert DAEMON is not None
    chown_tree(server.maildir, DAEMON.pw_uid, DAEMON.pw_gid)
    started = time.monotonic()
    with LineClient(server.port, timeout=30) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        assert client.cmd("RETR 1").startswith(b"-ERR")  # the default policy: the message fails
    assert time.monotonic() - started < 15
    assert gone(int((pids / "filter").read_text()))
    wait_until(lambda: "kind=timeout" in server.log() and "complaint" in server.log())
