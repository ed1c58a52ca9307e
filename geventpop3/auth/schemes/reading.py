"""Reading an entry's password field: Dovecot's `{SCHEME.encoding}data`, our `$scrypt$`, a bare
modular-crypt hash, or else the password itself (see the package docstring)."""

from __future__ import annotations

import hashlib
import re

from geventpop3.auth.schemes.base import SchemeError, StoredPassword, decode_b64, decode_hex, refuse_weak
from geventpop3.auth.schemes.digests import Digest, KeyedPlain, Pbkdf2, Scram, Scrypt
from geventpop3.auth.schemes.modular import ARGON2_SHAPE, Argon2, Bcrypt, Crypt

# fixed-size digests: name -> (hashlib algorithm, weak); Dovecot guesses hex or base64 by length
_DIGESTS = {
    "SHA": ("sha1", False), "SHA1": ("sha1", False), "SHA256": ("sha256", False), "SHA512": ("sha512", False),
    "PLAIN-MD5": ("md5", True), "LDAP-MD5": ("md5", True), "PLAIN-MD4": ("md4", True),
}
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


_DIGEST_SIZES: dict[str, int] = {}  # by algorithm, found once: hashlib.new costs 1 µs, per entry of a large file


def _digest_entry(name: str, encoding: str | None, data: str) -> StoredPassword:
    algorithm, _ = _DIGESTS.get(name) or _SALTED[name]
    if algorithm not in hashlib.algorithms_available:
        raise SchemeError(f"{name} needs {algorithm.upper()}, which this Python's OpenSSL does not provide")
    size = _DIGEST_SIZES.get(algorithm) or _DIGEST_SIZES.setdefault(algorithm, hashlib.new(algorithm).digest_size)
    if encoding is None and name in _DIGESTS:  # Dovecot's guess: hex if exactly twice the size
        encoding = "hex" if len(data) == 2 * size and re.fullmatch("[0-9a-fA-F]*", data) else "b64"
    raw = decode_hex(name, data) if encoding == "hex" else decode_b64(name, data)
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
        refuse_weak(name, allow_weak)
    if name in _REFUSED:
        raise SchemeError(f"password scheme {name} is not supported: {_REFUSED[name]}")
    if name in _DIGESTS or name in _SALTED:
        return _digest_entry(name, encoding, data)
    if encoding is not None:
        raw = decode_hex(name, data) if encoding == "hex" else decode_b64(name, data)
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
        if ARGON2_SHAPE.fullmatch(text):
            return Argon2("ARGON2", text)
        if _BARE_CRYPT.fullmatch(text):
            return _text_entry("CRYPT", text, plain_key, allow_weak)
    return KeyedPlain(plain_key, text)

