"""Fixtures and the tier markers; what the fixtures are built from lives in helpers.py.

Tiers (docs/testing.md): tests/unit (no server), tests/inprocess (the app or a service in
a greenlet here), tests/e2e (server processes), tests/external (needs Debian packages or
servers). Every test of tests/external, and every test that takes a PostgreSQL, is marked
`external` here; modules mark their own `slow` tests.
"""

from __future__ import annotations

from gevent import monkey

# In-process tests (store, MSMP server) run under gevent like the server does.
monkey.patch_all()

import ctypes
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import PostgresServer, ServerProcess, TlsFiles, make_tls_files, started_servers

EXTERNAL = Path(__file__).parent / "external"
EXTERNAL_FIXTURES = {"postgres", "own_postgres"}  # a PostgreSQL server: initdb and pg_ctl


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`external` for tests/external and for any test using a PostgreSQL fixture."""
    for item in items:
        if item.path.is_relative_to(EXTERNAL) or EXTERNAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.external)


# Tests press Ctrl-C (SIGINT) on the programs they start. A suite run as a background job
# of a shell has SIGINT ignored, and exec passes an ignored signal on: those programs would
# not hear it. A handled signal is reset to the default at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module", autouse=True)
def _no_subreaper_after_the_module() -> Iterator[None]:
    """Filters run in this process make it a child subreaper (geventpop3.service.reaper),
    and their clean-up kills every adopted child that is no filter. A PostgreSQL started
    meanwhile (pg_ctl daemonises: the postmaster is adopted) would be killed by a later
    module's filters: each module ends with the process as it found it."""
    yield
    reaper = sys.modules.get("geventpop3.service.reaper")
    if reaper is not None and reaper._subreaper:
        ctypes.CDLL(None, use_errno=True).prctl(reaper.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        reaper._subreaper = False


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: start_server(users=..., config=..., extra_args=..., listen=...) -> a running server."""
    with started_servers(tmp_path) as start:
        yield start


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A running server with users alice, bob and carol and an admin."""
    return start_server()


@pytest.fixture(scope="module")
def msmp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per test module for the admin client and shell: alice, an admin, MSMP on 127.0.0.1.

    The tests sharing it use unique user names and restore what they SET; some hold several
    MSMP connections from 127.0.0.1 at once, over the default per-source cap."""
    with started_servers(tmp_path_factory.mktemp("geventpop3")) as start:
        yield start(users={"alice": "alicepw"}, listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                    login_failure_delay=0.1, config="admin_max_connections_per_source = 20\n")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1, ::1 and localhost (made with trustme)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session (initdb + pg_ctl on a free loopback port, as the
    `postgres` user when root); tests take a database each (`create_database()`).
    Skips the test when the server binaries are not installed."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the test's own, for tests that stop and start it again."""
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.destroy()
