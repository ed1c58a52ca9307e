"""geventpop3.auth.schemes against the real Dovecot: every vector is made at test time by
`doveadm pw -s SCHEME` (Debian's dovecot-core, tools/install-system-deps.sh), and every entry
`hash_entry` makes is checked by `doveadm pw -t`. No I/O of the server: parse and verify only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import shutil
import subprocess
import threading

import argon2.low_level
import pytest

from geventpop3.auth import schemes
from geventpop3.auth.schemes import SchemeError, libxcrypt, parse

KEY = os.urandom(32)
PASSWORD = "pässwörd-1"  # non-ASCII: UTF-8 bytes reach every hash as Dovecot's do
WRONG = ("pässwörd-2", "pässwörd-1 ", "pässwörd", "PÄSSWÖRD-1", "")
STRONG = ("SHA", "SHA1", "SSHA", "SHA256", "SSHA256", "SHA512", "SSHA512", "SHA256-CRYPT", "SHA512-CRYPT",
          "CRYPT", "BLF-CRYPT", "ARGON2I", "ARGON2ID", "PBKDF2", "PLAIN", "CLEAR", "CLEARTEXT",
          "SCRAM-SHA-1", "SCRAM-SHA-256")
WEAK = ("MD5-CRYPT", "MD5", "PLAIN-MD5", "LDAP-MD5", "SMD5")
DOVEADM = shutil.which("doveadm")


@functools.cache
def doveadm_pw(scheme: str, password: str = PASSWORD, *extra: str) -> str:
    """`doveadm pw -s SCHEME -p PASSWORD`: the entry Dovecot makes."""
    assert DOVEADM, "doveadm is missing: run tools/install-system-deps.sh (dovecot-core)"
    result = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", password, *extra],
                            capture_output=True, text=True, timeout=30, check=True)
    entry = result.stdout.strip()
    assert entry.upper().startswith("{" + scheme.upper()), entry
    return entry


def doveadm_verifies(entry: str, password: str) -> bool:
    """`doveadm pw -t ENTRY -p PASSWORD`: whether Dovecot accepts `password` for `entry`."""
    assert DOVEADM
    result = subprocess.run([DOVEADM, "pw", "-t", entry, "-p", password], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode in (0, 75), result  # 75: mismatch
    return result.returncode == 0


def _argon2_shape(memory_kib: int, kind: str = "argon2id") -> str:
    """An argon2 entry of the right shape (parsed, never verified)."""
    return f"${kind}$v=19$m={memory_kib},t=3,p=1$" + "c2FsdHNhbHRzYWx0c2FsdA" + "$" + "A" * 43


@pytest.mark.parametrize("scheme", STRONG)
def test_dovecot_entries_verify_the_right_password_only(scheme: str) -> None:
    entry = doveadm_pw(scheme)
    stored = parse(entry, KEY)
    assert stored.verify(PASSWORD)
    assert not any(stored.verify(wrong) for wrong in (WRONG[:2] if scheme.startswith("ARGON2") else WRONG))
    lower = parse(entry.replace(scheme, scheme.lower(), 1), KEY)  # names in any case
    assert lower.cost_class == stored.cost_class and (scheme.startswith("ARGON2") or lower.verify(PASSWORD))


@pytest.mark.parametrize("scheme", ["SHA.B64", "SHA256.HEX", "SSHA.HEX", "SSHA512.BASE64", "SSHA256.b64",
                                    "PLAIN.B64", "PLAIN.HEX", "SHA512-CRYPT.B64", "BLF-CRYPT.HEX",
                                    "SCRAM-SHA-256.B64", "PBKDF2.HEX"])
def test_dovecot_encodings_b64_and_hex(scheme: str) -> None:
    stored = parse(doveadm_pw(scheme), KEY)
    assert stored.verify(PASSWORD) and not stored.verify(WRONG[0])


def test_unsuffixed_digests_are_read_in_hex_or_base64_as_dovecot_guesses() -> None:
    raw = hashlib.sha256(PASSWORD.encode()).digest()
    for data in (raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode()):
        assert parse("{SHA256}" + data, KEY).verify(PASSWORD), data
        assert doveadm_verifies("{SHA256}" + data, PASSWORD)
    with pytest.raises(SchemeError, match="base64"):  # Dovecot neither reads it without its padding
        parse("{SHA256}" + base64.b64encode(raw).decode()[:-1], KEY)


@pytest.mark.parametrize("scheme", WEAK)
def test_weak_schemes_are_refused_unless_allowed(scheme: str) -> None:
    entry = doveadm_pw(scheme)
    with pytest.raises(SchemeError, match=r"weak password scheme .*allow_weak_schemes = true"):
        parse(entry, KEY)
    stored = parse(entry, KEY, allow_weak=True)
    assert stored.verify(PASSWORD) and not stored.verify(WRONG[0])


def test_md5_is_md5_crypt_or_else_plain_md5_as_in_dovecot() -> None:
    plain_md5 = doveadm_pw("PLAIN-MD5").partition("}")[2]
    for entry in ("{MD5}" + plain_md5, "{MD5.HEX}" + plain_md5.encode().hex(), doveadm_pw("MD5")):
        with pytest.raises(SchemeError, match="weak password scheme MD5 "):
            parse(entry, KEY)
        assert parse(entry, KEY, allow_weak=True).verify(PASSWORD)
        assert doveadm_verifies(entry, PASSWORD)


def test_our_scrypt_entries_also_under_a_scrypt_scheme() -> None:
    entry = schemes.hash_password(PASSWORD, (1024, 8, 1))
    for text in (entry, "{SCRYPT}" + entry, "{scrypt}" + entry):
        stored = parse(text, KEY)
        assert isinstance(stored, schemes.Scrypt) and stored.verify(PASSWORD) and not stored.verify(WRONG[0])


def test_des_and_md5_crypt_under_crypt_are_weak_as_in_dovecot_2_4() -> None:
    des = doveadm_pw("DES-CRYPT", "short")
    md5crypt = doveadm_pw("MD5-CRYPT").partition("}")[2]
    for entry in (des, "{CRYPT}" + des.partition("}")[2], "{CRYPT}" + md5crypt, "{SHA512-CRYPT}" + md5crypt,
                  md5crypt):  # a bare $1$ hash is MD5-CRYPT (Dovecot's password_get_scheme)
        with pytest.raises(SchemeError, match="weak"):
            parse(entry, KEY)
        stored = parse(entry, KEY, allow_weak=True)
        password = "short" if entry.startswith(("{DES", "{CRYPT}")) and "$" not in entry else PASSWORD
        assert stored.verify(password) and not stored.verify(password + "x" if password == PASSWORD else "shorT")


@pytest.mark.parametrize(("entry", "reason"), [
    ("{CRAM-MD5}" + "0" * 64, "not supported"),
    ("{DIGEST-MD5}" + "0" * 32, "user name"),
    ("{PLAIN-TRUNC}8-password", "not supported"),
    ("{LANMAN}" + "0" * 32, "not supported"),
    ("{NTLM}" + "0" * 32, "not supported"),
    ("{HMAC-MD5}" + "0" * 64, "weak"),
    ("{OTP}md4 1024 seed", "not supported"),
])
def test_schemes_that_cannot_be_checked_are_refused_in_one_line(entry: str, reason: str) -> None:
    with pytest.raises(SchemeError, match=reason) as info:
        parse(entry, KEY, allow_weak=reason != "weak")
    assert "\n" not in str(info.value)


def test_plain_md4_works_where_hashlib_has_md4_and_is_refused_clearly_elsewhere() -> None:
    entry = doveadm_pw("PLAIN-MD4")
    if "md4" in hashlib.algorithms_available:
        assert parse(entry, KEY, allow_weak=True).verify(PASSWORD)
    else:
        with pytest.raises(SchemeError, match="PLAIN-MD4 needs MD4"):
            parse(entry, KEY, allow_weak=True)
    with pytest.raises(SchemeError, match="weak"):
        parse(entry, KEY)


def test_blf_crypt_ignores_what_follows_byte_72_as_dovecot_does() -> None:
    long = "ä" * 36  # 72 bytes of UTF-8
    entry = doveadm_pw("BLF-CRYPT", long + "tail")
    stored = parse(entry, KEY)
    assert stored.verify(long) and stored.verify(long + "other tail")
    assert doveadm_verifies(entry, long + "other tail")  # Dovecot agrees
    assert not stored.verify("ä" * 35 + "a")
    assert parse(doveadm_pw("BLF-CRYPT", PASSWORD, "-r", "6"), KEY).cost_class == ("bcrypt", 6)


@pytest.mark.parametrize("prefix", [b"$y$", b"$gy$", b"$6$", b"$5$", b"$7$"])
def test_crypt_methods_of_libxcrypt_dovecot_verifies_too(prefix: bytes) -> None:
    hashed = libxcrypt.crypt(PASSWORD.encode(), libxcrypt.gensalt(prefix, 6 if prefix == b"$7$" else 0))
    assert hashed is not None
    entry = "{CRYPT}" + hashed.decode()
    assert doveadm_verifies(entry, PASSWORD) and not doveadm_verifies(entry, WRONG[0])
    for text in (entry, hashed.decode()):  # bare: Dovecot's passwd-file default scheme is CRYPT
        stored = parse(text, KEY)
        assert stored.verify(PASSWORD) and not stored.verify(WRONG[0])
    if prefix in (b"$y$", b"$gy$"):
        assert parse(entry, KEY).memory == 16 << 20  # libxcrypt's default j9T: N=4096, r=32
    if prefix == b"$7$":
        assert parse(entry, KEY).memory == 128 * 32 * (2**13 + 1)  # count 6: N=2^13, r=32, p=1


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "ARGON2I"])
def test_a_bare_modular_crypt_hash_is_that_hash(scheme: str) -> None:
    bare = doveadm_pw(scheme).partition("}")[2]
    stored = parse(bare, KEY)
    assert stored.verify(PASSWORD) and not stored.verify(bare)


@pytest.mark.parametrize("text", ["$ecret", "$6$short$hash", "$2y$05$tooShort", "$1$", "$argon2id$", "p$w{x}",
                                  "KUtb1EwNX2ki6"])  # 13 characters: a password, though DES has that shape
def test_other_bare_values_are_plain_passwords(text: str) -> None:
    stored = parse(text, KEY)
    assert isinstance(stored, schemes.KeyedPlain)
    assert stored.verify(text) and not stored.verify(text + "x")


@pytest.mark.parametrize("entry", [
    "{SHA}not base64!", "{SHA}" + base64.b64encode(b"x" * 19).decode(), "{SSHA}" + base64.b64encode(b"x" * 20).decode(),
    "{SHA256.HEX}" + "zz" * 32, "{SHA256.HEX}abc", "{SHA512-CRYPT}", "{SHA512-CRYPT}$6$saltsalt$",
    "{SHA512-CRYPT}$6$salt:x$hash", "{CRYPT}$zz$salt$hash", "{BLF-CRYPT}$2y$99$" + "a" * 53,
    "{BLF-CRYPT}$2y$05$short", "{BLF-CRYPT}$6$salt$hash", "{ARGON2ID}" + _argon2_shape(262145),
    "{ARGON2ID}" + _argon2_shape(65536, "argon2d"), "{ARGON2I}$argon2i$garbage", "{PBKDF2}$1$salt$0$" + "0" * 40,
    "{PBKDF2}$1$salt$5000$" + "g" * 40, "{PBKDF2}$2$salt$5000$" + "0" * 40, "{PBKDF2}$1$salt$5000$00",
    "{SCRAM-SHA-256}4096,c2FsdA==", "{SCRAM-SHA-1}4096,c2FsdA==,AAAA,AAAA", "{NOPE}x", "{SHA.B32}x", "{}x",
    "{PLAIN}", "{PLAIN", "{MD5-CRYPT}$6$abc$def", "$scrypt$n=1048576,r=8,p=1$c2FsdA==$ZGlnZXN0",
    "{SCRYPT}$scrypt$n=3,r=8,p=1$c2FsdA==$ZGlnZXN0", "{CRYPT}$y$jzz$salt$" + "a" * 43,
    "{CRYPT}ab", "{DES-CRYPT}abc$def", "{MD5-CRYPT}$1$salt$", "{CRYPT}$argon2id$v=19$m=8,t=1,p=1$c2FsdA$" + "A" * 43,
])
def test_malformed_entries_are_one_line_scheme_errors(entry: str) -> None:
    with pytest.raises(SchemeError) as info:
        parse(entry, KEY, allow_weak=True)
    assert str(info.value) and "\n" not in str(info.value)


def test_memory_bounds_argon2_at_256_mib_and_scrypt_at_128_mib() -> None:
    assert parse("{ARGON2ID}" + _argon2_shape(262144), KEY).memory == 256 << 20  # parse only: no hashing
    assert parse(_argon2_shape(65536), KEY).memory == 64 << 20
    with pytest.raises(SchemeError, match="MiB"):
        parse(_argon2_shape(262145), KEY)
    assert parse("$scrypt$n=16384,r=8,p=1$c2FsdA==$ZGlnZXN0", KEY).memory == 128 * 8 * (16384 + 1)
    with pytest.raises(SchemeError, match="scrypt cost"):
        parse("$scrypt$n=131072,r=8,p=1$c2FsdA==$ZGlnZXN0", KEY)
    assert parse(doveadm_pw("SHA512-CRYPT"), KEY).memory == 0


@pytest.mark.parametrize(("entry", "dear"), [
    ("{BLF-CRYPT}$2y$16$" + "a" * 53, "{BLF-CRYPT}$2y$17$" + "a" * 53),
    ("{SHA512-CRYPT}$6$rounds=10000000$salt$" + "a" * 86, "{SHA512-CRYPT}$6$rounds=10000001$salt$" + "a" * 86),
    ("{PBKDF2}$1$salt$10000000$" + "0" * 40, "{PBKDF2}$1$salt$10000001$" + "0" * 40),
    ("{SCRAM-SHA-1}10000000,c2FsdA==," + "A" * 27 + "=," + "A" * 27 + "=",
     "{SCRAM-SHA-1}10000001,c2FsdA==," + "A" * 27 + "=," + "A" * 27 + "="),
    ("{ARGON2ID}" + _argon2_shape(262144).replace("t=3", "t=4"), "{ARGON2ID}" + _argon2_shape(262144)
     .replace("t=3", "t=5")),
])
def test_costs_that_would_make_every_failed_login_take_too_long_are_refused(entry: str, dear: str) -> None:
    parse(entry, KEY)  # parse only: no hashing
    with pytest.raises(SchemeError, match="every failed login would pay for it"):
        parse(dear, KEY)


@pytest.mark.parametrize("scheme", ["SSHA256", "SHA512-CRYPT", "BLF-CRYPT", "ARGON2I", "PBKDF2", "SCRAM-SHA-256",
                                    "PLAIN"])
def test_cost_classes_and_dummies(scheme: str) -> None:
    first, second = parse(doveadm_pw(scheme), KEY), parse(doveadm_pw(scheme, "other"), KEY)
    assert first.cost_class == second.cost_class
    dummy = first.dummy()
    assert dummy.cost_class == first.cost_class and type(dummy) is type(first) and dummy.memory == first.memory
    assert not dummy.verify(PASSWORD)
    assert first.cheap == (scheme in ("SSHA256", "PLAIN"))
    if scheme != "PLAIN":
        assert parse(dummy.text(), KEY).cost_class == first.cost_class


def test_rounds_make_a_different_cost_class() -> None:
    default = parse(doveadm_pw("SHA512-CRYPT"), KEY)
    dearer = parse(doveadm_pw("SHA512-CRYPT", PASSWORD, "-r", "10000"), KEY)
    assert dearer.verify(PASSWORD) and dearer.cost_class != default.cost_class
    assert parse(doveadm_pw("PBKDF2", PASSWORD, "-r", "6000"), KEY).cost_class == ("pbkdf2-sha1", 6000)


ODD = ("\udcff\udcfe", "\0", PASSWORD + "\0", "x" * 10_000, "", "\u2028", "a\r\nb", "\U0001f600" * 30)


@pytest.mark.parametrize("scheme", [s for s in STRONG if not s.startswith("ARGON2")] + ["ARGON2ID"])
def test_odd_passwords_never_crash_verify(scheme: str) -> None:
    if scheme == "ARGON2ID":  # a cheap argon2id: the odd passwords, not the cost, are the point
        salt = os.urandom(16)
        entry = argon2.low_level.hash_secret(b"x", salt, 1, 1024, 1, 32, argon2.low_level.Type.ID).decode()
    else:
        entry = doveadm_pw(scheme)
    stored = parse(entry, KEY)
    assert [stored.verify(odd) for odd in ODD] == [False] * len(ODD)


def test_non_utf8_passwords_are_their_bytes() -> None:
    raw = b"caf\xe9"  # Latin-1: a client's bytes, read with surrogateescape
    hashed = libxcrypt.crypt(raw, libxcrypt.gensalt(b"$6$"))
    assert hashed is not None
    stored = parse(hashed.decode(), KEY)
    assert stored.verify(raw.decode("utf-8", "surrogateescape")) and not stored.verify("café")


@pytest.mark.parametrize("scheme", schemes.HASH_SCHEMES)
def test_hash_entry_is_read_by_us_and_by_dovecot(scheme: str) -> None:
    entry = schemes.hash_entry(PASSWORD, scheme.lower())
    stored = parse(entry, KEY)
    assert stored.verify(PASSWORD) and not stored.verify(WRONG[0])
    if scheme == "SCRYPT":
        assert entry.startswith("$scrypt$n=16384,r=8,p=1$")
        return
    assert entry.startswith("{" + scheme + "}")
    assert doveadm_verifies(entry, PASSWORD) and not doveadm_verifies(entry, WRONG[0])
    reference = doveadm_pw(scheme)
    assert _shape(entry) == _shape(reference), (entry, reference)


def _shape(entry: str) -> list[str | int]:
    """An entry's `$` fields: parameters as written (method, cost, rounds), salts and hashes as lengths."""
    def parameter(field: str) -> bool:
        return len(field) <= 4 or re.fullmatch(r"[a-z]+=\d+(,[a-z]+=\d+)*", field) is not None
    return [field if parameter(field) else len(field) for field in entry.split("$")]


