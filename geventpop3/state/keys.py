"""Per-installation secrets kept in the state directory (the size cache's MAC key).

A key is created at the first start, mode 0600, and read at every later one. Several
processes may start at once (a supervisor and its workers): each writes a fresh key to
a temporary file of its own and links it to the final name, which only the first link
creates; everyone then reads the one that won. So a key is never seen half-written and
never changes once made.
"""

from __future__ import annotations

import contextlib
import os
import stat

SIZE_CACHE_KEY = "size-cache.key"
KEY_BYTES = 32
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class BadKey(OSError):
    """The key file exists but cannot be used (not a regular file, too short)."""


def installation_key(state_dir: str, name: str = SIZE_CACHE_KEY) -> bytes:
    """The key `name` of this installation, created in `state_dir` (0700) if missing.
    OSError when it cannot be read or made."""
    path = os.path.join(state_dir, name)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    temp = f"{path}.{os.urandom(8).hex()}.tmp"
    fd = os.open(temp, _CREATE, 0o600)
    try:
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs counts
            os.link(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return _read(path)


def _read(path: str) -> bytes:
    fd = os.open(path, _READ)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadKey(0, "not a regular file", path)
        data = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_BYTES:
        raise BadKey(0, f"not a key of {KEY_BYTES} octets", path)
    return data
