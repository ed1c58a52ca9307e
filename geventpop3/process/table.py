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

Layout: a header with each worker slot's open connections, then two open-addressing
hash tables (linear probing, backward-shift deletion, at most half full):

- counts: a key's hash (of the source, or of (user, source) for logins in flight), then
  one count per worker slot: the supervisor forgets a dead worker's share by zeroing its
  column (`forget`);
- failures: a penalty source's hash, its recent failures and the time (CLOCK_MONOTONIC,
  the same in every process) of the last one, published by the supervisor, which alone
  owns the penalty (`publish`), read by a worker's `login` (a source with failures waits
  behind clean ones for a hash thread).

Keys are Python's `hash()` of strings: the same in every process of the tree (all forked
from the supervisor, so the same hash seed), 64 bits (a collision is 2**-64 and merges two
keys' counts). Sized from the limits at start; a full table refuses (counts) or forgets
(failures), logged once.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import time
from typing import TYPE_CHECKING

from geventpop3.core.accounting import ADMITTED, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_IP
from geventpop3.core.penalty import source_of

if TYPE_CHECKING:
    from geventpop3.core.settings import Settings

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
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
    return (hash(value) & _MASK64) or 1


class _Region:
    """One open-addressing table of fixed-size entries (`layout`, the key first) in `memory`."""

    def __init__(self, memory: mmap.mmap, offset: int, slots: int, layout: str, used_at: int) -> None:
        self.memory = memory
        self.used_at = used_at  # where the number of entries in use is kept (in the header)
        self.offset = offset
        self.slots = slots
        self.mask = slots - 1
        self.entry = struct.Struct(layout)
        self.size = slots * self.entry.size

    def at(self, index: int) -> int:
        return self.offset + index * self.entry.size

    def find(self, key: int) -> tuple[int, bool]:
        """The index of `key`'s entry (True) or of the free entry where it would go (False)."""
        memory, entry, mask = self.memory, self.entry, self.mask
        index = key & mask
        while True:
            stored = struct.unpack_from("<Q", memory, self.offset + index * entry.size)[0]
            if stored == key:
                return index, True
            if stored == 0:
                return index, False
            index = (index + 1) & mask

    def full(self) -> bool:
        """Half full: one more would slow every probe (asked before inserting)."""
        return self.used() * 2 >= self.slots

    def used(self) -> int:
        return int(struct.unpack_from("<i", self.memory, self.used_at)[0])

    def _count(self, by: int) -> None:
        struct.pack_into("<i", self.memory, self.used_at, self.used() + by)

    def insert(self, index: int, *values: int | float) -> None:
        """Fill free entry `index` (from `find`)."""
        self.entry.pack_into(self.memory, self.at(index), *values)
        self._count(1)

    def delete(self, index: int) -> None:
        """Free entry `index`, shifting back the entries after it whose probe passed it."""
        memory, size, mask = self.memory, self.entry.size, self.mask
        free = index
        probe = index
        while True:
            probe = (probe + 1) & mask
            key = struct.unpack_from("<Q", memory, self.offset + probe * size)[0]
            if key == 0:
                break
            home = key & mask
            # the entry at `probe` may move to `free` unless its home lies in (free, probe]
            if (free < probe and free < home <= probe) or (free > probe and (home > free or home <= probe)):
                continue
            start = self.offset + probe * size
            memory[self.offset + free * size:self.offset + free * size + size] = memory[start:start + size]
            free = probe
        start = self.offset + free * size
        memory[start:start + size] = bytes(size)
        self._count(-1)

    def clear(self) -> None:
        self.memory[self.offset:self.offset + self.size] = bytes(self.size)
        struct.pack_into("<i", self.memory, self.used_at, 0)


class AccountingTable:
    """The shared counts and failures (see the module docstring), for `workers` slots."""

    def __init__(self, workers: int, max_connections: int, penalty_sources: int) -> None:
        self.workers = workers
        self.fd = os.memfd_create("geventpop3-accounting", os.MFD_CLOEXEC)
        self._header = struct.Struct(f"<{workers}i")  # open connections per slot, then the tables' use
        counts = _slots(2 * max_connections, MAX_COUNT_SLOTS)  # a source and a login per connection at most
        failures = _slots(penalty_sources, MAX_FAILURE_SLOTS)
        used_at = self._header.size
        offset = (used_at + 8 + 7) // 8 * 8
        size = offset + counts * (8 + 4 * workers) + failures * 20
        os.ftruncate(self.fd, size)
        self.memory = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.counts = _Region(self.memory, offset, counts, f"<Q{workers}i", used_at)
        self.failures = _Region(self.memory, offset + self.counts.size, failures, "<Qid", used_at + 4)
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
            connections = self._header.unpack_from(self.memory, 0)
            if sum(connections) >= settings.max_connections:
                return MAX_CONNECTIONS
            refused = self._add(_key(source), owner, settings.max_connections_per_ip)
            if refused is None:
                return MAX_CONNECTIONS  # the table is full
            if refused:
                return MAX_CONNECTIONS_PER_IP
            self._add_header(owner, 1)
            return ADMITTED
        finally:
            self._unlock()

    def disconnect(self, source: str, owner: int) -> None:
        self._lock()
        try:
            if self._remove(_key(source), owner):
                self._add_header(owner, -1)
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

    def login_done(self, user: str, source: str, owner: int, forget: float) -> int:
        """The login ended; the source's recent failures (the supervisor forgets them after a right password)."""
        self._lock()
        try:
            self._remove(_key((user, source)), owner)
            return self._failures(source, forget)
        finally:
            self._unlock()

    # -- the supervisor's side -------------------------------------------------------------
    def forget(self, owner: int) -> None:
        """Worker slot `owner` is gone: its connections and logins in flight with it."""
        self._lock()
        try:
            region = self.counts
            kept: list[tuple[int, ...]] = []
            for index in range(region.slots):
                values = region.entry.unpack_from(self.memory, region.at(index))
                if values[0] == 0:
                    continue
                counts = list(values[1:])
                counts[owner] = 0
                if any(counts):
                    kept.append((values[0], *counts))
            region.clear()
            for values in kept:
                index, _ = region.find(values[0])
                region.insert(index, *values)
            self._header.pack_into(self.memory, 0, *[0 if slot == owner else count for slot, count in
                                                     enumerate(self._header.unpack_from(self.memory, 0))])
        finally:
            self._unlock()

    def publish(self, address: str | None, failures: int, last: float) -> None:
        """The penalty of `address`'s source is now `failures` (0: none), the last at `last`;
        `address` None with 0: every source's is cleared."""
        self._lock()
        try:
            region = self.failures
            if address is None:
                region.clear()
                return
            index, found = region.find(_key(source_of(address) or address))
            if failures <= 0:
                if found:
                    region.delete(index)
                return
            if not found and region.full():
                if not self._failures_full_logged:
                    self._failures_full_logged = True
                    log.warning("the shared penalty table is full (%d sources): a worker sees no failures of "
                                "further sources before a login (their delays stay right)", region.slots // 2)
                return
            key = _key(source_of(address) or address)
            if found:
                region.entry.pack_into(self.memory, region.at(index), key, failures, last)
            else:
                region.insert(index, key, failures, last)
        finally:
            self._unlock()

    def connections(self) -> int:
        """Open connections over every worker (what the header counts)."""
        return sum(self._header.unpack_from(self.memory, 0))

    def count(self, value: object) -> int:
        """Over every worker: open connections of a source (`value` a str), logins in flight
        of a (user, source) tuple."""
        region = self.counts
        index, found = region.find(_key(value))
        return sum(region.entry.unpack_from(self.memory, region.at(index))[1:]) if found else 0

    # -- under the lock --------------------------------------------------------------------
    def _add(self, key: int, owner: int, limit: int) -> bool | None:
        """Count one more of `key` for `owner` unless `limit` is reached (True); None: the table is full."""
        region = self.counts
        index, found = region.find(key)
        start = region.at(index)
        if found:
            values = list(region.entry.unpack_from(self.memory, start))
            if sum(values[1:]) >= limit:
                return True
            values[1 + owner] += 1
            region.entry.pack_into(self.memory, start, *values)
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
        region.insert(index, *values)
        return False

    def _remove(self, key: int, owner: int) -> bool:
        """One fewer of `key` for `owner`; False if `owner` held none (forgotten already)."""
        region = self.counts
        index, found = region.find(key)
        if not found:
            return False
        start = region.at(index)
        values = list(region.entry.unpack_from(self.memory, start))
        if values[1 + owner] <= 0:
            return False
        values[1 + owner] -= 1
        if any(values[1:]):
            region.entry.pack_into(self.memory, start, *values)
        else:
            region.delete(index)
        return True

    def _add_header(self, owner: int, by: int) -> None:
        at = owner * 4
        (count,) = struct.unpack_from("<i", self.memory, at)
        struct.pack_into("<i", self.memory, at, count + by)

    def _failures(self, address: str, forget: float) -> int:
        region = self.failures
        index, found = region.find(_key(source_of(address) or address))
        if not found:
            return 0
        _, failures, last = region.entry.unpack_from(self.memory, region.at(index))
        return int(failures) if time.monotonic() - last < forget else 0
