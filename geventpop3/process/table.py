"""The whole server's connection and login counts in shared memory, and the penalty's failures.

With `--workers N` the limits `max_connections`, `max_connections_per_ip` and
`max_sessions_per_user_ip` hold for the server as a whole (issue 21, like Dovecot's
anvil). Asking the supervisor at every connection and login costs both processes a
wake-up (+41 % instructions per session measured): the counts live here instead, in a
memory file (`memfd_create`, mapped MAP_SHARED) that the supervisor creates before it
forks the keeper, so every worker the keeper forks (a replacement too) maps it. A worker
counts its own connections and logins under a short cross-process lock (a POSIX record
lock, `lockf`, on the memory file: held by the process, not inherited by a fork, released
by the kernel if its holder dies), so check-and-count is atomic across workers.

Layout, in 64-bit words (read and written through a memoryview: no struct packing on
the hot path): a header with each worker slot's open connections and the tables' use,
then two open-addressing hash tables (linear probing, backward-shift deletion, at most
half full):

- counts: a key's hash (of the source, or of (user, source) for logins in flight), then
  one count per worker slot: the supervisor forgets a dead worker's share by zeroing its
  column (`forget`);
- failures: a penalty source's hash, its recent failures and the time (CLOCK_MONOTONIC
  in nanoseconds, the same in every process) of the last one, published by the supervisor, which alone
  owns the penalty (`publish`), read by a worker's `login` (a source with failures waits
  behind clean ones for a hash thread).

Keys are Python's `hash()` of strings: the same in every process of the tree (all forked
from the supervisor, so the same hash seed), 64 bits (a collision is 2**-64 and merges two
keys' counts). Sized from the limits at start; a full table refuses (counts) or forgets
(failures), logged once.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import time
from typing import TYPE_CHECKING

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP
from geventpop3.core.penalty import source_of

if TYPE_CHECKING:
    from geventpop3.core.settings import Settings

log = logging.getLogger(__name__)

MAX_COUNT_SLOTS = 1 << 20  # entries of the counts table at most (the limits may be larger than memory wants)
MAX_FAILURE_SLOTS = 1 << 18


def _slots(wanted: int, most: int) -> int:
    """A power of two at least twice `wanted` (half full at most), within [64, most]."""
    slots = 64
    while slots < 2 * wanted and slots < most:
        slots *= 2
    return slots


def _key(value: object) -> int:
    """A nonzero 64-bit key (0 marks a free entry)."""
    return hash(value) or 1


class _Region:
    """One open-addressing table of entries of `stride` words (the key first) in `words`."""

    def __init__(self, words: memoryview, base: int, slots: int, stride: int, used_at: int) -> None:
        self.words = words
        self.base = base  # the first word
        self.slots = slots
        self.mask = slots - 1
        self.stride = stride
        self.used_at = used_at  # the header word counting the entries in use
        self.size = slots * stride  # in words
        self._zeros = array.array("q", bytes(8 * stride))

    def find(self, key: int) -> tuple[int, bool]:
        """The first word of `key`'s entry (True) or of the free entry where it would go (False)."""
        words, base, stride, mask = self.words, self.base, self.stride, self.mask
        index = key & mask
        while True:
            at = base + index * stride
            stored = words[at]
            if stored == key:
                return at, True
            if stored == 0:
                return at, False
            index = (index + 1) & mask

    def full(self) -> bool:
        """Half full: one more would slow every probe (asked before inserting)."""
        return self.used() * 2 >= self.slots

    def used(self) -> int:
        return int(self.words[self.used_at])

    def insert(self, at: int, values: list[int]) -> None:
        """Fill the free entry at word `at` (from `find`)."""
        self.words[at:at + self.stride] = array.array("q", values)
        self.words[self.used_at] += 1

    def delete(self, at: int) -> None:
        """Free the entry at word `at`, shifting back the entries after it whose probe passed it."""
        words, base, stride, mask = self.words, self.base, self.stride, self.mask
        free = (at - base) // stride
        probe = free
        while True:
            probe = (probe + 1) & mask
            key = words[base + probe * stride]
            if key == 0:
                break
            home = key & mask
            # the entry at `probe` may move to `free` unless its home lies in (free, probe]
            if (free < probe and free < home <= probe) or (free > probe and (home > free or home <= probe)):
                continue
            words[base + free * stride:base + free * stride + stride] = words[base + probe * stride:
                                                                              base + probe * stride + stride]
            free = probe
        words[base + free * stride:base + free * stride + stride] = self._zeros
        words[self.used_at] -= 1

    def entries(self) -> list[list[int]]:
        """Every entry in use (its words)."""
        words, stride = self.words, self.stride
        return [words[at:at + stride].tolist() for at in range(self.base, self.base + self.size, stride)
                if words[at]]

    def clear(self) -> None:
        self.words[self.base:self.base + self.size] = array.array("q", bytes(8 * self.size))
        self.words[self.used_at] = 0


