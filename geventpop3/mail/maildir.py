"""One user's Maildir as a `Mailbox`: open, lock, snapshot, delete, size; plus streaming.

Sizes: RFC 1939 wants the octets RETR really sends (CRLF line ends, no dot-stuffing).
Files may use bare LF, so the size is computed once by reading the message and kept
in `geventpop3.sizes` in the user's Maildir, keyed by UIDL and raw file size and
authenticated by a keyed MAC (the installation's key: the mailbox owner can write the file,
not forge it); a later login only stats the files (Dovecot keeps the same fact in its index).

Lock: a one-byte record lock (Linux OFD lock) per user in one shared file per
Maildir root, `.geventpop3.locks`: no descriptor per session, so 10,000 held sessions
need 10,000 descriptors, not 20,000. The kernel drops the locks when the process ends,
however it ends, so they are never stale after a crash, and they work across processes
sharing the Maildir root.

Safety (whoever can write into a Maildir is not trusted): only regular files are mail.
cur/ and new/ are opened as directories without following a symlink, every entry is
lstat'ed (never followed), and a message is opened with O_NOFOLLOW | O_NONBLOCK and
fstat'ed: anything but a regular file (symlink, FIFO, device, directory), a sparse file,
one over `max_message_size`, or a file that is not the one the snapshot saw (device and
inode), is skipped; what a scan skipped is one log line, logged once per change.
Every file this module creates uses O_CREAT | O_EXCL | O_NOFOLLOW (the lock file, which
is shared, O_NOFOLLOW and a regular-file check). A name that is not a safe UIDL (not
printable ASCII, over 70 octets, not UTF-8, CR/LF...) is still mail: its UIDL is `~`
and a hash of its raw base name, and names reach log lines only through ascii().

UIDLs after Dovecot (docs/migrating.md): when the Maildir holds Dovecot's `dovecot-uidlist`
(geventpop3.mail.dovecot_uidlist, read only), a message's UIDL is the one Dovecot saved for it
(`P`), else per `uidl_format` (`%08Xu%08Xv`: its IMAP UID and the UIDVALIDITY in hex), else
the base name; messages are listed in Dovecot's order (its POP3 order, then UID), unlisted
ones after them. A UIDL that breaks RFC 1939 or repeats one listed before gets a `~` hash.
Sizes from names: `,W=<n>` (Dovecot's virtual size, CRLF octets), or the `W` Dovecot kept
in dovecot-uidlist, is taken as the size without reading the file when it is plausible
(see `plausible_size`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import heapq
import hmac
import logging
import os
import re
import socket
import stat
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar, cast

import gevent
from gevent import monkey

from geventpop3.core.message import Message
from geventpop3.core.names import HASHED_UID_PREFIX, UIDL_BASE_NAME, UIDL_DOVECOT, valid_username
from geventpop3.mail import dovecot_uidlist

# The descriptors here are files and directories, never sockets: close them at once with
# the real close(2), not gevent's patched one (an fcntl check, then a close deferred to the
# event loop for the sake of I/O watchers these descriptors never have).
_close_fd = monkey.get_original("os", "close")

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
SMALL_MESSAGE = CHUNK_SIZE  # octets on disk: RETR reads and sends such a message whole (whole_message)
SIZE_CACHE = "geventpop3.sizes"
SIZE_CACHE_TRAILER = b"#geventpop3.sizes"  # last line: "<trailer> <entries> <keyed MAC of the Maildir and entries>"
SIZE_CACHE_KEY_BYTES = 32
SIZE_CACHE_MAX = 16 << 20  # octets (~150,000 entries); a bigger cache file is ignored
SIZE_CACHE_LOOP_MAX = 1 << 20  # read on the event loop; a bigger cache is read in the thread pool
SIZE_MEMO_ENTRIES = 100_000  # size cache entries remembered in memory for all Maildirs (~200 octets each)
LOCK_FILE = ".geventpop3.locks"  # in the Maildir root
SUBDIRS = ("cur", "new", "tmp")
# Past this many octets of messages without a cached size, measuring them moves to the
# thread pool: reading is what costs, however few the files (12 x 40 MB stalled 100 ms).
THREADPOOL_BYTES = 1 << 20
UIDLIST_LOOP_MAX = 1 << 20  # a bigger dovecot-uidlist to (re)read goes to the thread pool
MAX_MESSAGES = 100_000  # the defaults of max_messages_per_mailbox and max_message_size
MAX_MESSAGE_SIZE = 1 << 30
POOL_JOBS_PER_MAILBOX = 2  # pool threads one Maildir may hold at once (an abandoned scan counts until it ends)
POOL_POLL = 0.1  # seconds between two looks at the client while a pool thread works for it
CANCEL_EVERY = 64  # items between two calls of `_Cancel.check` in a scan's loops
# A scan on the event loop gives the other sessions their turn (gevent.idle: every event
# ready is handled first) after each TURN s of work, and then looks at its client. Not a
# pool thread: a Python-busy thread holds the GIL, and on a loaded 2-core machine the event
# loop's thread waited for it 160 ms (p99) to 1.9 s per turn.
TURN = 0.002
SKIP_EXAMPLES = 3  # examples per reason in the one line of skipped entries
SKIP_EXAMPLE_CHARS = 120
LOGGED_SKIPS = 10_000  # Maildirs whose last line of skipped entries is remembered (logged once per change)
# Sorts of a scan are done in runs of this many items, merged in Python, with turns between:
# one sort of 500,000 names is one C call of 0.4 s.
SORT_RUN = 4096
# A directory of at most this size (its st_size: ext4 4 KiB per ~60 names, tmpfs 20 octets a
# name) is listed in one call; a bigger one with os.scandir, a few names between two turns.
LISTDIR_MAX = 64 << 10
# Snapshots of more messages than this have their Message objects untracked by the GC.
UNTRACK_OVER = 1000
_SIZE_FIELD = re.compile(r",([SW])=([0-9]{1,19})(?=[,:]|$)")
_DOT_LINE = re.compile(rb"\n\.")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_SCANNED = ("new", "cur")  # new/ first: a UIDL in both is served from new/

T = TypeVar("T")


class MaildirError(Exception):
    """The mailbox cannot be used (an unsafe user name...)."""


class NotMail(OSError):
    """A Maildir entry that is not a regular file, or not the file the snapshot saw."""


class TooManyMessages(MaildirError):
    """More messages than `max_messages_per_mailbox`: the mailbox is refused, nothing touched."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"{count} messages, over max_messages_per_mailbox ({limit})")
        self.count = count
        self.limit = limit


