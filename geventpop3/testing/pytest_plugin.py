"""The pytest plugin (entry point `pytest11`: geventpop3): a real POP3 server per test or per session.

    def test_fetch(pop3_server):
        pop3_server.add_user("alice", "secret")
        pop3_server.deliver("alice", b"Subject: hi\\n\\nhello\\n")
        ...

    @pytest.mark.pop3_server(users={"alice": "secret"}, tls=True)
    def test_fetch_over_tls(pop3_server): ...

`pop3_server` (function scope) is a `geventpop3.testing.Pop3TestServer` built from the
`pop3_server` marker's keyword arguments, or from `request.param` (indirect
parametrisation), and stopped after the test. `pop3_server_session` is one server for
the whole session, `clear()`ed before each test that uses it; its arguments come from the
`pop3_server_session_options` fixture, which a conftest.py may override.

Loaded into every pytest run where geventpop3 is installed, this module imports nothing
but pytest until a fixture is used, and never gevent: the server is a child process.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from geventpop3.testing import Pop3TestServer

FIXTURES = ("pop3_server", "pop3_server_session")
LOG_LINES = 40  # of the server's log, shown under a failed test


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pop3_server(**options): arguments of the pop3_server fixture's Pop3TestServer "
                   "(users, tls, settings, faults, host, args)")


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The marker's keyword arguments (the closest marker wins per key), then request.param's."""
    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("pop3_server"))):
        if marker.args:
            raise pytest.UsageError("pop3_server marker: give Pop3TestServer arguments by keyword")
        options.update(marker.kwargs)
    options.update(getattr(request, "param", None) or {})
    return options


@pytest.fixture
def pop3_server(request: pytest.FixtureRequest) -> Iterator[Pop3TestServer]:
    """A running geventpop3 server for this test only (see the `pop3_server` marker)."""
    from geventpop3.testing import Pop3TestServer

    with Pop3TestServer(**_options(request)) as server:
        yield server


@pytest.fixture(scope="session")
def pop3_server_session_options() -> dict[str, Any]:
    """Pop3TestServer arguments of `pop3_server_session`: override it in a conftest.py."""
    return {}


@pytest.fixture(scope="session")
def _pop3_shared_server(pop3_server_session_options: dict[str, Any]) -> Iterator[Pop3TestServer]:
    from geventpop3.testing import Pop3TestServer

    with Pop3TestServer(**pop3_server_session_options) as server:
        yield server


@pytest.fixture
def pop3_server_session(_pop3_shared_server: Pop3TestServer) -> Pop3TestServer:
    """The session's shared server, cleared for this test: no mail, the users it started
    with, its settings and log as at the start (see Pop3TestServer.clear)."""
    _pop3_shared_server.clear()
    return _pop3_shared_server


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under a failed test, the end of the log of the server it used."""
    report = yield
    if report.when == "call" and report.failed:
        funcargs = getattr(item, "funcargs", {})
        for name in FIXTURES:
            server = funcargs.get(name)
            if server is not None:
                report.sections.append((f"geventpop3 server log ({name})", "\n".join(server.log[-LOG_LINES:])))
    return report
