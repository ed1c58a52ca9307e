"""Start-up time with a large users file: from process start to the first POP3 greeting.

Writes a users file of `--users` entries (default 100,000) and starts `python -m
geventpop3` on it `--runs` times (default 3), timing each run from the fork to the first
greeting (the listeners are bound before the users are read, so a connection that the
kernel accepts proves nothing: the greeting does), and reading the server's CPU time
then from /proc (a figure a busy machine does not inflate). Each run then logs a user of
each scheme in and fails two logins, and its resident memory is read from /proc. Prints
every run and the medians.

    python -m loadtest.users_start --users 100000            # plain passwords
    python -m loadtest.users_start --users 100000 --hashed   # hashes of mixed schemes
    python -m loadtest.users_start --hashed --schemes SCRYPT,SSHA512 --templates more.txt

Hashed entries are made cheaply: one hash per scheme (scrypt at n=2**8; `{SSHA256}`,
`{SSHA512}` with hashlib) for the password `benchpw`, replicated under every name, in
turn. `--templates FILE` adds entries made elsewhere (`doveadm pw -p benchpw`, `geventpop3
hash -s ...`), one per line. Schemes the server cannot parse stop the benchmark with a
message. `--tree DIR` runs another checkout (A/B against an older version).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import poplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geventpop3.testing import launcher
from geventpop3.testing.ports import free_port
from loadtest.launch import tree_cpu_seconds

PASSWORD = "benchpw"
CHEAP_SCRYPT = (2**8, 8, 1)
DEFAULT_SCHEMES = ("SCRYPT", "SSHA512", "SSHA256", "PLAIN")


def _salted(name: str, password: str) -> str:
    """`{SSHA256}`/`{SSHA512}` as Dovecot writes them: base64(digest(password + salt) + salt)."""
    algorithm = name[1:].lower()  # SSHA512 -> sha512
    salt = os.urandom(8)
    digest = hashlib.new(algorithm, password.encode() + salt).digest()
    return "{" + name + "}" + base64.b64encode(digest + salt).decode()


def template(scheme: str) -> str:
    """One entry's secret field for PASSWORD in `scheme` (PLAIN: the password itself)."""
    if scheme == "PLAIN":
        return PASSWORD
    if scheme == "SCRYPT":
        from geventpop3.auth.schemes import hash_password

        return hash_password(PASSWORD, CHEAP_SCRYPT)
    if scheme in ("SSHA256", "SSHA512"):
        return _salted(scheme, PASSWORD)
    raise SystemExit(f"users_start: no generator for {scheme}: give an entry with --templates")


def accepted(entry: str) -> str | None:
    """Why the server's schemes.parse refuses `entry`, or None if it accepts it."""
    from geventpop3.auth import schemes as parser

    try:
        parser.parse(entry, b"k" * 32)
    except parser.SchemeError as exc:
        return str(exc)
    return None


def usable_templates(schemes: list[str], extra: list[str], chosen: bool) -> tuple[list[str], list[str]]:
    """(templates, their schemes): with schemes `chosen` on the command line, exit with a
    message for one the server refuses; from the default list, leave it out with a note."""
    templates, names = [], []
    for scheme, entry in [(scheme, template(scheme)) for scheme in schemes] + [("template", e) for e in extra]:
        why = accepted(entry)
        if why is None:
            templates.append(entry)
            names.append(scheme)
        elif chosen or scheme == "template":
            raise SystemExit(f"users_start: the server does not accept {entry[:24]}...: {why}")
        else:
            print(f"note: {scheme} left out, this server does not accept it yet ({why})")
    return templates, names


def write_users(path: Path, count: int, templates: list[str]) -> None:
    """`u<N>:<secret>` lines; a PLAIN template gets a password per user (`pw<N>`)."""
    with open(path, "w", encoding="ascii") as handle:
        for number in range(count):
            secret = templates[number % len(templates)]
            handle.write(f"u{number}:{f'pw{number}' if secret == PASSWORD else secret}\n")


def password_of(number: int, templates: list[str]) -> str:
    return f"pw{number}" if templates[number % len(templates)] == PASSWORD else PASSWORD


def first_greeting(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Return when the server greets on 127.0.0.1:`port` (connect every 10 ms, then wait for +OK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited {process.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=max(deadline - time.monotonic(), 0.1)) as sock:
                if sock.recv(512).startswith(b"+OK"):
                    return
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no greeting within {timeout:g} s")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def check_logins(port: int, count: int, templates: list[str]) -> None:
    """One user of each template logs in; a wrong password and an unknown name fail."""
    for number in range(min(count, len(templates))):
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(f"u{number}")
        client.pass_(password_of(number, templates))
        client.quit()
    for name in ("u0", "nobody"):
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user(name)
        try:
            client.pass_("wrong")
        except poplib.error_proto:
            pass
        else:
            raise RuntimeError(f"{name} logged in with a wrong password")
        client.close()


def one_run(root: Path, users_file: Path, count: int, templates: list[str], tree: str,
            timeout: float, workers: int = 1) -> tuple[float, float, int]:
    """(seconds from fork to the first greeting, the server's CPU seconds then, its RSS in
    KiB after the logins)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "-m", "geventpop3", "-l", "127.0.0.1", "-p", str(port), "-P", str(free_port()),
            "-L", "127.0.0.1", "-d", str(root / "mail"), "--no-state", "--users-file", str(users_file),
            "--login-failure-delay", "0", "--log-level", "WARNING", "--workers", str(workers),
            *launcher.tcp_only_msmp(tree or launcher.SOURCE)]
    with open(root / "server.log", "ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(args, cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        first_greeting(port, process, timeout)
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(process.pid)  # with workers: all of them
        check_logins(port, count, templates)
        return seconds, cpu, rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=100_000, help="entries in the users file (default 100000)")
    parser.add_argument("--hashed", action="store_true", help="hashes of mixed schemes (default: plain passwords)")
    parser.add_argument("--schemes", default=None,
                        help=f"with --hashed: the schemes, in turn (default {','.join(DEFAULT_SCHEMES)})")
    parser.add_argument("--templates", help="with --hashed: a file of more entries for the password benchpw")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]), help="the checkout to start")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes (default 1; with N > 1 the supervisor reads the file, then each worker)")
    args = parser.parse_args(argv)
    extra = Path(args.templates).read_text().split() if args.templates else []
    given = [s.strip().upper() for s in (args.schemes or "").split(",") if s.strip()]
    schemes = (given or list(DEFAULT_SCHEMES)) if args.hashed else ["PLAIN"]
    templates, names = usable_templates(schemes, extra if args.hashed else [], bool(given))
    with tempfile.TemporaryDirectory(prefix="users-start-") as directory:
        root = Path(directory)
        users_file = root / "users"
        write_users(users_file, args.users, templates)
        kind = "hashed " + "/".join(names) if args.hashed else "plain"
        print(f"{args.users} users ({kind}), users file {users_file.stat().st_size / 2**20:.1f} MiB, tree {args.tree}")
        times, cpus = [], []
        for run in range(args.runs):
            seconds, cpu, rss = one_run(root, users_file, args.users, templates, args.tree, args.timeout,
                                        args.workers)
            times.append(seconds)
            cpus.append(cpu)
            print(f"run {run + 1}: {seconds:.3f} s to the first greeting (server CPU {cpu:.2f} s), "
                  f"server RSS {rss / 1024:.0f} MiB")
        print(f"median of {args.runs}: {statistics.median(times):.3f} s (server CPU {statistics.median(cpus):.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
