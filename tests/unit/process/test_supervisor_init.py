"""The first message a new worker gets from the supervisor (`Init`): what it must carry so the
worker serves as every other process does (the processes themselves: tests/e2e/test_workers.py)."""

from __future__ import annotations

from pathlib import Path

import gevent

from geventpop3.auth.users import UserDirectory
from geventpop3.flags import parse_config
from geventpop3.process import messages
from geventpop3.process.aggregate import Totals
from geventpop3.process.channel import Channel, socketpair
from geventpop3.process.messages import Received, Set
from geventpop3.process.server import Server
from geventpop3.process.supervisor import ClusterBackend, SettingsRelay, Supervisor, WorkerPool
from geventpop3.service.context import ServerContext


def supervisor(tmp_path: Path) -> tuple[Server, Supervisor, WorkerPool]:
    config = parse_config(["-d", str(tmp_path / "mail"), "--no-state", "--workers", "2", "-u", "alice:alicepw"])
    sup = Supervisor([])
    server = Server(config, sup)
    users = UserDirectory(None)
    users.configure(config.users)
    server.ctx = ServerContext(settings=config.settings, users=users)
    sup.pool = WorkerPool(None, 2, lambda index, digest: sup.initial(server, index, digest))
    return server, sup, sup.pool


def test_a_worker_that_says_hello_during_a_dele_gets_the_user_withdrawn(tmp_path: Path) -> None:
    """Its init comes after the deluser begin broadcast it missed: without the name it would let
    the user log in while the supervisor moves the Maildir aside."""
    server, sup, pool = supervisor(tmp_path)
    assert sup.initial(server, 0, server.users.digest).withdrawn == ()
    pool.withdrawn.add("alice")
    init = sup.initial(server, 1, server.users.digest)
    assert init.withdrawn == ("alice",)


def test_the_name_is_withdrawn_only_while_its_dele_runs(tmp_path: Path) -> None:
    server, sup, pool = supervisor(tmp_path)
    assert server.ctx is not None
    (tmp_path / "mail").mkdir()
    backend = ClusterBackend(server.ctx, server.reload, pool, Totals(server.ctx, 2), sup.recorded,
                             SettingsRelay(server.ctx.settings, pool))
    backend.delete_user("alice")
    assert "alice" not in server.ctx.users and pool.withdrawn == set()
    assert sup.initial(server, 0, server.users.digest).withdrawn == ()


def test_a_worker_that_read_another_users_file_gets_the_content_in_force(tmp_path: Path) -> None:
    """Only then: the digest of what the worker read (its hello) is compared with this process's."""
    server, sup, _ = supervisor(tmp_path)
    (tmp_path / "users").write_text("carol:carolpw\n")
    server.users.path = str(tmp_path / "users")
    assert server.ctx is not None
    server.configured_users(server.ctx.users)
    assert sup.initial(server, 0, server.users.digest).users_data is None
    assert sup.initial(server, 0, "another digest").users_data == "carol:carolpw\n"


def test_a_set_over_msmp_is_one_broadcast_of_the_value_in_force(tmp_path: Path) -> None:
    """The backend sends it (and waits for the acks); the settings listener sends nothing more.
    A change from elsewhere (another instance's, through the follower) is relayed as it comes."""
    server, sup, pool = supervisor(tmp_path)
    assert server.ctx is not None
    settings = server.ctx.settings
    ours, theirs = socketpair()
    pool.channels[0] = Channel(ours)
    pool.channels[0].start()
    backend = ClusterBackend(server.ctx, server.reload, pool, Totals(server.ctx, 2), sup.recorded,
                             SettingsRelay(settings, pool))
    backend.set_setting("idle_timeout", "300")
    settings.apply("log_level", "DEBUG", "another instance")
    worker = Channel(theirs)
    frames = worker.messages()
    with gevent.Timeout(5):
        received = [messages.decode(next(frames)) for _ in range(2)]
    pool.channels[0].close()
    worker.close()
    assert received == [Received(Set("idle_timeout", "300"), 1), Received(Set("log_level", "DEBUG"), 2)]
