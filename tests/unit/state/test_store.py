"""The stores, the persister and saved settings: the `Store` protocol's tests run against
both implementations (`store`, `reopen`: SQLite files and a real PostgreSQL); the SQLite
file's own failures (locks, disk full, SIGKILL mid-write) on real database files."""

import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest
from helpers import wait_until

from geventpop3.auth.users import UserDirectory
from geventpop3.core.metrics import UNKNOWN_USER, AccessEntry
from geventpop3.core.settings import SettingNotSaved
from geventpop3.service.context import ServerContext
from geventpop3.service.setting_checks import checked_settings
from geventpop3.state import Store, StoreError
from geventpop3.state.persister import Persister
from geventpop3.state.settings import persist_settings, restore_settings
from geventpop3.state.sqlite import SqliteStore

REPO = Path(__file__).resolve().parents[3]
FAKE_HASH = "$scrypt$n=16384,r=8,p=1$c2FsdA==$aGFzaA=="


def entry(user: str = "alice", when: float | None = None, port: int = 40000, event: str = "login") -> AccessEntry:
    return AccessEntry(
        time=time.time() if when is None else when, user=user, address="127.0.0.1", port=port, event=event
    )


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state.sqlite3")


@pytest.fixture(params=["sqlite", "postgresql"])
def reopen(request: pytest.FixtureRequest, db_path: str) -> Iterator[Callable[[], Store]]:
    """Factory: a store on the same database each call (a restart), SQLite or PostgreSQL
    (a new database in the session's PostgreSQL); every store opened is closed at the end."""
    opened: list[Store] = []
    if request.param == "sqlite":
        def make() -> Store:
            return SqliteStore(db_path)
    else:
        from geventpop3.state.postgres import PostgresStore

        url = request.getfixturevalue("postgres").create_database()

        def make() -> Store:
            return PostgresStore(url, "test:110")

    def open_store() -> Store:
        opened.append(make())
        return opened[-1]

    yield open_store
    for each in opened:
        each.close()


@pytest.fixture
def store(reopen: Callable[[], Store]) -> Store:
    return reopen()


