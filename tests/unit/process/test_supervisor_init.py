"""The first message a new worker gets from the supervisor (`init`): what it must carry so the
worker serves as every other process does (the processes themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

from pathlib import Path

from geventpop3.auth.users import UserDirectory
from geventpop3.flags import parse_config
from geventpop3.process.aggregate import Totals
from geventpop3.process.supervisor import ClusterBackend, Supervisor, WorkerPool
from geventpop3.service.context import ServerContext


def supervisor(tmp_path: Path) -> tuple[Supervisor, WorkerPool]:
    config = parse_config(["-d", str(tmp_path / "mail"), "--no-state", "--workers", "2", "-u", "alice:alicepw"])
    sup = Supervisor(config, [])
    users = UserDirectory(None)
    users.configure(config.users)
    sup.ctx = ServerContext(settings=config.settings, users=users)
    sup.pool = WorkerPool([], {}, 2, sup._initial)
    return sup, sup.pool


def test_a_worker_that_says_hello_during_a_dele_gets_the_user_withdrawn(tmp_path: Path) -> None:
    """Its init comes after the deluser-begin broadcast it missed: without the name it would let
    the user log in while the supervisor moves the Maildir aside."""
    sup, pool = supervisor(tmp_path)
    assert "withdrawn" not in sup._initial(0, sup.users_digest)
    pool.withdrawn.add("alice")
    init = sup._initial(1, sup.users_digest)
    assert init["op"] == "init" and init["withdrawn"] == ["alice"]


def test_the_name_is_withdrawn_only_while_its_dele_runs(tmp_path: Path) -> None:
    sup, pool = supervisor(tmp_path)
    assert sup.ctx is not None
    (tmp_path / "mail").mkdir()
    backend = ClusterBackend(sup.ctx, sup.reload, pool, Totals(sup.ctx, 2), sup.recorded)
    backend.delete_user("alice")
    assert "alice" not in sup.ctx.users and pool.withdrawn == set()
    assert "withdrawn" not in sup._initial(0, sup.users_digest)
