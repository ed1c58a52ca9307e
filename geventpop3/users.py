"""Credentials: name and password rules, scrypt hashing and verification, for POP3
users and MSMP admins alike.

Passwords are kept only as scrypt hashes (`$scrypt$n=..,r=..,p=..$salt$hash`). The
slow hash runs in its own few threads (`Hasher`), not in gevent's hub pool, so password
guessing cannot starve the SQLite and Maildir work that pool does; the logins waiting
for a hash thread are bounded and served cleanest source first. After one successful
slow verification a keyed fast digest of the password is cached in memory (as Dovecot's
auth cache does), so a client polling every minute does not cost 50 ms of CPU per
login. A wrong password or an unknown name always pays the same slow work: the cost of
the dearest entry in use (an entry of a cheaper cost is topped up with dummy hashes to
it), so neither can be told apart by its timing; a cheap entry is rehashed at the
default cost at its next successful login.

`Credentials` is a fixed set (the MSMP admins); `UserDirectory` adds run-time changes
persisted in a `UserStore` (the SQLite store of the management plane, or nothing): the
POP3 side only ever talks to `UserDirectory`.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import itertools
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.threadpool import ThreadPool

log = logging.getLogger(__name__)
T = TypeVar("T")

USERNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,39}\Z")
Cost = tuple[int, int, int]  # scrypt n, r, p
DEFAULT_COST: Cost = (2**14, 8, 1)  # about 50 ms and 16 MiB per hash
_MAXMEM = 128 * 1024 * 1024


class UserError(Exception):
    """A user operation that cannot be done; str() is the MSMP reason."""


class HashingBusy(UserError):
    """Too many logins already wait for a hash thread: answer a temporary failure at once."""

    def __init__(self) -> None:
        super().__init__("Server busy, try again later")


class _Waiter:
    __slots__ = ("event", "granted", "cancelled")

    def __init__(self) -> None:
        self.event = Event()
        self.granted = False  # a thread slot was handed to it
        self.cancelled = False  # its greenlet stopped waiting (killed): skip it


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
    """

    def __init__(self, threads: int = 2, queue: int = 100) -> None:
        self.threads = threads
        self.queue = queue
        self._pool: ThreadPool | None = None  # made at first use, in the process that uses it
        self._running = 0
        self._waiting: list[tuple[int, int, _Waiter]] = []  # heap: (priority, arrival, waiter)
        self._queued = 0  # waiters in the heap not cancelled
        self._arrivals = itertools.count()

    def configure(self, threads: int, queue: int) -> None:
        """New limits (settings `auth_hash_threads`, `auth_hash_queue`), applied at once."""
        self.threads, self.queue = threads, queue
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
            only_if_idle: bool = False) -> T:
        """`func(*args)` in a hash thread, this greenlet blocked meanwhile (others run).

        `only_if_idle`: run only on a thread nobody waits for, else HashingBusy at once
        (work that can be done later, such as upgrading a hash, never queues before logins)."""
        if only_if_idle and (self._running >= self.threads or self._queued):
            raise HashingBusy()
        self._acquire(priority, bounded)
        try:
            if self._pool is None:
                self._pool = ThreadPool(max(self.threads, 1))
            return self._pool.apply(func, args)
        finally:
            self._release()

    def _acquire(self, priority: int, bounded: bool) -> None:
        if self._running < self.threads and not self._queued:
            self._running += 1
            return
        if bounded and self._queued >= self.queue:
            raise HashingBusy()
        waiter = _Waiter()
        heapq.heappush(self._waiting, (priority, next(self._arrivals), waiter))
        self._queued += 1
        try:
            waiter.event.wait()
        except BaseException:  # killed while waiting: give back what it holds
            if waiter.granted:
                self._release()
            else:
                waiter.cancelled = True
                self._queued -= 1
            raise

    def _release(self) -> None:
        self._running -= 1
        self._wake()

    def _wake(self) -> None:
        while self._running < self.threads and self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if waiter.cancelled:
                continue
            self._queued -= 1
            self._running += 1
            waiter.granted = True
            waiter.event.set()


HASHER = Hasher()  # shared by users and admins; app.py applies the settings


def valid_username(name: str) -> bool:
    """1-40 of letters, digits, `.`, `_`, `-`; never starting with `.` or `-`."""
    return USERNAME_RE.match(name) is not None


def valid_password(password: str) -> bool:
    """1-100 printable characters without whitespace."""
    return 0 < len(password) <= 100 and password.isprintable() and not any(c.isspace() for c in password)


