"""A throw-away PostgreSQL for tests and benchmarks: initdb and pg_ctl on a loopback port.

Needs the server binaries (Debian's postgresql, tools/install-system-deps.sh); psycopg
only for `create_database`, imported there.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from geventpop3.testing.ports import free_port


def postgres_bin() -> Path | None:
    """The directory of the newest installed PostgreSQL server binaries (Debian keeps
    them off PATH, in /usr/lib/postgresql/<version>/bin), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throw-away PostgreSQL cluster: `initdb` into a temporary directory, `pg_ctl start`
    on a free loopback port (no Unix socket), trust authentication on loopback.

    PostgreSQL refuses to run as root: as root the cluster belongs to, and runs as, the
    `postgres` system user (the Debian package creates it). stop() and start() again
    keep the data, for tests of the server while the database is down."""

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests (a throw-away cluster); on to measure as deployed
        bindir = postgres_bin()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not installed (tools/install-system-deps.sh)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="geventpop3-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._databases = itertools.count(1)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync",
                  "-E", "UTF8", "--locale=C")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # its own session: a Ctrl-C reaches the caller only, which then stops the cluster in order
        return subprocess.run([*self._as, str(self.bindir / program), *args], capture_output=True, text=True,
                              timeout=120, check=check, stdin=subprocess.DEVNULL, cwd=self.root,
                              start_new_session=True)

    def start(self) -> PostgresServer:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories='' "
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 -c shared_buffers=32MB")
        self._run("pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.root / "log"),
                  "-o", options)
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60", check=False)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    @property
    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data), check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"test{next(self._databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
