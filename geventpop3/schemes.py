"""Password schemes: the stored forms a users file or the state store may hold, parsed once
and verified on demand.

One entry is one `StoredPassword`. Parsing is cheap (no hashing: a users file of 100,000
entries loads in well under a second); `verify` is the slow part and runs in a hash thread
(users.Hasher), except for entries whose `cheap` says they are fast. Forms accepted:

- `{SCHEME}data` as Dovecot's passwd-file writes it (`{SHA512-CRYPT}$6$...`, `{PLAIN}pw`,
  `{SSHA256.b64}...`, ...), scheme names in any case, with Dovecot's `.b64`/`.base64`/`.hex`
  encodings and its guess between hex and base64 for the fixed-size digests;
- `$scrypt$n=..,r=..,p=..$salt$hash`, geventpop3's own default;
- a bare modular-crypt hash of a complete, exact shape (`$1$`, `$5$`, `$6$`, `$2y$`, `$y$`,
  `$7$`, `$argon2id$`...): that hash, as Dovecot's passwd-file (default scheme CRYPT) reads it;
- anything else: the password itself (the original `name:password` format). A plain
  password is never kept: only a keyed digest of it (`plain_key`), compared in constant time.

Weak schemes (Dovecot 2.4's list: MD5, MD5-CRYPT, SMD5, PLAIN-MD4, PLAIN-MD5, LDAP-MD5,
HMAC-MD5, DES-CRYPT, and CRYPT hashes of DES, MD5 or another method libxcrypt calls legacy)
are refused unless `allow_weak`. A password holding a NUL byte never matches (Dovecot's C
strings would end there; no real password holds one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Hashable

import argon2
import argon2.exceptions
import argon2.low_level
import bcrypt

from geventpop3 import libxcrypt

Cost = tuple[int, int, int]  # scrypt n, r, p
DEFAULT_COST: Cost = (2**14, 8, 1)  # about 50 ms and 16 MiB per hash
_MAXMEM = 128 * 1024 * 1024  # scrypt ($scrypt$ and crypt's $7$)
_MAX_ARGON2_MEMORY = 256 * 1024 * 1024  # argon2 and yescrypt
_BCRYPT_MAX_BYTES = 72  # bcrypt reads no further; Dovecot truncates there too
# Upper bounds of cost, each about a second or more per check: a failed login pays the dearest
# entry's cost (unknown names too), so one mistyped cost must not make every failure take minutes.
_MAX_BCRYPT_COST = 16
_MAX_ROUNDS = 10_000_000  # $5$/$6$ rounds, PBKDF2 and SCRAM iterations
_MAX_ARGON2_WORK = 1024 * 1024  # m (KiB) x t: 1 GiB-pass, 256 MiB x 4 passes
WEAK_HINT = "set allow_weak_schemes = true to allow"


class SchemeError(ValueError):
    """An entry that cannot be used (unknown or weak scheme, malformed data): str() is one line."""


def _secret(password: str) -> bytes:
    # surrogateescape: a non-UTF-8 password (from argv, or bytes a client sent) hashes, not crashes
    return password.encode("utf-8", "surrogateescape")


def _random_secret() -> bytes:
    return os.urandom(12).hex().encode()


def _decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _bound(scheme: str, what: str, value: int, limit: int) -> None:
    if value > limit:
        raise SchemeError(f"{scheme} {what} {value} is over {limit}: every failed login would pay for it")


def _weak(name: str, allow_weak: bool) -> None:
    if not allow_weak:
        raise SchemeError(f"weak password scheme {name} refused ({WEAK_HINT})")


class StoredPassword:
    """One stored password. Subclasses: one per family of schemes; they implement `_matches`."""

    __slots__ = ()
    scheme: str = ""  # the scheme's name as Dovecot spells it (SHA512-CRYPT, SSHA256, ...)
    cheap: bool = False  # verify is fast enough for the event loop (no thread)

    def verify(self, password: str) -> bool:
        """Whether `password` matches; constant time in the password. Slow for real hashes."""
        secret = _secret(password)
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


# -- plain and digests ---------------------------------------------------------------

class KeyedPlain(StoredPassword):
    """A plain password, kept only as HMAC(key, password)."""

    scheme = "PLAIN"
    cheap = True
    __slots__ = ("_key", "_digest")

    def __init__(self, key: bytes, password: str) -> None:
        self._key = key
        self._digest = hmac.digest(key, _secret(password), "sha256")

    def verify(self, password: str) -> bool:
        # NUL included: a plain entry is compared whole, whatever it holds
        return self._matches(_secret(password))

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(hmac.digest(self._key, secret, "sha256"), self._digest)

    def dummy(self) -> StoredPassword:
        return KeyedPlain(self._key, os.urandom(8).hex())

    def text(self) -> str:
        raise SchemeError("a plain password is not kept, only its keyed digest")


class Digest(StoredPassword):
    """A hashlib digest of the password, unsalted (SHA, SHA256, PLAIN-MD5, ...) or followed by
    its salt (SSHA, SSHA256, SSHA512, SMD5: digest(password + salt) + salt)."""

    cheap = True
    __slots__ = ("scheme", "algorithm", "digest", "salt")

    def __init__(self, scheme: str, algorithm: str, digest: bytes, salt: bytes = b"") -> None:
        self.scheme, self.algorithm, self.digest, self.salt = scheme, algorithm, digest, salt

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(hashlib.new(self.algorithm, secret + self.salt).digest(), self.digest)

    @property
    def cost_class(self) -> Hashable:
        return ("digest", self.algorithm)

    def dummy(self) -> StoredPassword:
        salt = os.urandom(len(self.salt))
        return Digest(self.scheme, self.algorithm, hashlib.new(self.algorithm, _random_secret() + salt).digest(), salt)

    def text(self) -> str:
        if self.scheme in _HEX_DEFAULT:
            return f"{{{self.scheme}}}{(self.digest + self.salt).hex()}"
        return f"{{{self.scheme}}}{base64.b64encode(self.digest + self.salt).decode()}"


# -- the crypt family, bcrypt, argon2 ---------------------------------------------------------

_CRYPT64 = "./0-9A-Za-z"
_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _yescrypt_uint(text: str, pos: int, minimum: int) -> tuple[int, int]:
    """yescrypt's variable-length integer at text[pos:] (decode64_uint32 of yescrypt-common.c)."""
    start, end, chars, bits = 0, 47, 1, 0
    c = _ITOA64.find(text[pos])
    if c < 0:
        raise ValueError("bad yescrypt parameter")
    value = minimum
    while c > end:
        value += (end + 1 - start) << bits
        start, end = end + 1, end + 1 + (62 - end) // 2
        chars, bits = chars + 1, bits + 6
    value += (c - start) << bits
    for i in range(1, chars):
        d = _ITOA64.find(text[pos + i])
        if d < 0:
            raise ValueError("bad yescrypt parameter")
        bits -= 6
        value += d << bits
    return value, pos + chars


