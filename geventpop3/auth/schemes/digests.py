"""Schemes hashlib verifies: plain passwords (as a keyed digest), Dovecot's SHA/SSHA/...
digests, PBKDF2 and SCRAM credentials, and geventpop3's own scrypt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Hashable

from geventpop3.auth.schemes.base import (
    DEFAULT_COST,
    MAX_ROUNDS,
    MAX_SCRYPT_MEMORY,
    Cost,
    SchemeError,
    StoredPassword,
    ascii_decimal,
    decode_b64,
    random_secret,
    refuse_dear,
    secret_bytes,
)

HEX_DEFAULT = {"PLAIN-MD5", "PLAIN-MD4"}  # digests Dovecot writes in hex by default (others: base64)


class KeyedPlain(StoredPassword):
    """A plain password, kept only as a keyed digest: BLAKE2s in its keyed (MAC) mode, a
    third of HMAC-SHA256's time, which counts with 100,000 plain entries to load."""

    scheme = "PLAIN"
    cheap = True
    __slots__ = ("_key", "_digest")

    def __init__(self, key: bytes, password: str) -> None:
        self._key = key
        self._digest = hashlib.blake2s(secret_bytes(password), key=key).digest()

    def verify(self, password: str) -> bool:
        # NUL included: a plain entry is compared whole, whatever it holds
        return self._matches(secret_bytes(password))

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(hashlib.blake2s(secret, key=self._key).digest(), self._digest)

    def dummy(self) -> StoredPassword:
        return KeyedPlain(self._key, os.urandom(8).hex())

    def text(self) -> str:
        raise SchemeError("a plain password is not kept, only its keyed digest")

    def same(self, other: StoredPassword) -> bool:
        return isinstance(other, KeyedPlain) and other._key == self._key and hmac.compare_digest(
            other._digest, self._digest)


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
        return Digest(self.scheme, self.algorithm, hashlib.new(self.algorithm, random_secret() + salt).digest(), salt)

    def text(self) -> str:
        if self.scheme in HEX_DEFAULT:
            return f"{{{self.scheme}}}{(self.digest + self.salt).hex()}"
        return f"{{{self.scheme}}}{base64.b64encode(self.digest + self.salt).decode()}"



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
        if len(fields) != 5 or fields[:2] != ["", "1"] or not ascii_decimal(fields[3]):
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
        refuse_dear("PBKDF2", "rounds", rounds, MAX_ROUNDS)
        return cls(secret_bytes(fields[2]), rounds, digest)

    def _matches(self, secret: bytes) -> bool:
        return hmac.compare_digest(hashlib.pbkdf2_hmac("sha1", secret, self.salt, self.rounds), self.digest)

    @property
    def cost_class(self) -> Hashable:
        return ("pbkdf2-sha1", self.rounds)

    def dummy(self) -> StoredPassword:
        return Pbkdf2(self.salt, self.rounds, hashlib.pbkdf2_hmac("sha1", random_secret(), self.salt, self.rounds))

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
        if len(fields) != 4 or not ascii_decimal(fields[0]):
            raise SchemeError(f"malformed {scheme} entry: not iterations,salt,StoredKey,ServerKey")
        self.iterations = int(fields[0])
        self.salt, self.stored_key, self.server_key = (decode_b64(scheme, field) for field in fields[1:])
        if len(self.stored_key) != size or len(self.server_key) != size or not self.salt:
            raise SchemeError(f"malformed {scheme} entry: wrong key sizes")
        if self.iterations < 1:
            raise SchemeError(f"impossible {scheme} iterations {self.iterations}")
        refuse_dear(scheme, "iterations", self.iterations, MAX_ROUNDS)

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
        stored = base64.b64encode(self._stored_key(random_secret())).decode()
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
        if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p + 2) > MAX_SCRYPT_MEMORY:
            raise SchemeError(f"impossible scrypt cost n={n},r={r},p={p}")
        return cls(cost, salt, digest)

    @classmethod
    def make(cls, password: str, cost: Cost = DEFAULT_COST) -> Scrypt:
        n, r, p = cost
        salt = os.urandom(16)
        digest = hashlib.scrypt(secret_bytes(password), salt=salt, n=n, r=r, p=p, maxmem=MAX_SCRYPT_MEMORY)
        return cls(cost, salt, digest)

    def verify(self, password: str) -> bool:
        # NUL included, as before the Dovecot schemes: scrypt entries hash the whole password
        return self._matches(secret_bytes(password))

    def _matches(self, secret: bytes) -> bool:
        n, r, p = self.cost
        digest = hashlib.scrypt(secret, salt=self.salt, n=n, r=r, p=p, maxmem=MAX_SCRYPT_MEMORY, dklen=len(self.digest))
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

