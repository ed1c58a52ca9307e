"""Privileges (issue 9, point 1): bind as root, then run as --run-as; filters never as root.

Started as root (CI is), the server really drops: /proc/<pid>/status shows the new
user and group, it still serves POP3 on the port it bound before, and a filter's
`id -u` is `nobody`'s (the default filter user), never the server's. The directories are
chowned to `daemon`, which Debian has, so the server's user and the filter's differ.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LineClient, ServerProcess, chown_tree, filter_tmp_dir, run_server, wait_until

from geventpop3.service.privileges import ROOT_WARNING

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege tests must start the server as root")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
DAEMON = pwd.getpwnam("daemon") if os.geteuid() == 0 else None
ID_FILTER = "sh -c 'id -u; id -g; cat'"  # run without a shell by the server; sh is just the program
HAM = b"Subject: hello\n\nbody\n"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Replaces pytest's for this module: the dropped server must reach its directories."""
    with filter_tmp_dir() as path:
        yield path



def ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {name: [int(x) for x in value.split()] for name, value in re.findall(r"^(\w+):\t(.*)$", status, re.M)
              if name in ("Uid", "Gid", "Groups")}
    return fields["Uid"], fields["Gid"], fields.get("Groups", [])


def filtered_ids(server: ServerProcess) -> tuple[int, int]:
    with LineClient(server.port, timeout=30) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        body = client.multi("RETR 1")[1]
        assert client.cmd("QUIT").startswith(b"+OK")
    uid, gid = body.split(b"\r\n")[:2]
    return int(uid), int(gid)


def test_run_as_drops_to_the_user_and_still_serves(start_server: Callable[..., ServerProcess],
                                                   tmp_path: Path) -> None:
    assert NOBODY is not None and DAEMON is not None
    root = tmp_path / "server0"  # what start_server will use
    (root / "mail").mkdir(parents=True)
    chown_tree(tmp_path, DAEMON.pw_uid, DAEMON.pw_gid)
    group = grp.getgrgid(DAEMON.pw_gid).gr_name
    server = start_server(extra_args=["-t", ID_FILTER, "--run-as", "daemon", "--run-as-group", group])
    assert server.process is not None
    pid = server.process.pid
    # The kernel accepts on a listener as soon as it is bound, which is before the drop.
    wait_until(lambda: "running as user daemon" in server.log())
    uids, gids, groups = ids(pid)
    assert uids == [DAEMON.pw_uid] * 4 and gids == [DAEMON.pw_gid] * 4
    assert 0 not in groups
    server.deliver("alice", HAM)
    chown_tree(root / "mail", DAEMON.pw_uid, DAEMON.pw_gid)
    # The filter runs as the filter user, started by the root-side spawner, not as the server's user.
    assert filtered_ids(server) == (NOBODY.pw_uid, grp.getgrnam("nogroup").gr_gid)
    log = server.log()
    assert "running as user daemon" in log and ROOT_WARNING not in log
    assert [line for line in log.splitlines() if "Traceback" in line] == []


def test_as_root_without_run_as_warns_and_filters_run_as_nobody(start_server: Callable[..., ServerProcess]) -> None:
    assert NOBODY is not None
    server = start_server(extra_args=["-t", ID_FILTER])
    server.deliver("alice", HAM)
    assert filtered_ids(server)[0] == NOBODY.pw_uid  # never root
    assert ROOT_WARNING in server.log()


@pytest.mark.parametrize(("args", "message"), [
    (["--run-as", "no-such-user-xyz"], "unknown user 'no-such-user-xyz' for --run-as"),
    (["--run-as", "nobody", "--run-as-group", "no-such-group-xyz"], "unknown group 'no-such-group-xyz'"),
    (["--run-as-group", "nogroup"], "--run-as-group needs --run-as"),
    (["--run-as", "root"], "that is root"),
])
def test_bad_run_as_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_server("-p", "0", "-P", "0", "-d", str(tmp_path / "mail"), "--no-state", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_users_file_the_dropped_user_cannot_read_is_one_line_and_exit_2(tmp_path: Path) -> None:
    assert NOBODY is not None
    users = tmp_path / "users"
    users.write_text("alice:alicepw\n")
    users.chmod(0o600)  # root's only
    (tmp_path / "mail").mkdir()
    chown_tree(tmp_path / "mail", NOBODY.pw_uid, NOBODY.pw_gid)
    result = run_server("-p", "0", "-P", "0", "-l", "127.0.0.1", "-d", str(tmp_path / "mail"), "--no-state",
                        "--users-file", str(users), "--run-as", "nobody")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"geventpop3: cannot read users file {users}: Permission denied"]
