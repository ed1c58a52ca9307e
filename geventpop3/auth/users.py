"""Credentials: the stored passwords of POP3 users and MSMP admins, and how they are
checked (the rules for names and new passwords are geventpop3.core.names).

Entries are `schemes.StoredPassword` objects, parsed once (no hashing at start: a users
file of 100,000 entries loads in a fraction of a second); a plain password is kept only
as a keyed digest (`schemes.KeyedPlain`). Slow verifications run in their own few threads
(`Hasher`), never on the event loop nor in gevent's hub pool, so password guessing cannot
starve the SQLite and Maildir work that pool does; the logins waiting for a hash thread
are bounded and served cleanest source first, and memory-hard schemes share a memory
budget. After one successful slow verification a keyed fast digest of the password is
cached in memory (as Dovecot's auth cache does), so a client polling every minute does
not cost a slow hash per login.

Failures take the same time whatever the entry (the hardening rule: same answer, same
time): every failed check waits its turn for a hash thread, an unknown name is checked
against a dummy entry of the dearest cost class in use, and the answer is then padded
(gevent.sleep, no CPU) up to a floor: the slowest verification time among the cost classes
in use, measured once per class in the background (`_calibrate`) with a margin, raised by
slower verifications seen in the last minute; until a class is measured the floor is a
conservative second.

`PasswordStore` holds configured entries (the MSMP admins; flags and the users file);
`UserDirectory` adds run-time changes persisted in a `UserStore` (the SQLite store of the
management plane, or nothing) and re-reads the configured entries at reload: the POP3
side only ever talks to `UserDirectory`.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import hmac
import io
import itertools
import logging
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol, TypeVar

import gevent
from gevent.event import Event
from gevent.greenlet import Greenlet
from gevent.threadpool import ThreadPool

from geventpop3.auth import schemes
from geventpop3.auth.schemes import (  # noqa: F401 - re-exported: the names callers used from here
    DEFAULT_COST,
    Cost,
    KeyedPlain,
    SchemeError,
    Scrypt,
    StoredPassword,
    hash_password,
)
from geventpop3.core.names import HashingBusy, UserError, valid_password, valid_username

log = logging.getLogger(__name__)
T = TypeVar("T")

MIB = 1 << 20
DEFAULT_MEMORY_BUDGET = 256 * MIB  # bytes of concurrent memory-hard verifications (auth_hash_memory)
DEFAULT_HASH_MEMORY = Scrypt(DEFAULT_COST, b"", b"").memory  # what hashing a new password needs

UNCALIBRATED_FLOOR = 1.0  # seconds a failure takes at least while a cost class in use is not measured yet
FLOOR_MARGIN = 1.25  # the floor is this times the slowest measured class: load makes hashes slower
PEAK_WINDOW = 60.0  # seconds a slow verification seen raises the floor
CALIBRATION_RUNS = 3  # verifications of a class's dummy; their median is the class's time


class _Waiter:
    __slots__ = ("event", "granted", "cancelled", "memory")

    def __init__(self, memory: int) -> None:
        self.event = Event()
        self.granted = False  # a thread slot was handed to it
        self.cancelled = False  # its greenlet stopped waiting (killed): skip it
        self.memory = memory


class Hasher:
    """The password-hashing threads: a gevent ThreadPool of their own, a bounded queue.

    Why not the hub's pool: scrypt takes 50 ms of CPU, and 40 guessing connections kept
    every thread of the hub's pool busy, so a valid login's SQLite and Maildir work waited
    behind them (33 ms became 800 ms). Here `threads` hashes run at once; a verification
    that finds them busy waits its turn, lowest `priority` first (the sessions give the
    failures of their source, so a clean source goes before a guessing one), then oldest
    first. When `queue` verifications already wait, one more is refused at once with
    `HashingBusy` (`bounded=False`: start-up and admin work wait anyway): a temporary
    failure the client retries, rather than memory and latency that grow with the guessers.

    Memory-hard schemes (scrypt, argon2) reserve their peak `memory` from a budget while
    they run: a turn starts only when its memory fits beside the running ones (or nothing
    runs, so an entry dearer than the whole budget still runs, alone). The first waiter
    waits for room rather than be overtaken, so a dear entry is never starved.
    """

    def __init__(self, threads: int = 2, queue: int = 100, memory: int = DEFAULT_MEMORY_BUDGET) -> None:
        self.threads = threads
        self.queue = queue
        self.memory = memory
        self._pool: ThreadPool | None = None  # made at first use, in the process that uses it
        self._running = 0
        self._reserved = 0  # bytes the running turns reserved
        self._waiting: list[tuple[int, int, _Waiter]] = []  # heap: (priority, arrival, waiter)
        self._queued = 0  # waiters in the heap not cancelled
        self._arrivals = itertools.count()

    def configure(self, threads: int, queue: int, memory: int | None = None) -> None:
        """New limits (settings `auth_hash_threads`, `auth_hash_queue`, `auth_hash_memory`), applied at once."""
        self.threads, self.queue = threads, queue
        if memory is not None:
            self.memory = memory
        if self._pool is not None:
            self._pool.maxsize = threads
        self._wake()

    def close(self) -> None:
        """End the threads (a new pool is made if used again): for tests and embedders."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None

    @property
    def waiting(self) -> int:
        return self._queued

    def run(self, func: Callable[..., T], *args: Any, priority: int = 0, bounded: bool = True,
            only_if_idle: bool = False, memory: int = 0) -> T:
        """`func(*args)` in a hash thread, this greenlet blocked meanwhile (others run).

        `memory`: the bytes it needs at its peak (reserved from the budget while it runs).
        `only_if_idle`: run only on a thread nobody waits for, else HashingBusy at once
        (work that can be done later, such as upgrading a hash, never queues before logins)."""
        if only_if_idle and (self._running >= self.threads or self._queued or not self._fits(memory)):
            raise HashingBusy()
        with self.turn(priority, bounded, memory):
            if self._pool is None:
                self._pool = ThreadPool(max(self.threads, 1))
            return self._pool.apply(func, args)

    @contextmanager
    def turn(self, priority: int = 0, bounded: bool = True, memory: int = 0) -> Iterator[None]:
        """Hold a hash thread's turn (and `memory` of the budget) for the block: waiting
        for it as any verification does (HashingBusy when the queue is full)."""
        self._acquire(priority, bounded, memory)
        try:
            yield
        finally:
            self._release(memory)

    def _fits(self, memory: int) -> bool:
        return self._running == 0 or self._reserved + memory <= self.memory

    def _acquire(self, priority: int, bounded: bool, memory: int) -> None:
        if self._running < self.threads and not self._queued and self._fits(memory):
            self._running += 1
            self._reserved += memory
            return
        if bounded and self._queued >= self.queue:
            raise HashingBusy()
        waiter = _Waiter(memory)
        heapq.heappush(self._waiting, (priority, next(self._arrivals), waiter))
        self._queued += 1
        try:
            waiter.event.wait()
        except BaseException:  # killed while waiting: give back what it holds
            if waiter.granted:
                self._release(memory)
            else:
                waiter.cancelled = True
                self._queued -= 1
                self._wake()  # it may have been the first in line, holding the others back
            raise

    def _release(self, memory: int) -> None:
        self._running -= 1
        self._reserved -= memory
        self._wake()

    def _wake(self) -> None:
        waiting = self._waiting
        while waiting and self._running < self.threads:
            waiter = waiting[0][2]
            if waiter.cancelled:
                heapq.heappop(waiting)
                continue
            if not self._fits(waiter.memory):
                return  # the first in line waits for room; nobody overtakes it
            heapq.heappop(waiting)
            self._queued -= 1
            self._running += 1
            self._reserved += waiter.memory
            waiter.granted = True
            waiter.event.set()


