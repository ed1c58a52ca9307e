"""Making entries: what `geventpop3 hash [-s SCHEME]` prints, `$scrypt$` or `{SCHEME}...` exactly
as `doveadm pw -s SCHEME` would with its default cost."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable

import argon2.low_level
import bcrypt

from geventpop3.auth.schemes import libxcrypt
from geventpop3.auth.schemes.base import BCRYPT_MAX_BYTES, DEFAULT_COST, Cost, SchemeError, secret_bytes
from geventpop3.auth.schemes.digests import Scrypt
from geventpop3.auth.schemes.modular import ITOA64


def _crypt_entry(prefix: bytes) -> Callable[[bytes], str]:
    def make(secret: bytes) -> str:
        result = libxcrypt.crypt(secret, libxcrypt.gensalt(prefix))
        if result is None:
            raise SchemeError("crypt(3) refused the password (too long?)")
        return result.decode()
    return make


def _bcrypt_entry(secret: bytes) -> str:
    salt = bcrypt.gensalt(5, b"2b").replace(b"$2b$", b"$2y$", 1)  # Dovecot's $2y$, cost 5
    return bcrypt.hashpw(secret[:BCRYPT_MAX_BYTES], salt).decode()


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
    salt = "".join(ITOA64[byte % 64] for byte in os.urandom(16))
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
    secret = secret_bytes(password)
    if b"\0" in secret:
        raise SchemeError("a password cannot hold a NUL byte")
    return f"{{{name}}}{maker(secret)}"


def hash_password(password: str, cost: Cost = DEFAULT_COST) -> str:
    """A `$scrypt$` entry for `password` (the default scheme of `geventpop3 hash`)."""
    return Scrypt.make(password, cost).text()

