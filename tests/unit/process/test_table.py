"""The shared accounting table (geventpop3.process.table): limits over every worker slot,
a dead slot's share forgotten, entries freed without breaking other keys' probes, the
penalty's failures as the supervisor publishes them, a full table refusing, and the
check-and-count atomic across forked processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP
from geventpop3.core.settings import Settings
from geventpop3.process.table import AccountingTable


def settings(**values: object) -> Settings:
    result = Settings()
    for key, value in values.items():
        result.apply(key, value, "test")
    return result


def test_the_per_source_cap_and_the_global_cap_count_every_slot() -> None:
    table = AccountingTable(2, 100, 100)
    limits = settings(max_connections_per_ip=3, max_connections=5)
    assert [table.connect("192.0.2.1", slot, limits) for slot in (0, 1, 0)] == [ADMITTED] * 3
    assert table.connect("192.0.2.1", 1, limits) == MAX_CONNECTIONS_PER_IP
    assert table.connect("192.0.2.2", 1, limits) == ADMITTED
    assert table.connect("192.0.2.3", 0, limits) == ADMITTED
    assert table.connect("192.0.2.4", 0, limits) == MAX_CONNECTIONS  # 5 open over both slots
    table.disconnect("192.0.2.1", 1)
    assert table.connections() == 4 and table.count("192.0.2.1") == 2
    table.disconnect("192.0.2.1", 1)  # slot 1 holds none of it any more: nothing to give back
    assert table.connections() == 4 and table.count("192.0.2.1") == 2


def test_logins_in_flight_and_a_dead_slots_share_forgotten() -> None:
    table = AccountingTable(2, 100, 100)
    limits = settings(max_sessions_per_user_ip=2, max_connections_per_ip=10)
    assert table.login("alice", "192.0.2.1", 0, limits) == 0
    assert table.login("alice", "192.0.2.1", 1, limits) == 0
    assert table.login("alice", "192.0.2.1", 0, limits) is None
    assert table.login("bob", "192.0.2.1", 0, limits) == 0
    for slot in (0, 1, 1):
        assert table.connect("192.0.2.1", slot, limits) == ADMITTED
    table.forget(1)
    assert table.count(("alice", "192.0.2.1")) == 1 and table.count("192.0.2.1") == 1
    assert table.connections() == 1
    table.login_done("alice", "192.0.2.1", 1, 300.0)  # the dead slot's end, told late: already forgotten
    assert table.count(("alice", "192.0.2.1")) == 1
    table.login_done("alice", "192.0.2.1", 0, 300.0)
    assert table.count(("alice", "192.0.2.1")) == 0


def test_many_keys_come_and_go_without_losing_any() -> None:
    """Freeing an entry shifts back those whose probe passed it: every other key stays found."""
    table = AccountingTable(1, 200, 100)
    limits = settings(max_connections_per_ip=5, max_connections=10_000)
    sources = [f"10.0.{n // 250}.{n % 250}" for n in range(300)]
    expected: dict[str, int] = {}
    for round_ in range(3):
        for n, source in enumerate(sources):
            if (n + round_) % 3:
                assert table.connect(source, 0, limits) == ADMITTED
                expected[source] = expected.get(source, 0) + 1
        for n, source in enumerate(sources):
            if n % (round_ + 2) == 0 and expected.get(source):
                table.disconnect(source, 0)
                expected[source] -= 1
        assert {source: table.count(source) for source in sources} == {s: expected.get(s, 0) for s in sources}
    for source, count in expected.items():
        for _ in range(count):
            table.disconnect(source, 0)
    assert table.connections() == 0 and table.counts.used() == 0


def test_a_full_table_refuses_and_frees_again() -> None:
    table = AccountingTable(1, 1, 1)  # the smallest table: 64 entries, 32 in use at most
    limits = settings(max_connections=10_000)
    answers = [table.connect(f"10.1.0.{n}", 0, limits) for n in range(40)]
    assert answers == [ADMITTED] * 32 + [MAX_CONNECTIONS] * 8
    table.disconnect("10.1.0.0", 0)
    assert table.connect("10.1.0.39", 0, limits) == ADMITTED


def test_published_failures_are_read_at_login_until_forgotten_by_time_or_cleared() -> None:
    table = AccountingTable(2, 100, 100)
    limits = settings(auth_penalty_forget=60)
    table.publish("192.0.2.1", 3, time.monotonic())
    table.publish("2001:db8::1", 2, time.monotonic())  # an IPv6 source is its /64
    table.publish("192.0.2.9", 5, time.monotonic() - 61)  # its last failure is older than the forget horizon
    assert table.login("alice", "192.0.2.1", 0, limits) == 3
    assert table.login("alice", "2001:db8::2", 1, limits) == 2
    assert table.login("alice", "192.0.2.9", 1, limits) == 0
    assert table.login_done("alice", "192.0.2.1", 0, 60.0) == 3  # the worker tells a right password then
    table.publish("192.0.2.1", 0, time.monotonic())
    assert table.login("bob", "192.0.2.1", 0, limits) == 0
    table.publish(None, 0, 0.0)
    assert table.login("bob", "2001:db8::3", 0, limits) == 0 and table.failures.used() == 0


def race(table: AccountingTable, work: Callable[[int], int], processes: int = 4) -> list[int]:
    """`work(slot)` in `processes` forked processes (forked after the table, as the workers
    are), started together; what each returned."""
    go_read, go_write = os.pipe()
    children: list[tuple[int, int]] = []
    for slot in range(processes):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.read(go_read, 1)
                os.write(write, str(work(slot)).encode())
                status = 0
            finally:
                os._exit(status)
        os.close(write)
        children.append((pid, read))
    os.write(go_write, b"g" * processes)
    results = []
    for pid, read in children:
        results.append(int(os.read(read, 32) or b"-1"))
        os.close(read)
        assert os.waitpid(pid, 0)[1] == 0
    os.close(go_read)
    os.close(go_write)
    return results


def test_check_and_count_is_atomic_across_forked_processes() -> None:
    """Four processes race for one source's 10 places, 200 tries each: exactly 10 are
    admitted; then they connect and disconnect 3,000 times each at once: no count is lost."""
    table = AccountingTable(4, 100, 100)
    limits = settings(max_connections_per_ip=10)
    admitted = race(table, lambda slot: sum(table.connect("192.0.2.1", slot, limits) == ADMITTED
                                            for _ in range(200)))
    assert sum(admitted) == 10 and table.count("192.0.2.1") == 10

    def churn(slot: int) -> int:
        for n in range(3000):
            if table.connect(f"192.0.2.{n % 3 + 2}", slot, limits) == ADMITTED:
                table.disconnect(f"192.0.2.{n % 3 + 2}", slot)
        return 0

    race(table, churn)
    assert table.connections() == 10 and table.counts.used() == 1
    for slot in range(4):
        table.forget(slot)
    assert table.connections() == 0 and table.counts.used() == 0