def is_plain(secret: str) -> bool:
    """Whether an entry's secret is a plain password (`pw`, `{PLAIN}pw`), not a hash:
    for the warning about plain passwords on the command line."""
    try:
        return isinstance(schemes.parse(secret, b"", allow_weak=True), KeyedPlain)
    except SchemeError:
        return False


def _timed_verify(entry: StoredPassword, password: str) -> tuple[bool, float]:
    """entry.verify(password) and the seconds it took (run in a hash thread)."""
    started = time.perf_counter()
    ok = entry.verify(password)
    return ok, time.perf_counter() - started


def _weaker_than_default(entry: StoredPassword) -> bool:
    """A store entry worth rehashing at the default scrypt cost at its next login."""
    if isinstance(entry, KeyedPlain):
        return True
    if isinstance(entry, Scrypt):
        n, r, p = entry.cost
        default_n, default_r, default_p = DEFAULT_COST
        return n * r * p < default_n * default_r * default_p
    return False


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block that makes 100,000s of objects and no
    cycles (a third of the time of loading a large users file went to its passes)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Configured(NamedTuple):
    """One entry of the users file, its name already checked."""

    name: str
    secret: str  # the password field as given: a plain password or a hash
    line: int
    path: str

    @property
    def origin(self) -> str:
        """Where it was given, for errors."""
        return f"{self.path}:{self.line}"