class Cancelled(Exception):
    """The client went away while its mailbox was scanned: the scan was abandoned."""


class MessageChanged(OSError):
    """A message file no longer has the size the snapshot announced: not sent past it."""


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


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


def uid_of(name: str) -> str:
    """The UIDL of a Maildir file name: its base name (before ':') when that is a safe UIDL.

    Otherwise (not printable ASCII, a space, CR/LF, over 70 octets, empty, not UTF-8 -
    os.listdir gives such bytes surrogate-escaped - or starting with `~`): `~` and a hash
    of the raw base name, stable across flag changes and never equal to a plain name."""
    uid = name.split(":", 1)[0]
    if uid.isascii() and uid.isprintable() and " " not in uid and 0 < len(uid) <= 70 and uid[0] != "~":
        return uid
    return _hashed_uid(name)


def _hashed_uid(name: str) -> str:
    raw = os.fsencode(name).split(b":", 1)[0]
    return HASHED_UID_PREFIX + hashlib.blake2b(raw, digest_size=16).hexdigest()


def _safe_uidl(uidl: str) -> bool:
    """RFC 1939: 1 to 70 characters 0x21-0x7E; and not `~`, kept for hashed UIDLs."""
    return uidl.isascii() and uidl.isprintable() and " " not in uidl and 0 < len(uidl) <= 70 and uidl[0] != "~"


def _hashed_uidl(value: str, domain: bytes) -> str:
    raw = domain + os.fsencode(value)
    return HASHED_UID_PREFIX + hashlib.blake2b(raw, digest_size=16).hexdigest()


def size_from_name(name: str, raw: int) -> int | None:
    """The CRLF size a Maildir name gives with `,W=<n>`, when it is plausible; else None.

    W= is Dovecot's virtual size: the octets with CRLF line ends, what LIST must show.
    S= (the size on disk) alone is never used as a POP3 size; see `plausible_size`."""
    base = name.split(":", 1)[0]
    if ",W=" not in base:
        return None
    fields: dict[str, int] = {}
    for key, digits in _SIZE_FIELD.findall(base):
        fields.setdefault(key, int(digits))
    return plausible_size(raw, fields.get("W"), fields.get("S"))


def plausible_size(raw: int, virtual: int | None, physical: int | None) -> int | None:
    """`virtual` (a W= size) if a file of `raw` octets on disk could have it, else None.

    Plausible: raw <= W <= 2 raw + 2 (CRLF only adds a CR per LF, and a final CRLF), and
    the S= given with it, if any, equals `raw`: a name or record whose S= no longer fits
    the file is stale, so its W= is not trusted either and the file is measured."""
    if virtual is None or (physical is not None and physical != raw) or not raw <= virtual <= 2 * raw + 2:
        return None
    return virtual


def _file_id(info: os.stat_result) -> int:
    return info.st_dev << 64 | info.st_ino


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

    __slots__ = ("path", "user")  # a held session keeps one: no more than it needs

    def __init__(self, root: str, user: str) -> None:
        self.path = user_maildir(root, user)
        self.user = user

    @property
    def _offset(self) -> int:
        """The lock's offset, computed when locking and releasing only (not kept: an int per held session)."""
        return _lock_offset(self.user)

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
        if not _record_lock(_lock_fd(os.path.dirname(self.path)), self._offset, fcntl.F_WRLCK):
            return False
        _HELD[self.path] = self
        return True

    def release(self) -> None:
        """Give the lock up if this object holds it; harmless otherwise."""
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
            with contextlib.suppress(OSError):
                _record_lock(_lock_fd(os.path.dirname(self.path)), self._offset, fcntl.F_UNLCK)

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
    def snapshot(self, uidl_format: str = UIDL_BASE_NAME, max_messages: int = MAX_MESSAGES,
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 client_gone: Callable[[], bool] | None = None) -> list[Message]:
        """The mailbox as a session sees it for its whole life (sizes as RETR sends them,
        UIDLs per `uidl_format` and the Maildir's dovecot-uidlist, if it has one).

        Warm cache: one directory listing and one lstat per file (and one for
        dovecot-uidlist), nothing read. The scan runs in this greenlet, on the event loop,
        in turns of TURN s (`_Cancel.check`): a mailbox of 500,000 files takes seconds, and
        the other sessions are served between two turns. After each turn it looks at
        `client_gone`: once true the scan is abandoned (Cancelled) and saves nothing. What
        waits for the disk (measuring big files, reading a big size cache or dovecot-uidlist,
        writing the cache with its fsync) goes to the thread pool.

        TooManyMessages when more than `max_messages` regular files are found; a file of
        more than `max_message_size` octets, or a sparse one, is left out (one log line)."""
        notes = _Notes()
        cancel = _Cancel(client_gone)
        try:
            with _Subdirs(self.path, notes) as dirs:
                names = dirs.names(cancel)
                try:
                    return _scan(self.path, dirs, names, uidl_format, (max_messages, max_message_size), notes,
                                 cancel)
                finally:
                    _release(names, cancel)
        finally:
            if not cancel.set:  # an abandoned pool thread may still be adding to `notes`
                _log_notes(self.path, notes)

    def delete(self, messages: list[Message]) -> list[Message]:
        """UPDATE: remove the files of `messages`, then fsync the directories that lost one,
        so mail the client was told is gone stays gone after a power loss; returns those that
        could not be removed. In the thread pool (fsync is disk work)."""
        if not messages:
            return []
        return _in_pool(self.path, None, _delete, self.path, messages)

    def size(self, max_message_size: int = MAX_MESSAGE_SIZE) -> tuple[int, int]:
        """(messages, octets as stored) of what a snapshot would list: MSMP `LIST <user>`.

        A directory scan and one lstat per file, no reading; a missing Maildir is (0, 0)."""
        notes = _Notes()
        cancel = _Cancel(None)
        try:
            with _Subdirs(self.path, notes) as dirs:
                found = dirs.regular_files(dirs.names(cancel), notes, max_message_size, cancel)
            return len(found), sum(raw for _, _, raw, _ in found)
        finally:
            _log_notes(self.path, notes)


