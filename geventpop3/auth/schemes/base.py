"""What every password scheme shares: the StoredPassword interface, SchemeError, the bounds
of cost and memory, and the decoding of Dovecot's base64 and hex."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Hashable

Cost = tuple[int, int, int]  # scrypt n, r, p
DEFAULT_COST: Cost = (2**14, 8, 1)  # about 50 ms and 16 MiB per hash
MAX_SCRYPT_MEMORY = 128 * 1024 * 1024  # scrypt ($scrypt$ and crypt's $7$)
MAX_MEMORY = 256 * 1024 * 1024  # argon2 and yescrypt
BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; Dovecot truncates there too
# Upper bounds of cost, each about a second or more per check: a failed login pays the dearest
# entry's cost (unknown names too), so one mistyped cost must not make every failure take minutes.
MAX_BCRYPT_COST = 16
MAX_ROUNDS = 10_000_000  # $5$/$6$ rounds, PBKDF2 and SCRAM iterations
MAX_ARGON2_WORK = 1024 * 1024  # m (KiB) x t: 1 GiB-pass, 256 MiB x 4 passes
WEAK_HINT = "set allow_weak_schemes = true to allow"


class SchemeError(ValueError):
    """An entry that cannot be used (unknown or weak scheme, malformed data): str() is one line."""


def secret_bytes(password: str) -> bytes:
    # surrogateescape: a non-UTF-8 password (from argv, or bytes a client sent) hashes, not crashes
    return password.encode("utf-8", "surrogateescape")


def random_secret() -> bytes:
    return os.urandom(12).hex().encode()


def ascii_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def refuse_dear(scheme: str, what: str, value: int, limit: int) -> None:
    if value > limit:
        raise SchemeError(f"{scheme} {what} {value} is over {limit}: every failed login would pay for it")


def refuse_weak(name: str, allow_weak: bool) -> None:
    if not allow_weak:
        raise SchemeError(f"weak password scheme {name} refused ({WEAK_HINT})")


class StoredPassword:
    """One stored password. Subclasses: one per family of schemes; they implement `_matches`."""

    __slots__ = ()
    scheme: str = ""  # the scheme's name as Dovecot spells it (SHA512-CRYPT, SSHA256, ...)
    cheap: bool = False  # verify is fast enough for the event loop (no thread)

    def verify(self, password: str) -> bool:
        """Whether `password` matches; constant time in the password. Slow for real hashes."""
        secret = secret_bytes(password)
        if b"\0" in secret:
            return False
        return self._matches(secret)

    def _matches(self, secret: bytes) -> bool:
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
        a failure against this class costs. May hash once (call it in a hash thread)."""
        raise NotImplementedError

    def text(self) -> str:
        """The entry as a users file holds it."""
        raise NotImplementedError

    def same(self, other: StoredPassword) -> bool:
        """Whether `other` stores the same password the same way (a reload keeps the
        cached logins of unchanged entries)."""
        return type(other) is type(self) and other.text() == self.text()



def decode_b64(scheme: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)  # padding required, as Dovecot does
    except (binascii.Error, ValueError):
        raise SchemeError(f"{scheme} data is not valid base64") from None


def decode_hex(scheme: str, text: str) -> bytes:
    try:
        if not text.isascii() or len(text) % 2:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise SchemeError(f"{scheme} data is not valid hex") from None


