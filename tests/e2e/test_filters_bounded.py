"""Filters are bounded (issue 9, point 12), through the real server over loopback.

Output past `transformer_max_output` fails the filter and leaves no big file; a
grandchild that left the filter's session with `setsid` is killed when the filter
ends; a client that leaves during a slow first login frees its mailbox at once and
no further filter starts for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import LineClient, ServerProcess, can_login, filter_tmp_dir, wait_until

SMALL = b"Subject: tiny\n\n24 bytes of mail\n"


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Replaces pytest's for this module: filters (as `nobody` when the tests run as root)
    must reach their scripts and the files they write."""
    with filter_tmp_dir() as path:
        yield path


def script(directory: Path, name: str, body: str) -> str:
    path = directory / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def large_files(root: Path, limit: int) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and path.stat().st_size > limit]


def test_output_over_the_cap_fails_the_filter_and_leaves_no_big_file(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(extra_args=["-t", "head -c 300000000 /dev/zero"],
                          config="transformer_max_output = 1048576\n")
    server.deliver("alice", SMALL)
    with LineClient(server.port, timeout=60) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        assert client.cmd("RETR 1").startswith(b"-ERR [SYS/TEMP]")
        assert client.cmd("QUIT").startswith(b"+OK")
    assert "kind=output over transformer_max_output" in server.log()
    assert large_files(server.root, 2 << 20) == []  # nothing near 300 MB (or even the 1 MiB cap) is left


def test_passthrough_sends_the_original_when_the_output_is_too_large(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(extra_args=["-t", "head -c 300000000 /dev/zero"],
                          config='transformer_max_output = 1048576\ntransformer_failure = "passthrough"\n')
    server.deliver("alice", SMALL)
    with LineClient(server.port, timeout=60) as client:
        assert client.login("alice", "alicepw").startswith(b"+OK")
        original = SMALL.replace(b"\n", b"\r\n")
        assert client.cmd("STAT") == b"+OK 1 %d" % len(original)
        assert client.multi("RETR 1")[1] == original


def test_a_setsid_grandchild_is_killed_when_the_filter_ends(start_server: Callable[..., ServerProcess],
                                                            tmp_path: Path) -> None:
    marker = tmp_path / "grandchild"
    escaping = script(tmp_path, "escape.sh", f"""\
        setsid sh -c 'echo $$ > {marker}.tmp && mv {marker}.tmp {marker}; exec sleep 300' \\
            </dev/null >/dev/null 2>&1 &
        while [ ! -s {marker} ]; do sleep 0.01; done
        exec cat
    """)
    server = start_server(extra_args=["-t", escaping])
    server.deliver("alice", SMALL)
    grandchild = 0
    try:
        with LineClient(server.port, timeout=30) as client:
            assert client.login("alice", "alicepw").startswith(b"+OK")
            grandchild = int(marker.read_text())
            assert client.multi("RETR 1")[1] == SMALL.replace(b"\n", b"\r\n")  # the filter itself succeeded
            wait_until(lambda: not alive(grandchild), timeout=5)
            assert client.cmd("QUIT").startswith(b"+OK")
        assert server.running
    finally:
        if grandchild and alive(grandchild):
            with contextlib.suppress(OSError):
                os.kill(grandchild, signal.SIGKILL)


def test_a_client_gone_during_a_slow_first_login_frees_the_mailbox(start_server: Callable[..., ServerProcess],
                                                                   tmp_path: Path) -> None:
    started = tmp_path / "started"
    started.mkdir()
    started.chmod(0o777)  # filters may run as nobody
    slow = script(tmp_path, "slow.sh", f"""\
        echo $$ > {started}/$$
        sleep 1
        exec cat
    """)
    server = start_server(extra_args=["-t", slow], config="transformer_concurrency = 1\n")
    for i in range(20):
        server.deliver("alice", SMALL.replace(b"tiny", f"tiny {i}".encode()))

    client = LineClient(server.port, timeout=30)
    assert client.cmd("USER alice").startswith(b"+OK")
    client.send(b"PASS alicepw\r\n")  # the login now filters 20 messages, one at a time: about 20 s
    wait_until(lambda: any(started.iterdir()))
    client.sock.shutdown(socket.SHUT_RDWR)
    client.close()

    with server.admin_client() as msmp:
        assert msmp.set("transformer", "none") == "Changed value"  # the next login need not filter
    wait_until(lambda: can_login(server, "alice"), timeout=5)  # the lock was released: no [IN-USE]
    pids = [int(path.name) for path in started.iterdir()]
    assert len(pids) <= 3  # no filter started once the client was seen gone
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=5)  # and the running one was killed
    assert "client gone while filtering" in server.log()
    assert len(list(started.iterdir())) == len(pids)