def test_hash_entry_refuses_unknown_schemes() -> None:
    for scheme in ("PLAIN", "MD5-CRYPT", "nope", ""):
        with pytest.raises(SchemeError, match="cannot hash with scheme"):
            schemes.hash_entry(PASSWORD, scheme)


def test_crypt_verifies_in_parallel_threads() -> None:
    """crypt_rn has its own work area per call: hash threads run it at once, with right answers."""
    stored = [parse(doveadm_pw("SHA512-CRYPT", f"pw{i}"), KEY) for i in range(4)]
    errors: list[str] = []

    def worker(index: int) -> None:
        for round_ in range(40):
            password = f"pw{(index + round_) % 4}"
            if stored[index].verify(password) != (password == f"pw{index}"):
                errors.append(f"thread {index} round {round_}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads)


def test_argon2_entries_of_argon2_cffi_and_of_libsodium_agree() -> None:
    ours = argon2.low_level.hash_secret(PASSWORD.encode(), os.urandom(16), 2, 8192, 1, 32,
                                        argon2.low_level.Type.ID).decode()
    assert doveadm_verifies("{ARGON2ID}" + ours, PASSWORD)
    assert parse("{ARGON2}" + ours, KEY).verify(PASSWORD)


@pytest.mark.parametrize("scheme", ["ARGON2I", "ARGON2ID"])
def test_argon2_parameters_read_from_the_entry_are_argon2_cffis(scheme: str) -> None:
    entry = doveadm_pw(scheme)
    stored = parse(entry, KEY)
    assert isinstance(stored, schemes.Argon2)
    assert stored.params == argon2.extract_parameters(entry.partition("}")[2])
