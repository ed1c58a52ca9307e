"""SIGKILL under load, 20 times: no mail lost, none resurrected, no torn or doubled file, no acknowledged user lost.

The short, seeded run of `python -m loadtest.crash` (docs/reliability.md), as an operator
runs it: its own server on loopback (one process, as the suite's), killed and restarted
on the same directories; then SIGTERM must still stop it cleanly (part of its exit status).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, server_env

pytestmark = pytest.mark.slow


def test_crash_run_keeps_every_invariant(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.crash", "--kills", "20", "--seed", "20", "--workers", "4", "--users", "6",
         "--server-workers", "1", "--dir", str(tmp_path / "crash")],
        cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "invariants: all held" in done.stdout, output
    counts = {name: int(value) for name, value in re.findall(r"^([^:\n]+): (\d+)$", done.stdout, re.M)}
    # The run did what it claims: mail went both ways, kills landed right after QUITs, users were added.
    assert counts["messages deleted, acknowledged"] > 0, output
    assert counts["messages retrieved in full"] > counts["messages deleted, acknowledged"], output
    assert counts["kills right after a QUIT"] > 0, output
    assert counts["msmp ADD acknowledged"] > 0, output
    seconds = re.search(r"^kills: 20 in (\d+) s$", done.stdout, re.M)
    assert seconds is not None and int(seconds.group(1)) < 90, output
