"""Modular-crypt hashes verified by libraries: the crypt(3) family through the system's
libxcrypt, bcrypt (Dovecot's BLF-CRYPT) and argon2 (ARGON2I/ARGON2ID)."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Hashable

import argon2
import argon2.exceptions
import argon2.low_level
import bcrypt

from geventpop3.auth.schemes import libxcrypt
from geventpop3.auth.schemes.base import (
    BCRYPT_MAX_BYTES,
    MAX_ARGON2_WORK,
    MAX_BCRYPT_COST,
    MAX_MEMORY,
    MAX_ROUNDS,
    MAX_SCRYPT_MEMORY,
    SchemeError,
    StoredPassword,
    random_secret,
    refuse_dear,
    refuse_weak,
)

ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _yescrypt_uint(text: str, pos: int, minimum: int) -> tuple[int, int]:
    """yescrypt's variable-length integer at text[pos:] (decode64_uint32 of yescrypt-common.c)."""
    start, end, chars, bits = 0, 47, 1, 0
    c = ITOA64.find(text[pos])
    if c < 0:
        raise ValueError("bad yescrypt parameter")
    value = minimum
    while c > end:
        value += (end + 1 - start) << bits
        start, end = end + 1, end + 1 + (62 - end) // 2
        chars, bits = chars + 1, bits + 6
    value += (c - start) << bits
    for i in range(1, chars):
        d = ITOA64.find(text[pos + i])
        if d < 0:
            raise ValueError("bad yescrypt parameter")
        bits -= 6
        value += d << bits
    return value, pos + chars


def _crypt_memory(hashed: str) -> int:
    """Peak memory of a memory-hard crypt hash: yescrypt ($y$, $gy$, $sm3y$: 128*r*N) and
    scrypt ($7$: 128*r*(N+p)); 0 for the others."""
    if not hashed.startswith(("$y$", "$gy$", "$sm3y$", "$7$")):
        return 0
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
            n_log2 = ITOA64.index(field[0])
            r = sum(ITOA64.index(ch) << (6 * i) for i, ch in enumerate(field[1:6]))
            p = sum(ITOA64.index(ch) << (6 * i) for i, ch in enumerate(field[6:11]))
            return 128 * r * ((1 << n_log2) + p)
    except (IndexError, ValueError):
        raise SchemeError("malformed yescrypt/scrypt crypt parameters") from None
    return 0


# crypt methods refused unless allow_weak: Dovecot 2.4's (DES, MD5-CRYPT), and NT-hash (unsalted MD4)
_WEAK_CRYPT = {"DES": "DES-CRYPT", "$1$": "MD5-CRYPT", "$3$": "NT-HASH CRYPT"}
_SHA_CRYPT_ROUNDS = re.compile(r"\$[56]\$rounds=([0-9]{1,12})\$")
_UNSAFE = re.compile(r"[\0:\s]")  # what no crypt hash holds
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
        if not hashed or not hashed.isascii() or _UNSAFE.search(hashed):
            raise SchemeError(f"malformed {scheme} hash")
        method = hashed[: hashed.find("$", 1) + 1] if hashed.startswith("$") else "DES"
        if method == "DES" and not _DES.fullmatch(hashed):
            raise SchemeError(f"malformed {scheme} hash: neither $method$... nor 13 characters of DES")
        if method != "DES" and (len(hashed.split("$")) < 4 or not hashed.rsplit("$", 1)[1]):
            raise SchemeError(f"malformed {scheme} hash: no hash after the salt")
        if method in _WEAK_CRYPT:
            refuse_weak(_WEAK_CRYPT[method], allow_weak)
        try:
            status = libxcrypt.checksalt(hashed.encode())
        except libxcrypt.CryptUnavailable as exc:
            raise SchemeError(str(exc)) from None
        # LEGACY and TOO_CHEAP are the distribution's preferences ($5$ is "legacy" on Debian): the
        # weak list is Dovecot's, above; crypt(3) verifies those methods all the same
        if status not in (libxcrypt.SALT_OK, libxcrypt.SALT_METHOD_LEGACY, libxcrypt.SALT_TOO_CHEAP):
            raise SchemeError(f"{scheme} hash of a method this system's crypt(3) cannot verify ({method})")
        rounds = _SHA_CRYPT_ROUNDS.match(hashed)
        if rounds:
            refuse_dear(scheme, "rounds", int(rounds.group(1)), MAX_ROUNDS)
        entry = cls(scheme, hashed)
        limit = MAX_SCRYPT_MEMORY if hashed.startswith("$7$") else MAX_MEMORY
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
        result = libxcrypt.crypt(random_secret(), self.hashed.encode())
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
        refuse_dear(scheme, "cost", self.rounds, MAX_BCRYPT_COST)

    def _matches(self, secret: bytes) -> bool:
        try:
            return bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], self.hashed.encode())
        except ValueError:
            return False

    @property
    def cost_class(self) -> Hashable:
        return ("bcrypt", self.rounds)

    def dummy(self) -> StoredPassword:
        return Bcrypt(self.scheme, bcrypt.hashpw(random_secret(), self.hashed[:29].encode()).decode())

    def text(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"


ARGON2_SHAPE = re.compile(r"\$argon2(i|id|d)\$(?:v=([0-9]{1,3})\$)?m=([0-9]{1,10}),t=([0-9]{1,10}),p=([0-9]{1,3})"
                          r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
_ARGON2_TYPES = {"i": argon2.low_level.Type.I, "id": argon2.low_level.Type.ID}


class Argon2(StoredPassword):
    """`$argon2i$`/`$argon2id$` (Dovecot's ARGON2I, ARGON2ID, ARGON2) through argon2-cffi."""

    __slots__ = ("scheme", "hashed", "params")

    def __init__(self, scheme: str, hashed: str) -> None:
        match = ARGON2_SHAPE.fullmatch(hashed)
        if match is None:
            raise SchemeError(f"malformed {scheme} hash: not $argon2i$ or $argon2id$")
        if match.group(1) == "d":
            raise SchemeError(f"{scheme}: argon2d is not a password scheme (Dovecot neither reads it)")
        kind, version, m, t, p, salt, digest = match.groups()
        # argon2.extract_parameters, from the match: a users file of argon2 entries loads twice as fast
        self.params = argon2.Parameters(
            type=_ARGON2_TYPES[kind], version=int(version or 16), salt_len=len(salt) * 3 // 4,
            hash_len=len(digest) * 3 // 4, time_cost=int(t), memory_cost=int(m), parallelism=int(p))
        if self.params.version not in (16, 19):
            raise SchemeError(f"{scheme}: unknown argon2 version {self.params.version}")
        self.scheme, self.hashed = scheme, hashed
        if self.memory > MAX_MEMORY:
            raise SchemeError(f"{scheme} hash needs {self.memory >> 20} MiB per check, "
                              f"over {MAX_MEMORY >> 20} MiB")
        if self.params.time_cost < 1 or self.params.parallelism < 1 or self.params.memory_cost < 8:
            raise SchemeError(f"impossible {scheme} cost m={self.params.memory_cost},t={self.params.time_cost},"
                              f"p={self.params.parallelism}")
        refuse_dear(scheme, "work m*t", self.params.memory_cost * self.params.time_cost, MAX_ARGON2_WORK)

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
        hashed = argon2.low_level.hash_secret(random_secret(), os.urandom(p.salt_len), p.time_cost, p.memory_cost,
                                              p.parallelism, p.hash_len, p.type, p.version)
        return Argon2(self.scheme, hashed.decode())

    def text(self) -> str:
        return f"{{{self.scheme}}}{self.hashed}"

