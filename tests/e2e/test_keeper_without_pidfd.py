"""The keeper without pidfd_open (Linux before 5.3, or valgrind, which lacks it): a worker's
exit is the end of a pipe it holds, so a killed worker is still reaped and replaced.
The server runs with the keeper's `_HAS_PIDFD` off, as on such a kernel."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
from helpers import GEVENTPOP3, LineClient, ServerProcess, wait_until, workers_of

WITHOUT_PIDFD = """
import sys
from geventpop3.process.patching import patch_all
patch_all()
import geventpop3.process.keeper as keeper
keeper._HAS_PIDFD = False
from geventpop3.cli import main
sys.exit(main())
"""


def two_workers(server: ServerProcess) -> list[int] | None:
    pids = workers_of(server)
    return pids if len(pids) == 2 else None


def test_a_killed_worker_is_replaced_without_pidfd_open(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", workers=2, listen=["127.0.0.1"], admin_listen=["127.0.0.1"])
    assert server.args[:len(GEVENTPOP3)] == GEVENTPOP3
    server.args[:len(GEVENTPOP3)] = [sys.executable, "-c", WITHOUT_PIDFD]
    try:
        server.start()
        first = wait_until(lambda: two_workers(server))
        keeper = psutil.Process(first[0]).ppid()
        links = [os.readlink(f"/proc/{keeper}/fd/{fd}") for fd in os.listdir(f"/proc/{keeper}/fd")]
        assert not any("pidfd" in link for link in links), links  # the pipes, not pidfds
        os.kill(first[0], signal.SIGKILL)
        replaced = wait_until(lambda: (pids := two_workers(server)) and first[0] not in pids and pids)
        assert first[1] in replaced
        for _ in range(4):  # whichever worker takes them
            with LineClient(server.port) as client:
                assert client.login("alice", "alicepw").startswith(b"+OK")
    finally:
        server.clean_up()
