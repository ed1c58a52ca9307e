"""The system's crypt(3) (libxcrypt) through ctypes: the crypt family of password hashes
(`$1$`, `$5$`, `$6$`, `$y$` yescrypt, `$gy$`, `$7$`, ...) as `/etc/shadow` and Dovecot's
CRYPT scheme use them.

Why ctypes: Python 3.13 removed the `crypt` module, and passlib is unmaintained. Why
`crypt_rn`: it takes its work area as an argument, so several hash threads can call it
at once (ctypes releases the GIL for the call); plain `crypt` shares one static buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# sizeof(struct crypt_data): 32768 in libxcrypt; glibc's old libcrypt needs 131232 for
# crypt_r. The larger one serves both.
_DATA_SIZE = 131232
_OUTPUT_SIZE = 384

SALT_OK, SALT_INVALID, SALT_METHOD_DISABLED, SALT_METHOD_LEGACY, SALT_TOO_CHEAP = range(5)


class CryptUnavailable(RuntimeError):
    """This system has no usable libcrypt."""


class _Lib:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.crypt_rn = getattr(lib, "crypt_rn", None)
        if self.crypt_rn is not None:
            self.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
            self.crypt_rn.restype = ctypes.c_char_p
        self.crypt_r = lib.crypt_r
        self.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        self.crypt_r.restype = ctypes.c_char_p
        self.checksalt = getattr(lib, "crypt_checksalt", None)
        if self.checksalt is not None:
            self.checksalt.argtypes = [ctypes.c_char_p]
            self.checksalt.restype = ctypes.c_int
        self.gensalt_rn = getattr(lib, "crypt_gensalt_rn", None)
        if self.gensalt_rn is not None:
            self.gensalt_rn.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int,
                                        ctypes.c_char_p, ctypes.c_int]
            self.gensalt_rn.restype = ctypes.c_char_p


@functools.cache
def _lib() -> _Lib:
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise CryptUnavailable("crypt(3) is not available: no libcrypt on this system")
    try:
        return _Lib(ctypes.CDLL(name, use_errno=True))
    except (OSError, AttributeError) as exc:
        raise CryptUnavailable(f"crypt(3) is not available: {exc}") from None


def crypt(phrase: bytes, setting: bytes) -> bytes | None:
    """crypt(3) of `phrase` with `setting` (a salt string or a whole hash), thread-safe;
    None when libcrypt refuses (unknown method, phrase too long, NUL in it)."""
    if b"\0" in phrase or b"\0" in setting:
        return None
    lib = _lib()
    data = ctypes.create_string_buffer(_DATA_SIZE)
    if lib.crypt_rn is not None:
        result = lib.crypt_rn(phrase, setting, data, _DATA_SIZE)
    else:
        result = lib.crypt_r(phrase, setting, data)
    if not result or result.startswith(b"*"):  # crypt_r's failure tokens are "*0" and "*1"
        return None
    return bytes(result)


def checksalt(setting: bytes) -> int:
    """crypt_checksalt(3): SALT_OK, SALT_INVALID, SALT_METHOD_DISABLED, SALT_METHOD_LEGACY or
    SALT_TOO_CHEAP. Cheap (no hashing). A libcrypt without it: SALT_OK (crypt decides)."""
    lib = _lib()
    if lib.checksalt is None:
        return SALT_OK
    return int(lib.checksalt(setting))


def gensalt(prefix: bytes, count: int = 0) -> bytes:
    """A fresh setting for `prefix` (`$6$`, `$y$`, ...) with random salt from the OS;
    count 0 is the method's default cost."""
    lib = _lib()
    if lib.gensalt_rn is None:
        raise CryptUnavailable("crypt_gensalt_rn is not available in this libcrypt")
    rbytes = os.urandom(16)
    out = ctypes.create_string_buffer(_OUTPUT_SIZE)
    result = lib.gensalt_rn(prefix, count, rbytes, len(rbytes), out, _OUTPUT_SIZE)
    if not result:
        raise CryptUnavailable(f"crypt_gensalt cannot make a {prefix.decode(errors='replace')} salt")
    return bytes(result)
