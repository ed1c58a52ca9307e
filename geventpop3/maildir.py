"""One user's Maildir as a `Mailbox`: open, lock, snapshot, delete, size; plus streaming.

Sizes: RFC 1939 wants the octets RETR really sends (CRLF line ends, no dot-stuffing).
Files may use bare LF, so the size is computed once by reading the message and kept
in `geventpop3.sizes` in the user's Maildir, keyed by UIDL and raw file size; a later
login only stats the files (Dovecot keeps the same fact in its index).

Lock: a one-byte record lock (Linux OFD lock) per user in one shared file per
Maildir root, `.geventpop3.locks`: no descriptor per session, so 10,000 held sessions
need 10,000 descriptors, not 20,000. The kernel drops the locks when the process ends,
however it ends, so they are never stale after a crash, and they work across processes
sharing the Maildir root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import socket
import stat
import struct
import time
from collections.abc import Iterator
from typing import BinaryIO

import gevent

from geventpop3.message import Message
from geventpop3.users import valid_username

CHUNK_SIZE = 64 * 1024
SIZE_CACHE = "geventpop3.sizes"
LOCK_FILE = ".geventpop3.locks"  # in the Maildir root
SUBDIRS = ("cur", "new", "tmp")
# Past this many files, stat and size work moves to the thread pool so a big
# mailbox does not stall the other sessions.
THREADPOOL_THRESHOLD = 256
_DOT_LINE = re.compile(rb"\n\.")


class MaildirError(Exception):
    """The mailbox cannot be used (an unsafe user name...)."""


def user_maildir(root: str, user: str) -> str:
    """The user's Maildir under `root`; refuses any name that could leave it."""
    if not valid_username(user):
        raise MaildirError("unsafe user name")
    root = os.path.abspath(root)
    path = os.path.join(root, user)
    if os.path.dirname(path) != root:
        raise MaildirError("unsafe user name")
    return path


def _create(path: str, parents: bool = False) -> None:
    """The one place a Maildir is made: `path` and its cur/, new/, tmp/ (mode 0700).

    Without `parents` the root must already exist, so a vanished root (an unmounted
    disk, a mistyped SET maildir) is an error instead of a fresh empty tree."""
    if parents:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for directory in (path, *(os.path.join(path, sub) for sub in SUBDIRS)):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


class Mailbox:
    """One user's Maildir under a root: what a POP3 session and the MSMP backend do with it.

    Creating the object only computes names (and refuses a user name that could leave
    the root, with MaildirError), so it costs no system call; each method says what it costs.
    The lock costs no descriptor per session: a process opens one shared lock file per
    Maildir root (`<root>/.geventpop3.locks`) and takes a one-byte record lock at an
    offset derived from the user name (Linux OFD locks, else POSIX locks). The kernel
    drops a process's locks when it exits, however it ends; inside the process a table
    keeps two sessions of one user apart (record locks never conflict with their owner).
    """

    __slots__ = ("path", "user", "_root", "_offset")

    def __init__(self, root: str, user: str) -> None:
        self.path = user_maildir(root, user)
        self.user = user
        self._root = os.path.dirname(self.path)
        self._offset = _lock_offset(user)

    def open(self) -> None:
        """Create the Maildir (cur/, new/, tmp/) if it is missing; one stat if it is there.

        The root must exist: OSError (FileNotFoundError) if it vanished."""
        if not os.path.isdir(os.path.join(self.path, "new")):
            _create(self.path)

    # -- lock ------------------------------------------------------------------
    def lock(self) -> bool:
        """True if we now hold the lock; False at once if someone else does. One fcntl."""
        if self.path in _HELD:
            return False
        if not _record_lock(_lock_fd(self._root), self._offset, fcntl.F_WRLCK):
            return False
        _HELD[self.path] = self
        return True

    def release(self) -> None:
        """Give the lock up if this object holds it; harmless otherwise."""
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
            with contextlib.suppress(OSError):
                _record_lock(_lock_fd(self._root), self._offset, fcntl.F_UNLCK)

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return _HELD.get(self.path) is self

    def in_use(self) -> bool:
        """True if some session (in any process) holds the lock; False for a missing Maildir."""
        if self.path in _HELD:
            return True
        if not os.path.isdir(self.path):
            return False
        try:
            if self.lock():
                self.release()
                return False
        except OSError:
            return False
        return True

    # -- content -----------------------------------------------------------------
    def snapshot(self) -> list[Message]:
        """The mailbox as a session sees it for its whole life (sizes as RETR sends them)."""
        files = _list_files(self.path)
        if len(files) > THREADPOOL_THRESHOLD:
            return gevent.get_hub().threadpool.apply(_build_snapshot, (self.path, files))
        return _build_snapshot(self.path, files)

    def delete(self, messages: list[Message]) -> list[Message]:
        """UPDATE: remove the files of `messages`; returns those that could not be removed."""
        if len(messages) > THREADPOOL_THRESHOLD:
            return gevent.get_hub().threadpool.apply(_delete, (self.path, messages))
        return _delete(self.path, messages)

    def size(self) -> tuple[int, int]:
        """(messages, octets as stored) of what a snapshot would list: MSMP `LIST <user>`.

        A directory scan and one stat per file, no reading; a missing Maildir is (0, 0)."""
        files = _list_files(self.path)
        if len(files) > THREADPOOL_THRESHOLD:
            return gevent.get_hub().threadpool.apply(_stored_size, (files,))
        return _stored_size(files)