def _crypt_memory(hashed: str) -> int:
    """Peak memory of a memory-hard crypt hash: yescrypt ($y$, $gy$, $sm3y$: 128*r*N) and
    scrypt ($7$: 128*r*(N+p)); 0 for the others."""
    parts = hashed.split("$")
    if len(parts) < 3:
        return 0
    try:
        if parts[1] in ("y", "gy", "sm3y"):
            params = parts[2]
            _flavor, pos = _yescrypt_uint(params, 0, 0)
            n_log2, pos = _yescrypt_uint(params, pos, 1)
            r, _ = _yescrypt_uint(params, pos, 1)
            return 128 * r * (1 << n_log2)
        if parts[1] == "7":
            field = parts[2]
            n_log2 = _ITOA64.index(field[0])
            r = sum(_ITOA64.index(ch) << (6 * i) for i, ch in enumerate(field[1:6]))
            p = sum(_ITOA64.index(ch) << (6 * i) for i, ch in enumerate(field[6:11]))
            return 128 * r * ((1 << n_log2) + p)
    except (IndexError, ValueError):
        raise SchemeError("malformed yescrypt/scrypt crypt parameters") from None
    return 0


# crypt methods refused unless allow_weak: Dovecot 2.4's (DES, MD5-CRYPT), and NT-hash (unsalted MD4)
_WEAK_CRYPT = {"DES": "DES-CRYPT", "$1$": "MD5-CRYPT", "$3$": "NT-HASH CRYPT"}
_DES = re.compile(r"[./0-9A-Za-z]{13}|_[./0-9A-Za-z]{19}")  # traditional and BSDi extended DES


