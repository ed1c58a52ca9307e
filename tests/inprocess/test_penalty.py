"""The authentication penalty (sources, growth, cap, forgetting, eviction, reset) on a
controlled clock, and the password-hashing threads (own pool, priority, bounded queue)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gevent
import pytest
from gevent import monkey
from helpers import wait_until

from geventpop3.auth.users import Hasher
from geventpop3.core.metrics import Metrics
from geventpop3.core.names import HashingBusy
from geventpop3.core.penalty import Penalty, source_of
from geventpop3.service.setting_checks import checked_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**values: str) -> tuple[Penalty, Clock, Metrics]:
    settings = checked_settings()
    for key, value in {"login_failure_delay": "2", **values}.items():
        settings.set(key, value, source="config")
    clock, metrics = Clock(), Metrics()
    return Penalty(settings, metrics, clock), clock, metrics


@pytest.mark.parametrize(("address", "source"), [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::ffff]", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not an address", None),
])
def test_sources_are_ipv4_addresses_and_ipv6_networks(address: str, source: str | None) -> None:
    assert source_of(address) == source


def test_delays_double_up_to_the_cap_and_count_in_metrics() -> None:
    penalty, _, metrics = make()
    assert [penalty.failed("192.0.2.1") for _ in range(6)] == [2, 4, 8, 15, 15, 15]
    assert metrics.auth_penalty_delays == 5  # every answer beyond the base delay
    assert metrics.penalised_sources() == 1


def test_one_ipv6_network_is_one_source_and_others_are_apart() -> None:
    penalty, _, _ = make()
    penalty.failed("2001:db8::1")
    assert penalty.failed("2001:db8::2") == 4
    assert penalty.failed("2001:db8:0:1::1") == 2
    assert penalty.failed("192.0.2.1") == 2


def test_success_resets_only_its_own_source() -> None:
    penalty, _, _ = make()
    for _ in range(3):
        penalty.failed("192.0.2.1")
        penalty.failed("192.0.2.2")
    penalty.succeeded("192.0.2.1")
    assert penalty.failures("192.0.2.1") == 0 and penalty.failures("192.0.2.2") == 3
    assert penalty.failed("192.0.2.1") == 2 and penalty.failed("192.0.2.2") == 15


def test_forgotten_after_the_quiet_time_not_before() -> None:
    penalty, clock, _ = make(auth_penalty_forget="300")
    penalty.failed("192.0.2.1")
    clock.now += 299
    assert penalty.failed("192.0.2.1") == 4  # a failure renews the memory
    clock.now += 299
    assert len(penalty) == 1
    clock.now += 2
    assert len(penalty) == 0 and penalty.entries() == []
    assert penalty.failed("192.0.2.1") == 2


def test_memory_is_bounded_oldest_source_evicted() -> None:
    penalty, clock, _ = make(auth_penalty_sources="3")
    for i in range(10):
        clock.now += 1
        penalty.failed(f"192.0.2.{i}")
    assert [entry.source for entry in penalty.entries()] == ["192.0.2.9", "192.0.2.8", "192.0.2.7"]


def test_entries_clear_and_a_zero_base_turns_the_delay_off() -> None:
    penalty, clock, _ = make(auth_penalty_max="10")
    penalty.failed("192.0.2.1")
    clock.now += 5
    penalty.failed("2001:db8::1")
    first = penalty.entries()
    assert [entry.line() for entry in first] == ["2001:db8::/64 failures=1 delay=4 idle=0",
                                                 "192.0.2.1 failures=1 delay=4 idle=5"]
    assert penalty.clear("2001:db8::99") == 1 and penalty.clear("2001:db8::99") == 0
    with pytest.raises(ValueError):
        penalty.clear("nonsense")
    assert penalty.clear(None) == 1 and len(penalty) == 0
    off, _, _ = make(login_failure_delay="0")
    assert off.failed("192.0.2.1") == 0 and off.failures("192.0.2.1") == 1


# -- the hashing threads -----------------------------------------------------------
# Jobs hold a hash thread until the test opens the gate (a native sleep: gevent's are not for threads).
_thread_sleep = monkey.get_original("time", "sleep")


class ThreadEvent:
    def __init__(self) -> None:
        self.opened = False

    def set(self) -> None:
        self.opened = True

    def wait(self, timeout: float) -> bool:
        for _ in range(int(timeout / 0.005)):
            if self.opened:
                return True
            _thread_sleep(0.005)
        return False


@pytest.fixture
def hashers() -> Iterator[Callable[..., Hasher]]:
    """Factory of Hashers whose threads end with the test (no thread outlives it)."""
    made: list[Hasher] = []

    def make_hasher(threads: int, queue: int = 100) -> Hasher:
        made.append(Hasher(threads, queue))
        return made[-1]

    yield make_hasher
    for hasher in made:
        hasher.close()


def test_hashing_threads_are_not_the_hub_pool(hashers: Callable[..., Hasher]) -> None:
    """Regression: scrypt ran in the hub's pool, so busy hashing starved SQLite and Maildir work."""
    hasher = hashers(threads=1)
    gate = ThreadEvent()
    blocker = gevent.spawn(hasher.run, gate.wait, 10)  # every hash thread busy
    gevent.sleep(0.05)
    assert gevent.get_hub().threadpool.apply(sum, ([1, 2],)) == 3  # the hub's pool still answers
    gate.set()
    assert blocker.get(timeout=10) is True


