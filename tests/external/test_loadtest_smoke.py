"""The Locust suite cannot rot: a short headless run of every user class, gates on.

It runs `python -m loadtest.run --scenario smoke` as an operator would: a real
geventpop3 on an ephemeral loopback port, a freshly made user pool, a few users of each
class (download-and-delete, poller, idle holder, admin watcher) for a few seconds. The
gates (at most 1% failed requests, p95 of every POP3 step under 5 s) must pass. A
shorter run does the same over implicit TLS with the test session's CA, and the load
client's STLS path and certificate check are tried against a TLS server directly.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ServerProcess, TlsFiles, accepts, free_port, wait_until

from loadtest.pop3_client import Pop3Client, Pop3ConnectionError, unstuff
from loadtest.run import gate
from loadtest.setup_pool import corpus_sizes, create_pool, load_pool

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_passes_its_gates(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--scenario", "smoke", "--run-time", "4s",
         "--out", str(out), "--pool", str(tmp_path / "pool")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    summary_path = out / "summary.json"
    assert summary_path.exists(), done.stdout + done.stderr + _tail(out / "locust.log")
    summary = json.loads(summary_path.read_text())
    assert done.returncode == 0, summary["reasons"] or done.stderr
    assert summary["passed"]
    steps = summary["steps"]
    for step in ("CONNECT", "LOGIN", "STAT", "UIDL", "RETR", "DELE", "NOOP", "QUIT"):
        assert steps[f"POP3 {step}"]["count"] > 0, step
        assert steps[f"POP3 {step}"]["failures"] == 0, step
    for step in ("LOGIN", "STAT"):
        assert steps[f"MSMP {step}"]["count"] > 0, step
    assert steps["SESSION download-and-delete"]["count"] > 0
    assert summary["suite"]["idle_noop_ok"] >= 1
    assert summary["server_rss_max_kb"] > 0
    for report in ("report.html", "locust_stats.csv", "samples.csv", "summary.md"):
        assert (out / report).stat().st_size > 0, report


def test_smoke_run_over_implicit_tls(tmp_path: Path, tls_files: TlsFiles) -> None:
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "--scenario", "smoke", "--run-time", "2s", "--tls", "implicit",
         "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), "--cacert", str(tls_files.ca),
         "--log-level", "INFO", "--out", str(out), "--pool", str(tmp_path / "pool")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    summary_path = out / "summary.json"
    assert summary_path.exists(), done.stdout + done.stderr + _tail(out / "locust.log")
    summary = json.loads(summary_path.read_text())
    assert done.returncode == 0 and summary["passed"], summary["reasons"] or done.stderr
    for step in ("CONNECT", "LOGIN", "RETR", "NOOP", "QUIT"):
        assert summary["steps"][f"POP3 {step}"]["count"] > 0, step
        assert summary["steps"][f"POP3 {step}"]["failures"] == 0, step
    # Every POP3 login of the run was over TLS: the server logs each one with its protocol.
    logins = re.findall(r"pop3 login: .* tls=(\S+)", (out / "server.log").read_text())
    assert logins and all(tls.startswith("TLSv1.") for tls in logins), set(logins)


@pytest.fixture
def tls_pop3(start_server: Callable[..., ServerProcess], tls_files: TlsFiles) -> tuple[ServerProcess, int]:
    """A server with alice, STLS on its port and implicit TLS on the returned one."""
    pop3s = free_port()
    server = start_server(users={"alice": "alicepw"}, listen=["127.0.0.1"], extra_args=tls_files.server_args(pop3s))
    wait_until(lambda: accepts("127.0.0.1", pop3s))
    return server, pop3s


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_load_client_speaks_tls_and_verifies(tls_pop3: tuple[ServerProcess, int], tls_files: TlsFiles,
                                              mode: str) -> None:
    server, pop3s = tls_pop3
    content = b"Subject: load over TLS\n\n.dot line\nbody\n"
    server.deliver("alice", content)
    port = pop3s if mode == "implicit" else server.port
    steps: list[str] = []
    client = Pop3Client("127.0.0.1", port, timeout=10, on_step=lambda name, *_: steps.append(name),
                        ssl_context=tls_files.client_context(), starttls=mode == "starttls")
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


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


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
