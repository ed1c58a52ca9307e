"""Credentials: name and password rules, scrypt hashing and verification, for POP3
users and MSMP admins alike.

Passwords are kept only as scrypt hashes (`$scrypt$n=..,r=..,p=..$salt$hash`). The
slow hash runs in gevent's thread pool so it never stalls other sessions. After one
successful slow verification a keyed fast digest of the password is cached in memory
(as Dovecot's auth cache does), so a client polling every minute does not cost 50 ms of
CPU per login; a wrong password or an unknown name always pays the full slow hash, at
the cost most entries use, so the two cannot be told apart by their timing.

`Credentials` is a fixed set (the MSMP admins); `UserDirectory` adds run-time changes
persisted in a `UserStore` (the SQLite store of the management plane, or nothing): the
POP3 side only ever talks to `UserDirectory`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import gevent

USERNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,39}\Z")
Cost = tuple[int, int, int]  # scrypt n, r, p
DEFAULT_COST: Cost = (2**14, 8, 1)  # about 50 ms and 16 MiB per hash
_MAXMEM = 128 * 1024 * 1024


class UserError(Exception):
    """A user operation that cannot be done; str() is the MSMP reason."""


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


class Credentials:
    """Names and their password hashes, verified at equal cost for unknown names.

    Used as is for the MSMP admins (fixed at start-up) and, through `UserDirectory`,
    for the POP3 users. Every change of the entries goes through `_put`/`_pop`, which
    keep the count of costs from which the dummy hash takes its cost.
    """

    def __init__(self) -> None:
        self._hashes: dict[str, str] = {}
        self._costs: Counter[Cost] = Counter()
        self._cache_key = os.urandom(32)
        self._fast: dict[str, bytes] = {}
        # Unknown names are checked against this, so they cost what a wrong password costs.
        # Made when first needed, remade when the entries move to another cost.
        self._dummy: tuple[Cost, str] | None = None

    # -- start-up -----------------------------------------------------------
    def add_configured(self, entries: Iterable[tuple[str, str]]) -> None:
        """Entries from the command line or a file: `$scrypt$` hashes are kept as they
        are; plain passwords are hashed here, in parallel in the thread pool, and never kept."""
        entries = list(entries)
        for name, _ in entries:
            if not valid_username(name):
                raise UserError(f"unsafe user name: {name!r}")
        plain = [(name, secret) for name, secret in entries if not is_password_hash(secret)]
        pool = gevent.get_hub().threadpool
        hashed: Iterable[str] = pool.imap(hash_password, [secret for _, secret in plain]) if plain else []
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

    def verify(self, name: str, password: str) -> bool:
        """True only for a known name with this password; same cost otherwise."""
        encoded = self._hashes.get(name)
        fast = hmac.new(self._cache_key, password.encode("utf-8", "surrogateescape"), "sha256").digest()
        cached = self._fast.get(name)
        if encoded is not None and cached is not None and hmac.compare_digest(cached, fast):
            return True
        against = encoded if encoded is not None else self._dummy_hash()
        ok = gevent.get_hub().threadpool.apply(verify_password, (password, against))
        # The slow hash yields: the entry may have changed or gone meanwhile.
        ok = bool(ok) and encoded is not None and self._hashes.get(name) == encoded
        if ok:
            self._fast[name] = fast
        return ok

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
        """The cost most entries use (the dearer on a tie); the default when there are none."""
        if not self._costs:
            return DEFAULT_COST
        return max(self._costs.items(), key=lambda item: (item[1], item[0]))[0]

    def _refresh_dummy(self) -> None:
        """Make the dummy hash now if the entries call for another cost: done at changes,
        so the first unknown name does not pay for making it."""
        cost = self._dummy_cost()
        if self._dummy is not None and self._dummy[0] == cost:
            return
        secret = os.urandom(8).hex()
        try:
            encoded = gevent.get_hub().threadpool.apply(hash_password, (secret, cost))
        except ValueError:  # a hand-edited cost scrypt cannot run: such entries never log in
            cost = DEFAULT_COST
            encoded = gevent.get_hub().threadpool.apply(hash_password, (secret, cost))
        self._dummy = (cost, encoded)

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

    def __init__(self, store: UserStore | None = None) -> None:
        super().__init__()
        self._store = store
        self._deleting: set[str] = set()  # withdrawn, waiting for the store write
        if store is not None:
            for name, encoded in store.load_users().items():
                self._put(name, encoded)
            if self._hashes:
                self._refresh_dummy()

    def set_password(self, name: str, password: str) -> bool:
        """Create or update a user (persisted); True when the user is new."""
        if not valid_username(name):
            raise UserError("Unsafe username")
        if not valid_password(password):
            raise UserError("Invalid password")
        digest = gevent.get_hub().threadpool.apply(hash_password, (password,))
        if name in self._deleting:  # checked after the hash, which yields
            raise UserError("User is being deleted, try again")
        created = name not in self._hashes
        if self._store is not None:
            self._store.save_user(name, digest)
        self._put(name, digest)
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
        self._deleting.add(name)
        try:
            yield
            if self._store is not None:
                self._store.delete_user(name)
        except BaseException:
            self._put(name, encoded)
            raise
        finally:
            self._deleting.discard(name)
        self._refresh_dummy()

    def delete(self, name: str) -> None:
        with self.deleting(name):
            pass


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
