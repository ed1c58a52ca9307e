"""What only the PostgreSQL store does, against a real PostgreSQL in this process (under
gevent, as the server runs): cooperation with the hub, counters per instance, retries
without duplicates, leases, and the follower applying other instances' changes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import gevent
import pytest
from helpers import PostgresServer, wait_until

from geventpop3.auth.users import UserDirectory
from geventpop3.core.metrics import AccessEntry
from geventpop3.service.context import ServerContext
from geventpop3.service.setting_checks import checked_settings
from geventpop3.state import StoreError
from geventpop3.state.leases import HELD, IN_USE, UNAVAILABLE, Leases
from geventpop3.state.postgres import Database, PostgresStore
from geventpop3.state.settings import persist_settings
from geventpop3.state.shared import SharedState

FAKE_HASH = "$scrypt$n=16384,r=8,p=1$c2FsdA==$aGFzaA=="


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.create_database()


@pytest.fixture
def stores(url: str) -> Iterator[list[PostgresStore]]:
    """Two instances' stores on one database: A and B."""
    opened = [PostgresStore(url, "a-110"), PostgresStore(url, "b-110")]
    yield opened
    for store in opened:
        store.close()


def test_a_slow_query_does_not_block_the_hub(stores: list[PostgresStore]) -> None:
    """psycopg waits in Python on gevent's patched poll: other greenlets run meanwhile."""
    import psycopg

    assert psycopg.waiting.wait.__name__ != "wait_c"  # psycopg saw the monkey-patching
    ticks: list[None] = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    started = time.monotonic()
    try:
        stores[0].db.run("sleep in", lambda c: c.execute("SELECT pg_sleep(0.5)"))
        assert time.monotonic() - started >= 0.5
        assert len(ticks) >= 20  # 50 would be ideal; a loaded machine gets fewer, a blocked hub none
    finally:
        ticker.kill()


def test_counters_are_rows_per_instance_and_stat_sums_them(stores: list[PostgresStore]) -> None:
    a, b = stores
    a.save_counters({"total_connections": 5, "logins_ok": 1})
    b.save_counters({"total_connections": 7})
    b.save_counters({"total_connections": 8})
    assert a.load_counters() == {"total_connections": 5, "logins_ok": 1}  # its own rows only
    b.heartbeat(3)
    by_name = {name: (counters, current, age) for name, counters, current, age in a.instances()}
    assert by_name["a-110"][0] == {"total_connections": 5, "logins_ok": 1} and by_name["a-110"][2] is None
    assert by_name["b-110"][:2] == ({"total_connections": 8}, 3) and by_name["b-110"][2] < 5

    ctx = ServerContext(settings=checked_settings(), users=UserDirectory())
    ctx.metrics.restore({"total_connections": 6, "logins_ok": 2})  # A's live values beat its stored ones
    stat = dict(line.split(": ", 1) for line in SharedState(ctx, a).stat_lines(ctx.metrics))
    assert stat["Total connections"] == "14" and stat["Logins ok"] == "2"
    assert stat["Current connections"] == "3" and stat["Instances alive"] == "2"
    assert stat["Instance b-110 current connections"] == "3"


def test_a_batch_retried_after_a_lost_answer_is_stored_once(stores: list[PostgresStore]) -> None:
    a = stores[0]
    batch = [AccessEntry(time.time(), "alice", "127.0.0.1", port, "login") for port in range(3)]
    a.append_access(batch[:2])
    a._pending_seq.update({id(e): (e, seq) for e, seq in zip(batch[:2], (1, 2), strict=True)})  # as if unanswered
    a.append_access(batch)  # the persister's retry, with one more
    assert [e.port for e in a.query_access("alice", 10)] == [0, 1, 2]


def test_leases_conflict_expire_and_are_confirmed(stores: list[PostgresStore]) -> None:
    timeouts = {"a": 30.0, "b": 30.0}
    a = Leases(stores[0].db, lambda: timeouts["a"])
    b = Leases(stores[1].db, lambda: timeouts["b"])
    try:
        assert a.acquire("alice") == HELD
        assert b.acquire("alice") == IN_USE
        assert b.holder("alice") == "a-110"
        assert a.acquire("alice") == HELD  # its own (a lease left by a release that failed)
        a.release("alice")
        assert b.acquire("alice") == HELD
        assert not a.confirm("alice") and b.confirm("alice")
        b.release("alice")

        timeouts["a"] = 0.3  # A dies holding it: nobody renews
        assert a.acquire("bob") == HELD
        assert b.acquire("bob") == IN_USE
        wait_until(lambda: b.acquire("bob") == HELD, timeout=3)
        assert not a.confirm("bob")  # A's session, had it survived, deletes nothing
        a.renew()
        assert "bob" not in a.held  # lost, logged once
    finally:
        a.stop()
        b.stop()


def test_the_renewer_keeps_leases_alive_in_one_statement(stores: list[PostgresStore]) -> None:
    a = Leases(stores[0].db, lambda: 2.0)
    b = Leases(stores[1].db, lambda: 2.0)
    a.start()
    try:
        assert a.acquire("alice") == HELD and a.acquire("bob") == HELD
        deadline = time.monotonic() + 3.5  # well past the 2 s timeout
        while time.monotonic() < deadline:
            assert b.acquire("alice") == IN_USE and b.acquire("bob") == IN_USE
            gevent.sleep(0.25)
    finally:
        a.stop()  # gives back what it holds
        assert b.acquire("alice") == HELD
        b.stop()