def hash_password(password: str, cost: Cost = DEFAULT_COST) -> str:
    n, r, p = cost
    salt = os.urandom(16)
    # surrogateescape as in verify_password: a non-UTF-8 password from argv hashes, not crashes
    digest = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM)
    return f"$scrypt$n={n},r={r},p={p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def is_password_hash(text: str) -> bool:
    return text.startswith("$scrypt$")


def _decode(encoded: str) -> tuple[Cost, bytes, bytes] | None:
    """(cost, salt, digest) of an encoded scrypt hash, or None if it does not parse."""
    try:
        _, scheme, params, salt_b64, digest_b64 = encoded.split("$")
        fields = dict(item.split("=") for item in params.split(","))
        cost = int(fields["n"]), int(fields["r"]), int(fields["p"])
        salt = base64.b64decode(salt_b64)
        digest = base64.b64decode(digest_b64)
    except (ValueError, KeyError):
        return None
    return (cost, salt, digest) if scheme == "scrypt" else None


def hash_cost(encoded: str) -> Cost | None:
    """The scrypt (n, r, p) an encoded hash names, or None if it does not parse."""
    decoded = _decode(encoded)
    return decoded[0] if decoded is not None else None


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of `password` against an encoded scrypt hash."""
    decoded = _decode(encoded)
    if decoded is None:
        return False
    (n, r, p), salt, expected = decoded
    secret = password.encode("utf-8", "surrogateescape")
    try:
        digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(expected))
    except ValueError:  # impossible parameters in a hand-edited entry
        return False
    return hmac.compare_digest(digest, expected)


def cost_work(cost: Cost) -> int:
    """scrypt's work grows with n * r * p: what makes two costs comparable."""
    n, r, p = cost
    return n * r * p


def top_up_costs(cost: Cost | None, reference: Cost, most: int = 8) -> tuple[Cost, ...]:
    """Dummy hashes that bring the work of `cost` (None: an entry that does not parse, no
    work) up to that of `reference`: powers of two at the reference's r, largest first,
    at most `most` of them (within 1% of the gap for any real cost)."""
    _, r, p = reference
    gap = cost_work(reference) - (cost_work(cost) if cost is not None else 0)
    units = max(gap, 0) // (r * p)
    parts: list[Cost] = []
    bit = 1 << max(units.bit_length() - 1, 0)
    while bit >= 2 and len(parts) < most:
        if units & bit:
            parts.append((bit, r, p))
        bit >>= 1
    return tuple(parts)


