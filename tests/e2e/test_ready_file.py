"""`--ready-file`: with port 0 the server says which ports it got, once it serves, and takes it back at stop."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from helpers import GEVENTPOP3, REPO, LineClient, make_tls_files, run_server, server_env, wait_until


def start(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*GEVENTPOP3, "-l", "127.0.0.1", "-p", "0", "-L", "127.0.0.1", "-P", "0",
                             "-d", str(tmp_path / "mail"), "--no-state", *args], cwd=REPO, env=server_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_the_ready_file_names_the_ports_that_serve_and_goes_at_stop(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    ready = tmp_path / "ready.json"
    server = start(tmp_path, "--ready-file", str(ready), *tls.server_args(0), "--metrics-port", "0")
    try:
        served = json.loads(wait_until(lambda: ready.exists() and ready.read_text()))
        assert served["pid"] == server.pid and served["pop3s"] == []
        assert [endpoint["host"] for endpoint in served["pop3"] + served["msmp"] + served["metrics"]] == \
            ["127.0.0.1"] * 3
        with LineClient(served["pop3"][0]["port"]) as pop3:
            assert pop3.greeting.startswith(b"+OK")
        with LineClient(served["msmp"][0]["port"]) as msmp:
            assert msmp.greeting.startswith(b"+OK MSMP1")
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
        assert not ready.exists()
        assert list(tmp_path.glob("ready.json*")) == []  # no temporary file either
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_ready_file_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    result = run_server("-p", "0", "-P", "0", "-d", str(tmp_path / "mail"), "--no-state",
                        "--ready-file", str(tmp_path / "missing" / "ready.json"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"geventpop3: --ready-file: no directory {tmp_path / 'missing'}"]


def test_a_ready_file_that_cannot_be_written_stops_the_server(tmp_path: Path) -> None:
    (tmp_path / "ready.json").mkdir()  # a directory cannot be replaced by the file
    server = start(tmp_path, "--ready-file", str(tmp_path / "ready.json"))
    _, stderr = server.communicate(timeout=30)
    assert server.returncode == 2
    assert b"cannot write ready file" in stderr and b"Traceback" not in stderr