class AccountingTable:
    """The shared counts and failures (see the module docstring), for `workers` slots."""

    def __init__(self, workers: int, max_connections: int, penalty_sources: int) -> None:
        self.workers = workers
        self.fd = os.memfd_create("geventpop3-accounting", os.MFD_CLOEXEC)
        counts = _slots(2 * max_connections, MAX_COUNT_SLOTS)  # a source and a login per connection at most
        failures = _slots(penalty_sources, MAX_FAILURE_SLOTS)
        header = workers + 2  # open connections per slot, then each table's entries in use
        size = header + counts * (1 + workers) + failures * 3
        os.ftruncate(self.fd, 8 * size)
        self.memory = mmap.mmap(self.fd, 8 * size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.memory).cast("q")
        self.counts = _Region(self.words, header, counts, 1 + workers, workers)
        self.failures = _Region(self.words, header + counts * (1 + workers), failures, 3, workers + 1)
        self._full_logged = False
        self._failures_full_logged = False

    # -- the lock --------------------------------------------------------------------------
    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- a worker's side -------------------------------------------------------------------
    def connect(self, source: str, owner: int, settings: Settings) -> str:
        """ADMITTED (counted for `owner`) or the limit that refuses it, over every worker."""
        self._lock()
        try:
            words = self.words
            if sum(words[:self.workers]) >= settings.max_connections:
                return MAX_CONNECTIONS
            refused = self._add(_key(source), owner, settings.max_connections_per_ip)
            if refused is None:
                return MAX_CONNECTIONS  # the table is full
            if refused:
                return MAX_CONNECTIONS_PER_IP
            words[owner] += 1
            return ADMITTED
        finally:
            self._unlock()

    def disconnect(self, source: str, owner: int) -> None:
        self._lock()
        try:
            if self._remove(_key(source), owner):
                self.words[owner] -= 1
        finally:
            self._unlock()

    def login(self, user: str, source: str, owner: int, settings: Settings) -> int | None:
        """None if over `max_sessions_per_user_ip`; else counted, and the source's recent failures."""
        self._lock()
        try:
            refused = self._add(_key((user, source)), owner, settings.max_sessions_per_user_ip)
            if refused is None or refused:
                return None
            return self._failures(source, float(settings.auth_penalty_forget))
        finally:
            self._unlock()

    def login_done(self, user: str, source: str, owner: int, forget: float, verified: bool = True) -> int:
        """The login ended; if `verified`, the source's recent failures (the supervisor
        forgets them after a right password), else 0."""
        self._lock()
        try:
            self._remove(_key((user, source)), owner)
            return self._failures(source, forget) if verified else 0
        finally:
            self._unlock()

    # -- the supervisor's side -------------------------------------------------------------
    def forget(self, owner: int) -> None:
        """Worker slot `owner` is gone: its connections and logins in flight with it."""
        self._lock()
        try:
            region = self.counts
            kept = []
            for values in region.entries():
                values[1 + owner] = 0
                if any(values[1:]):
                    kept.append(values)
            region.clear()
            for values in kept:
                at, _ = region.find(values[0])
                region.insert(at, values)
            self.words[owner] = 0
        finally:
            self._unlock()

    def publish(self, address: str | None, failures: int, last: float) -> None:
        """The penalty of `address`'s source is now `failures` (0: none), the last at `last`
        (time.monotonic()); `address` None: every source's is cleared."""
        self._lock()
        try:
            region = self.failures
            if address is None:
                region.clear()
                return
            key = _key(source_of(address) or address)
            at, found = region.find(key)
            if failures <= 0:
                if found:
                    region.delete(at)
                return
            if found:
                self.words[at + 1:at + 3] = array.array("q", [failures, int(last * 1e9)])
            elif region.full():
                if not self._failures_full_logged:
                    self._failures_full_logged = True
                    log.warning("the shared penalty table is full (%d sources): a worker sees no failures of "
                                "further sources before a login (their delays stay right)", region.slots // 2)
            else:
                region.insert(at, [key, failures, int(last * 1e9)])
        finally:
            self._unlock()

    def connections(self) -> int:
        """Open connections over every worker (what the header counts)."""
        return sum(self.words[:self.workers])

    def count(self, value: object) -> int:
        """Over every worker: open connections of a source (`value` a str), logins in flight
        of a (user, source) tuple."""
        at, found = self.counts.find(_key(value))
        return sum(self.words[at + 1:at + 1 + self.workers]) if found else 0

    # -- under the lock --------------------------------------------------------------------
    def _add(self, key: int, owner: int, limit: int) -> bool | None:
        """Count one more of `key` for `owner` unless `limit` is reached (True); None: the table is full."""
        region = self.counts
        at, found = region.find(key)
        words = self.words
        if found:
            if sum(words[at + 1:at + 1 + self.workers]) >= limit:
                return True
            words[at + 1 + owner] += 1
            return False
        if region.full():
            if not self._full_logged:
                self._full_logged = True
                log.warning("the shared accounting table is full (%d entries): connections and logins are "
                            "refused while it is", region.slots // 2)
            return None
        values = [0] * (1 + self.workers)
        values[0] = key
        values[1 + owner] = 1
        region.insert(at, values)
        return False

    def _remove(self, key: int, owner: int) -> bool:
        """One fewer of `key` for `owner`; False if `owner` held none (forgotten already)."""
        region = self.counts
        at, found = region.find(key)
        if not found:
            return False
        words = self.words
        held = words[at + 1 + owner]
        if held <= 0:
            return False
        words[at + 1 + owner] = held - 1
        if not any(words[at + 1:at + 1 + self.workers]):
            region.delete(at)
        return True

    def _failures(self, address: str, forget: float) -> int:
        at, found = self.failures.find(_key(source_of(address) or address))
        if not found:
            return 0
        words = self.words
        return int(words[at + 1]) if time.monotonic_ns() - words[at + 2] < forget * 1e9 else 0
