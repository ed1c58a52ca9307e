"""Dovecot's `dovecot-uidlist`, read only: what a Maildir's messages were called by Dovecot.

A Maildir Dovecot served holds `dovecot-uidlist`: the IMAP UID of every message (by base
file name), the mailbox's UIDVALIDITY, and per message the POP3 UIDL Dovecot showed when
`pop3_save_uidl = yes` (extension `P`) and a POP3 order (extension `O`). geventpop3 reads it
to show the same UIDLs in the same order after a migration (see docs/migrating.md); it
never writes it, and ignores Dovecot's index files.

The format (Dovecot's src/lib-storage/index/maildir/maildir-uidlist.c):

    3 V<uidvalidity> N<nextuid> G<guid> [<key><value>...]      version 3, the header
    <uid> [<key><value>...] :<base name>                        one line per message
    1 <uidvalidity> <nextuid>                                   version 1, the header
    <uid> <base name>                                           version 1, a message

UIDs ascend; extension keys are one letter A-Z; a base name has no `/` and no `:2,flags`.
A `P` with an empty value means "the base name" (Dovecot's own shorthand).

The file is written by whoever can write into the Maildir, so it is hostile input: it is
opened without following a symlink and only if it is a regular file of at most
`MAX_SIZE` octets; a header that is not Dovecot's makes the whole file unused; a line
that is not a record is skipped (counted, and the first one described, for one log line).
`parse` is sans-IO; `load` reads and keeps the last result per Maildir, re-reading only
when the file's identity, size or mtime change.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

from gevent import monkey

NAME = "dovecot-uidlist"
MAX_SIZE = 32 << 20  # octets (~300,000 messages); a bigger file is not used
MAX_LINE = 4096  # octets; Dovecot's own lines are a base name (<= 255) and a few extensions
MAX_UID = 0xFFFFFFFE  # Dovecot refuses (uint32_t)-1 itself
CACHE_RECORDS = 250_000  # records kept for all Maildirs together: 250-360 octets each, ~90 MB at most

# A line as Dovecot writes it: "<uid> [<key><value> ]...:<base name>". Anything else takes the slow
# path (`_record`), which accepts Dovecot's tolerances (more spaces, a `:2,flags` part) and says what is wrong.
_DOVECOT_LINE = re.compile(rb"([1-9][0-9]{0,9}) ((?:[A-Z][^ ]* )*):([^/:\0]+)")
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # as os.fsdecode

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_close_fd = monkey.get_original("os", "close")  # a file, never a socket: the real close(2)
# Loads run on the event loop and in pool threads: the cache needs a real lock, held for dict work only.
_lock = monkey.get_original("threading", "Lock")()


class UidListError(ValueError):
    """The file cannot be used at all (not Dovecot's header); str() says why."""


class Record(NamedTuple):
    """One message as Dovecot knew it (a tuple: 100,000 of them are made in a login's time)."""

    uid: int  # IMAP UID
    pop3_uidl: str | None = None  # `P`: the UIDL Dovecot showed; "" means the base name; None: not saved
    pop3_order: int | None = None  # `O`: Dovecot lists messages with an order first, lowest first
    virtual_size: int | None = None  # `W`: octets with CRLF line ends (when the name has no ,W=)
    physical_size: int | None = None  # `S`: octets on disk (when the name has no ,S=)


@dataclass(slots=True)
class UidList:
    """A parsed file: the mailbox's UIDVALIDITY and each base name's record."""

    version: int
    uid_validity: int
    next_uid: int
    records: dict[str, Record] = field(default_factory=dict)
    skipped: int = 0  # lines that were not records
    first_skipped: str = ""  # why the first one was skipped, with its line number

    def skip(self, number: int, why: str) -> None:
        if not self.skipped:
            self.first_skipped = f"line {number}: {why}"
        self.skipped += 1


def _u32(text: bytes) -> int | None:
    """A positive decimal below 2^32 (what Dovecot's str_to_uint accepts for a UID or UIDVALIDITY)."""
    if not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 0 < value <= 0xFFFFFFFF else None


def _header(line: bytes) -> UidList:
    if len(line) < 2 or not line[:1].isdigit() or line[1:2] != b" ":
        raise UidListError("not a dovecot-uidlist header")
    version = line[0] - ord("0")
    uid_validity = next_uid = None
    if version == 1:
        words = line[2:].split()
        if len(words) == 2:
            uid_validity, next_uid = _u32(words[0]), _u32(words[1])
    elif version == 3:
        for word in line[2:].split(b" "):
            if word[:1] == b"V":
                uid_validity = _u32(word[1:])
            elif word[:1] == b"N":
                next_uid = _u32(word[1:])
    else:
        raise UidListError(f"unsupported dovecot-uidlist version {version}")
    if uid_validity is None or next_uid is None:
        raise UidListError("dovecot-uidlist header without a valid UIDVALIDITY and next UID")
    return UidList(version, uid_validity, next_uid)


def _size(text: bytes) -> int | None:
    return int(text) if text.isdigit() and len(text) <= 19 else None


def _record(line: bytes, version: int) -> tuple[str, Record] | str:
    """(base name, record) of one line, or why it is not a record."""
    digits, space, rest = line.partition(b" ")
    uid = _u32(digits) if space else None
    if uid is None or uid > MAX_UID:
        return "not a UID"
    extensions: dict[bytes, bytes] = {}
    rest = rest.lstrip(b" ")
    if version == 3:
        while rest and rest[:1] != b":":
            word, _, rest = rest.partition(b" ")
            rest = rest.lstrip(b" ")
            if not b"A" <= word[:1] <= b"Z":
                return "not an extension"
            extensions.setdefault(word[:1], word[1:])
        if rest[:1] != b":":
            return "no file name"
        rest = rest[1:]
    name = rest.split(b":", 1)[0]  # a base name; tolerate a written-out `:2,flags` part
    if not name or b"/" in name or b"\0" in name:
        return "not a file name"
    return name.decode(_FS_ENCODING, _FS_ERRORS), _with_extensions(uid, extensions)


def _with_extensions(uid: int, extensions: dict[bytes, bytes]) -> Record:
    if not extensions:
        return Record(uid)
    saved = extensions.get(b"P")
    return Record(
        uid,
        pop3_uidl=None if saved is None else saved.decode(_FS_ENCODING, _FS_ERRORS),  # checked where used
        pop3_order=_u32(extensions.get(b"O", b"")),
        virtual_size=_size(extensions.get(b"W", b"")),
        physical_size=_size(extensions.get(b"S", b"")),
    )


def _fast_record(line: bytes) -> tuple[str, Record] | None:
    """What `_record` gives for a line exactly as Dovecot writes it; None for any other line."""
    match = _DOVECOT_LINE.fullmatch(line)
    if match is None:
        return None
    uid = int(match[1])
    if uid > MAX_UID:
        return None
    extensions: dict[bytes, bytes] = {}
    if match[2]:
        for word in match[2].split():
            extensions.setdefault(word[:1], word[1:])
    return match[3].decode(_FS_ENCODING, _FS_ERRORS), _with_extensions(uid, extensions)


def parse(data: bytes) -> UidList:
    """The records of a whole file; UidListError if its header is not Dovecot's.

    Lines that are not records are skipped (counted in `skipped`): a UID that does not
    ascend, a name with `/`, an overlong line, an unterminated last line (a torn append).
    A base name listed twice keeps its last record, as Dovecot does."""
    lines = data.split(b"\n")
    result = _header(lines[0])
    previous = 0
    version = result.version
    fast = _fast_record
    last = len(lines) - 1  # after the final "\n" comes b"", or a line without its end
    for number, line in enumerate(lines[1:last], 2):
        if not line:
            continue
        if len(line) > MAX_LINE:
            result.skip(number, "too long")
            continue
        parsed = (fast(line) if version == 3 else None) or _record(line, version)
        if isinstance(parsed, str):
            result.skip(number, parsed)
            continue
        name, record = parsed
        if record.uid <= previous:
            result.skip(number, "UIDs not ascending")
            continue
        previous = record.uid
        result.records[name] = record
    if last and lines[last]:
        result.skip(last + 1, "no line end")
    return result


# -- reading, with a cache ----------------------------------------------------

class ReadOnLoopTooBig(Exception):
    """The file must be read, and it is bigger than the caller wants to read where it is."""


# Maildir path -> (identity, parsed file or None: unusable); least recently used first.
_cache: dict[str, tuple[tuple[int, ...], UidList | None]] = {}
_cached_records = 0


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def load(maildir: str, notes: list[str], read_cap: int = MAX_SIZE) -> UidList | None:
    """The Maildir's `dovecot-uidlist`, parsed; None if there is none or it cannot be used.

    One lstat when the file has not changed since the last load (the result is kept,
    an unusable file's too); else one open (never through a symlink, only a regular file)
    and one read. ReadOnLoopTooBig if it must be read and holds more than `read_cap`
    octets (the caller then loads it from a worker thread). What is wrong with it goes
    to `notes`, once per version of the file."""
    path = os.path.join(maildir, NAME)
    try:
        info = os.lstat(path)
    except OSError:
        _forget(maildir)
        return None
    identity = _identity(info)
    with _lock:
        cached = _cache.pop(maildir, None)
        if cached is not None and cached[0] == identity:
            _cache[maildir] = cached  # now the most recently used
            return cached[1]
    if cached is not None:
        _forget(maildir, cached)
    if stat.S_ISREG(info.st_mode) and MAX_SIZE >= info.st_size > read_cap:
        raise ReadOnLoopTooBig(info.st_size)
    identity, parsed = _read(path, identity, notes)
    _remember(maildir, identity, parsed)
    return parsed


def _read(path: str, identity: tuple[int, ...], notes: list[str]) -> tuple[tuple[int, ...], UidList | None]:
    """(identity of what was read, its records or None); `identity` (the lstat's) if nothing was."""
    why = ""
    try:
        fd = os.open(path, _READ_FLAGS)  # a symlink: ELOOP; a FIFO: opens, fstat tells
    except OSError as exc:
        why = exc.strerror or "cannot open"
    else:
        try:
            info = os.fstat(fd)
            identity = _identity(info)
            if not stat.S_ISREG(info.st_mode):
                why = "not a regular file"
            elif info.st_size > MAX_SIZE:
                why = f"over {MAX_SIZE} octets"
            else:
                data = _read_all(fd, info.st_size)
                if data is None:
                    return (), None  # written while read: not kept, read again next time
                try:
                    parsed = parse(data)
                except UidListError as exc:
                    why = str(exc)
                else:
                    if parsed.skipped:
                        notes.append(f"{ascii(path)}: skipped {parsed.skipped} malformed lines "
                                     f"(first {parsed.first_skipped})")
                    return identity, parsed
        except OSError as exc:
            why = exc.strerror or "cannot read"
        finally:
            _close_fd(fd)
    notes.append(f"not using {ascii(path)}: {why}")
    return identity, None


def _read_all(fd: int, size: int) -> bytes | None:
    """The file's `size` octets (None if it holds more: written meanwhile; reread next time)."""
    parts = []
    total = 0
    while chunk := os.read(fd, size + 1 - total if total <= size else 1):
        parts.append(chunk)
        total += len(chunk)
        if total > size:
            return None
    return b"".join(parts)


def _remember(maildir: str, identity: tuple[int, ...], parsed: UidList | None) -> None:
    global _cached_records
    count = len(parsed.records) if parsed is not None else 0
    if not identity or count > CACHE_RECORDS:
        return  # read again at the next login rather than crowd out every other Maildir
    with _lock:
        while _cache and _cached_records + count > CACHE_RECORDS:
            _drop(_cache.pop(next(iter(_cache))))
        _cache[maildir] = (identity, parsed)
        _cached_records += count


def _forget(maildir: str, entry: tuple[tuple[int, ...], UidList | None] | None = None) -> None:
    """Drop the Maildir's cached result (`entry`: already taken out of the cache)."""
    with _lock:
        if entry is None:
            entry = _cache.pop(maildir, None)
        _drop(entry)


def _drop(entry: tuple[tuple[int, ...], UidList | None] | None) -> None:
    global _cached_records
    if entry is not None and entry[1] is not None:
        _cached_records -= len(entry[1].records)


def clear_cache() -> None:
    """Forget every parsed file (tests; a Maildir root changed)."""
    global _cached_records
    with _lock:
        _cache.clear()
        _cached_records = 0