class _Cancel:
    """The turns of one scan and its end: `check()`, called every few items, gives the event
    loop a turn after TURN s of work and then looks at the client; `set` once the client is
    gone (pool threads working for the scan look at it too)."""

    __slots__ = ("client_gone", "set", "since", "loop_thread")

    def __init__(self, client_gone: Callable[[], bool] | None) -> None:
        self.client_gone = client_gone
        self.set = False
        self.since = _clock()
        self.loop_thread = _get_ident()

    def check(self) -> None:
        """Cancelled once the client is gone; on the event loop, a turn for the others every TURN s."""
        if self.set:
            raise Cancelled
        if self.turn() and self.client_gone is not None and self.client_gone():
            self.set = True
            raise Cancelled

    def turn(self) -> bool:
        """On the event loop, after TURN s of work: let every event ready now be handled
        (gevent.sleep(0) would handle none), and say so."""
        if _clock() - self.since < TURN or _get_ident() != self.loop_thread:
            return False
        gevent.idle()
        self.since = _clock()
        return True


_get_ident = monkey.get_original("_thread", "get_ident")


def _as_is(message: Message) -> Message:
    return message


def _untracked(message: Message) -> Message:
    """`message`, out of the cyclic garbage collector's sight (CPython's PyObject_GC_UnTrack): its
    fields are strings, ints and None, so it can be in no cycle. A snapshot makes one object per
    message, and the collections of 300,000 new ones each took 100 to 250 ms on the event loop
    (young generations, then the whole heap), several times per login and after it."""
    if _gc_untrack is not None:
        _gc_untrack(message)
    return message


_gc_untrack = None
if sys.implementation.name == "cpython":
    _gc_untrack = ctypes.pythonapi.PyObject_GC_UnTrack
    _gc_untrack.argtypes = (ctypes.py_object,)
    _gc_untrack.restype = None
_clock = time.perf_counter


# Pool jobs running per Maildir (POOL_JOBS_PER_MAILBOX), counted until the thread ends,
# not until its greenlet stops waiting: an abandoned scan still holds its thread.
_pool_jobs: dict[str, int] = {}


def _in_pool(maildir: str, cancel: _Cancel | None, function: Callable[..., T], *args: object) -> T:
    """Run `function` in gevent's thread pool; this greenlet waits, the others run.

    At most POOL_JOBS_PER_MAILBOX threads work for one Maildir at once (others wait their
    turn), so one mailbox cannot hold the whole pool. With a `cancel` whose `client_gone`
    says so, the wait ends (Cancelled) and the flag tells the thread to stop; so does a
    kill of this greenlet."""
    gone = cancel.client_gone if cancel is not None else None
    while _pool_jobs.get(maildir, 0) >= POOL_JOBS_PER_MAILBOX:
        gevent.sleep(POOL_POLL)
        if gone is not None and gone():
            assert cancel is not None
            cancel.set = True
            raise Cancelled
    _pool_jobs[maildir] = _pool_jobs.get(maildir, 0) + 1

    def done(_: object) -> None:
        left = _pool_jobs.get(maildir, 1) - 1
        if left > 0:
            _pool_jobs[maildir] = left
        else:
            _pool_jobs.pop(maildir, None)

    try:
        result = gevent.get_hub().threadpool.spawn(function, *args)
    except BaseException:
        done(None)
        raise
    result.rawlink(done)
    try:
        if gone is None:
            return cast(T, result.get())
        while True:
            try:
                return cast(T, result.get(timeout=POOL_POLL))
            except gevent.Timeout:
                if gone():
                    raise Cancelled from None
    except BaseException:
        if cancel is not None:
            cancel.set = True  # abandoned (client gone, greenlet killed): the thread stops soon
        raise