class PasswordStore:
    """Names and their stored passwords, verified at equal cost for unknown names.

    Used as is for the MSMP admins (fixed at start-up) and, through `UserDirectory`,
    for the POP3 users. Every change of the entries goes through `_put`/`_pop`, which
    keep the count of cost classes the failure floor and the unknown-name dummy come from.
    """

    kind = "admin"  # in log lines
    calibration_log_level = logging.INFO  # a worker's are DEBUG: its supervisor speaks for the server

    def __init__(self, hasher: Hasher | None = None, allow_weak: bool = False) -> None:
        # The server passes its context's one hasher (users and admins share it); alone, its own.
        self.hasher = hasher if hasher is not None else Hasher()
        self.allow_weak = allow_weak  # weak schemes (MD5-CRYPT, PLAIN-MD5, ...) accepted (allow_weak_schemes)
        self._plain_key = os.urandom(32)  # plain passwords are kept only as a digest keyed with it
        self._cache_key = os.urandom(32)
        self._entries: dict[str, StoredPassword] = {}
        self._configured: dict[str, StoredPassword] = {}  # from flags and the users file
        self._fast: dict[str, bytes] = {}
        self._classes: Counter[Hashable] = Counter()  # cost classes in use, with how many entries each
        self._samples: dict[Hashable, StoredPassword] = {}  # an entry of each class in use, for its dummy
        self._dummies: dict[Hashable, tuple[StoredPassword, float]] = {}  # measured: dummy, seconds
        self._calibrator: Greenlet[..., None] | None = None
        self._peak = (0.0, -PEAK_WINDOW)  # the slowest verification seen lately: seconds, when
        self._upgrading: set[str] = set()

    # -- configured entries (flags, users file) ---------------------------------
    def configure(self, entries: Iterable[Configured | tuple[str, str]]) -> tuple[int, int, int]:
        """Make `entries` the configured ones (replacing those of an earlier call): parsed
        here, no hashing; (added, changed, removed). Nothing changes if one is unusable
        (UserError naming where it was given). Unchanged entries keep their cached logins."""
        with gc_paused():
            parsed = self._parse_all(entries)
            return self._apply(parsed)

    def _apply(self, parsed: dict[str, StoredPassword]) -> tuple[int, int, int]:
        configured = self._configured
        added = changed = removed = 0
        for name in [name for name in configured if name not in parsed]:
            del configured[name]
            fallback = self._fallback(name)
            if fallback is None:
                self._pop(name)
            else:
                self._put(name, fallback)
            removed += 1
        current, classes, samples = self._entries, self._classes, self._samples
        for name, entry in parsed.items():
            old = configured.get(name)
            if old is None:
                added += 1
            elif old.same(entry):
                continue
            else:
                changed += 1
            configured[name] = entry
            if name in current:
                self._put(name, entry)
                continue
            current[name] = entry  # _put inlined: 100,000 entries at start-up
            cls = entry.cost_class
            classes[cls] += 1
            if cls not in samples:
                samples[cls] = entry
        self._calibrate_soon()
        return added, changed, removed

    def add_configured(self, entries: Iterable[Configured | tuple[str, str]]) -> None:
        """The configured entries at start-up (`configure`, for callers that only add once)."""
        self.configure(entries)

    def _parse_all(self, entries: Iterable[Configured | tuple[str, str]]) -> dict[str, StoredPassword]:
        parsed: dict[str, StoredPassword] = {}
        plain_key, allow_weak, parse = self._plain_key, self.allow_weak, schemes.parse
        for count, item in enumerate(entries, 1):
            if count % 10_000 == 0:
                gevent.sleep(0)  # a reload of a large file lets sessions run meanwhile
            name, secret = item[0], item[1]
            try:
                if type(item) is not Configured and not valid_username(name):  # the file's are checked
                    raise SchemeError(f"unsafe user name {name!r}")
                parsed[name] = parse(secret, plain_key, allow_weak)
            except SchemeError as exc:
                origin = item.origin if isinstance(item, Configured) else f"user {name}"
                raise UserError(f"{origin}: {exc}") from None
        return parsed

    def _fallback(self, name: str) -> StoredPassword | None:
        """What `name` has once no longer configured (nothing for fixed credentials)."""
        return None

    # -- queries ------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def verify(self, name: str, password: str, priority: int = 0) -> bool:
        """True only for a known name with this password; a failure takes the same time
        whatever the name and its entry (see the module docstring).

        `priority` orders the wait for a hash thread (lower first: the failures of the
        client's source); HashingBusy when too many already wait."""
        entry = self._entries.get(name)
        fast = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), "sha256").digest()
        if entry is not None:
            cached = self._fast.get(name)
            if cached is not None and hmac.compare_digest(cached, fast):
                return True
            if entry.cheap and entry.verify(password):
                return True
        ok, took = self._check(entry, password, priority)
        # The slow hash yields: the entry may have changed or gone meanwhile.
        if ok and entry is not None and self._entries.get(name) is entry:
            self._fast[name] = fast
            self._maybe_upgrade(name, entry, password)
            return True
        gevent.sleep(max(0.0, self.failure_floor() - took))
        return False

    def _check(self, entry: StoredPassword | None, password: str, priority: int) -> tuple[bool, float]:
        """The slow part of a check, in a hash thread's turn: (ok, seconds the work took).

        A cheap entry (already found wrong) and an unknown name before calibration do no
        work, but still wait their turn as a slow check would, with the same memory."""
        against = entry if entry is not None else self._unknown_dummy()
        if against is None or against.cheap:
            dearest = self._unknown_dummy()
            with self.hasher.turn(priority, memory=dearest.memory if dearest is not None else 0):
                return False, 0.0
        ok, took = self.hasher.run(_timed_verify, against, password, priority=priority, memory=against.memory)
        self._observe(took)
        return ok and entry is not None, took

    # -- the failure floor and its calibration ----------------------------------
    def failure_floor(self) -> float:
        """Seconds a failed check takes at least: the slowest verification among the cost
        classes in use with a margin (a conservative second while one is not measured),
        or the slowest seen in the last minute if more."""
        dummies = self._dummies
        measured = [dummies[cls][1] for cls in self._classes if cls in dummies]
        floor = FLOOR_MARGIN * max(measured, default=0.0)
        if len(measured) < len(self._classes):
            floor = max(floor, UNCALIBRATED_FLOOR)
        peak, seen = self._peak
        if time.monotonic() - seen <= PEAK_WINDOW:
            floor = max(floor, peak)
        return floor

    def calibrated(self) -> bool:
        """Whether every cost class in use has been measured."""
        return all(cls in self._dummies for cls in self._classes)

    def wait_calibrated(self, timeout: float | None = None) -> bool:
        """Block this greenlet until calibrated (tests, benchmarks); whether it is."""
        calibrator = self._calibrator
        if calibrator is not None:
            calibrator.join(timeout)
        return self.calibrated()

    def _observe(self, seconds: float) -> None:
        peak, seen = self._peak
        now = time.monotonic()
        if seconds >= peak or now - seen > PEAK_WINDOW:
            self._peak = (seconds, now)

    def _unknown_dummy(self) -> StoredPassword | None:
        """The dummy of the dearest measured class in use: what an unknown name is checked against."""
        dummies = self._dummies
        in_use = [dummies[cls] for cls in self._classes if cls in dummies]
        return max(in_use, key=lambda measured: measured[1])[0] if in_use else None

    def _calibrate_soon(self) -> None:
        """Measure the classes not measured yet, in the background (the server listens meanwhile)."""
        if self.calibrated() or (self._calibrator is not None and not self._calibrator.dead):
            return
        self._calibrator = gevent.spawn(self._calibrate)

    def _calibrate(self) -> None:
        """Per class in use not yet measured: make a dummy (same scheme and cost, random
        password), verify it CALIBRATION_RUNS times, keep it and the median time."""
        while True:
            todo = [(cls, sample) for cls, sample in self._samples.items() if cls not in self._dummies]
            if not todo:
                break
            for cls, sample in todo:
                try:
                    self._dummies[cls] = self._measure(sample)
                except Exception:  # noqa: BLE001 - the conservative floor stays for this class
                    log.exception("cannot measure the password scheme %s: failures keep the %.1f s floor",
                                  sample.scheme, UNCALIBRATED_FLOOR)
                    return
        for cls in [cls for cls in self._dummies if cls not in self._classes]:
            del self._dummies[cls]
        log.log(self.calibration_log_level, "%s password checks calibrated: %d cost classes, a failure takes at "
                "least %.0f ms", self.kind, len(self._classes), 1000 * self.failure_floor())

    def _measure(self, sample: StoredPassword) -> tuple[StoredPassword, float]:
        password = os.urandom(8).hex()
        if sample.cheap:
            dummy = sample.dummy()
            times = [_timed_verify(dummy, password)[1] for _ in range(CALIBRATION_RUNS)]
        else:
            dummy = self.hasher.run(sample.dummy, bounded=False, memory=sample.memory)
            times = [self.hasher.run(_timed_verify, dummy, password, bounded=False, memory=dummy.memory)[1]
                     for _ in range(CALIBRATION_RUNS)]
        return dummy, statistics.median(times)

    # -- stronger at rest: weak store entries are rehashed at their next login ----
    def _maybe_upgrade(self, name: str, entry: StoredPassword, password: str) -> None:
        if name in self._upgrading or not _weaker_than_default(entry) or not self._upgradable(name):
            return
        self._upgrading.add(name)
        gevent.spawn(self._upgrade, name, entry, password)  # the login answers meanwhile

    def _upgrade(self, name: str, entry: StoredPassword, password: str) -> None:
        try:
            stronger = self.hasher.run(Scrypt.make, password, only_if_idle=True, memory=DEFAULT_HASH_MEMORY)
            if self._entries.get(name) is not entry:  # changed or gone while hashing
                return
            self._save_upgrade(name, stronger)
            fast = self._fast.get(name)
            self._put(name, stronger)
            if fast is not None:
                self._fast[name] = fast
            log.info("password hash of %s upgraded to the default scrypt cost", name)
        except HashingBusy:
            pass  # logins use the threads now: the next login tries again
        except Exception:  # noqa: BLE001 - an upgrade must never break logins
            log.exception("could not upgrade the password hash of %s", name)
        finally:
            self._upgrading.discard(name)

    def _upgradable(self, name: str) -> bool:
        """Whether a stronger hash of `name` would last: only an entry this object can
        save. A flag's or a file's entry would be upgraded again at every start: `geventpop3
        hash` makes those."""
        return False

    def _save_upgrade(self, name: str, entry: StoredPassword) -> None:
        """Persist an upgraded entry (nothing to persist for fixed credentials)."""

    # -- the entries and their cost classes ---------------------------------
    def _put(self, name: str, entry: StoredPassword) -> None:
        if name in self._entries:
            self._pop(name)
        self._entries[name] = entry
        cls = entry.cost_class
        self._classes[cls] += 1
        if cls not in self._samples:
            self._samples[cls] = entry
            self._calibrate_soon()

    def _pop(self, name: str) -> StoredPassword | None:
        """Withdraw `name` at once (no yield): from here on it cannot log in."""
        entry = self._entries.pop(name, None)
        self._fast.pop(name, None)
        if entry is not None:
            cls = entry.cost_class
            self._classes[cls] -= 1
            if self._classes[cls] <= 0:
                del self._classes[cls]
                del self._samples[cls]
        return entry


