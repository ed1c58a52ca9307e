"""geventpop3-admin (`python -m admin`) against the real server: one-shot mode, --json,
and the interactive shell in a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
from helpers import ADMIN as ADMIN_ACCOUNT
from helpers import REPO, ServerProcess, free_port, unique_name, unpatched_close

ADMIN, ADMIN_PASSWORD = ADMIN_ACCOUNT
ALICE = "alice"

EXPECT_TIMEOUT = 15


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A private HOME and inputrc: no user history or key bindings leak into the tests."""
    (tmp_path / "inputrc").write_text("set enable-bracketed-paste off\nset bell-style none\n")
    return tmp_path


def admin_env(home: Path, password: str | None = ADMIN_PASSWORD) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEVENTPOP3_ADMIN")}
    env.update(HOME=str(home), INPUTRC=str(home / "inputrc"), TERM="xterm",
               GEVENTPOP3_ADMIN_HISTORY=str(home / "history"), PYTHONPATH=str(REPO))
    if password is not None:
        env["GEVENTPOP3_ADMIN_PASSWORD"] = password
    return env


def server_flags(server: ServerProcess) -> list[str]:
    return ["-L", server.admin_host, "-P", str(server.admin_port), "-u", ADMIN]


def run_admin(server: ServerProcess, home: Path, *args: str, password: str | None = ADMIN_PASSWORD,
              flags: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """One-shot mode, as a script would run it: no terminal."""
    argv = [sys.executable, "-m", "admin", *(server_flags(server) if flags is None else flags), *args]
    return subprocess.run(argv, cwd=REPO, env=admin_env(home, password), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, start_new_session=True)


def spawn(args: list[str], home: Path, password: str | None = None) -> pexpect.spawn:
    """`python -m admin ARGS` in a pseudo-terminal."""
    with unpatched_close():
        return pexpect.spawn(sys.executable, ["-m", "admin", *args], cwd=str(REPO), env=admin_env(home, password),
                             encoding="utf-8", timeout=EXPECT_TIMEOUT, dimensions=(40, 200))


def spawn_shell(server: ServerProcess, home: Path, *flags: str, password: str | None = None) -> pexpect.spawn:
    """The interactive shell in a pseudo-terminal; by default the password is typed at the prompt."""
    child = spawn([*server_flags(server), *flags], home, password)
    if password is None:
        child.expect_exact(f"Password for {ADMIN}@")
        child.sendline(ADMIN_PASSWORD)
    child.expect_exact("msmp> ")
    return child


def finish(child: pexpect.spawn) -> int | None:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# -- the interactive shell ----------------------------------------------------------------


def test_shell_prompts_for_password_and_prints_tables(msmp_server: ServerProcess, home: Path) -> None:
    child = spawn_shell(msmp_server, home)
    assert ADMIN_PASSWORD not in child.before  # typed without echo
    child.sendline("STAT")
    child.expect(r"Total connections +\d+\r\n")
    child.expect(r"Historical maximum traffic +\d+")
    child.expect_exact("msmp> ")
    child.sendline("list")
    child.expect(rf"\r\n{ALICE}\r\n")
    child.expect_exact("msmp> ")
    child.sendline(f"LIST {ALICE}")
    child.expect(rf"name +{ALICE}\r\nlogs +\d+")
    child.expect_exact("msmp> ")
    child.sendline("GET no_such_key")
    child.expect_exact("error: Invalid key")
    child.expect_exact("msmp> ")
    child.sendline("quit")
    child.expect_exact("Bye")
    assert finish(child) == 0


def test_shell_wrong_password(msmp_server: ServerProcess, home: Path) -> None:
    child = spawn(server_flags(msmp_server), home)
    child.expect_exact("Password for")
    child.sendline("not-the-password")
    child.expect_exact("login failed: Invalid credentials")
    assert finish(child) == 1
    assert "Traceback" not in child.before


def test_tab_completion(msmp_server: ServerProcess, home: Path) -> None:
    child = spawn_shell(msmp_server, home)
    child.send("ST\t")
    child.expect_exact("STAT")
    child.send("\r")
    child.expect(r"Total connections +\d+")
    child.expect_exact("msmp> ")

    child.send("LOGS al\t")
    child.expect_exact(f"LOGS {ALICE}")
    child.send("\r")
    child.expect_exact("msmp> ")

    child.send("GET maild\t")
    child.expect_exact("GET maildir")
    child.send("\r")
    child.expect_exact(str(msmp_server.maildir))
    child.expect_exact("msmp> ")

    # User names are fetched again after ADD, so a new user completes at once.
    name = unique_name("zed")
    child.sendline(f"ADD {name} pw{name}")
    child.expect_exact("Added user")
    child.expect_exact("msmp> ")
    child.send(f"DELE {name[:4]}\t")
    child.expect_exact(f"DELE {name}")
    child.send("\r")
    child.expect_exact("Deleted user")
    child.expect_exact("msmp> ")
    child.sendeof()
    assert finish(child) == 0


def test_history_persists_without_passwords(msmp_server: ServerProcess, home: Path) -> None:
    name = unique_name("hist")
    child = spawn_shell(msmp_server, home)
    child.sendline("GET transformer")
    child.expect_exact("msmp> ")
    child.sendline(f"ADD {name} secret{name}")
    child.expect_exact("Added user")
    child.expect_exact("msmp> ")
    child.sendeof()  # Ctrl-D: leaves nothing more in the history
    assert finish(child) == 0

    history = home / "history"
    text = history.read_text()
    assert "GET transformer" in text
    assert f"secret{name}" not in text  # ADD carries a password: never in the history
    assert stat.S_IMODE(history.stat().st_mode) == 0o600

    child = spawn_shell(msmp_server, home)
    child.send("\x1b[A")  # up arrow recalls the last line of the previous session
    child.expect_exact("GET transformer")
    child.send("\r")
    child.expect_exact("msmp> ")
    child.sendline(f"DELE {name}")
    child.expect_exact("Deleted user")
    child.expect_exact("msmp> ")
    child.sendline("QUIT")
    assert finish(child) == 0


def test_watch_in_shell_returns_to_prompt(msmp_server: ServerProcess, home: Path) -> None:
    child = spawn_shell(msmp_server, home, "--interval", "0.2")
    child.sendline("watch")
    child.expect(r"refresh 1\s")
    child.expect(r"refresh 2\s")
    child.expect_exact("Total connections:")
    child.sendintr()
    child.expect_exact("msmp> ")
    child.sendline("STAT")  # the session still works (reconnected if Ctrl-C cut a command short)
    child.expect(r"Total connections +\d+")
    child.expect_exact("msmp> ")
    child.sendline("quit")
    assert finish(child) == 0


@pytest.mark.slow
def test_live_view_until_ctrl_c(msmp_server: ServerProcess, home: Path) -> None:
    child = spawn([*server_flags(msmp_server), "--watch"], home, ADMIN_PASSWORD)
    child.expect(r"refresh 1\s")
    child.expect(r"Total connections: +\d+")
    child.expect(r"refresh 2\s")
    child.sendintr()
    assert finish(child) == 0
    assert "Traceback" not in child.before


def test_piped_commands(msmp_server: ServerProcess, home: Path) -> None:
    argv = [sys.executable, "-m", "admin", *server_flags(msmp_server)]
    done = subprocess.run(argv, cwd=REPO, env=admin_env(home), input="STAT\nLIST\n", capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert "Total connections" in done.stdout
    assert f"\n{ALICE}\n" in done.stdout
    done = subprocess.run(argv, cwd=REPO, env=admin_env(home), input="GET no_such_key\nSTAT\n", capture_output=True,
                          text=True, timeout=60, start_new_session=True)
    assert done.returncode == 1  # a script learns that a command failed
    assert "error: Invalid key" in done.stderr and "Total connections" in done.stdout


# -- one-shot mode ------------------------------------------------------------------------


def test_one_shot_ok_and_err(msmp_server: ServerProcess, home: Path) -> None:
    done = run_admin(msmp_server, home, "STAT")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Total connections ")
    # One aligned table: every value starts in the same column.
    columns = {len(line) - len(line.split()[-1]) for line in lines}
    assert len(columns) == 1, lines

    done = run_admin(msmp_server, home, "GET", "no_such_key")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: Invalid key"

    done = run_admin(msmp_server, home, "LIST")
    assert done.returncode == 0
    assert ALICE in done.stdout.splitlines()

    done = run_admin(msmp_server, home, "LIST", ALICE)
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].split() == ["name", ALICE]

    done = run_admin(msmp_server, home, "LOGS", ALICE)
    assert done.returncode == 0, done.stderr


def test_one_shot_set(msmp_server: ServerProcess, home: Path) -> None:
    old = run_admin(msmp_server, home, "GET", "transformer_timeout").stdout.strip()
    try:
        done = run_admin(msmp_server, home, "SET", "transformer_timeout", "17")
        assert (done.returncode, done.stdout.strip()) == (0, "Changed value")
        assert run_admin(msmp_server, home, "GET", "transformer_timeout").stdout.strip() == "17"
    finally:
        assert run_admin(msmp_server, home, "SET", "transformer_timeout", old).returncode == 0


def test_one_shot_json(msmp_server: ServerProcess, home: Path) -> None:
    stats = json.loads(run_admin(msmp_server, home, "--json", "STAT").stdout)
    assert stats["Total connections"].isdigit()
    users = json.loads(run_admin(msmp_server, home, "--json", "LIST").stdout)
    assert ALICE in users
    info = json.loads(run_admin(msmp_server, home, "--json", "LIST", ALICE).stdout)
    assert info["name"] == ALICE and info["logs"].isdigit()
    logs = json.loads(run_admin(msmp_server, home, "--json", "LOGS", ALICE).stdout)
    assert isinstance(logs, list) and all(isinstance(entry, str) for entry in logs)
    got = json.loads(run_admin(msmp_server, home, "--json", "GET", "maildir").stdout)
    assert got == {"ok": True, "message": str(msmp_server.maildir)}
    done = run_admin(msmp_server, home, "--json", "GET", "no_such_key")
    assert done.returncode == 1
    assert json.loads(done.stdout) == {"ok": False, "message": "Invalid key"}


def test_login_failure_exits_1(msmp_server: ServerProcess, home: Path) -> None:
    done = run_admin(msmp_server, home, "STAT", password="wrong")
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["geventpop3-admin: login failed: Invalid credentials"]
    assert done.stdout == ""


def test_unreachable_server_exits_2(home: Path) -> None:
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "admin", "-P", str(port), "STAT"], cwd=REPO, env=admin_env(home),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1
    assert f"cannot connect to 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--password", "x", "STAT"], ["-P", "70000", "STAT"],
                                  ["-P", "http", "STAT"]])
