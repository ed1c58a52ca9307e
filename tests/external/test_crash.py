"""SIGKILL under load, 20 times: no mail lost, none resurrected, no torn or doubled file, no acknowledged user lost.

The short, seeded version of `python -m loadtest.crash --kills 1000` (docs/reliability.md):
the same run on the suite's ServerProcess, restarted on the same directories after
every kill.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from helpers import ADMIN, ServerProcess

from loadtest.crash import run_crash

MAILBOXES = {f"mbox{i}": f"mbox{i}pw" for i in range(6)}


def test_crash_run_keeps_every_invariant(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(users=MAILBOXES, listen=["127.0.0.1"], admin_listen=["127.0.0.1"])
    started = time.monotonic()
    report = run_crash(server, MAILBOXES, ADMIN, kills=20, seed=20, workers=4)
    assert report.ok, "\n".join(report.lines())
    counts = report.counts
    # The run did what it claims: mail went both ways, kills landed right after QUITs, users were added.
    assert counts["messages deleted, acknowledged"] > 0, report.lines()
    assert counts["messages retrieved in full"] > counts["messages deleted, acknowledged"], report.lines()
    assert counts["kills right after a QUIT"] > 0, report.lines()
    assert counts["msmp ADD acknowledged"] > 0, report.lines()
    assert time.monotonic() - started < 90
    # And the server still stops cleanly after all that.
    assert server.stop(signal.SIGTERM) == 0

