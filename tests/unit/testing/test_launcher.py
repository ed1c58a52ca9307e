"""geventpop3.testing's launcher on stand-in children (`python -c`): ready file, early exit,
process-group clean-up, and the child's import path. The real server: tests/e2e."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
from helpers import wait_until

from geventpop3.testing import launcher

# A stand-in server: writes the ready file (the last argument) after `delay` s, then waits for a signal.
READY_AFTER = """import json, os, sys, time
time.sleep(float(sys.argv[1]))
path = sys.argv[-1]
with open(path + ".tmp", "w") as handle:
    json.dump({"pid": os.getpid(), "pop3": [{"host": "127.0.0.1", "port": 1100}]}, handle)
os.replace(path + ".tmp", path)
time.sleep(60)
"""
# Leaves a grandchild in its process group, then exits at SIGTERM (as a supervisor whose worker hangs).
WITH_GRANDCHILD = """import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(sys.argv[-1], "w").write('{"pid": %d, "grandchild": %d}' % (os.getpid(), child.pid))
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
time.sleep(60)
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def test_start_returns_the_endpoints_of_the_ready_file_once_written(tmp_path: Path) -> None:
    (tmp_path / "ready.json").write_text('{"pid": 1}')  # left by a killed run: must not be taken
    process, served = launcher.start(python(READY_AFTER, "0.3"), ready_file=tmp_path / "ready.json",
                                     log_path=tmp_path / "log", timeout=30)
    try:
        assert served == {"pid": process.pid, "pop3": [{"host": "127.0.0.1", "port": 1100}]}
        assert os.getpgid(process.pid) == process.pid  # leads its own process group
    finally:
        assert launcher.stop(process) == -signal.SIGTERM


def test_an_exit_before_ready_is_a_launch_error_with_its_status_and_output_in_the_log(tmp_path: Path) -> None:
    with pytest.raises(launcher.LaunchError, match="exited 3 during start-up") as failed:
        launcher.start(python("import sys; print('no config'); sys.exit(3)"), ready_file=tmp_path / "ready.json",
                       log_path=tmp_path / "log", timeout=30)
    assert failed.value.returncode == 3
    assert (tmp_path / "log").read_text() == "no config\n"


def test_not_ready_in_time_is_a_launch_error_and_the_child_is_killed(tmp_path: Path) -> None:
    started: list[object] = []
    with pytest.raises(launcher.LaunchError, match="not ready within 0.5 s") as failed:
        launcher.start(python(READY_AFTER, "60"), ready_file=tmp_path / "ready.json", log_path=tmp_path / "log",
                       timeout=0.5, started=started)  # type: ignore[arg-type]
    assert failed.value.returncode is None
    assert started[0].returncode == -signal.SIGKILL  # type: ignore[attr-defined]


@pytest.mark.parametrize("kill_group", [True, False])
def test_stop_ends_what_is_left_of_the_group_only_when_asked(tmp_path: Path, kill_group: bool) -> None:
    process, served = launcher.start(python(WITH_GRANDCHILD), ready_file=tmp_path / "ready.json",
                                     log_path=tmp_path / "log", timeout=30)
    grandchild = psutil.Process(served["grandchild"])
    try:
        assert launcher.stop(process, kill_group=kill_group) == 0
        if kill_group:
            wait_until(lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE)
        else:
            assert grandchild.is_running() and grandchild.status() != psutil.STATUS_ZOMBIE
    finally:
        if grandchild.is_running():
            grandchild.kill()


def test_the_child_imports_this_copy_of_geventpop3_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/elsewhere", launcher.SOURCE]))
    paths = launcher.child_env({"EXTRA": "1"}, Path("/tmp/x"))["PYTHONPATH"].split(os.pathsep)
    assert paths == [launcher.SOURCE, "/elsewhere"]
    env = launcher.child_env({"EXTRA": "1"}, Path("/tmp/x"))
    assert (env["EXTRA"], env["TMPDIR"]) == ("1", "/tmp/x")
    assert json.loads(json.dumps(env)) == env  # plain strings only: an environment
