"""The load tools' own parts: the POP3 load client over TLS, the run's gates, the user pool.

The whole tools run as an operator runs them in tests/external/test_loadtest_smoke.py.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventpop3.testing import Pop3TestServer
from loadtest.pop3_client import Pop3Client, Pop3ConnectionError, unstuff
from loadtest.run import gate
from loadtest.setup_pool import corpus_sizes, create_pool, load_pool


@pytest.fixture(scope="module")
def tls_server() -> Iterator[Pop3TestServer]:
    """A server with alice, STLS on its port and implicit TLS on its POP3S port."""
    with Pop3TestServer(users={"alice": "alicepw"}, tls=True) as server:
        yield server


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_load_client_speaks_tls_and_verifies(tls_server: Pop3TestServer, mode: str) -> None:
    server = tls_server
    server.clear()
    content = b"Subject: load over TLS\n\n.dot line\nbody\n"
    server.deliver("alice", content)
    port = server.pop3s_port if mode == "implicit" else server.port
    assert port is not None
    steps: list[str] = []
    client = Pop3Client("127.0.0.1", port, timeout=10, on_step=lambda name, *_: steps.append(name),
                        ssl_context=server.ssl_context(), starttls=mode == "starttls")
    assert client.connect()
    assert client.tls_version and client.tls_version.startswith("TLSv1.")
    client.login("alice", "alicepw")
    assert client.stat()[0] == 1
    assert unstuff(client.retr(1)) == content.replace(b"\n", b"\r\n")
    client.quit()
    assert steps == ["CONNECT", "LOGIN", "STAT", "RETR", "QUIT"]
    # A server the client cannot verify is a failed CONNECT, reported as such.
    failed: list[BaseException | None] = []
    untrusting = Pop3Client("127.0.0.1", port, timeout=10, on_step=lambda *args: failed.append(args[3]),
                            ssl_context=ssl.create_default_context(), starttls=mode == "starttls")
    with pytest.raises(Pop3ConnectionError, match="certificate verify failed"):
        untrusting.connect()
    assert not untrusting.connected and isinstance(failed[0], Pop3ConnectionError)


def _row(kind: str, name: str, count: int, failures: int, p95_ms: float | str) -> dict[str, str]:
    return {"Type": kind, "Name": name, "Request Count": str(count), "Failure Count": str(failures),
            "95%": str(p95_ms), "50%": "1", "Requests/s": "1"}


def test_gate_fails_on_error_ratio_and_slow_steps() -> None:
    ok = [_row("POP3", "RETR", 1000, 10, 120), _row("MSMP", "STAT", 100, 0, 3)]
    assert gate(ok, max_fail_ratio=0.01, max_p95=5.0) == (True, [])
    passed, reasons = gate([_row("POP3", "RETR", 1000, 11, 120)], 0.01, 5.0)
    assert not passed and "11 of 1000" in reasons[0]
    passed, reasons = gate([_row("POP3", "LOGIN", 10, 0, 5100)], 0.01, 5.0)
    assert not passed and "LOGIN" in reasons[0]
    # Whole sessions are reported too, but are not requests: they do not count.
    assert gate([_row("POP3", "RETR", 10, 0, 1), _row("SESSION", "download-and-delete", 10, 10, 9000)], 0.01, 5)[0]
    assert not gate([], 0.01, 5.0)[0]  # no request at all is a failed run
    assert gate([_row("POP3", "LOGIN", 10, 0, 5100)], 0.01, 6.0)[0]  # thresholds are options


def test_pool_is_one_mailbox_per_user_and_refills(tmp_path: Path) -> None:
    sizes = corpus_sizes()
    assert len(sizes) == 30 and sum(sizes) == 30 * 26 * 1024
    pool = create_pool(tmp_path / "pool", {"dd": 3, "poll": 2, "idle": 2})
    again = load_pool(tmp_path / "pool")
    names = [n for group in again.users.values() for n in group]
    assert len(names) == len(set(names)) == 7
    assert set(again.passwords) >= set(names)
    hashed = dict(line.split(":", 1) for line in pool.users_hashed.read_text().splitlines())
    assert all(value.startswith("$scrypt$n=256,") for value in hashed.values())
    box = pool.maildir / "dd00001" / "new"
    assert len(os.listdir(box)) == 30
    for name in os.listdir(box)[:12]:
        os.unlink(box / name)
    assert pool.refill("dd00001") == 12
    assert len(os.listdir(box)) == 30
    assert pool.refill("dd00001") == 0


@pytest.mark.slow
def test_heap_per_session_reports_a_plausible_figure(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import heap_per_session

    repo = Path(__file__).resolve().parents[2]
    assert heap_per_session.main(["--tree", f"here={repo}", "--sessions", "60", "--rounds", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    figure = float(out.rsplit("median ", 1)[1].split(" B", 1)[0])
    assert 500 < figure < 20_000  # a socket pair, a session and its protocol: about 2.4 KB here
    assert "/geventpop3/" in out  # the growth is attributed to the server's own lines


@pytest.mark.slow
def test_noop_cost_with_fewer_sessions_than_in_flight() -> None:
    """It hung when --sessions < --in-flight: every session now has at most one NOOP out.
    Run as an operator runs it (this process's `select` is gevent's, without epoll)."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.noop_cost", "--tree", f"here={repo}", "--sessions", "3", "--rounds", "20",
         "--in-flight", "100", "--ab-rounds", "1", "--workers", "1"],
        cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "here" in done.stdout and "NOOP" in done.stdout, done.stdout
