"""Password schemes: the stored forms a users file or the state store may hold, parsed once
and verified on demand.

One entry is one `StoredPassword`. Parsing is cheap (no hashing: a users file of 100,000
entries loads in well under a second); `verify` is the slow part and runs in a hash thread
(users.Hasher), except for entries whose `cost_class` says they are cheap. Forms accepted:

- `{SCHEME}data` as Dovecot's passwd-file writes it (`{SHA512-CRYPT}$6$...`, `{PLAIN}pw`,
  `{SSHA256.b64}...`, ...);
- `$scrypt$n=..,r=..,p=..$salt$hash`, geventpop3's own default;
- anything else: the password itself (the original `name:password` format). A plain
  password is never kept: only a keyed digest of it (`plain_key`), compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Hashable
from typing import ClassVar

Cost = tuple[int, int, int]  # scrypt n, r, p
DEFAULT_COST: Cost = (2**14, 8, 1)  # about 50 ms and 16 MiB per hash
_MAXMEM = 128 * 1024 * 1024


class SchemeError(ValueError):
    """An entry that cannot be used (unknown or weak scheme, malformed data): str() is one line."""


def _secret(password: str) -> bytes:
    # surrogateescape: a non-UTF-8 password (from argv, or bytes a client sent) hashes, not crashes
    return password.encode("utf-8", "surrogateescape")


class StoredPassword:
    """One stored password. Subclasses: one per family of schemes."""

    scheme: ClassVar[str] = ""
    cheap: ClassVar[bool] = False  # verify is fast enough for the event loop (no thread)

    def verify(self, password: str) -> bool:
        """Whether `password` matches; constant time in the password. Slow for real hashes."""
        raise NotImplementedError

    @property
    def cost_class(self) -> Hashable:
        """Entries with equal cost classes take the same time to verify (the timing floor
        of failures is the dearest class in use)."""
        return (self.scheme,)

    @property
    def memory(self) -> int:
        """Bytes a verification needs at its peak (memory-hard schemes bound how many run at once)."""
        return 0

    def dummy(self) -> StoredPassword:
        """An entry of the same scheme and cost for a random password: verified to learn what
        a failure against this class costs."""
        raise NotImplementedError

    def text(self) -> str:
        """The entry as a users file holds it."""
        raise NotImplementedError

    def same(self, other: StoredPassword) -> bool:
        """Whether `other` stores the same password the same way (a reload keeps the
        cached logins of unchanged entries)."""
        return type(other) is type(self) and other.text() == self.text()


class KeyedPlain(StoredPassword):
    """A plain password, kept only as a keyed digest: BLAKE2s in its keyed (MAC) mode, a
    third of HMAC-SHA256's time, which counts with 100,000 plain entries to load."""

    scheme = "PLAIN"
    cheap = True
    __slots__ = ("_key", "_digest")

    def __init__(self, key: bytes, password: str) -> None:
        self._key = key
        self._digest = hashlib.blake2s(_secret(password), key=key).digest()

    def verify(self, password: str) -> bool:
        return hmac.compare_digest(hashlib.blake2s(_secret(password), key=self._key).digest(), self._digest)

    def dummy(self) -> StoredPassword:
        return KeyedPlain(self._key, os.urandom(8).hex())

    def text(self) -> str:
        raise SchemeError("a plain password is not kept, only its keyed digest")

    def same(self, other: StoredPassword) -> bool:
        return isinstance(other, KeyedPlain) and other._key == self._key and hmac.compare_digest(
            other._digest, self._digest)


class Scrypt(StoredPassword):
    """geventpop3's own `$scrypt$n=..,r=..,p=..$salt$hash`."""

    scheme = "SCRYPT"
    __slots__ = ("cost", "salt", "digest")

    def __init__(self, cost: Cost, salt: bytes, digest: bytes) -> None:
        self.cost, self.salt, self.digest = cost, salt, digest

    @classmethod
    def parse(cls, encoded: str) -> Scrypt:
        try:
            _, scheme, params, salt_b64, digest_b64 = encoded.split("$")
            fields = dict(item.split("=") for item in params.split(","))
            cost = int(fields["n"]), int(fields["r"]), int(fields["p"])
            salt = base64.b64decode(salt_b64, validate=True)
            digest = base64.b64decode(digest_b64, validate=True)
        except (ValueError, KeyError):
            raise SchemeError("malformed $scrypt$ entry") from None
        if scheme != "scrypt" or not digest:
            raise SchemeError("malformed $scrypt$ entry")
        n, r, p = cost
        if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p + 2) > _MAXMEM:
            raise SchemeError(f"impossible scrypt cost n={n},r={r},p={p}")
        return cls(cost, salt, digest)

    @classmethod
    def make(cls, password: str, cost: Cost = DEFAULT_COST) -> Scrypt:
        n, r, p = cost
        salt = os.urandom(16)
        return cls(cost, salt, hashlib.scrypt(_secret(password), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM))

    def verify(self, password: str) -> bool:
        n, r, p = self.cost
        digest = hashlib.scrypt(_secret(password), salt=self.salt, n=n, r=r, p=p, maxmem=_MAXMEM,
                                dklen=len(self.digest))
        return hmac.compare_digest(digest, self.digest)

    @property
    def cost_class(self) -> Hashable:
        return (self.scheme, self.cost)

    @property
    def memory(self) -> int:
        n, r, p = self.cost
        return 128 * r * (n + p)

    def dummy(self) -> StoredPassword:
        return Scrypt.make(os.urandom(8).hex(), self.cost)

    def text(self) -> str:
        n, r, p = self.cost
        salt, digest = base64.b64encode(self.salt).decode(), base64.b64encode(self.digest).decode()
        return f"$scrypt$n={n},r={r},p={p}${salt}${digest}"


def parse(text: str, plain_key: bytes, allow_weak: bool = False) -> StoredPassword:
    """The stored password an entry's secret field holds; SchemeError (one line) if unusable."""
    if text.startswith("$scrypt$"):
        return Scrypt.parse(text)
    if text.startswith("{"):
        raise SchemeError(f"unknown password scheme {text.partition('}')[0]}}}")
    return KeyedPlain(plain_key, text)


def hash_password(password: str, cost: Cost = DEFAULT_COST) -> str:
    """A `$scrypt$` entry for `password` (the default scheme of `geventpop3 hash`)."""
    return Scrypt.make(password, cost).text()