def test_the_follower_applies_other_instances_settings_and_users(stores: list[PostgresStore]) -> None:
    a, b = stores
    ctx_a = ServerContext(settings=checked_settings(), users=UserDirectory(a))
    ctx_b = ServerContext(settings=checked_settings(), users=UserDirectory(b))
    ctx_b.users.add_configured([("carol", "fromfile")])  # a configured entry wins over the store's
    persist_settings(ctx_a.settings, a)
    shared_b = SharedState(ctx_b, b, skip={"log_level"}, reread_interval=3600)
    shared_b.start()
    try:
        assert shared_b.follower.connected.wait(10)
        ctx_a.settings.set("idle_timeout", "77")
        ctx_a.settings.set("log_level", "DEBUG")  # given as a flag on B: stays B's
        ctx_a.users.set_password("dave", "davepw")
        ctx_a.users.set_password("carol", "fromstore")
        wait_until(lambda: ctx_b.settings.idle_timeout == 77.0 and "dave" in ctx_b.users, timeout=1.0)
        assert ctx_b.settings.log_level == "INFO"
        assert ctx_b.users.verify("dave", "davepw") and ctx_b.users.verify("carol", "fromfile")
        ctx_a.users.delete("dave")
        wait_until(lambda: "dave" not in ctx_b.users, timeout=1.0)
    finally:
        shared_b.stop()


def test_the_follower_catches_up_after_its_connection_is_killed(stores: list[PostgresStore]) -> None:
    """A change made while B was not listening arrives with the re-read after the reconnect."""
    a, b = stores
    ctx_b = ServerContext(settings=checked_settings(), users=UserDirectory(b))
    shared_b = SharedState(ctx_b, b, reread_interval=3600)
    shared_b.start()
    try:
        assert shared_b.follower.connected.wait(10)
        a.db.run("kill the listener of", lambda c: c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%'"))
        a.save_user("erin", FAKE_HASH)  # its NOTIFY may find nobody listening
        wait_until(lambda: "erin" in ctx_b.users, timeout=5)
    finally:
        shared_b.stop()


def test_an_unreachable_database_is_a_store_error_and_leases_answer_unavailable(
        postgres: PostgresServer) -> None:
    from helpers import free_port

    with pytest.raises(StoreError, match="cannot connect to state database"):
        PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/x", "a-110", connect_timeout=1)
    db = Database(postgres.url(), "a-110")
    try:
        db.available = False  # as after a failed call: a login is answered at once
        assert Leases(db, lambda: 30.0).acquire("alice") == UNAVAILABLE
    finally:
        db.close()


@contextlib.contextmanager
def statements_of(db: Database) -> Iterator[list[object]]:
    """The statements `db` runs inside the block: its `run` is wrapped, and put back after."""
    statements: list[object] = []
    real_run = db.run

    def counted(*args: object, **kwargs: object) -> object:
        statements.append(args[0])
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    db.run = counted  # type: ignore[method-assign]
    try:
        yield statements
    finally:
        db.run = real_run  # type: ignore[method-assign]


def test_concurrent_takes_and_releases_share_statements_and_one_mailbox_goes_to_one(
        stores: list[PostgresStore]) -> None:
    a = Leases(stores[0].db, lambda: 30.0)
    b = Leases(stores[1].db, lambda: 30.0)
    try:
        with statements_of(a.db) as statements:
            names = [f"user{n}" for n in range(50)]
            takes = [gevent.spawn(a.acquire, name) for name in names]
            rivals = [gevent.spawn(b.acquire, name) for name in names[:10]]  # B wants some of them too
            gevent.joinall(takes + rivals, raise_error=True)
            won_by_a = {name for name, take in zip(names, takes, strict=True) if take.value == HELD}
            won_by_b = {name for name, take in zip(names, rivals, strict=False) if take.value == HELD}
            assert won_by_a | won_by_b == set(names) and not won_by_a & won_by_b
            assert len(statements) < 10  # 50 takes, a few statements
            statements.clear()
            gevent.joinall([gevent.spawn(a.release, name) for name in won_by_a], raise_error=True)
            assert len(statements) < 10
        assert all(b.acquire(name) == HELD for name in won_by_a)
    finally:
        a.stop()
        b.stop()


def test_releases_and_takes_waiting_together_go_in_one_statement(stores: list[PostgresStore]) -> None:
    """A session is a take and a release: waiting together they share a round trip. A
    mailbox released and taken again in that round stays this process's."""
    a = Leases(stores[0].db, lambda: 30.0)
    b = Leases(stores[1].db, lambda: 30.0)
    try:
        assert a.acquire("x") == HELD and a.acquire("y") == HELD
        with statements_of(a.db) as statements:
            round_ = [gevent.spawn(a.release, "x"), gevent.spawn(a.release, "y"),
                      gevent.spawn(a.acquire, "y"), gevent.spawn(a.acquire, "z")]
            gevent.joinall(round_, raise_error=True)
        assert [g.value for g in round_] == [None, None, HELD, HELD]
        assert len(statements) == 1
        assert [b.acquire(name) for name in ("x", "y", "z")] == [HELD, IN_USE, IN_USE]
        assert a.held == {"y", "z"}
    finally:
        a.stop()
        b.stop()