class Crypt(StoredPassword):
    """A crypt(3) hash the system's libxcrypt verifies: `$1$`, `$5$`, `$6$`, `$y$`, `$gy$`, `$7$`,
    `$2x$`, DES, ... (Dovecot's CRYPT, SHA256-CRYPT, SHA512-CRYPT, MD5-CRYPT, DES-CRYPT)."""

    __slots__ = ("scheme", "hashed", "_memory")

    def __init__(self, scheme: str, hashed: str) -> None:
        self.scheme, self.hashed = scheme, hashed
        self._memory = _crypt_memory(hashed)

    @classmethod
    def parse(cls, scheme: str, hashed: str, allow_weak: bool) -> Crypt:
        if not hashed or not hashed.isascii() or any(ch in hashed for ch in "\0:\n\r \t"):
            raise SchemeError(f"malformed {scheme} hash")
        method = hashed[: hashed.find("$", 1) + 1] if hashed.startswith("$") else "DES"
        if method == "DES" and not _DES.fullmatch(hashed):
            raise SchemeError(f"malformed {scheme} hash: neither $method$... nor 13 characters of DES")
        if method != "DES" and (len(hashed.split("$")) < 4 or not hashed.rsplit("$", 1)[1]):
            raise SchemeError(f"malformed {scheme} hash: no hash after the salt")
        if method in _WEAK_CRYPT:
            _weak(_WEAK_CRYPT[method], allow_weak)
        try:
            status = libxcrypt.checksalt(hashed.encode())
        except libxcrypt.CryptUnavailable as exc:
            raise SchemeError(str(exc)) from None
        # LEGACY and TOO_CHEAP are the distribution's preferences ($5$ is "legacy" on Debian): the
        # weak list is Dovecot's, above; crypt(3) verifies those methods all the same
        if status not in (libxcrypt.SALT_OK, libxcrypt.SALT_METHOD_LEGACY, libxcrypt.SALT_TOO_CHEAP):
            raise SchemeError(f"{scheme} hash of a method this system's crypt(3) cannot verify ({method})")
        rounds = re.match(r"\$[56]\$rounds=([0-9]{1,12})\$", hashed)
        if rounds:
            _bound(scheme, "rounds", int(rounds.group(1)), _MAX_ROUNDS)
        entry = cls(scheme, hashed)
        limit = _MAXMEM if hashed.startswith("$7$") else _MAX_ARGON2_MEMORY
        if entry.memory > limit:
            raise SchemeError(f"{scheme} hash needs {entry.memory >> 20} MiB per check, over {limit >> 20} MiB")
        return entry

    def _matches(self, secret: bytes) -> bool:
        result = libxcrypt.crypt(secret, self.hashed.encode())
        return result is not None and hmac.compare_digest(result, self.hashed.encode())

    @property
    def cost_class(self) -> Hashable:
        parts = self.hashed.split("$")
        if not self.hashed.startswith("$"):
            return ("crypt", "DES")
        if parts[1] in ("5", "6"):
            rounds = parts[2][7:] if parts[2].startswith("rounds=") else "5000"
            return ("crypt", parts[1], rounds)
        if parts[1] == "7":
            return ("crypt", "7", parts[2][:11])
        if parts[1].startswith("2"):  # $2x$NN$...: the cost field
            return ("crypt", parts[1], parts[2])
        return ("crypt", *parts[1:-2]) if len(parts) > 4 else ("crypt", parts[1])

    @property
    def memory(self) -> int:
        return self._memory

    def dummy(self) -> StoredPassword:
        # the same setting (method, cost, salt) for a random password: a failure costs the same
        result = libxcrypt.crypt(_random_secret(), self.hashed.encode())
        if result is None:
            raise SchemeError(f"crypt(3) cannot hash with this {self.scheme} setting")
        return Crypt(self.scheme, result.decode())

    def text(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"


_BCRYPT = re.compile(r"\$2[aby]\$([0-9][0-9])\$[./0-9A-Za-z]{53}")


class Bcrypt(StoredPassword):
    """`$2y$`/`$2b$`/`$2a$` (Dovecot's BLF-CRYPT) through the bcrypt package: the password is cut
    at 72 bytes, as bcrypt and Dovecot do (the package refuses longer ones rather than cut)."""

    __slots__ = ("scheme", "hashed", "rounds")

    def __init__(self, scheme: str, hashed: str) -> None:
        match = _BCRYPT.fullmatch(hashed)
        if match is None or int(match.group(1)) < 4:
            raise SchemeError(f"malformed {scheme} hash: not $2y$/$2b$/$2a$, cost 04-31, 53 characters")
        self.scheme, self.hashed, self.rounds = scheme, hashed, int(match.group(1))
        _bound(scheme, "cost", self.rounds, _MAX_BCRYPT_COST)

    def _matches(self, secret: bytes) -> bool:
        try:
            return bcrypt.checkpw(secret[:_BCRYPT_MAX_BYTES], self.hashed.encode())
        except ValueError:
            return False

    @property
    def cost_class(self) -> Hashable:
        return ("bcrypt", self.rounds)

    def dummy(self) -> StoredPassword:
        return Bcrypt(self.scheme, bcrypt.hashpw(_random_secret(), self.hashed[:29].encode()).decode())

    def text(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"


_ARGON2 = re.compile(r"\$argon2(i|id|d)\$(v=[0-9]+\$)?m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")


class Argon2(StoredPassword):
    """`$argon2i$`/`$argon2id$` (Dovecot's ARGON2I, ARGON2ID, ARGON2) through argon2-cffi."""

    __slots__ = ("scheme", "hashed", "params")

    def __init__(self, scheme: str, hashed: str) -> None:
        match = _ARGON2.fullmatch(hashed)
        if match is None:
            raise SchemeError(f"malformed {scheme} hash: not $argon2i$ or $argon2id$")
        if match.group(1) == "d":
            raise SchemeError(f"{scheme}: argon2d is not a password scheme (Dovecot neither reads it)")
        try:
            self.params = argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError:
            raise SchemeError(f"malformed {scheme} hash") from None
        self.scheme, self.hashed = scheme, hashed
        if self.memory > _MAX_ARGON2_MEMORY:
            raise SchemeError(f"{scheme} hash needs {self.memory >> 20} MiB per check, "
                              f"over {_MAX_ARGON2_MEMORY >> 20} MiB")
        if self.params.time_cost < 1 or self.params.parallelism < 1 or self.params.memory_cost < 8:
            raise SchemeError(f"impossible {scheme} cost m={self.params.memory_cost},t={self.params.time_cost},"
                              f"p={self.params.parallelism}")
        _bound(scheme, "work m*t", self.params.memory_cost * self.params.time_cost, _MAX_ARGON2_WORK)

    def _matches(self, secret: bytes) -> bool:
        try:
            return argon2.low_level.verify_secret(self.hashed.encode(), secret, self.params.type)
        except argon2.exceptions.VerificationError:
            return False

    @property
    def cost_class(self) -> Hashable:
        p = self.params
        return ("argon2", p.type, p.memory_cost, p.time_cost, p.parallelism)

    @property
    def memory(self) -> int:
        return int(self.params.memory_cost) * 1024

    def dummy(self) -> StoredPassword:
        p = self.params
        hashed = argon2.low_level.hash_secret(_random_secret(), os.urandom(p.salt_len), p.time_cost, p.memory_cost,
                                              p.parallelism, p.hash_len, p.type, p.version)
        return Argon2(self.scheme, hashed.decode())

    def text(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"


# -- PBKDF2, SCRAM, scrypt -----------------------------------------------------------------

class Pbkdf2(StoredPassword):
    """Dovecot's PBKDF2: `$1$salt$rounds$hex`, PBKDF2-HMAC-SHA1 of the password with the salt
    string as written, 20 bytes (src/lib-auth/password-scheme-pbkdf2.c)."""

    scheme = "PBKDF2"
    __slots__ = ("salt", "rounds", "digest")

    def __init__(self, salt: bytes, rounds: int, digest: bytes) -> None:
        self.salt, self.rounds, self.digest = salt, rounds, digest

    @classmethod
    def parse(cls, data: str) -> Pbkdf2:
        fields = data.split("$")
        if len(fields) != 5 or fields[:2] != ["", "1"] or not _decimal(fields[3]):
            raise SchemeError("malformed PBKDF2 entry: not $1$salt$rounds$hex")
        rounds = int(fields[3])
        try:
            digest = bytes.fromhex(fields[4]) if fields[4].isascii() else b""
        except ValueError:
            digest = b""
        if len(digest) != 20 or len(fields[4]) != 40:
            raise SchemeError("malformed PBKDF2 entry: the hash is not 40 hex digits")
        if rounds < 1:
            raise SchemeError(f"impossible PBKDF2 rounds {rounds}")
        _bound("PBKDF2", "rounds", rounds, _MAX_ROUNDS)
        return cls(_secret(fields[2]), rounds, digest)

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(hashlib.pbkdf2_hmac("sha1", secret, self.salt, self.rounds), self.digest)

    @property
    def cost_class(self) -> Hashable:
        return ("pbkdf2-sha1", self.rounds)

    def dummy(self) -> StoredPassword:
        return Pbkdf2(self.salt, self.rounds, hashlib.pbkdf2_hmac("sha1", _random_secret(), self.salt, self.rounds))

    def text(self) -> str:
        return f"{{PBKDF2}}$1${self.salt.decode('utf-8', 'surrogateescape')}${self.rounds}${self.digest.hex()}"


class Scram(StoredPassword):
    """SCRAM-SHA-1/SCRAM-SHA-256 credentials (RFC 5802: `iterations,salt,StoredKey,ServerKey`,
    base64): the password matches if H(HMAC(PBKDF2(password, salt, i), "Client Key")) is StoredKey."""

    __slots__ = ("scheme", "algorithm", "iterations", "salt", "stored_key", "server_key")

    def __init__(self, scheme: str, data: str) -> None:
        self.scheme = scheme
        self.algorithm = "sha1" if scheme == "SCRAM-SHA-1" else "sha256"
        size = hashlib.new(self.algorithm).digest_size
        fields = data.split(",")
        if len(fields) != 4 or not _decimal(fields[0]):
            raise SchemeError(f"malformed {scheme} entry: not iterations,salt,StoredKey,ServerKey")
        self.iterations = int(fields[0])
        self.salt, self.stored_key, self.server_key = (_b64(scheme, field) for field in fields[1:])
        if len(self.stored_key) != size or len(self.server_key) != size or not self.salt:
            raise SchemeError(f"malformed {scheme} entry: wrong key sizes")
        if self.iterations < 1:
            raise SchemeError(f"impossible {scheme} iterations {self.iterations}")
        _bound(scheme, "iterations", self.iterations, _MAX_ROUNDS)

    def _stored_key(self, secret: bytes) -> bytes:
        salted = hashlib.pbkdf2_hmac(self.algorithm, secret, self.salt, self.iterations)
        client_key = hmac.new(salted, b"Client Key", self.algorithm).digest()
        return hashlib.new(self.algorithm, client_key).digest()

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(self._stored_key(secret), self.stored_key)

    @property
    def cost_class(self) -> Hashable:
        return ("scram", self.algorithm, self.iterations)

    def dummy(self) -> StoredPassword:
        stored = base64.b64encode(self._stored_key(_random_secret())).decode()
        return Scram(self.scheme, f"{self.iterations},{base64.b64encode(self.salt).decode()},{stored},{stored}")

    def text(self) -> str:
        fields = (base64.b64encode(value).decode() for value in (self.salt, self.stored_key, self.server_key))
        return f"{{{self.scheme}}}{self.iterations},{','.join(fields)}"


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
        # NUL included, as before the Dovecot schemes: scrypt entries hash the whole password
        return self._matches(_secret(password))

    def _matches(self, secret: bytes) -> bool:
        n, r, p = self.cost
        digest = hashlib.scrypt(secret, salt=self.salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(self.digest))
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


# -- {SCHEME.encoding}data -------------------------------------------------------------------

def _b64(scheme: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)  # padding required, as Dovecot does
    except (binascii.Error, ValueError):
        raise SchemeError(f"{scheme} data is not valid base64") from None


def _hex(scheme: str, text: str) -> bytes:
    try:
        if not text.isascii() or len(text) % 2:
            raise ValueError
        return bytes.fromhex(text)
    except ValueError:
        raise SchemeError(f"{scheme} data is not valid hex") from None


# fixed-size digests: name -> (hashlib algorithm, weak); Dovecot guesses hex or base64 by length
_DIGESTS = {
    "SHA": ("sha1", False), "SHA1": ("sha1", False), "SHA256": ("sha256", False), "SHA512": ("sha512", False),
    "PLAIN-MD5": ("md5", True), "LDAP-MD5": ("md5", True), "PLAIN-MD4": ("md4", True),
}
_HEX_DEFAULT = {"PLAIN-MD5", "PLAIN-MD4"}
# salted digests: digest + salt, base64 by default
_SALTED = {"SSHA": ("sha1", False), "SSHA256": ("sha256", False), "SSHA512": ("sha512", False),
           "SMD5": ("md5", True)}
_WEAK_TEXT_SCHEMES = {"MD5-CRYPT", "DES-CRYPT", "MD5"}
_CRYPT_SCHEMES = {"CRYPT", "SHA256-CRYPT", "SHA512-CRYPT", "MD5-CRYPT", "DES-CRYPT"}
_WEAK_SCHEMES = _WEAK_TEXT_SCHEMES | {"HMAC-MD5"} | {
    name for name, (_, weak) in (_DIGESTS | _SALTED).items() if weak}
_ENCODINGS: dict[str, str | None] = {"": None, "B64": "b64", "BASE64": "b64", "HEX": "hex"}
_REFUSED = {
    "CRAM-MD5": "its stored HMAC-MD5 context is a password equivalent that needs MD5's internal state",
    "HMAC-MD5": "its stored HMAC-MD5 context is a password equivalent that needs MD5's internal state",
    "DIGEST-MD5": "it hashes the user name and realm with the password, which a users file entry does not carry",
    "PLAIN-TRUNC": "store the password as {PLAIN} instead",
    "LANMAN": "weak, and removed from Dovecot", "NTLM": "weak, and removed from Dovecot",
    "RPA": "weak, and removed from Dovecot", "SKEY": "one-time passwords are not supported",
    "OTP": "one-time passwords are not supported",
}


def _digest_entry(name: str, encoding: str | None, data: str) -> StoredPassword:
    algorithm, _ = _DIGESTS.get(name) or _SALTED[name]
    if algorithm not in hashlib.algorithms_available:
        raise SchemeError(f"{name} needs {algorithm.upper()}, which this Python's OpenSSL does not provide")
    size = hashlib.new(algorithm).digest_size
    if encoding is None and name in _DIGESTS:  # Dovecot's guess: hex if exactly twice the size
        encoding = "hex" if len(data) == 2 * size and re.fullmatch("[0-9a-fA-F]*", data) else "b64"
    raw = _hex(name, data) if encoding == "hex" else _b64(name, data)
    if name in _DIGESTS:
        if len(raw) != size:
            raise SchemeError(f"{name} data is {len(raw)} bytes, not {size}")
        return Digest(name, algorithm, raw)
    if len(raw) <= size:
        raise SchemeError(f"{name} data is too short for a {size}-byte digest and a salt")
    return Digest(name, algorithm, raw[:size], raw[size:])


def _text_entry(name: str, data: str, plain_key: bytes, allow_weak: bool) -> StoredPassword:
    """Schemes whose data is text (default encoding none in Dovecot)."""
    if name in ("PLAIN", "CLEAR", "CLEARTEXT"):
        if not data:
            raise SchemeError(f"empty {name} password")
        return KeyedPlain(plain_key, data)
    if name == "MD5" and not data.startswith("$1$"):  # Dovecot: MD5-CRYPT, or else PLAIN-MD5
        return _digest_entry("PLAIN-MD5", None, data)
    if name in _CRYPT_SCHEMES or name == "MD5":
        if name in ("MD5-CRYPT", "MD5") and not data.startswith("$1$"):
            raise SchemeError(f"malformed {name} hash: not $1$salt$hash")
        if data.startswith("$2") and len(data) > 3 and data[2] in "aby" and name not in ("MD5-CRYPT", "DES-CRYPT"):
            return Bcrypt(name, data)
        return Crypt.parse(name, data, allow_weak)
    if name == "BLF-CRYPT":
        return Bcrypt(name, data)
    if name in ("ARGON2I", "ARGON2ID", "ARGON2"):
        return Argon2(name, data)
    if name == "PBKDF2":
        return Pbkdf2.parse(data)
    if name in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        return Scram(name, data)
    if name == "SCRYPT":
        return Scrypt.parse(data)
    raise SchemeError(f"unknown password scheme {{{name}}}")


def _braced(text: str, plain_key: bytes, allow_weak: bool) -> StoredPassword:
    end = text.find("}")
    if end < 0:
        raise SchemeError("unterminated {SCHEME} (write {PLAIN}... for a password that starts with '{')")
    name, _, suffix = text[1:end].upper().partition(".")
    data = text[end + 1:]
    if not name:
        raise SchemeError("empty {SCHEME}")
    encoding = _ENCODINGS.get(suffix, "?")
    if encoding == "?":
        raise SchemeError(f"unknown encoding .{suffix.lower()} of {{{name}}} (.b64, .base64 or .hex)")
    if name in _WEAK_SCHEMES:
        _weak(name, allow_weak)
    if name in _REFUSED:
        raise SchemeError(f"password scheme {name} is not supported: {_REFUSED[name]}")
    if name in _DIGESTS or name in _SALTED:
        return _digest_entry(name, encoding, data)
    if encoding is not None:
        raw = _hex(name, data) if encoding == "hex" else _b64(name, data)
        data = raw.decode("utf-8", "surrogateescape")
    return _text_entry(name, data, plain_key, allow_weak)


# a bare value of one of these exact shapes is a hash, not a password (see the module docstring)
_BARE_CRYPT = re.compile(
    r"\$1\$[./0-9A-Za-z]{0,8}\$[./0-9A-Za-z]{22}"
    r"|\$5\$(rounds=[0-9]+\$)?[^$:\s]{0,16}\$[./0-9A-Za-z]{43}"
    r"|\$6\$(rounds=[0-9]+\$)?[^$:\s]{0,16}\$[./0-9A-Za-z]{86}"
    r"|\$2[abxy]\$[0-9][0-9]\$[./0-9A-Za-z]{53}"
    r"|\$(y|gy|sm3y)\$[./0-9A-Za-z]+\$[./0-9A-Za-z]*\$[./0-9A-Za-z]{43}"
    r"|\$7\$[./0-9A-Za-z]{11}[^$:\s]*\$[./0-9A-Za-z]{43}")


def parse(text: str, plain_key: bytes, allow_weak: bool = False) -> StoredPassword:
    """The stored password an entry's secret field holds; SchemeError (one line) if unusable."""
    if text.startswith("$scrypt$"):
        return Scrypt.parse(text)
    if text.startswith("{"):
        return _braced(text, plain_key, allow_weak)
    if text.startswith("$"):
        if _ARGON2.fullmatch(text):
            return Argon2("ARGON2", text)
        if _BARE_CRYPT.fullmatch(text):
            return _text_entry("CRYPT", text, plain_key, allow_weak)
    return KeyedPlain(plain_key, text)


# -- making entries: `geventpop3 hash -s SCHEME` --------------------------------------------------

def _crypt_entry(prefix: bytes) -> Callable[[bytes], str]:
    def make(secret: bytes) -> str:
        result = libxcrypt.crypt(secret, libxcrypt.gensalt(prefix))
        if result is None:
            raise SchemeError("crypt(3) refused the password (too long?)")
        return result.decode()
    return make


def _bcrypt_entry(secret: bytes) -> str:
    salt = bcrypt.gensalt(5, b"2b").replace(b"$2b$", b"$2y$", 1)  # Dovecot's $2y$, cost 5
    return bcrypt.hashpw(secret[:_BCRYPT_MAX_BYTES], salt).decode()


def _argon2_entry(kind: argon2.low_level.Type, time_cost: int, memory_kib: int) -> Callable[[bytes], str]:
    def make(secret: bytes) -> str:
        return argon2.low_level.hash_secret(secret, os.urandom(16), time_cost, memory_kib, 1, 32, kind).decode()
    return make


def _ssha_entry(algorithm: str) -> Callable[[bytes], str]:
    def make(secret: bytes) -> str:
        salt = os.urandom(4)
        return base64.b64encode(hashlib.new(algorithm, secret + salt).digest() + salt).decode()
    return make


def _pbkdf2_entry(secret: bytes) -> str:
    salt = "".join(_ITOA64[byte % 64] for byte in os.urandom(16))
    return f"$1${salt}$5000${hashlib.pbkdf2_hmac('sha1', secret, salt.encode(), 5000).hex()}"


# what `doveadm pw -s NAME` makes with its defaults (Dovecot 2.3/2.4, libsodium's interactive limits)
_MAKERS: dict[str, Callable[[bytes], str]] = {
    "BLF-CRYPT": _bcrypt_entry,
    "ARGON2ID": _argon2_entry(argon2.low_level.Type.ID, 3, 65536),
    "ARGON2I": _argon2_entry(argon2.low_level.Type.I, 4, 32768),
    "SHA512-CRYPT": _crypt_entry(b"$6$"),
    "SHA256-CRYPT": _crypt_entry(b"$5$"),
    "SSHA512": _ssha_entry("sha512"),
    "SSHA256": _ssha_entry("sha256"),
    "PBKDF2": _pbkdf2_entry,
}
HASH_SCHEMES = ("SCRYPT", *_MAKERS)


def hash_entry(password: str, scheme: str = "SCRYPT") -> str:
    """A users file entry for `password`: `$scrypt$...` for SCRYPT, else `{SCHEME}...` exactly as
    `doveadm pw -s SCHEME` would print it (so Dovecot reads it too). SchemeError if unknown."""
    name = scheme.upper()
    if name == "SCRYPT":
        return hash_password(password)
    maker = _MAKERS.get(name)
    if maker is None:
        raise SchemeError(f"cannot hash with scheme {scheme!r}: one of {', '.join(HASH_SCHEMES)}")
    secret = _secret(password)
    if b"\0" in secret:
        raise SchemeError("a password cannot hold a NUL byte")
    return f"{{{name}}}{maker(secret)}"


def hash_password(password: str, cost: Cost = DEFAULT_COST) -> str:
    """A `$scrypt$` entry for `password` (the default scheme of `geventpop3 hash`)."""
    return Scrypt.make(password, cost).text()