def _check(password: str, encoded: str, top_up: tuple[Cost, ...]) -> bool:
    """verify_password, then for a failure the dummy hashes of `top_up` (in the same thread:
    a wrong password costs the reference work whatever the entry's cost)."""
    if verify_password(password, encoded):
        return True
    secret = password.encode("utf-8", "surrogateescape")
    for n, r, p in top_up:
        hashlib.scrypt(secret, salt=b"geventpop3-top-up", n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return False


class Credentials:
    """Names and their password hashes, verified at equal cost for unknown names.

    Used as is for the MSMP admins (fixed at start-up) and, through `UserDirectory`,
    for the POP3 users. Every change of the entries goes through `_put`/`_pop`, which
    keep the count of costs from which the dummy hash takes its cost.
    """

    def __init__(self, hasher: Hasher | None = None) -> None:
        self._hasher = hasher if hasher is not None else HASHER
        self._hashes: dict[str, str] = {}
        self._costs: Counter[Cost] = Counter()
        self._cache_key = os.urandom(32)
        self._fast: dict[str, bytes] = {}
        # Unknown names are checked against this, so they cost what a wrong password costs.
        # Made when first needed, remade when the entries move to another cost.
        self._dummy: tuple[Cost, str] | None = None
        self._top_ups: dict[Cost | None, tuple[Cost, ...]] = {}  # for the current dummy cost
        self._upgrading: set[str] = set()

    # -- start-up -----------------------------------------------------------
    def add_configured(self, entries: Iterable[tuple[str, str]]) -> None:
        """Entries from the command line or a file: `$scrypt$` hashes are kept as they
        are; plain passwords are hashed here, in parallel in the thread pool, and never kept."""
        entries = list(entries)
        for name, _ in entries:
            if not valid_username(name):
                raise UserError(f"unsafe user name: {name!r}")
        plain = [(name, secret) for name, secret in entries if not is_password_hash(secret)]
        hasher = self._hasher

        def hashed_at_start(secret: str) -> str:
            return hasher.run(hash_password, secret, bounded=False)

        workers = Pool(max(hasher.threads, 1))
        hashed: Iterable[str] = workers.imap(hashed_at_start, [secret for _, secret in plain]) if plain else []
        for (name, _), digest in zip(plain, hashed, strict=True):
            self._put(name, digest)
        for name, secret in entries:
            if is_password_hash(secret):
                self._put(name, secret)
        self._refresh_dummy()

    # -- queries ------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def names(self) -> list[str]:
        return sorted(self._hashes)

    def verify(self, name: str, password: str, priority: int = 0) -> bool:
        """True only for a known name with this password; the same work otherwise.

        `priority` orders the wait for a hash thread (lower first: the failures of the
        client's source); HashingBusy when too many already wait."""
        encoded = self._hashes.get(name)
        fast = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), "sha256").digest()
        cached = self._fast.get(name)
        if encoded is not None and cached is not None and hmac.compare_digest(cached, fast):
            return True
        top_up: tuple[Cost, ...] = ()
        if encoded is None:
            against = self._dummy_hash()
        else:
            against, top_up = encoded, self._top_up(hash_cost(encoded))
        ok = self._hasher.run(_check, password, against, top_up, priority=priority)
        # The slow hash yields: the entry may have changed or gone meanwhile.
        ok = bool(ok) and encoded is not None and self._hashes.get(name) == encoded
        if ok:
            self._fast[name] = fast
            assert encoded is not None
            self._maybe_upgrade(name, encoded, password)
        return ok

    # -- stronger at rest: cheap entries are rehashed at their next login ------
    def _maybe_upgrade(self, name: str, encoded: str, password: str) -> None:
        cost = hash_cost(encoded)
        if cost is None or cost_work(cost) >= cost_work(DEFAULT_COST) or name in self._upgrading:
            return
        if not self._upgradable(name):
            return
        self._upgrading.add(name)
        gevent.spawn(self._upgrade, name, encoded, password)  # the login answers meanwhile

    def _upgrade(self, name: str, encoded: str, password: str) -> None:
        try:
            digest = self._hasher.run(hash_password, password, only_if_idle=True)
            if self._hashes.get(name) != encoded:  # changed or gone while hashing
                return
            self._save_upgrade(name, digest)
            fast = self._fast.get(name)
            self._put(name, digest)
            if fast is not None:
                self._fast[name] = fast
            log.info("password hash of %s upgraded to the default scrypt cost", name)
            self._refresh_dummy()
        except HashingBusy:
            pass  # logins use the threads now: the next login tries again
        except Exception:  # noqa: BLE001 - an upgrade must never break logins
            log.exception("could not upgrade the password hash of %s", name)
        finally:
            self._upgrading.discard(name)

    def _upgradable(self, name: str) -> bool:
        """Whether a stronger hash of `name` would last: only an entry this object can
        save. A flag's or a file's entry would be upgraded again at every start (50 ms of
        CPU and 16 MiB of scrypt memory per hash thread each time): `geventpop3 hash`
        makes those."""
        return False

    def _save_upgrade(self, name: str, digest: str) -> None:
        """Persist an upgraded entry (nothing to persist for fixed credentials)."""

    # -- the entries and the dummy hash -------------------------------------
    def _put(self, name: str, encoded: str) -> None:
        self._pop(name)
        self._hashes[name] = encoded
        cost = hash_cost(encoded)
        if cost is not None:
            self._costs[cost] += 1

    def _pop(self, name: str) -> str | None:
        """Withdraw `name` at once (no yield): from here on it cannot log in."""
        encoded = self._hashes.pop(name, None)
        self._fast.pop(name, None)
        cost = hash_cost(encoded) if encoded is not None else None
        if cost is not None:
            self._costs[cost] -= 1
            if self._costs[cost] <= 0:
                del self._costs[cost]
        return encoded

    def _dummy_cost(self) -> Cost:
        """The dearest cost in use (the default when there are none): every failure costs this."""
        if not self._costs:
            return DEFAULT_COST
        return max(self._costs, key=lambda cost: (cost_work(cost), cost))

    def _top_up(self, cost: Cost | None) -> tuple[Cost, ...]:
        """The dummy hashes a failure for an entry of `cost` adds to reach the dummy's cost."""
        if self._dummy is None:
            self._refresh_dummy()
        assert self._dummy is not None
        top_up = self._top_ups.get(cost)
        if top_up is None:
            top_up = self._top_ups[cost] = top_up_costs(cost, self._dummy[0])
        return top_up

    def _refresh_dummy(self) -> None:
        """Make the dummy hash now if the entries call for another cost: done at changes,
        so the first unknown name does not pay for making it."""
        cost = self._dummy_cost()
        if self._dummy is not None and self._dummy[0] == cost:
            return
        secret = os.urandom(8).hex()
        try:
            encoded = self._hasher.run(hash_password, secret, cost, bounded=False)
        except ValueError:  # a hand-edited cost scrypt cannot run: such entries never log in
            cost = DEFAULT_COST
            encoded = self._hasher.run(hash_password, secret, cost, bounded=False)
        self._dummy = (cost, encoded)
        self._top_ups = {}

    def _dummy_hash(self) -> str:
        if self._dummy is None:
            self._refresh_dummy()
        assert self._dummy is not None
        return self._dummy[1]