class UserStore(Protocol):
    """Where users added at run time persist (the SQLite store implements this)."""

    def load_users(self) -> dict[str, str]: ...

    def save_user(self, name: str, password_hash: str) -> None: ...

    def delete_user(self, name: str) -> None: ...


class UserDirectory(PasswordStore):
    """Every POP3 user: from flags and the users file (`configure`, again at each reload),
    and from the store (MSMP ADD/DELE). A configured entry wins over the store's entry of
    the same name, as at start-up; the store's comes back when the file drops the name."""

    kind = "user"

    def __init__(self, store: UserStore | None = None, hasher: Hasher | None = None,
                 allow_weak: bool = False) -> None:
        super().__init__(hasher, allow_weak)
        self._store: UserStore | None = None
        self._deleting: set[str] = set()  # withdrawn, waiting for the store write
        self._stored: dict[str, StoredPassword] = {}  # the store's entries (ours to save)
        if store is not None:
            self.attach_store(store)

    def attach_store(self, store: UserStore) -> None:
        """Persist in `store` from now on and take its users, under the configured entries of
        the same name: at construction, or once configured (a worker of geventpop3.process
        parses its users file before its supervisor tells it the stored users)."""
        self._store = store
        for name, text in store.load_users().items():
            self._keep_stored(name, text)

    def _keep_stored(self, name: str, text: str) -> None:
        """A stored user's entry, under a configured one of the same name."""
        try:  # written by set_password: no weak scheme, but an old store may hold anything
            entry = schemes.parse(text, self._plain_key, allow_weak=True)
        except SchemeError as exc:
            log.warning("state store: user %s has an unusable password entry, left out: %s", name, exc)
            return
        self._stored[name] = entry
        if name not in self._configured:
            self._put(name, entry)

    def _fallback(self, name: str) -> StoredPassword | None:
        return self._stored.get(name)

    def _upgradable(self, name: str) -> bool:
        """Only an entry from the store: a flag's or a file's stays theirs (saving it
        would keep a user the operator later removes from the file)."""
        entry = self._entries.get(name)
        return self._store is not None and entry is not None and self._stored.get(name) is entry

    def _save_upgrade(self, name: str, entry: StoredPassword) -> None:
        if self._upgradable(name):
            self._store.save_user(name, entry.text())  # type: ignore[union-attr]
            self._stored[name] = entry

    def set_password(self, name: str, password: str) -> bool:
        """Create or update a user (persisted); True when the user is new."""
        if not valid_username(name):
            raise UserError("Unsafe username")
        if not valid_password(password):
            raise UserError("Invalid password")
        entry = self.hasher.run(Scrypt.make, password, bounded=False, memory=DEFAULT_HASH_MEMORY)
        if name in self._deleting:  # checked after the hash, which yields
            raise UserError("User is being deleted, try again")
        created = name not in self._entries
        if self._store is not None:
            self._store.save_user(name, entry.text())
        self._stored[name] = entry
        self._put(name, entry)
        return created

    def withdraw(self, name: str) -> Withdrawal:
        """Begin deleting `name`: withdrawn at once, before anything can yield, so no login
        succeeds from here on; the handle then forgets it for good (`commit`, the store
        write) or puts it back as it was (`rollback`). UserError if there is no such user."""
        entry = self._pop(name)
        if entry is None:
            raise UserError("User does not exist")
        self._deleting.add(name)
        return Withdrawal(self, name, entry, self._stored.pop(name, None))

    @contextmanager
    def deleting(self, name: str) -> Iterator[None]:
        """Delete `name` (`withdraw`) around the block (the caller's own steps, such as
        moving mail aside): committed after it, rolled back if it raises."""
        withdrawal = self.withdraw(name)
        try:
            yield
        except BaseException:
            withdrawal.rollback()
            raise
        withdrawal.commit()

    def delete(self, name: str) -> None:
        with self.deleting(name):
            pass

    # -- changes another instance made to a shared store (geventpop3.state.shared) --
    def stored_entries(self) -> dict[str, str]:
        """The store's entries as this directory holds them: name -> password entry text."""
        return {name: entry.text() for name, entry in self._stored.items()}

    def take_stored(self, name: str, text: str | None) -> None:
        """Another instance saved (`text`) or deleted (None) `name` in the shared store.
        A flag's or the users file's entry of that name stays in force: they win, as at
        start-up (the store's comes back when the file drops the name)."""
        if name in self._deleting:
            return
        old = self._stored.get(name)
        if text is None:
            if old is None:
                return
            del self._stored[name]
            if name not in self._configured:
                self._pop(name)
            return
        if old is None or old.text() != text:
            self._keep_stored(name, text)