class _Notes(list[str]):
    """What a scan could not use, for the caller to log on the event loop (pool threads only
    collect: logging's locks are gevent's): lines (`append`), and skipped entries
    (`skip`), counted by reason with a few examples, logged as one line."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, tuple[int, list[str]]] = {}
        self.total = 0

    def skip(self, path: str, reason: str) -> None:
        self.total += 1
        count, examples = self.skipped.get(reason, (0, []))
        if len(examples) < SKIP_EXAMPLES:
            examples.append(path)
        self.skipped[reason] = (count + 1, examples)

    def summary(self, maildir: str) -> str | None:
        """The one line of skipped entries (None: nothing skipped)."""
        if not self.total:
            return None
        inside = os.path.join(maildir, "")

        def shown(paths: list[str]) -> str:
            return ", ".join(ascii(path.removeprefix(inside))[:SKIP_EXAMPLE_CHARS] for path in paths)

        reasons = "; ".join(f"{count} {reason} (e.g. {shown(examples)})"
                            for reason, (count, examples) in sorted(self.skipped.items()))
        return f"{ascii(maildir)[:SKIP_EXAMPLE_CHARS]}: skipped {self.total} entries: {reasons}"


# Maildir -> its last line of skipped entries: a line is logged once per change of what is skipped.
_logged_skips: OrderedDict[str, str] = OrderedDict()


def _log_notes(maildir: str, notes: _Notes) -> None:
    """Log what a scan skipped: one line, and only when it differs from the last one logged for
    this Maildir (100,000 planted symlinks cost one line once, not a line per entry per login)."""
    for note in list(notes):
        log.warning("maildir: %s", note)
    line = notes.summary(maildir)
    if line is None:
        return
    if _logged_skips.get(maildir) == line:
        _logged_skips.move_to_end(maildir)
        return
    _logged_skips[maildir] = line
    _logged_skips.move_to_end(maildir)
    while len(_logged_skips) > LOGGED_SKIPS:
        _logged_skips.popitem(last=False)
    log.warning("maildir: %s", line)


# One descriptor per Maildir root for the whole process, and the locks this process holds.
_LOCK_FDS: dict[str, int] = {}
_HELD: dict[str, Mailbox] = {}
_OFD = hasattr(fcntl, "F_OFD_SETLK")
_FLOCK = "hhqqi4x"  # struct flock on Linux: type, whence, start, len, pid


def _lock_offset(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") >> 2


def _lock_fd(root: str) -> int:
    """The shared lock file, opened once: never through a symlink, only a regular file."""
    fd = _LOCK_FDS.get(root)
    if fd is None:
        path = os.path.join(root, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _close_fd(fd)
            raise NotMail(errno.EINVAL, "lock file is not a regular file", path)
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


# -- scanning ------------------------------------------------------------------

class _Subdirs:
    """new/ and cur/ of one Maildir, opened as directories and never through a symlink.

    Entries are looked at relative to these descriptors (lstat, unlink), so swapping
    cur/ for a symlink after the open cannot lead anywhere else. What cannot be used
    goes to `notes`, for the caller to log."""

    __slots__ = ("maildir", "fds")

    def __init__(self, maildir: str, notes: _Notes) -> None:
        self.maildir = maildir
        self.fds: dict[str, int] = {}
        for sub in _SCANNED:
            try:
                self.fds[sub] = os.open(os.path.join(maildir, sub), _DIR_FLAGS)
            except FileNotFoundError:
                continue
            except OSError as exc:  # ELOOP/ENOTDIR: a symlink or a file where the directory should be
                notes.skip(os.path.join(maildir, sub), f"not a directory ({exc.strerror})")

    def __enter__(self) -> _Subdirs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self.fds.values():
            _close_fd(fd)
        self.fds.clear()

    def names(self, cancel: _Cancel | None = None) -> list[tuple[str, tuple[str, str]]]:
        """(uid, (subdir, name)) of every entry of new/ and cur/ but dot files, sorted by uid
        (delivery order); a UIDL met twice is served once. No stat: the listing only.
        `cancel`: looked at (turns, the client) as it goes."""
        found: dict[str, tuple[str, str]] = {}
        for sub, fd in self.fds.items():
            # A small directory in one call (the usual mailbox); a big one a few names at a time.
            entries = os.listdir(fd) if os.fstat(fd).st_size <= LISTDIR_MAX else _entries(fd)
            for count, name in enumerate(entries):
                if cancel is not None and not count % CANCEL_EVERY:
                    cancel.check()
                if name[0] != ".":
                    uid = name.split(":", 1)[0]  # uid_of(), inlined: this runs once per file per login
                    if not (uid.isascii() and uid.isprintable() and " " not in uid and 0 < len(uid) <= 70
                            and uid[0] != "~"):
                        uid = _hashed_uid(name)
                    if uid not in found:
                        found[uid] = (sub, name)
        if len(found) <= SORT_RUN:
            return sorted(found.items(), key=_first)
        items = []
        for count, item in enumerate(found.items()):
            if cancel is not None and not count % (4 * CANCEL_EVERY):
                cancel.check()
            items.append(item)
        return sorted_in_steps(items, _first, cancel)

    def regular_files(self, names: Iterable[tuple[str, tuple[str, str]]], notes: _Notes,
                      max_message_size: int = MAX_MESSAGE_SIZE,
                      cancel: _Cancel | None = None) -> list[tuple[str, str, int, int]]:
        """(uid, path, raw size, file id) of the regular files among `names`: one lstat each.

        Left out (in `notes`): anything but a regular file, a file over `max_message_size`
        octets, and a sparse file (`_sparse`: measuring 8 GiB of holes cost 18 s of CPU)."""
        prefix = {sub: os.path.join(self.maildir, sub, "") for sub in self.fds}
        fds = self.fds
        found = []
        for count, (uid, (sub, name)) in enumerate(names):
            if cancel is not None and not count % CANCEL_EVERY:
                cancel.check()
            try:
                info = os.lstat(name, dir_fd=fds[sub])
            except OSError:
                continue  # vanished between listing and stat: not part of the snapshot
            if not stat.S_ISREG(info.st_mode):
                notes.skip(prefix[sub] + name, "not a regular file")
            elif info.st_size > max_message_size:
                notes.skip(prefix[sub] + name, "over max_message_size")
            elif info.st_size > SMALL_MESSAGE and info.st_blocks * 512 < info.st_size and _sparse(fds[sub], name):
                notes.skip(prefix[sub] + name, "sparse file")
            else:
                found.append((uid, prefix[sub] + name, info.st_size, _file_id(info)))
        return found

    def uid_map(self) -> dict[str, tuple[str, str]]:
        """UIDL -> (subdir, name) of every file now (another program may have renamed some):
        one listing of new/ and cur/, new/ first."""
        found: dict[str, tuple[str, str]] = {}
        for sub, fd in self.fds.items():
            try:
                names = os.listdir(fd)
            except OSError:
                continue
            for name in names:
                if name[0] != ".":
                    found.setdefault(uid_of(name), (sub, name))
        return found


def _entries(fd: int) -> Iterator[str]:
    """The names in a directory, read a few at a time (os.listdir of 500,000 names is one
    call of 0.3 s)."""
    with os.scandir(fd) as entries:
        for entry in entries:
            yield entry.name


def _sparse(dir_fd: int, name: str) -> bool:
    """True if the file has a hole before its end (SEEK_HOLE). Asked only of a file whose
    st_blocks cover less than its size, which a compressing filesystem (btrfs, ZFS) also
    shows for a whole file: such a file has no hole and is mail as any other."""
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False  # vanished, or not a file: the open for measuring decides
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    except OSError:
        return False  # no SEEK_HOLE here: measured, up to max_message_size
    finally:
        _close_fd(fd)


# -- snapshot ----------------------------------------------------------------

def _scan(maildir: str, dirs: _Subdirs, names: list[tuple[str, tuple[str, str]]], uidl_format: str,
          limits: tuple[int, int], notes: _Notes, cancel: _Cancel) -> list[Message]:
    """The snapshot: Dovecot's uidlist if there is one, then sizes, then UIDLs and order.
    `limits`: (max_messages, max_message_size)."""
    max_messages, max_message_size = limits
    files = dirs.regular_files(names, notes, max_message_size, cancel)
    try:
        if len(files) > max_messages:
            raise TooManyMessages(len(files), max_messages)
        try:
            uidlist = dovecot_uidlist.load(maildir, notes, UIDLIST_LOOP_MAX)
        except dovecot_uidlist.ReadOnLoopTooBig:
            uidlist = _in_pool(maildir, cancel, dovecot_uidlist.load, maildir, notes)
        messages = _build_snapshot(maildir, files, uidlist, notes, cancel)
    finally:
        _release(files, cancel)
    if uidlist is None:
        return messages  # UIDLs are the base names, unique already
    return _name_messages(maildir, messages, uidlist, uidl_format, notes, cancel)


def _build_snapshot(maildir: str, files: list[tuple[str, str, int, int]],
                    uidlist: dovecot_uidlist.UidList | None, notes: _Notes, cancel: _Cancel) -> list[Message]:
    """Take sizes from names (W=), Dovecot's uidlist (W) or the cache, measure the rest,
    save the cache if it changed.

    On the event loop, in turns: what reads many octets (measuring files over SMALL_MESSAGE
    once they add up to THREADPOOL_BYTES, a size cache over SIZE_CACHE_LOOP_MAX) or waits
    for the disk (saving, with fsync) goes to the thread pool."""
    cache = _load_size_cache(maildir, cancel)
    fresh: dict[str, tuple[int, int]] = {}
    messages = []
    pending = []
    records = uidlist.records if uidlist is not None else {}
    track = _untracked if len(files) > UNTRACK_OVER else _as_is
    for count, (uid, path, raw, fid) in enumerate(files):
        if not count % CANCEL_EVERY:
            cancel.check()
        # No cache entry for these: the name, or Dovecot's file, keeps the size.
        named = size_from_name(path[path.rindex("/") + 1:], raw) if ",W=" in path else None
        if named is None and records:
            record = records.get(_base_name(path))
            if record is not None:
                named = plausible_size(raw, record.virtual_size, record.physical_size)
        if named is not None:
            messages.append(track(Message(uid, path, named, path, None, fid)))
            continue
        cached = cache.get(uid)
        if cached is not None and cached[0] == raw:
            fresh[uid] = cached
            messages.append(track(Message(uid, path, cached[1], path, None, fid)))
        else:
            pending.append((uid, path, raw, fid))
    measured: dict[str, int] = {}
    if pending:
        big = [entry for entry in pending if entry[2] > SMALL_MESSAGE]
        if sum(raw for _, _, raw, _ in big) > THREADPOOL_BYTES:
            measured = _measure([entry for entry in pending if entry[2] <= SMALL_MESSAGE], notes, cancel)
            measured.update(_in_pool(maildir, cancel, _measure, big, notes, cancel))
        else:
            measured = _measure(pending, notes, cancel)
        for count, (uid, path, raw, fid) in enumerate(pending):
            if not count % CANCEL_EVERY:
                cancel.check()
            if uid in measured:  # else vanished or swapped: not part of the snapshot
                fresh[uid] = (raw, measured[uid])
                messages.append(track(Message(uid, path, measured[uid], path, None, fid)))
        messages = sorted_in_steps(messages, _by_uid, cancel)
    _release(pending, cancel)
    # Changed when a size was measured or a cached one dropped (comparing 300,000 entries is one long call).
    if len(fresh) != len(cache) or any(cache.get(uid) != fresh.get(uid) for uid in measured):
        body = _size_cache_body(fresh, cancel)
        _in_pool(maildir, cancel, _save_size_cache, maildir, body, cancel)
    while len(fresh) > SORT_RUN:  # freed in steps too
        for _ in range(min(len(fresh), SORT_RUN)):
            fresh.popitem()
        cancel.turn()
    return messages


def _release(items: list[T], cancel: _Cancel) -> None:
    """Empty `items` a run at a time, in turns: freeing the 500,000 entries of a listing at once
    held the event loop 0.5 s."""
    while items:
        del items[-SORT_RUN:]
        cancel.turn()  # also for an abandoned scan


def _by_uid(message: Message) -> str:
    return message.uid


def _first(item: tuple[str, tuple[str, str]]) -> str:
    return item[0]


def sorted_in_steps(items: list[T], key: Callable[[T], object], cancel: _Cancel | None = None) -> list[T]:
    """`sorted(items, key=key)` (stable) that never holds the GIL long: runs of SORT_RUN
    sorted in C, merged by heapq.merge (Python), with `cancel.check` (turns for the other
    sessions) between runs and as the merge goes: one sort of 500,000 names is 0.4 s."""
    if len(items) <= SORT_RUN:
        return sorted(items, key=key)  # type: ignore[arg-type]
    runs = []
    for start in range(0, len(items), SORT_RUN):
        if cancel is not None:
            cancel.check()
        runs.append(sorted(items[start:start + SORT_RUN], key=key))  # type: ignore[arg-type]
    merged = []
    for count, item in enumerate(heapq.merge(*runs, key=key)):  # type: ignore[arg-type]
        if cancel is not None and not count % (8 * CANCEL_EVERY):
            cancel.check()
        merged.append(item)
    return merged


def _name_messages(maildir: str, messages: list[Message], uidlist: dovecot_uidlist.UidList, uidl_format: str,
                   notes: list[str], cancel: _Cancel) -> list[Message]:
    """The snapshot with Dovecot's UIDLs and order (see the module docstring).

    `%08Xu%08Xv` is written as Dovecot writes it: Dovecot's `X` modifier prints lower-case
    hex (2.3's var_expand uses "%llx"), so its UIDLs look like `000000016b0f40bd`."""
    records = uidlist.records
    suffix = f"{uidlist.uid_validity:08x}"
    dovecot_format = uidl_format == UIDL_DOVECOT
    keyed: list[tuple[tuple[int, int], int, Message]] = []
    for position, message in enumerate(messages):  # position: unlisted ones keep base name order
        if not position % CANCEL_EVERY:
            cancel.check()
        record = records.get(_base_name(message.source))
        if record is None:
            keyed.append(((1 << 33, 0), position, message))
            continue
        saved = record.pop3_uidl
        if saved:  # "" is Dovecot's shorthand for the base name, the %f UIDL
            message.uidl = saved if _safe_uidl(saved) else _hashed_uidl(saved, b"P:")
        elif saved is None and dovecot_format:
            message.uidl = f"{record.uid:08x}{suffix}"
        order = record.pop3_order if record.pop3_order is not None else 0xFFFFFFFF
        keyed.append(((order, record.uid), position, message))
    keyed = sorted_in_steps(keyed, _first_two, cancel)
    ordered = [message for _, _, message in keyed]
    repeated = _make_unique(ordered, cancel)
    if repeated:
        notes.append(f"{ascii(maildir)}: {repeated} UIDLs from {dovecot_uidlist.NAME} repeated one listed "
                     "before; those messages got hashed UIDLs")
    return ordered


def _first_two(item: tuple[tuple[int, int], int, Message]) -> tuple[tuple[int, int], int]:
    return item[0], item[1]


def _base_name(path: str) -> str:
    return path[path.rindex("/") + 1:].split(":", 1)[0]


def _make_unique(messages: list[Message], cancel: _Cancel) -> int:
    """Give a message whose UIDL an earlier one has a `~` hash of its base name instead;
    returns how many needed it. Base names are unique, so their hashes are."""
    seen: set[str] = set()
    repeated = 0
    for count, message in enumerate(messages):
        if not count % CANCEL_EVERY:
            cancel.check()
        uidl = message.uidl or message.uid
        if uidl in seen:
            repeated += 1
            uidl = message.uidl = _hashed_uidl(_base_name(message.source), b"")
            while uidl in seen:  # only if a hash collided: hash again
                uidl = message.uidl = _hashed_uidl(uidl, b"again:")
        seen.add(uidl)
    return repeated


def _measure(pending: list[tuple[str, str, int, int]], notes: _Notes, cancel: _Cancel) -> dict[str, int]:
    """uid -> CRLF size of each pending file that is still the regular file the scan saw."""
    sizes = {}
    for uid, path, _, fid in pending:
        cancel.check()
        try:
            sizes[uid] = crlf_size(path, fid, cancel.check)
        except NotMail as exc:
            notes.skip(path, exc.strerror or "not mail")
        except OSError:
            continue  # vanished meanwhile
    return sizes


def _read_capped(fd: int, cap: int) -> tuple[bytes | None, os.stat_result]:
    """All of a regular file up to `cap` octets (None if it is bigger or not a regular file),
    and its fstat."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
        return None, info
    parts = []
    total = 0
    while chunk := os.read(fd, info.st_size + 1 - total if total <= info.st_size else CHUNK_SIZE):
        parts.append(chunk)
        total += len(chunk)
        if total > cap:
            return None, info  # grew while read
    return b"".join(parts), info


def _load_size_cache(maildir: str, cancel: _Cancel) -> dict[str, tuple[int, int]]:
    """uid -> (raw size, CRLF size); empty when the file is missing, too big, not a regular
    file or not whole and ours (its trailer counts the entries and carries their keyed MAC: a
    torn write or an edit by the mailbox owner is never read as a wrong size, every size is
    then measured again).

    What a file read gave is remembered (`_SizeMemo`): while an lstat shows the same file
    (device, inode, size, mtime, ctime) the next login of the mailbox reads nothing. The
    server replaces the file by a rename, never in place, so a new cache is a new inode.
    The dict returned is shared: read only. A file over SIZE_CACHE_LOOP_MAX is read and
    its MAC checked in the thread pool; the entries are parsed here, in turns."""
    path = os.path.join(maildir, SIZE_CACHE)
    try:
        seen = os.lstat(path)
    except OSError:
        return {}
    remembered = _size_memo.get(maildir, _identity(seen))
    if remembered is not None:
        return remembered
    if seen.st_size > SIZE_CACHE_MAX:
        return {}
    if seen.st_size > SIZE_CACHE_LOOP_MAX:
        read = _in_pool(maildir, cancel, _read_size_cache, maildir, path)
    else:
        read = _read_size_cache(maildir, path)
    if read is None:
        return {}
    body, info = read
    cache = _parse_size_cache(body, cancel)
    if cache and _identity(info) == _identity(seen):
        _size_memo.put(maildir, _identity(seen), cache)
    return cache


def _read_size_cache(maildir: str, path: str) -> tuple[bytes, os.stat_result] | None:
    """The entries of the size cache file, if it is whole and ours (its MAC), and its fstat."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    try:
        data, info = _read_capped(fd, SIZE_CACHE_MAX)
    except OSError:
        return None
    finally:
        _close_fd(fd)
    body = _verified_body(maildir, data)
    return None if body is None else (body, info)


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


class _SizeMemo:
    """The size caches last read, per Maildir, up to SIZE_MEMO_ENTRIES entries in all (the
    least recently used Maildirs go first). Loads run on the event loop and in pool
    threads: a real lock, held for dict work only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries = 0
        self._memo: OrderedDict[str, tuple[tuple[int, ...], dict[str, tuple[int, int]]]] = OrderedDict()
        self._lock = monkey.get_original("threading", "Lock")()

    def get(self, maildir: str, identity: tuple[int, ...]) -> dict[str, tuple[int, int]] | None:
        with self._lock:
            found = self._memo.get(maildir)
            if found is None or found[0] != identity:
                return None
            self._memo.move_to_end(maildir)
            return found[1]

    def put(self, maildir: str, identity: tuple[int, ...], cache: dict[str, tuple[int, int]]) -> None:
        if len(cache) > self.limit:
            return
        with self._lock:
            old = self._memo.pop(maildir, None)
            if old is not None:
                self.entries -= len(old[1])
            self._memo[maildir] = (identity, cache)
            self.entries += len(cache)
            while self.entries > self.limit:
                _, (_, dropped) = self._memo.popitem(last=False)
                self.entries -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._memo.clear()
            self.entries = 0


_size_memo = _SizeMemo(SIZE_MEMO_ENTRIES)


_size_cache_key = os.urandom(SIZE_CACHE_KEY_BYTES)  # per process until `use_size_cache_key`


def use_size_cache_key(key: bytes) -> None:
    """Authenticate size caches with `key` (the installation's, from the state directory):
    a cache is read only if this key wrote it. Until called, a random key per process."""
    global _size_cache_key
    if len(key) < 16:
        raise ValueError("size cache key too short")
    _size_cache_key = bytes(key)
    _size_memo.clear()


def _size_cache_mac(maildir: str, body: bytes) -> bytes:
    """The keyed MAC of a size cache: its Maildir's path and its entries (a cache copied from
    another Maildir, or edited by the mailbox owner, does not verify)."""
    keyed = hashlib.blake2b(key=_size_cache_key, digest_size=16)
    keyed.update(os.fsencode(maildir) + b"\0")
    keyed.update(body)
    return keyed.hexdigest().encode()


def _verified_body(maildir: str, data: bytes | None) -> bytes | None:
    """The entries of a size cache file's content; None unless it is whole and ours (the
    trailer counts the entries and carries their keyed MAC)."""
    if not data or not data.endswith(b"\n"):
        return None
    end = data.rfind(b"\n", 0, len(data) - 1) + 1
    body = data[:end]
    expected = b"%s %d %s" % (SIZE_CACHE_TRAILER, body.count(b"\n"), _size_cache_mac(maildir, body))
    if not hmac.compare_digest(data[end:-1], expected):
        return None
    return body


PARSE_BLOCK = 1 << 16  # octets of size cache entries parsed between two looks at the turn


def _parse_size_cache(body: bytes, cancel: _Cancel | None = None) -> dict[str, tuple[int, int]]:
    """uid -> (raw, size) of authenticated entries, in blocks (`cancel.check` between two). An
    entry whose size is out of range for its raw size (see `plausible_size`) is ignored."""
    cache: dict[str, tuple[int, int]] = {}
    start = 0
    try:
        while start < len(body):
            if cancel is not None:
                cancel.check()
            end = body.find(b"\n", start + PARSE_BLOCK)
            end = len(body) if end < 0 else end + 1
            for line in body[start:end].decode("ascii").splitlines():
                uid, raw_text, size_text = line.split(" ")
                raw, size = int(raw_text), int(size_text)
                if 0 <= raw <= size <= 2 * raw + 2:
                    cache[uid] = (raw, size)
            start = end
    except ValueError:  # authenticated but not ours (UnicodeDecodeError is a ValueError)
        return {}
    return cache


def _size_cache_body(cache: dict[str, tuple[int, int]], cancel: _Cancel) -> bytes:
    """The entries of a size cache file, built in turns."""
    blocks = []
    lines: list[str] = []
    for uid, (raw, size) in cache.items():
        lines.append(f"{uid} {raw} {size}\n")
        if len(lines) >= 4 * CANCEL_EVERY:
            blocks.append("".join(lines))
            lines.clear()
            cancel.check()
    blocks.append("".join(lines))
    return "".join(blocks).encode("ascii")


def _save_size_cache(maildir: str, body: bytes, cancel: _Cancel | None = None) -> None:
    """Write `body` (`_size_cache_body`) and its trailer to a unique new file (O_EXCL |
    O_NOFOLLOW: nothing planted is written through), fsync it, rename it over the cache.
    Nothing once `cancel` is set.

    The directory is not fsynced: after a power loss the name gives the old cache or the
    new one, both whole (the file was synced before the rename) and both right, since an
    entry counts only for a file of the same UIDL and raw size; the fsync spares a full
    re-measure of the mailbox after a crash, the MAC catches what a disk still tears."""
    if cancel is not None and cancel.set:
        return
    data = body + b"%s %d %s\n" % (SIZE_CACHE_TRAILER, body.count(b"\n"), _size_cache_mac(maildir, body))
    final = os.path.join(maildir, SIZE_CACHE)
    if len(data) > SIZE_CACHE_MAX:
        return  # beyond what a load would accept; the old file stays right for what it lists
    temp = f"{final}.{os.urandom(8).hex()}.tmp"
    try:
        fd = os.open(temp, _CREATE_FLAGS, 0o600)
    except OSError:
        return
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            _close_fd(fd)
        os.replace(temp, final)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- content -----------------------------------------------------------------

class _FileReader:
    """A descriptor with read() and close(): no buffering layer, no extra system call to set one up.
    `size`: the file's size when it was opened (fstat)."""

    __slots__ = ("fd", "size")

    def __init__(self, fd: int, size: int = -1) -> None:
        self.fd = fd
        self.size = size

    def read(self, size: int = CHUNK_SIZE, /) -> bytes:
        return os.read(self.fd, size)

    def close(self) -> None:
        if self.fd >= 0:
            _close_fd(self.fd)
            self.fd = -1

    def __enter__(self) -> _FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_regular(path: str, file_id: int = 0) -> _FileReader:
    """Open a message file to read: never through a symlink, never blocking (a FIFO), only a
    regular file, and (with `file_id`) only the very file a snapshot saw. NotMail otherwise."""
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotMail(errno.EINVAL, "not a regular file", path)
        if file_id and _file_id(info) != file_id:
            raise NotMail(errno.ESTALE, "replaced since the snapshot", path)
    except BaseException:
        _close_fd(fd)
        raise
    return _FileReader(fd, info.st_size)


