"""geventpop3.process.server.Server: the same fixed sequence whatever the role, its role
deciding what each step does (the roles themselves serve in tests/e2e and tests/server)."""

from __future__ import annotations

from pathlib import Path

import gevent
import pytest

from geventpop3.auth.users import UserDirectory
from geventpop3.flags import parse_config
from geventpop3.process.server import Endpoints, Server, StartupError
from geventpop3.service.context import ServerContext


class Recording:
    """A role that records each step it is asked for; `fail_at` raises StartupError there,
    `stop_at` asks the server to stop there (as SIGTERM would)."""

    def __init__(self, fail_at: str = "", stop_at: str = "ready") -> None:
        self.steps: list[str] = []
        self.fail_at = fail_at
        self.stop_at = stop_at

    def _step(self, server: Server, name: str) -> None:
        self.steps.append(name)
        if name == self.fail_at:
            raise StartupError(f"no {name}")
        if name == self.stop_at:
            server.stopping.set()

    def bind(self, server: Server) -> None:
        self._step(server, "bind")

    def drop(self, server: Server) -> None:
        self._step(server, "drop")

    def prepare(self, server: Server) -> ServerContext:
        self._step(server, "prepare")
        return ServerContext(settings=server.config.settings, users=UserDirectory(None, server.hasher))

    def serve(self, server: Server, ctx: ServerContext) -> None:
        self._step(server, "serve")

    def started(self, server: Server, ctx: ServerContext) -> None:
        self._step(server, "started")

    def ready(self, server: Server, served: Endpoints) -> int:
        self._step(server, "ready")
        return 0

    def hangup(self, server: Server) -> None:
        self._step(server, "hangup")

    def reload(self, server: Server) -> list[str]:
        self._step(server, "reload")
        return []

    def shutdown(self, server: Server) -> None:
        self._step(server, "shutdown")

    def close_state(self, server: Server) -> None:
        self._step(server, "close_state")


def run(tmp_path: Path, role: Recording) -> int:
    config = parse_config(["-d", str(tmp_path / "mail"), "--no-state"])
    runner = gevent.spawn(Server(config, role).run)
    status = runner.get(timeout=10)
    assert isinstance(status, int)
    return status


def test_every_role_goes_through_the_same_steps_in_order(tmp_path: Path) -> None:
    role = Recording()
    assert run(tmp_path, role) == 0
    assert role.steps == ["bind", "drop", "prepare", "serve", "started", "ready", "shutdown"]


@pytest.mark.parametrize("step", ["bind", "drop", "prepare", "serve"])
def test_a_start_that_fails_closes_what_it_opened_and_exits_2(tmp_path: Path, step: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    role = Recording(fail_at=step)
    assert run(tmp_path, role) == 2
    order = ["bind", "drop", "prepare", "serve"]
    assert role.steps == [*order[:order.index(step) + 1], "close_state"]
    assert capsys.readouterr().err == f"geventpop3: no {step}\n"  # one line, no traceback


def test_asked_to_stop_during_start_up_it_goes_straight_to_shutdown(tmp_path: Path) -> None:
    role = Recording(stop_at="serve")
    assert run(tmp_path, role) == 0
    assert role.steps == ["bind", "drop", "prepare", "serve", "shutdown"]


def test_the_context_shares_the_server_s_hasher(tmp_path: Path) -> None:
    """Users and admins wait for the same hash threads, configured from the settings."""
    config = parse_config(["-d", str(tmp_path / "mail"), "--no-state"])
    config.settings.apply("auth_hash_threads", 3, "config")
    server = Server(config, Recording())
    ctx = server.prepare_context(lambda: UserDirectory(None, server.hasher), keep_state=False)
    assert ctx.hasher is server.hasher and ctx.admins.hasher is server.hasher
    assert server.hasher.threads == 3