class Withdrawal:
    """A user withdrawn by `UserDirectory.withdraw`, until `commit` or `rollback` (the first
    call counts; later ones do nothing). A cluster worker holds one per MSMP DELE in progress,
    between the supervisor's `begin` and its outcome."""

    def __init__(self, directory: UserDirectory, name: str, entry: StoredPassword,
                 stored: StoredPassword | None) -> None:
        self.directory = directory
        self.name = name
        self._entry = entry
        self._stored = stored
        self._open = True

    def commit(self) -> None:
        """The deletion went through: written to the store (rolled back if that write raises)."""
        if not self._open:
            return
        store = self.directory._store
        try:
            if store is not None:
                store.delete_user(self.name)
        except BaseException:
            self.rollback()
            raise
        self._close()

    def rollback(self) -> None:
        """The deletion failed: the user is back as it was."""
        if not self._open:
            return
        directory = self.directory
        directory._put(self.name, self._entry)
        if self._stored is not None:
            directory._stored[self.name] = self._stored
        self._close()

    def _close(self) -> None:
        self._open = False
        self.directory._deleting.discard(self.name)


# -- the users file and -u ------------------------------------------------------------

# Dovecot passdb extra fields that refuse or restrict a login: geventpop3 does not enforce
# them, so an entry carrying one is left out rather than let in where Dovecot refused it.
_RESTRICTING_FIELDS = ("nologin", "deny", "nopassword", "allow_nets", "allow_real_nets")
# A valid name, then a password or a hash without passwd-file fields after it.
_SIMPLE_LINE = re.compile(r"([A-Za-z0-9_][A-Za-z0-9._-]{0,39}):([^{$:][^\n]*|[{$][^:]*)")