def open_message(message: Message) -> _FileReader:
    """What RETR/TOP stream: `message.path` as `open_regular` opens it (the snapshot's file
    identity is checked when the path is the Maildir file itself); a refusal is logged once."""
    file_id = message.file_id if message.path == message.source else 0
    try:
        return open_regular(message.path, file_id)
    except NotMail as exc:
        log.warning("maildir: refused %s: %s", ascii(message.path), exc.strerror)
        raise


def _crlf_chunks(handle: Readable, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
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


def crlf_size(path: str, file_id: int = 0, check: Callable[[], None] | None = None) -> int:
    """Octets RETR sends for this file (CRLF line ends, before dot-stuffing).

    Reads the whole file: a caller on the event loop sends big files to the thread pool.
    Only a regular file is read (NotMail otherwise), so a FIFO or /dev/zero cannot hang it.
    `check` is called before each chunk (a pool thread's cancel flag: it raises)."""
    with open_regular(path, file_id) as handle:
        if check is None:
            return sum(len(chunk) for chunk in _crlf_chunks(handle))
        total = 0
        for chunk in _crlf_chunks(handle):
            check()
            total += len(chunk)
        return total


def whole_message(handle: _FileReader, limit: int | None = None) -> bytes | None:
    """What RETR sends of a small message (at most SMALL_MESSAGE octets on disk), in one
    piece: as `message_chunks` gives it, from one read(2) and no generators (most mail is
    small, and RETR is most of a session's commands).

    The read asks one octet more than the size fstat gave at the open: getting exactly the
    size is the end of a regular file. None, the file rewound, for a bigger file or one
    whose size changed since: `message_chunks` streams it then. MessageChanged, before
    anything is sent, when the CRLF octets are more than `limit` (the size announced)."""
    size = handle.size
    if not 0 <= size <= SMALL_MESSAGE:
        return None
    data = os.read(handle.fd, size + 1)
    if len(data) != size:
        os.lseek(handle.fd, 0, os.SEEK_SET)
        return None
    if b"\r" not in data:  # LF-only, the usual Maildir file
        data = data.replace(b"\n", b"\r\n")
    elif data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and data[-1:] != b"\n":
        data += b"\r\n"  # also after a trailing lone CR, as _crlf_chunks does
    if limit is not None and len(data) > limit:
        raise MessageChanged(errno.EFBIG, f"grew since the snapshot ({len(data)} octets now)")
    if b"\n." in data:
        data = _DOT_LINE.sub(b"\n..", data)
    if data[:1] == b".":
        data = b"." + data
    return data


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


def _capped(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """`chunks` while they add up to at most `limit` octets; MessageChanged before the chunk
    that would go past it."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise MessageChanged(errno.EFBIG, f"grew since the snapshot (past {limit} octets)")
        yield chunk


def message_chunks(handle: Readable, body_lines: int | None = None, limit: int | None = None) -> Iterator[bytes]:
    """RETR (body_lines None) or TOP content: CRLF, dot-stuffed, ending in CRLF.

    The terminating `.` line is the caller's. Memory is one chunk whatever the size.
    `limit`: the size announced (the snapshot's): a file that grew past it raises
    MessageChanged rather than send more than that.
    """
    chunks = _crlf_chunks(handle)
    if limit is not None:
        chunks = _capped(chunks, limit)
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
    """Remove the files of `messages`, fsync the directories that lost one; returns those
    that could not be removed (or whose removal could not be made durable).

    Unlinks go through the directory descriptors (no symlink followed on the way). A file
    that another program renamed (flags changed) is looked up by its UIDL in one map of
    new/ and cur/, listed at the first such miss (linear in the deletions however many
    files were renamed); one that is already gone counts as deleted.
    """
    failed = []
    removed: dict[str, list[Message]] = {}
    current: dict[str, tuple[str, str]] | None = None
    with _Subdirs(maildir, _Notes()) as dirs:
        for message in messages:
            sub = os.path.basename(os.path.dirname(message.source))
            target: tuple[str, str] | None = (sub, os.path.basename(message.source))
            try:
                while target is not None:
                    try:
                        os.unlink(target[1], dir_fd=dirs.fds[target[0]])
                        removed.setdefault(target[0], []).append(message)
                        break
                    except (FileNotFoundError, KeyError):
                        if current is None:
                            current = dirs.uid_map()
                        found = current.pop(message.uid, None)
                        target = None if found == target else found
            except OSError:
                failed.append(message)
        for sub, gone in removed.items():
            try:
                os.fsync(dirs.fds[sub])
            except OSError:
                failed += gone  # removed, but not durably: never a false +OK
    return failed


def deliver(maildir: str, content: bytes) -> str:
    """Deliver one message the Maildir way: write into tmp/ (a new file, O_EXCL), then rename into new/.

    A delivery agent's job (--demo, tests, load tests): the Maildir and its parents are
    created if missing."""
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    # One clock reading, microseconds zero-padded: names sort in delivery order.
    now = time.time_ns()
    name = f"{now // 10**9}.M{now // 1000 % 1_000_000:06d}P{os.getpid()}R{os.urandom(4).hex()}.{host}"
    temp = os.path.join(maildir, "tmp", name)
    try:
        fd = os.open(temp, _CREATE_FLAGS, 0o600)
    except FileNotFoundError:
        _create(maildir, parents=True)
        fd = os.open(temp, _CREATE_FLAGS, 0o600)
    try:
        _write_all(fd, content)
        os.fsync(fd)
    finally:
        _close_fd(fd)
    final = os.path.join(maildir, "new", name)
    os.rename(temp, final)
    return final