class UserStore(Protocol):
    """Where users added at run time persist (the SQLite store implements this)."""

    def load_users(self) -> dict[str, str]: ...

    def save_user(self, name: str, password_hash: str) -> None: ...

    def delete_user(self, name: str) -> None: ...


class UserDirectory(Credentials):
    """Every POP3 user: from flags and the users file, and from the store."""

    def __init__(self, store: UserStore | None = None, hasher: Hasher | None = None) -> None:
        super().__init__(hasher)
        self._store = store
        self._deleting: set[str] = set()  # withdrawn, waiting for the store write
        self._stored: set[str] = set()  # names whose entry is the store's (not a flag's or file's)
        if store is not None:
            for name, encoded in store.load_users().items():
                self._put(name, encoded)
                self._stored.add(name)
            if self._hashes:
                self._refresh_dummy()

    def add_configured(self, entries: Iterable[tuple[str, str]]) -> None:
        entries = list(entries)
        super().add_configured(entries)
        self._stored.difference_update(name for name, _ in entries)  # flags and files win

    def _upgradable(self, name: str) -> bool:
        """Only an entry from the store: a flag's or a file's stays theirs (saving it
        would keep a user the operator later removes from the file)."""
        return self._store is not None and name in self._stored

    def _save_upgrade(self, name: str, digest: str) -> None:
        if self._upgradable(name):
            self._store.save_user(name, digest)  # type: ignore[union-attr]

    def set_password(self, name: str, password: str) -> bool:
        """Create or update a user (persisted); True when the user is new."""
        if not valid_username(name):
            raise UserError("Unsafe username")
        if not valid_password(password):
            raise UserError("Invalid password")
        digest = self._hasher.run(hash_password, password, bounded=False)
        if name in self._deleting:  # checked after the hash, which yields
            raise UserError("User is being deleted, try again")
        created = name not in self._hashes
        if self._store is not None:
            self._store.save_user(name, digest)
        self._put(name, digest)
        self._stored.add(name)
        self._refresh_dummy()
        return created

    @contextmanager
    def deleting(self, name: str) -> Iterator[None]:
        """Delete `name`: withdrawn at once, before anything can yield, so no login
        succeeds from here on; then the block runs (the caller's own steps, such as
        moving mail aside), then the store write. If the block or the store write
        raises, the user is put back as it was and the exception goes on."""
        encoded = self._pop(name)
        if encoded is None:
            raise UserError("User does not exist")
        stored = name in self._stored
        self._stored.discard(name)
        self._deleting.add(name)
        try:
            yield
            if self._store is not None:
                self._store.delete_user(name)
        except BaseException:
            self._put(name, encoded)
            if stored:
                self._stored.add(name)
            raise
        finally:
            self._deleting.discard(name)
        self._refresh_dummy()

    def delete(self, name: str) -> None:
        with self.deleting(name):
            pass

    # -- changes another instance made to a shared store (geventpop3.store.shared) --
    def stored_entries(self) -> dict[str, str]:
        """The store's entries as this directory holds them: name -> password entry."""
        return {name: self._hashes[name] for name in self._stored if name in self._hashes}

    def take_stored(self, name: str, encoded: str | None) -> None:
        """Another instance saved (`encoded`) or deleted (None) `name` in the shared store.
        A flag's or the users file's entry of that name stays: they win, as at start-up."""
        configured = name in self._hashes and name not in self._stored
        if configured or name in self._deleting or self._hashes.get(name) == encoded:
            return
        if encoded is None:
            self._pop(name)
            self._stored.discard(name)
        else:
            self._put(name, encoded)
            self._stored.add(name)
        self._refresh_dummy()


def parse_users_file(path: str) -> list[tuple[str, str]]:
    """`name:password` or `name:$scrypt$...` lines; `#` comments and blank lines skipped."""
    entries = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, secret = line.partition(":")
                if not sep or not secret:
                    raise UserError(f"{path}:{number}: expected name:password")
                if not valid_username(name):
                    raise UserError(f"{path}:{number}: unsafe user name {name!r}")
                entries.append((name, secret))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return entries


def parse_user_flag(text: str) -> tuple[str, str]:
    name, sep, secret = text.partition(":")
    if not sep or not secret:
        raise UserError(f"expected NAME:PASS, got {text.split(':')[0]!r}...")
    if not valid_username(name):
        raise UserError(f"unsafe user name {name!r}")
    return name, secret