def test_waiting_verifications_go_by_priority_then_arrival_and_the_queue_is_bounded(
        hashers: Callable[..., Hasher]) -> None:
    hasher = hashers(threads=1, queue=3)
    gate, order = ThreadEvent(), []
    blocker = gevent.spawn(hasher.run, gate.wait, 10)  # holds the one thread
    gevent.sleep(0.05)

    def job(name: str, priority: int, bounded: bool = True) -> None:
        hasher.run(order.append, name, priority=priority, bounded=bounded)

    jobs = [gevent.spawn(job, "guesser-1", 3), gevent.spawn(job, "clean", 0), gevent.spawn(job, "guesser-2", 3)]
    gevent.sleep(0.05)
    assert hasher.waiting == 3
    with pytest.raises(HashingBusy):
        hasher.run(order.append, "one too many")
    jobs.append(gevent.spawn(job, "start-up", 5, False))  # unbounded work waits, never refused
    gevent.sleep(0.05)
    assert hasher.waiting == 4
    gate.set()
    gevent.joinall([blocker, *jobs], timeout=10, raise_error=True)
    assert order == ["clean", "guesser-1", "guesser-2", "start-up"], order


def test_a_killed_waiter_gives_its_place_back(hashers: Callable[..., Hasher]) -> None:
    hasher = hashers(threads=1, queue=1)
    gate = ThreadEvent()
    blocker = gevent.spawn(hasher.run, gate.wait, 10)
    gevent.sleep(0.05)
    waiter = gevent.spawn(hasher.run, sum, [1, 2])
    gevent.sleep(0.05)
    assert hasher.waiting == 1
    waiter.kill()
    assert hasher.waiting == 0
    gate.set()
    blocker.join(timeout=10)
    assert hasher.run(sum, [1, 2]) == 3


def test_upgrading_cheap_hashes_never_makes_logins_busy(hashers: Callable[..., Hasher]) -> None:
    """Cheap entries are rehashed at the default cost after a login, but only on a hash
    thread nobody waits for: waves of logins (a restart's reconnects) are never refused
    because upgrades filled the queue."""
    from geventpop3.auth.schemes import parse
    from geventpop3.auth.users import UserDirectory, hash_password

    class Store:  # entries of the store are the ones upgraded (and saved)
        def __init__(self, entries: dict[str, str]) -> None:
            self.entries = entries

        def load_users(self) -> dict[str, str]:
            return dict(self.entries)

        def save_user(self, name: str, password_hash: str) -> None:
            self.entries[name] = password_hash

        def delete_user(self, name: str) -> None:
            self.entries.pop(name, None)

    hasher = hashers(1, queue=10)
    cheap = (2**8, 8, 1)
    names = [f"user{n}" for n in range(40)]
    store = Store({name: hash_password(name + "pw", cheap) for name in names})
    directory = UserDirectory(store, hasher=hasher)
    assert directory.wait_calibrated(30)
    for wave in range(4):
        batch = names[wave * 10:(wave + 1) * 10]
        checks = [gevent.spawn(directory.verify, name, name + "pw") for name in batch]
        gevent.joinall(checks, timeout=60, raise_error=True)
        assert [check.value for check in checks] == [True] * 10, f"wave {wave}"
    wait_until(lambda: not directory._upgrading)
    assert any(parse(encoded, b"").cost_class != ("SCRYPT", cheap) for encoded in store.entries.values())


def test_memory_hard_checks_share_the_memory_budget(hashers: Callable[..., Hasher]) -> None:
    """Two threads, a budget of 100: a check reserving 60 waits while another holds 60,
    a small one goes beside it; a check dearer than the whole budget still runs, alone."""
    hasher = hashers(threads=2)
    hasher.configure(2, 100, memory=100)
    gates = [ThreadEvent() for _ in range(3)]
    first = gevent.spawn(hasher.run, gates[0].wait, 10, memory=60)
    gevent.sleep(0.05)
    second = gevent.spawn(hasher.run, gates[1].wait, 10, memory=60)
    gevent.sleep(0.05)
    assert hasher.waiting == 1  # 60 + 60 > 100: waits although a thread is free
    gates[0].set()
    assert first.get(timeout=10) is True
    wait_until(lambda: hasher.waiting == 0)  # now it runs
    small = gevent.spawn(hasher.run, sum, [1, 2], memory=40)
    assert small.get(timeout=10) == 3  # 60 + 40 fits beside it
    huge = gevent.spawn(hasher.run, gates[2].wait, 10, memory=500)
    gevent.sleep(0.05)
    assert hasher.waiting == 1
    gates[1].set()
    assert second.get(timeout=10) is True
    gates[2].set()
    assert huge.get(timeout=10) is True  # alone, over the budget
    # and work that runs "only if idle" does not run when its memory does not fit
    with pytest.raises(HashingBusy), hasher.turn(memory=60):
        hasher.run(sum, [1], only_if_idle=True, memory=60)
