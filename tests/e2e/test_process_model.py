"""The process model of issue 21: the keeper, workers forked from it, and who is root.

Started as root with --run-as nobody and two workers, from an interpreter nobody
cannot execute (a path through a 0700 directory of root's): the workers are forked,
not started as new interpreters, so they run all the same. Which process holds what is
read from the kernel: /proc/<pid>/status for the user, /proc/<pid>/fd and
/proc/net/tcp{,6} for the sockets, /proc/<pid>/cmdline for the process title.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    ServerProcess,
    TlsFiles,
    admin,
    filter_tmp_dir,
    free_port,
    keeper_of,
    one_per_worker,
    tls_client,
    workers_of,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server must start as root to drop to nobody")

NOBODY = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
ESTABLISHED, LISTEN = "01", "0A"


@pytest.fixture
def hidden_python() -> Iterator[Path]:
    """This interpreter, reached through a 0700 directory of root's: nobody cannot execute it."""
    directory = Path(tempfile.mkdtemp(prefix="geventpop3-python-"))
    directory.chmod(0o700)
    link = directory / "python3"
    link.symlink_to(os.path.realpath(sys.executable))
    try:
        yield link
    finally:
        link.unlink()
        directory.rmdir()


def sockets_of(pid: int) -> set[int]:
    """The inodes of the sockets `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_table() -> dict[int, tuple[int, str]]:
    """Every TCP socket of the machine: inode -> (local port, state)."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            table[int(fields[9])] = (int(fields[1].rsplit(":", 1)[1], 16), fields[3])
    return table


def uids(pid: int) -> list[int]:
    match = re.search(r"^Uid:\t(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return [int(value) for value in match.group(1).split()]


def test_run_as_with_workers_from_an_interpreter_nobody_cannot_execute(hidden_python: Path,
                                                                        tls_files: TlsFiles) -> None:
    assert NOBODY is not None
    with pytest.raises(PermissionError):  # the precondition: as nobody, this interpreter does not start
        subprocess.run([str(hidden_python), "-c", "pass"], user=NOBODY.pw_uid, group=NOBODY.pw_gid, check=False,
                       extra_groups=[])
    assert os.stat(tls_files.key).st_uid == 0 and os.stat(tls_files.key).st_mode & 0o077 == 0  # root's alone
    with filter_tmp_dir() as root:
        pop3s, metrics = free_port(), free_port()
        server = ServerProcess(root / "server", listen=["127.0.0.1"], admin_listen=["127.0.0.1"], workers=2,
                               extra_args=[*tls_files.server_args(pop3s), "--metrics-port", str(metrics),
                                           "--run-as", "nobody", "--run-as-group",
                                           grp.getgrgid(NOBODY.pw_gid).gr_name])
        server.args[0] = str(hidden_python)
        for path in [server.root, *server.root.rglob("*")]:
            os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        server.start()
        try:
            check_the_tree(server, tls_files, pop3s, metrics)
        finally:
            server.stop()
    assert "Traceback" not in server.log()


def check_the_tree(server: ServerProcess, tls_files: TlsFiles, pop3s: int, metrics: int) -> None:
    assert server.process is not None
    keeper = keeper_of(server)
    workers = workers_of(server)
    assert keeper is not None and len(workers) == 2
    assert sorted(psutil.Process(pid).cmdline()[0] for pid in workers) == ["geventpop3: worker 0",
                                                                          "geventpop3: worker 1"]
    assert uids(keeper) == [0, 0, 0, 0]  # the one process that stays root
    log = server.log()
    assert (f"listening: POP3 on 127.0.0.1:{server.port}, POP3S on 127.0.0.1:{pop3s}, "
            f"MSMP socket on {server.admin_socket}, MSMP on 127.0.0.1:{server.admin_port}, "
            f"metrics on 127.0.0.1:{metrics}") in log
    assert "geventpop3 ready:" in log and "workers=2 (worker 0 pid" in log
    assert log.count("INFO worker") == 0  # no line per worker at start: the supervisor says it once

    metrics_client = socket.create_connection(("127.0.0.1", metrics))
    with one_per_worker(server) as clients, admin(server), tls_client(pop3s, tls_files) as secure, metrics_client:
        for client, user in zip(clients.values(), ("alice", "carol"), strict=True):
            assert client.login(user, f"{user}pw").startswith(b"+OK")
        assert secure.login("bob", "bobpw").startswith(b"+OK")
        metrics_client.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")  # kept alive
        assert metrics_client.recv(64).startswith(b"HTTP/1.1 200")
        table = tcp_table()
        tree = [server.process.pid, *(child.pid for child in psutil.Process(server.process.pid).children(True))]
        held: dict[int, list[tuple[int, str]]] = {}
        for pid in tree:
            held[pid] = [table[inode] for inode in sockets_of(pid) if inode in table]
        client_ports = {server.port, pop3s, server.admin_port, metrics}
        for pid, sockets in held.items():
            serving = [(port, state) for port, state in sockets
                       if (port in client_ports and state == ESTABLISHED)
                       or (port in (server.admin_port, metrics) and state == LISTEN)]
            if serving:
                assert 0 not in uids(pid), (pid, psutil.Process(pid).cmdline(), serving)
        assert not [s for s in held[keeper] if s[1] == ESTABLISHED]  # the keeper reads no network input
        assert {(server.port, ESTABLISHED)} <= set(held[workers[0]]) | set(held[workers[1]])
        assert (pop3s, ESTABLISHED) in set(held[workers[0]]) | set(held[workers[1]])
        assert (server.admin_port, ESTABLISHED) in held[server.process.pid]
        assert (metrics, ESTABLISHED) in held[server.process.pid]