class WriteLock:
    """Another process's connection holding the write lock: writes of the store fail
    with 'database is locked' after its busy timeout, even as root."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()


def make_context() -> ServerContext:
    return ServerContext(settings=checked_settings(), users=UserDirectory())


def run_child(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


# -- users, settings, counters -------------------------------------------------------
def test_users_survive_reopen(reopen: Callable[[], Store]) -> None:
    first = reopen()
    first.save_user("alice", FAKE_HASH)
    first.save_user("bob", FAKE_HASH)
    first.save_user("alice", FAKE_HASH + "x")  # replace
    first.delete_user("bob")
    first.close()
    assert reopen().load_users() == {"alice": FAKE_HASH + "x"}


def test_user_directory_uses_store(reopen: Callable[[], Store]) -> None:
    first = reopen()
    directory = UserDirectory(first)
    directory.set_password("carol", "s3cret")
    first.close()
    assert UserDirectory(reopen()).verify("carol", "s3cret")


def test_user_survives_kill_9_mid_stream(db_path: str) -> None:
    child = run_child(
        """
        import sys, time
        from geventpop3.core.metrics import AccessEntry
        from geventpop3.state.sqlite import SqliteStore
        store = SqliteStore(sys.argv[1])
        store.save_user("alice", "$scrypt$saved-before-kill")
        print("saved", flush=True)
        i = 0
        while True:  # stream writes until killed
            batch = [AccessEntry(time.time(), "alice", "127.0.0.1", 1000 + n, "login") for n in range(50)]
            store.append_access(batch)
            store.save_counters({"total_connections": i})
            i += 1
            if i == 20:
                print("streaming", flush=True)
        """,
        db_path,
    )
    try:
        assert child.stdout.readline().strip() == "saved"
        assert child.stdout.readline().strip() == "streaming"
    finally:
        child.kill()  # SIGKILL: no close, no checkpoint, no atexit
        child.communicate(timeout=10)
    assert child.returncode == -9
    reopened = SqliteStore(db_path)
    try:
        assert reopened.load_users() == {"alice": "$scrypt$saved-before-kill"}
        assert reopened.access_count("alice") >= 20 * 50
        assert reopened.load_counters()["total_connections"] >= 19
    finally:
        reopened.close()
    assert sqlite3.connect(db_path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_settings_round_trip(store: Store) -> None:
    store.save_setting("idle_timeout", "42")
    store.save_setting("idle_timeout", "43")
    store.save_setting("log_level", "DEBUG")
    assert store.load_settings() == {"idle_timeout": "43", "log_level": "DEBUG"}


def test_counters_round_trip(reopen: Callable[[], Store]) -> None:
    first = reopen()
    first.save_counters({"total_connections": 5, "bytes_sent": 2**40})
    first.save_counters({"total_connections": 7})
    first.close()
    assert reopen().load_counters() == {"total_connections": 7, "bytes_sent": 2**40}


def test_closed_store_raises_store_error_on_every_call(reopen: Callable[[], Store]) -> None:
    closed = reopen()
    closed.close()
    closed.close()  # idempotent
    for call in (closed.load_users, closed.load_settings, lambda: closed.save_user("alice", FAKE_HASH),
                 lambda: closed.append_access([entry()]), lambda: closed.query_access("alice", 1)):
        with pytest.raises(StoreError, match="closed"):
            call()


# -- access log ---------------------------------------------------------------------
def test_query_access_last_n_oldest_first(store: Store) -> None:
    store.append_access([entry("alice", port=p) for p in range(10)] + [entry("bob", port=99)])
    store.append_access([entry("alice", port=10, event="logout")])
    got = store.query_access("alice", 3)
    assert [e.port for e in got] == [8, 9, 10]
    assert got[-1].event == "logout"
    assert [e.port for e in store.query_access("alice", 100)] == list(range(11))
    assert store.query_access("alice", 0) == []
    assert store.query_access("nobody", 5) == []
    assert store.access_count("alice") == 11
    assert store.access_count("bob") == 1


def test_access_entry_fields_round_trip(store: Store) -> None:
    original = AccessEntry(
        time=1700000000.25,
        user="alice",
        address="::1",
        port=1234,
        event="logout",
        retr=3,
        dele=1,
        top=2,
        bytes=12345,
        duration=1.5,
        ended="quit",
        detail="transformer failed x1",
    )
    store.append_access([original])
    assert store.query_access("alice", 1) == [original]


def test_prune_by_count(store: Store) -> None:
    store.append_access([entry("alice", port=p) for p in range(5)] + [entry("bob", port=p) for p in range(2)])
    assert store.prune(keep_per_user=3, max_age_days=36500) == 2
    assert [e.port for e in store.query_access("alice", 10)] == [2, 3, 4]
    assert store.access_count("bob") == 2


def test_prune_counts_failures_apart_from_sessions(store: Store) -> None:
    """Failed logins cannot push a user's logins and logouts out of the log (issue 9)."""
    store.append_access(
        [entry("alice", port=1), entry("alice", port=2, event="logout")]
        + [entry("alice", port=p, event="login-failed") for p in range(10, 15)]
    )
    assert store.prune(keep_per_user=3, max_age_days=36500) == 2
    assert [(e.port, e.event) for e in store.query_access("alice", 10)] == [
        (1, "login"), (2, "logout"), (12, "login-failed"), (13, "login-failed"), (14, "login-failed")]


def test_prune_and_trim_keep_the_total_cap_oldest_first(store: Store) -> None:
    store.append_access([entry(f"user{p % 4}", port=p) for p in range(30)])
    assert store.prune(keep_per_user=1000, max_age_days=36500, max_total=20) == 10
    assert store.trim(12) == 12
    ports = sorted(e.port for user in range(4) for e in store.query_access(f"user{user}", 100))
    assert ports == list(range(18, 30))
    assert store.trim(100) == 12


def test_prune_by_age(store: Store) -> None:
    now = time.time()
    store.append_access(
        [
            entry("alice", when=now - 100 * 86400, port=1),
            entry("bob", when=now - 91 * 86400, port=2),
            entry("alice", when=now - 10 * 86400, port=3),
            entry("alice", when=now, port=4),
        ]
    )
    assert store.prune(keep_per_user=1000, max_age_days=90) == 2
    assert [e.port for e in store.query_access("alice", 10)] == [3, 4]
    assert store.access_count("bob") == 0


# -- failures -----------------------------------------------------------------------
def test_path_that_is_a_directory_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        SqliteStore(str(tmp_path / "db"))


def test_missing_directory_and_garbage_file_raise_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(str(tmp_path / "gone" / "state.sqlite3"))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SqliteStore(str(garbage))