def test_usage_errors_exit_2(home: Path, args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "admin", *args], cwd=REPO, env=admin_env(home),
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_password_file(msmp_server: ServerProcess, home: Path) -> None:
    secret = home / "password"
    secret.write_text(ADMIN_PASSWORD + "\n")
    done = run_admin(msmp_server, home, "--password-file", str(secret), "STAT", password=None)
    assert done.returncode == 0, done.stderr
    done = run_admin(msmp_server, home, "--password-file", str(home / "missing"), "STAT", password=None)
    assert done.returncode == 2
    assert "cannot read password file" in done.stderr


def test_no_password_without_terminal_exits_2(msmp_server: ServerProcess, home: Path) -> None:
    done = run_admin(msmp_server, home, "STAT", password=None)  # new session: no terminal to prompt on
    assert done.returncode == 2
    assert "no password given" in done.stderr


def test_json_watch_lines(msmp_server: ServerProcess, home: Path) -> None:
    argv = [sys.executable, "-m", "admin", *server_flags(msmp_server), "--watch", "--json", "--interval", "0.2"]
    proc = subprocess.Popen(argv, cwd=REPO, env=admin_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)
    try:
        frames = [json.loads(proc.stdout.readline()) for _ in range(2)]  # readline blocks until a frame
        assert all(frame["stat"]["Total connections"].isdigit() for frame in frames)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_version_and_help(home: Path) -> None:
    from geventpop3 import __version__

    done = subprocess.run([sys.executable, "-m", "admin", "--version"], cwd=REPO, env=admin_env(home),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"geventpop3-admin {__version__}"
    done = subprocess.run([sys.executable, "-m", "admin", "-h"], cwd=REPO, env=admin_env(home),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--password-file" in done.stdout and "--watch" in done.stdout
