"""The Locust suite cannot rot: a short headless run of every user class, gates on.

It runs `python -m loadtest.run --scenario smoke` as an operator would: a real
geventpop3 on an ephemeral loopback port, a freshly made user pool, a few users of each
class (download-and-delete, poller, idle holder, admin watcher) for a few seconds. The
gates (at most 1% failed requests, p95 of every POP3 step under 5 s) must pass. A
shorter run does the same over implicit TLS with the test session's CA. The load
tools' parts (client, gate, pool) are tested beside them, in loadtest/tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import TlsFiles

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


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def test_instruction_count_is_repeatable() -> None:
    """`loadtest.instructions` (callgrind) counts the same work the same, to within 2 % over 40 sessions."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.instructions", "--tree", f"a={REPO}", "--tree", f"b={REPO}",
         "--sessions", "40", "--warm-up", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    figures = [float(value) for value in re.findall(r"^[ab]: ([0-9.]+) M per session", done.stdout, re.M)]
    assert len(figures) == 2 and 0.5 < figures[0] < 20  # about 2.2 M instructions per full session here
    assert abs(figures[1] / figures[0] - 1) < 0.02, done.stdout