# One descriptor per Maildir root for the whole process, and the locks this process holds.
_LOCK_FDS: dict[str, int] = {}
_HELD: dict[str, Mailbox] = {}
_OFD = hasattr(fcntl, "F_OFD_SETLK")
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid


def _lock_offset(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 2


def _lock_fd(root: str) -> int:
    fd = _LOCK_FDS.get(root)
    if fd is None:
        fd = os.open(os.path.join(root, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _LOCK_FDS[root] = fd
    return fd


def _record_lock(fd: int, offset: int, kind: int) -> bool:
    """Set or clear one byte's lock without waiting; False if another process holds it."""
    try:
        if _OFD:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0))
        else:
            mode = fcntl.LOCK_UN if kind == fcntl.F_UNLCK else fcntl.LOCK_EX | fcntl.LOCK_NB
            fcntl.lockf(fd, mode, 1, offset, os.SEEK_SET)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


# -- snapshot ----------------------------------------------------------------

def _load_size_cache(maildir: str) -> dict[str, tuple[int, int]]:
    cache: dict[str, tuple[int, int]] = {}
    try:
        with open(os.path.join(maildir, SIZE_CACHE), encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    cache[parts[0]] = (int(parts[1]), int(parts[2]))
    except OSError:
        pass
    return cache


def _save_size_cache(maildir: str, cache: dict[str, tuple[int, int]]) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a file."""
    final = os.path.join(maildir, SIZE_CACHE)
    temp = f"{final}.{os.getpid()}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.writelines(f"{uid} {raw} {size}\n" for uid, (raw, size) in cache.items())
        os.replace(temp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _list_files(maildir: str) -> list[tuple[str, str]]:
    """(uid, path) of every message in new/ and cur/, sorted by uid (delivery order)."""
    found: dict[str, str] = {}
    for sub in ("new", "cur"):
        try:
            entries = os.scandir(os.path.join(maildir, sub))
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                uid = name.split(":", 1)[0]
                if uid and uid not in found and " " not in uid and len(uid) <= 70:
                    found[uid] = entry.path
    return sorted(found.items())


def _build_snapshot(maildir: str, files: list[tuple[str, str]]) -> list[Message]:
    cache = _load_size_cache(maildir)
    fresh: dict[str, tuple[int, int]] = {}
    messages = []
    for uid, path in files:
        try:
            raw = os.stat(path).st_size
            cached = cache.get(uid)
            size = cached[1] if cached is not None and cached[0] == raw else crlf_size(path)
        except OSError:
            continue  # vanished between listing and stat: not part of the snapshot
        fresh[uid] = (raw, size)
        messages.append(Message(uid, path, size, path))
    if fresh != cache:
        _save_size_cache(maildir, fresh)
    return messages


def _stored_size(files: list[tuple[str, str]]) -> tuple[int, int]:
    count = octets = 0
    for _, path in files:
        try:
            info = os.stat(path)
        except OSError:
            continue  # fetched or deleted meanwhile
        if stat.S_ISREG(info.st_mode):
            count += 1
            octets += info.st_size
    return count, octets


# -- content -----------------------------------------------------------------

def _crlf_chunks(handle: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """The file with every line ending CRLF and a final CRLF if it lacked one.

    A CR at the end of a chunk is held back, so a CRLF split across two reads is
    recognised; a lone LF becomes CRLF; a lone CR is left alone.
    """
    held_cr = False
    last = b"\n"
    while True:
        chunk = handle.read(chunk_size)
        if not chunk:
            break
        if held_cr:
            chunk = b"\r" + chunk
        held_cr = chunk.endswith(b"\r")
        if held_cr:
            chunk = chunk[:-1]
            if not chunk:
                continue
        if b"\r" not in chunk:  # LF-only, the usual Maildir file: one pass
            data = chunk.replace(b"\n", b"\r\n")
        elif chunk.count(b"\n") == chunk.count(b"\r\n"):  # already CRLF throughout
            data = chunk
        else:
            data = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        last = data[-1:]
        yield data
    if held_cr:
        yield b"\r\r\n"  # a trailing lone CR, then the final line end
    elif last != b"\n":
        yield b"\r\n"


def crlf_size(path: str) -> int:
    """Octets RETR sends for this file (CRLF line ends, before dot-stuffing)."""
    with open(path, "rb") as handle:
        return sum(len(chunk) for chunk in _crlf_chunks(handle))


def _top_chunks(chunks: Iterator[bytes], body_lines: int) -> Iterator[bytes]:
    """The headers, the blank line, then at most `body_lines` lines of the body."""
    in_header = True
    at_line_start = True
    for data in chunks:
        start = 0
        if in_header:
            if at_line_start and data.startswith(b"\r\n"):
                start = 2
            else:
                found = data.find(b"\r\n\r\n")
                if found < 0:
                    at_line_start = data.endswith(b"\n")
                    yield data
                    continue
                start = found + 4
            in_header = False
        end = start
        while body_lines > 0:
            found = data.find(b"\n", end)
            if found < 0:
                break
            end = found + 1
            body_lines -= 1
        if body_lines > 0:
            at_line_start = data.endswith(b"\n")
            yield data
            continue
        yield data[:end]
        return


def message_chunks(handle: BinaryIO, body_lines: int | None = None) -> Iterator[bytes]:
    """RETR (body_lines None) or TOP content: CRLF, dot-stuffed, ending in CRLF.

    The terminating `.` line is the caller's. Memory is one chunk whatever the size.
    """
    chunks = _crlf_chunks(handle)
    if body_lines is not None:
        chunks = _top_chunks(chunks, body_lines)
    at_line_start = True
    ends_with_newline = True
    for data in chunks:
        if not data:
            continue
        if b"\n." in data:
            data = _DOT_LINE.sub(b"\n..", data)  # 3x faster than bytes.replace here
        if at_line_start and data[:1] == b".":
            data = b"." + data
        at_line_start = ends_with_newline = data.endswith(b"\n")
        yield data
    if not ends_with_newline:
        yield b"\r\n"  # TOP may stop inside a line only if the file itself does


# -- UPDATE ------------------------------------------------------------------

def _delete(maildir: str, messages: list[Message]) -> list[Message]:
    """Remove the files of `messages`; returns those that could not be removed.

    A file that another program renamed (flags changed) is looked up by its UIDL;
    one that is already gone counts as deleted.
    """
    failed = []
    for message in messages:
        try:
            os.unlink(message.source)
        except FileNotFoundError:
            moved = _find_by_uid(maildir, message.uid)
            if moved is not None:
                try:
                    os.unlink(moved)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed.append(message)
        except OSError:
            failed.append(message)
    return failed


def _find_by_uid(maildir: str, uid: str) -> str | None:
    for sub in ("cur", "new"):
        directory = os.path.join(maildir, sub)
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name == uid or name.startswith(uid + ":"):
                return os.path.join(directory, name)
    return None


def deliver(maildir: str, content: bytes) -> str:
    """Deliver one message the Maildir way: write into tmp/, then rename into new/.

    A delivery agent's job (--demo, tests, load tests): the Maildir and its parents are
    created if missing."""
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    # One clock reading, microseconds zero-padded: names sort in delivery order.
    now = time.time_ns()
    name = f"{now // 10**9}.M{now // 1000 % 1_000_000:06d}P{os.getpid()}R{os.urandom(4).hex()}.{host}"
    temp = os.path.join(maildir, "tmp", name)
    try:
        handle = open(temp, "wb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        _create(maildir, parents=True)
        handle = open(temp, "wb")  # noqa: SIM115 - closed below
    with handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    final = os.path.join(maildir, "new", name)
    os.rename(temp, final)
    return final