class UsersFile(NamedTuple):
    entries: list[Configured]
    notes: list[str]  # one line each for the log: what was ignored or left out
    data: bytes = b""  # the content parsed: a cluster's supervisor hands it to a worker that read another
    digest: str = ""  # SHA-256 of `data`: whether two processes read the same users


def parse_users_file(path: str) -> UsersFile:
    """The entries of a users file (`parse_users_data` of its content, read at once);
    OSError if it cannot be read."""
    with open(path, "rb") as handle:
        data = handle.read()
    return parse_users_data(data, path)


def parse_users_data(data: bytes, path: str) -> UsersFile:
    """The entries of the users file `path` whose content is `data`; UserError naming
    `path:line` for a bad line.

    Lines: geventpop3's `name:password` (the rest of the line is the password, colons
    included) or `name:$scrypt$...`, and Dovecot's passwd-file `name:{SCHEME}hash` or
    `name:$6$...` (crypt) followed by `:uid:gid:gecos:home:shell:extra`. Those fields
    are ignored (one note for the whole file); an entry whose extra field refuses or
    restricts logins (`nologin`, `deny`, `nopassword`, `allow_nets`) is left out. `#`
    comments and blank lines are skipped.
    """
    entries: list[Configured] = []
    ignored = 0
    left_out: list[str] = []
    simple = _SIMPLE_LINE.fullmatch
    try:
        with gc_paused(), io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") as handle:  # as open() reads
            for number, raw in enumerate(handle, 1):
                line = raw.strip()
                if not line or line[0] == "#":
                    continue
                match = simple(line)
                if match is not None:  # the common case in one step
                    entries.append(Configured(match[1], match[2], number, path))
                    continue
                name, sep, secret = line.partition(":")
                if secret[:1] in ("{", "$"):  # a hash: the passwd-file fields may follow
                    secret, _, fields = secret.partition(":")
                    if fields.strip(":"):
                        ignored += 1
                        if _restricting(fields):
                            left_out.append(name)
                            continue
                if not sep or not secret:
                    raise UserError(f"{path}:{number}: expected name:password")
                if not valid_username(name):
                    raise UserError(f"{path}:{number}: unsafe user name {name!r}")
                entries.append(Configured(name, secret, number, path))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    notes = []
    if ignored:
        notes.append(f"users file {path}: the fields after the password (uid, gid, home, ...) are ignored "
                     f"on {ignored} lines: every user's Maildir is under the Maildir root")
    if left_out:
        notes.append(f"users file {path}: left out {len(left_out)} users whose extra field refuses or restricts "
                     f"logins ({', '.join(_RESTRICTING_FIELDS)}): {', '.join(left_out[:10])}"
                     + (", ..." if len(left_out) > 10 else ""))
    return UsersFile(entries, notes, data, hashlib.sha256(data).hexdigest())


def _restricting(fields: str) -> bool:
    """Whether the passwd-file fields after the password carry a restricting extra field."""
    extra = fields.split(":", 5)[5:]  # uid, gid, gecos, home, shell, then the extra fields
    words = extra[0].split() if extra else []
    return any(word.split("=", 1)[0].lower() in _RESTRICTING_FIELDS for word in words)


def parse_user_flag(text: str) -> tuple[str, str]:
    name, sep, secret = text.partition(":")
    if not sep or not secret:
        raise UserError(f"expected NAME:PASS, got {text.split(':')[0]!r}...")
    if not valid_username(name):
        raise UserError(f"unsafe user name {name!r}")
    return name, secret