def test_locked_database_raises_store_error(db_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    blocked = SqliteStore(db_path, busy_timeout=0.05)
    lock = WriteLock(db_path)
    try:
        with pytest.raises(StoreError, match="locked"):
            blocked.save_user("alice", FAKE_HASH)
        with pytest.raises(StoreError):
            blocked.save_setting("idle_timeout", "5")
        with pytest.raises(StoreError):
            blocked.append_access([entry()])
        with pytest.raises(StoreError):
            blocked.save_counters({"total_connections": 1})
    finally:
        lock.release()
    blocked.save_user("alice", FAKE_HASH)  # recovers once the lock is gone
    assert blocked.load_users() == {"alice": FAKE_HASH}
    blocked.close()
    assert "Traceback" not in capfd.readouterr().err


def test_waiting_store_does_not_stall_other_greenlets(db_path: str) -> None:
    slow = SqliteStore(db_path, busy_timeout=1.0)
    lock = WriteLock(db_path)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
    try:
        with pytest.raises(StoreError):
            slow.save_user("alice", FAKE_HASH)  # waits ~1 s for the lock, in a pool thread
        assert len(ticks) >= 20  # the event loop kept running meanwhile
    finally:
        ticker.kill()
        lock.release()
        slow.close()


def test_disk_full_raises_store_error(db_path: str) -> None:
    """RLIMIT_FSIZE applies to root too: a real 'file too large' from the kernel."""
    child = run_child(
        """
        import resource, signal, sys, time
        from geventpop3.core.metrics import AccessEntry
        from geventpop3.state import StoreError
        from geventpop3.state.sqlite import SqliteStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = SqliteStore(sys.argv[1])
        store.save_user("alice", "h")
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        try:
            for _ in range(1000):
                store.append_access([AccessEntry(time.time(), "alice", "127.0.0.1", 1, "login", detail="x" * 2000)
                                     for _ in range(20)])
            print("no error")
        except StoreError as exc:
            print("StoreError:", exc)
        print("users:", sorted(store.load_users()))
        """,
        db_path,
    )
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "StoreError: cannot write state database" in out
    assert "users: ['alice']" in out
    assert "Traceback" not in err  # a clear error, not a pool thread's traceback on stderr


# -- persister ----------------------------------------------------------------------
def test_persister_flushes_within_deadline(store: Store) -> None:
    context = make_context()
    persister = Persister(context, store, interval=0.05)
    persister.start()
    try:
        context.access_log.record(entry("alice"))
        context.metrics.connection_opened()
        wait_until(lambda: store.access_count("alice") == 1 and store.load_counters().get("total_connections") == 1)
    finally:
        persister.stop()


def test_flush_makes_entry_visible_now_and_stop_flushes(store: Store) -> None:
    context = make_context()
    persister = Persister(context, store, interval=3600)
    persister.start()
    context.access_log.record(entry("alice", port=1))
    assert persister.flush()
    assert [e.port for e in store.query_access("alice", 5)] == [1]
    context.access_log.record(entry("alice", port=2))
    assert [e.port for e in persister.logs("alice", 5)] == [1, 2]
    assert persister.log_count("alice") == 2
    context.access_log.record(entry("alice", port=3))
    assert persister.stop()
    assert not persister.running
    assert [e.port for e in store.query_access("alice", 5)] == [1, 2, 3]


def test_persister_survives_failing_store(db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStore(db_path, busy_timeout=0.02)
    context = make_context()
    persister = Persister(context, store, interval=0.02, error_interval=60)
    caplog.set_level(logging.WARNING, logger="geventpop3.state.persister")
    lock = WriteLock(db_path)
    persister.start()
    try:
        for port in range(3):
            context.access_log.record(entry("alice", port=port))
        wait_until(lambda: persister.failures >= 3)
        assert persister.running
        errors = [r for r in caplog.records if r.name == "geventpop3.state.persister" and r.levelno == logging.ERROR]
        assert len(errors) == 1  # loud, but not flooding
        assert "locked" in errors[0].getMessage()
        assert [e.port for e in persister.logs("alice", 10)] == [0, 1, 2]  # still shown by LOGS
        assert persister.log_count("alice") == 3
    finally:
        lock.release()
    try:
        wait_until(lambda: store.access_count("alice") == 3 and persister.failures == 0)
        assert any("writable again" in r.getMessage() for r in caplog.records)
    finally:
        persister.stop()
        store.close()


def test_persister_bounds_unsaved_entries(db_path: str) -> None:
    store = SqliteStore(db_path, busy_timeout=0.02)
    context = make_context()
    persister = Persister(context, store, max_backlog=5)
    lock = WriteLock(db_path)
    try:
        for port in range(8):
            context.access_log.record(entry("alice", port=port))
        assert not persister.flush()
        assert persister.dropped == 3
    finally:
        lock.release()
    assert persister.flush()
    assert [e.port for e in store.query_access("alice", 10)] == [3, 4, 5, 6, 7]
    store.close()


def test_persister_prunes_with_retention_settings(store: Store) -> None:
    context = make_context()
    context.settings.set("log_retention_count", "2")
    store.append_access([entry("alice", port=p) for p in range(5)])
    persister = Persister(context, store, interval=0.02)
    persister.start()
    try:
        wait_until(lambda: store.access_count("alice") == 2)
        assert [e.port for e in store.query_access("alice", 10)] == [3, 4]
    finally:
        persister.stop()


def test_persister_holds_the_total_cap(store: Store) -> None:
    context = make_context()
    context.settings.set("log_retention_total", "10")
    persister = Persister(context, store, interval=3600)
    for port in range(25):
        context.access_log.record(entry(f"user{port}", port=port))
        if port % 7 == 0:
            assert persister.flush()
    assert persister.flush()
    stored = [e.port for port in range(25) for e in store.query_access(f"user{port}", 5)]
    assert stored == list(range(15, 25))
    persister.stop()


def test_lowered_retention_is_applied_at_the_next_flush(store: Store) -> None:
    context = make_context()
    store.append_access([entry("alice", port=p) for p in range(5)])
    persister = Persister(context, store, interval=0.02, prune_interval=3600)
    persister.start()
    try:
        wait_until(lambda: persister._pruner is not None and persister._pruner.dead)  # the one at start
        context.settings.set("log_retention_count", "2")
        wait_until(lambda: store.access_count("alice") == 2)
    finally:
        persister.stop()


def test_failed_logins_of_unknown_names_share_one_bucket() -> None:
    context = make_context()
    context.users.add_configured([("alice", "alicepw")])
    for name in ("mallory", "eve\r\nforged", "x" * 60):
        context.access_log.record(entry(name, event="login-failed"))
    context.access_log.record(entry("alice", event="login-failed"))
    context.access_log.record(entry("bob", event="login"))  # only failures are rebucketed
    assert [e.user for e in context.access_log.pending] == [UNKNOWN_USER] * 3 + ["alice", "bob"]
    details = [e.detail for e in context.access_log.pending[:3]]
    assert details == ["tried=mallory", "tried=eve??forged", "tried=" + "x" * 32]


# -- settings persistence ---------------------------------------------------------
def test_settings_changes_persist_and_restore(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    live = checked_settings()
    persist_settings(live, store)
    live.set("idle_timeout", "42")
    live.set("transformer_failure", "passthrough")
    assert store.load_settings() == {"idle_timeout": "42", "transformer_failure": "passthrough"}

    store.save_setting("max_connections", "0")  # no longer valid
    store.save_setting("no_such_key", "1")
    caplog.set_level(logging.WARNING, logger="geventpop3.state.settings")
    fresh = checked_settings()
    applied = restore_settings(fresh, store, skip={"transformer_failure"})
    assert applied == {"idle_timeout": "42"}
    assert fresh.idle_timeout == 42.0
    assert fresh.transformer_failure == "tempfail"
    assert fresh.max_connections == 10_000
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "max_connections" in warnings and "no_such_key" in warnings


def test_setting_change_refused_if_store_fails(db_path: str, caplog: pytest.LogCaptureFixture) -> None:
    """A SET that could not be saved is not made: the old value stays, now and after a restart."""
    store = SqliteStore(db_path, busy_timeout=0.02)
    live = checked_settings()
    persist_settings(live, store)
    heard: list[str] = []
    live.subscribe(lambda key, old, new: heard.append(key))
    lock = WriteLock(db_path)
    try:
        with pytest.raises(SettingNotSaved, match="cannot be written"):
            live.set("idle_timeout", "42")
    finally:
        lock.release()
    assert live.idle_timeout == 600.0 and heard == []
    assert store.load_settings() == {}
    assert any("not changed" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    live.set("idle_timeout", "43")  # writable again
    assert store.load_settings() == {"idle_timeout": "43"}
    store.close()


def test_restore_skips_a_filter_transformer_programs_no_longer_allows(store: Store) -> None:
    store.save_setting("transformer", "cat")
    restricted = checked_settings()
    restricted.apply("transformer_programs", restricted.parse("transformer_programs", "spam,ham"), "config")
    assert restore_settings(restricted, store) == {}
    assert restricted.transformer == "none"


def test_the_sqlite_database_is_owner_only(tmp_path: Path) -> None:
    """It holds password hashes: created 0600 (its -wal and -shm take its mode), an existing one tightened."""
    fresh = SqliteStore(str(tmp_path / "fresh.db"))
    fresh.save_user("alice", "hash")
    old = tmp_path / "old.db"
    old.touch(0o644)
    old.chmod(0o644)
    tightened = SqliteStore(str(old))
    tightened.save_user("alice", "hash")
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    fresh.close()
    tightened.close()
