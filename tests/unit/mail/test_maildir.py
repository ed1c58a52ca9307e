"""Maildir: the Mailbox (open, snapshot, cached exact sizes, lock, UPDATE deletes, size), streaming RETR/TOP."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventpop3.core.message import Message
from geventpop3.mail import maildir
from geventpop3.mail.maildir import Mailbox

REPO = str(Path(__file__).resolve().parents[3])


# -- reference implementation ------------------------------------------------

def ref_crlf(raw: bytes) -> bytes:
    """What RETR sends before dot-stuffing: CRLF line ends, a final line end added if missing."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\n"):
        data += b"\r\n"
    return data


def ref_stuff(data: bytes) -> bytes:
    return (b"\n" + data).replace(b"\n.", b"\n..")[1:]


def ref_top(raw: bytes, body_lines: int) -> bytes:
    """The headers, the blank line, then `body_lines` lines (the whole message if no blank line)."""
    data = ref_crlf(raw)
    lines = [part + b"\n" for part in data.split(b"\n")[:-1]]
    if b"\r\n" not in lines:
        return data
    blank = lines.index(b"\r\n")
    return b"".join(lines[: blank + 1 + body_lines])


# -- helpers -----------------------------------------------------------------

class ShortReads(io.RawIOBase):
    """A file whose reads return at most a few octets, as raw I/O may: forces tiny chunks."""

    def __init__(self, data: bytes, sizes: Iterator[int]) -> None:
        self._data = data
        self._position = 0
        self._sizes = sizes

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        step = next(self._sizes)
        if size >= 0:
            step = min(step, size)
        chunk = self._data[self._position:self._position + step]
        self._position += len(chunk)
        return chunk


def fixed(size: int) -> Iterator[int]:
    while True:
        yield size


def randomly(rng: random.Random, high: int) -> Iterator[int]:
    while True:
        yield rng.randint(1, high)


def crlf(raw: bytes, chunk_size: int) -> bytes:
    return b"".join(maildir._crlf_chunks(io.BytesIO(raw), chunk_size=chunk_size))


def stream(raw: bytes, body_lines: int | None = None, sizes: Iterator[int] | None = None) -> bytes:
    handle = ShortReads(raw, sizes) if sizes is not None else io.BytesIO(raw)
    chunks = list(maildir.message_chunks(handle, body_lines))  # type: ignore[arg-type]
    assert all(chunks), "no empty chunks"
    return b"".join(chunks)


def make_maildir(root: Path, user: str = "alice") -> Path:
    Mailbox(str(root), user).open()
    return root / user


def mailbox(box: Path) -> Mailbox:
    return Mailbox(str(box.parent), box.name)


def snapshot(box: Path) -> list[Message]:
    return mailbox(box).snapshot()


def put(box: Path, sub: str, name: str, content: bytes) -> Path:
    path = box / sub / name
    path.write_bytes(content)
    return path


# -- CRLF conversion and dot-stuffing -----------------------------------------

CASES = {
    "lf": (b"A: 1\nB: 2\n\nbody\n", b"A: 1\r\nB: 2\r\n\r\nbody\r\n"),
    "crlf": (b"A: 1\r\n\r\nbody\r\n", b"A: 1\r\n\r\nbody\r\n"),
    "mixed": (b"A: 1\r\nB: 2\n\r\nx\ny\r\n", b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n"),
    "no final newline": (b"A: 1\n\nlast", b"A: 1\r\n\r\nlast\r\n"),
    "empty": (b"", b""),
    "only newline": (b"\n", b"\r\n"),
    "lone cr kept": (b"a\rb\n", b"a\rb\r\n"),
    "trailing cr": (b"a\r", b"a\r\r\n"),
    "cr cr lf": (b"a\r\r\nb\n", b"a\r\r\nb\r\n"),
    "nul and binary": (b"\x00\xff\n\x80\x00", b"\x00\xff\r\n\x80\x00\r\n"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, maildir.CHUNK_SIZE])
def test_crlf_conversion(name: str, chunk_size: int) -> None:
    raw, expected = CASES[name]
    assert ref_crlf(raw) == expected
    assert crlf(raw, chunk_size) == expected


WHOLE_CASES = {**{name: raw for name, (raw, _) in CASES.items()}, "dots": b".a\n..b\n\n.\nc.\n.", "dot cr": b".\r\n.\r",
               "largest small": b".x\n" * (maildir.SMALL_MESSAGE // 3) + b"\n" * (maildir.SMALL_MESSAGE % 3)}


@pytest.mark.parametrize("name", sorted(WHOLE_CASES))
def test_whole_message_is_what_streaming_sends(tmp_path: Path, name: str) -> None:
    raw = WHOLE_CASES[name]
    path = tmp_path / "m"
    path.write_bytes(raw)
    with maildir.open_regular(str(path)) as handle:
        whole = maildir.whole_message(handle)
    assert whole == stream(raw) == ref_stuff(ref_crlf(raw))


def test_whole_message_leaves_big_and_changed_files_to_streaming(tmp_path: Path) -> None:
    path = tmp_path / "m"
    path.write_bytes(b"x\n" * (maildir.SMALL_MESSAGE // 2 + 1))  # one octet over
    with maildir.open_regular(str(path)) as handle:
        assert maildir.whole_message(handle) is None
        assert b"".join(maildir.message_chunks(handle)) == ref_crlf(path.read_bytes())
    path.write_bytes(b".a\nb\n")
    with maildir.open_regular(str(path)) as handle:
        with open(path, "ab") as grow:
            grow.write(b".c\n")  # grew after the open: not the size fstat gave
        assert maildir.whole_message(handle) is None
        assert b"".join(maildir.message_chunks(handle)) == b"..a\r\nb\r\n..c\r\n"  # rewound: all of it


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5])
def test_cr_at_chunk_end_followed_by_lf(chunk_size: int) -> None:
    raw = b"ab\r\ncd\r\n\r\n.x\r\n"
    assert crlf(raw, chunk_size) == raw
    assert stream(raw, sizes=fixed(chunk_size)) == b"ab\r\ncd\r\n\r\n..x\r\n"


@pytest.mark.parametrize(("raw", "expected"), [
    (b".", b"..\r\n"),
    (b".\n", b"..\r\n"),
    (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n"),
    (b"a\n..b\n", b"a\r\n...b\r\n"),
    (b"a.b\n .c\n", b"a.b\r\n .c\r\n"),
    (b"a\r\n.\r\n", b"a\r\n..\r\n"),
    (b"\n.\n.\n", b"\r\n..\r\n..\r\n"),
    (b"x\n.", b"x\r\n..\r\n"),  # a `.` line after a bare LF, at the very end, no final newline
])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1000])
def test_dot_stuffing(raw: bytes, expected: bytes, chunk_size: int) -> None:
    assert stream(raw, sizes=fixed(chunk_size)) == expected


def test_dot_at_chunk_start() -> None:
    raw = b"abc\n.def\n"
    for size in range(1, len(raw) + 1):
        assert stream(raw, sizes=fixed(size)) == b"abc\r\n..def\r\n", size


def test_body_never_ends_the_response_early() -> None:
    """Whatever the file, the stream never contains CRLF.CRLF (the end marker)."""
    rng = random.Random(7)
    for _ in range(200):
        raw = bytes(rng.choice(b".\r\nab") for _ in range(rng.randint(0, 60)))
        out = stream(raw, sizes=randomly(rng, 5))
        assert b"\r\n.\r\n" not in b"\r\n" + out
        assert out == b"" or out.endswith(b"\r\n")


def test_property_against_reference() -> None:
    """Random contents (binary, NUL, dots, CR, LF) and random read sizes: RETR, TOP and sizes match."""
    rng = random.Random(20240601)
    alphabet = b"\r\n.\r\n.a \x00\xff:"
    for _ in range(400):
        length = rng.choice([0, 1, 2, 5, 20, 100, 600])
        raw = bytes(rng.choice(alphabet) for _ in range(length))
        high = rng.choice([1, 2, 3, 8, 64])
        expected = ref_crlf(raw)
        assert crlf(raw, rng.randint(1, high)) == expected, raw
        assert stream(raw, sizes=randomly(rng, high)) == ref_stuff(expected), raw
        body_lines = rng.choice([0, 1, 2, 5, 1000])
        assert stream(raw, body_lines, sizes=randomly(rng, high)) == ref_stuff(ref_top(raw, body_lines)), (
            raw, body_lines)


# -- TOP ---------------------------------------------------------------------

MESSAGE = b"From: a@example.org\nSubject: hi\n\nline 1\n.line 2\nline 3\n"


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
def test_top_zero_sends_headers_and_blank_line_only(chunk_size: int) -> None:
    assert stream(MESSAGE, 0, fixed(chunk_size)) == b"From: a@example.org\r\nSubject: hi\r\n\r\n"


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_top_with_lines(chunk_size: int) -> None:
    head = b"From: a@example.org\r\nSubject: hi\r\n\r\n"
    assert stream(MESSAGE, 1, fixed(chunk_size)) == head + b"line 1\r\n"
    assert stream(MESSAGE, 2, fixed(chunk_size)) == head + b"line 1\r\n..line 2\r\n"
    assert stream(MESSAGE, 3, fixed(chunk_size)) == stream(MESSAGE)
    assert stream(MESSAGE, 99, fixed(chunk_size)) == stream(MESSAGE)
    assert stream(MESSAGE, 2**62, fixed(chunk_size)) == stream(MESSAGE)


def test_top_of_message_without_blank_line_is_the_whole_message() -> None:
    raw = b"From: a\nSubject: no body\n"
    assert stream(raw, 0) == b"From: a\r\nSubject: no body\r\n"
    assert stream(b"From: a", 0) == b"From: a\r\n"


def test_top_of_message_starting_with_blank_line() -> None:
    assert stream(b"\nbody\nmore\n", 0) == b"\r\n"
    assert stream(b"\r\nbody\nmore\n", 1, fixed(1)) == b"\r\nbody\r\n"


def test_top_of_empty_message() -> None:
    assert stream(b"", 0) == b""


def test_top_body_without_final_newline() -> None:
    assert stream(b"A: 1\n\nonly", 5, fixed(2)) == b"A: 1\r\n\r\nonly\r\n"


def test_blank_line_split_across_chunks() -> None:
    raw = b"A: 1\r\nB: 2\r\n\r\nbody\r\nmore\r\n"
    for size in range(1, len(raw) + 1):
        assert stream(raw, 0, fixed(size)) == b"A: 1\r\nB: 2\r\n\r\n", size
        assert stream(raw, 1, fixed(size)) == b"A: 1\r\nB: 2\r\n\r\nbody\r\n", size


def test_large_message_streams_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big"
    raw = b".\n" * (maildir.CHUNK_SIZE * 2) + b"end"  # every line dot-stuffed and converted
    path.write_bytes(raw)
    total = 0
    with open(path, "rb") as handle:
        for chunk in maildir.message_chunks(handle):
            assert len(chunk) <= 2 * maildir.CHUNK_SIZE + 8
            total += len(chunk)
    assert total == len(ref_stuff(ref_crlf(raw)))
    assert maildir.crlf_size(str(path)) == len(ref_crlf(raw))


# -- snapshot and sizes --------------------------------------------------------

def test_snapshot_new_and_cur_uidl_is_base_name(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.M1P1.host", b"A: 1\n\nnew\n")
    put(box, "cur", "1001.M2P1.host:2,S", b"A: 2\r\n\r\ncur\r\n")
    put(box, "cur", "1002.M3P1.host:2,", b"x")
    put(box, "new", ".hidden", b"ignored")
    put(box, "tmp", "1003.M4P1.host", b"not delivered yet")
    messages = snapshot(box)
    assert [m.uid for m in messages] == ["1000.M1P1.host", "1001.M2P1.host", "1002.M3P1.host"]
    assert [os.path.basename(m.path) for m in messages] == ["1000.M1P1.host", "1001.M2P1.host:2,S",
                                                             "1002.M3P1.host:2,"]
    assert all(m.source == m.path and m.error is None for m in messages)
    assert [m.size for m in messages] == [len(b"A: 1\r\n\r\nnew\r\n"), len(b"A: 2\r\n\r\ncur\r\n"), 3]


def test_snapshot_serves_odd_names_with_hashed_uidls_once_each(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "dup.host", b"in new")
    put(box, "cur", "dup.host:2,S", b"in cur")
    odd = ["has space", "x" * 71, ":2,S", "~looks.hashed"]
    for name in odd:
        put(box, "new", name, b"x")
    messages = snapshot(box)
    assert [m.uid for m in messages][0] == "dup.host"
    assert messages[0].path.endswith("/new/dup.host")
    hashed = {os.path.basename(m.path): m.uid for m in messages[1:]}
    assert sorted(hashed) == sorted(odd)
    assert all(uid.startswith("~") and len(uid) == 33 and uid[1:].isalnum() for uid in hashed.values())
    assert hashed == {name: maildir.uid_of(name + ":2,S") for name in hashed if name != ":2,S"} | {
        ":2,S": maildir.uid_of(":2,T")}  # stable across flag changes
    assert len({m.uid for m in messages}) == len(messages)


def test_snapshot_of_missing_subdirectories_is_empty(tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    assert snapshot(tmp_path / "bare") == []


def test_sizes_equal_stream_minus_dot_stuffing(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    contents = [b"", b"a", b".\n.\n", b"x\r\ny\nz", b"\x00\r\r\n\xff.\n", b"A: 1\n\n" + b".dots\n" * 500]
    for number, content in enumerate(contents):
        put(box, "new", f"{1000 + number}.host", content)
    for message, content in zip(snapshot(box), contents, strict=True):
        with open(message.path, "rb") as handle:
            sent = b"".join(maildir.message_chunks(handle))
        unstuffed = (b"\r\n" + sent).replace(b"\r\n..", b"\r\n.")[2:]
        assert message.size == len(unstuffed) == len(ref_crlf(content)), content


def _count_message_opens(monkeypatch: pytest.MonkeyPatch, box: Path) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202 - mirrors os.open
        if os.path.dirname(os.path.dirname(str(path))) == str(box):
            opened.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(maildir.os, "open", counting_open)
    return opened


def cache_lines(box: Path) -> list[str]:
    """The entries of the size cache, after checking its trailer counts them."""
    lines = (box / maildir.SIZE_CACHE).read_text().split("\n")
    assert lines[-1] == "" and lines[-2].startswith(f"#geventpop3.sizes {len(lines) - 2} ")
    return lines[:-2]


def test_second_snapshot_reads_no_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    for number in range(20):
        put(box, "new", f"{1000 + number}.host", b"A: 1\n\nbody\n" * (number + 1))
    opened = _count_message_opens(monkeypatch, box)
    first = snapshot(box)
    assert len(opened) == 20
    opened.clear()
    second = snapshot(box)
    assert opened == []
    assert first == second


def test_size_cache_content_and_use(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    path = put(box, "new", "1000.host", b"\n\n\n\n")  # 4 raw octets, 8 on the wire
    put(box, "cur", "1001.host:2,S", b"ab\n")
    assert [m.size for m in snapshot(box)] == [8, 4]
    assert sorted(cache_lines(box)) == ["1000.host 4 8", "1001.host 3 4"]
    # Same raw length, different content: the cached size is used (no re-read).
    path.write_bytes(b"abcd")
    assert [m.size for m in snapshot(box)] == [8, 4]


def test_changed_raw_size_is_measured_again(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    path = put(box, "new", "1000.host", b"\n\n\n\n")
    assert snapshot(box)[0].size == 8
    path.write_bytes(b"abcde")
    assert snapshot(box)[0].size == 7
    assert cache_lines(box) == ["1000.host 5 7"]


def test_size_cache_forgets_removed_messages(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    gone = put(box, "new", "1000.host", b"a\n")
    put(box, "new", "1001.host", b"b\n")
    snapshot(box)
    gone.unlink()
    assert [m.uid for m in snapshot(box)] == ["1001.host"]
    assert cache_lines(box) == ["1001.host 2 3"]


def test_corrupt_size_cache_is_ignored(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")
    (box / maildir.SIZE_CACHE).write_bytes(b"garbage\n1000.host x y\n\xff\xfe\x00\n1000.host 4\n")
    assert snapshot(box)[0].size == 6
    assert cache_lines(box) == ["1000.host 4 6"]
    assert not [name for name in os.listdir(box) if name.endswith(".tmp")]


def test_size_cache_read_once_while_the_file_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")
    assert snapshot(box)[0].size == 6  # measured, cache written
    cache_path = str(box / maildir.SIZE_CACHE)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN202 - mirrors os.open
        opened.append(path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    assert snapshot(box)[0].size == 6  # read: the file the memo knows was written after the last read
    assert snapshot(box)[0].size == 6
    assert opened.count(cache_path) == 1
    # Replaced (as the server does: a new file renamed over it) with another size: read again.
    (box / "new-cache").write_bytes(signed_cache(box, b"1000.host 4 9\n"))
    os.replace(box / "new-cache", cache_path)
    assert snapshot(box)[0].size == 9  # another size for the same raw size, signed with our key: trusted
    # Changed in place (another length): read again.
    (box / maildir.SIZE_CACHE).write_bytes(signed_cache(box, b"1000.host 4 7\n"))
    assert snapshot(box)[0].size == 7


def signed_cache(box: Path, body: bytes) -> bytes:
    """A size cache file as this process's key signs it for the Maildir `box`."""
    return body + b"%s %d %s\n" % (maildir.SIZE_CACHE_TRAILER, body.count(b"\n"),
                                   maildir._size_cache_mac(str(box), body))


def test_size_cache_edited_or_out_of_range_is_not_trusted(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")
    put(box, "new", "1001.host", b"abcd")
    assert [m.size for m in snapshot(box)] == [6, 6]
    cache = box / maildir.SIZE_CACHE
    data = cache.read_bytes()
    cache.write_bytes(data.replace(b"1000.host 4 6", b"1000.host 4 5"))  # the owner edits a size: MAC fails
    assert [m.size for m in snapshot(box)] == [6, 6]
    old_crc = b"1000.host 4 9\n"  # the format before the MAC (a CRC) is not read
    cache.write_bytes(old_crc + b"%s 1 %08x\n" % (maildir.SIZE_CACHE_TRAILER, zlib.crc32(old_crc)))
    assert [m.size for m in snapshot(box)] == [6, 6]
    # Signed but out of range (a -5, or more than 2 raw + 2): that entry is ignored, measured again.
    cache.write_bytes(signed_cache(box, b"1000.host 4 -5\n1001.host 4 11\n"))
    assert [m.size for m in snapshot(box)] == [6, 6]
    # Another Maildir's key or path: not ours.
    (tmp_path / "other").mkdir()
    other = make_maildir(tmp_path / "other")
    cache.write_bytes(signed_cache(other, b"1000.host 4 9\n"))
    assert [m.size for m in snapshot(box)] == [6, 6]


def test_size_memo_is_bounded() -> None:
    memo = maildir._SizeMemo(limit=3)
    memo.put("/a", (1,), {"x": (1, 2), "y": (1, 2)})
    memo.put("/b", (1,), {"z": (1, 2)})
    assert memo.get("/a", (1,)) is not None and memo.get("/a", (2,)) is None  # another file: not it
    memo.put("/c", (1,), {"w": (1, 2)})  # 4 entries: the least recently used (/b) goes
    assert memo.get("/b", (1,)) is None and memo.get("/a", (1,)) is not None and memo.entries == 3
    memo.put("/d", (1,), {str(n): (1, 2) for n in range(4)})  # bigger than the limit: not kept
    assert memo.get("/d", (1,)) is None and memo.entries == 3


def test_big_snapshot_in_thread_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    for number in range(10):
        put(box, "new", f"{1000 + number}.host", b"x\n" * number)
    messages = snapshot(box)
    assert [m.size for m in messages] == [3 * number for number in range(10)]


# -- lock --------------------------------------------------------------------

def test_lock_is_exclusive_between_two_objects(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    first, second = mailbox(box), mailbox(box)
    assert not first.in_use()
    assert first.lock() and first.locked
    assert not second.lock() and not second.locked
    assert first.in_use() and second.in_use()
    first.release()
    assert not first.locked
    assert not first.in_use()
    assert second.lock()
    assert not first.lock()
    second.release()
    second.release()  # releasing twice is harmless
    first.release()  # so is releasing a lock one never held


def test_in_use_of_missing_maildir(tmp_path: Path) -> None:
    assert not Mailbox(str(tmp_path), "nobody").in_use()
    assert not (tmp_path / "nobody").exists()


HOLDER = textwrap.dedent("""
    import sys
    from geventpop3.mail.maildir import Mailbox
    mailbox = Mailbox(sys.argv[1], sys.argv[2])
    print("locked" if mailbox.lock() else "busy", flush=True)
    sys.stdin.read()
""")


def _holder(box: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(box.parent), box.name], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=env)
    assert process.stdout is not None
    assert process.stdout.readline() == b"locked\n"
    return process


def test_lock_across_processes_released_on_exit(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    process = _holder(box)
    try:
        assert mailbox(box).in_use()
        assert not mailbox(box).lock()
    finally:
        process.communicate(b"")  # the holder exits normally
    assert not mailbox(box).in_use()


def test_lock_never_stale_after_kill_9(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    process = _holder(box)
    try:
        held = mailbox(box)
        assert not held.lock()
    finally:
        process.kill()
        process.wait()
        process.stdin.close()  # type: ignore[union-attr]
        process.stdout.close()  # type: ignore[union-attr]
    assert held.lock()
    held.release()


def test_lock_held_here_is_seen_by_other_process(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    held = mailbox(box)
    assert held.lock()
    env = dict(os.environ, PYTHONPATH=REPO)
    check = "import sys; from geventpop3.mail.maildir import Mailbox; print(Mailbox(sys.argv[1], sys.argv[2]).in_use())"
    try:
        out = subprocess.run([sys.executable, "-c", check, str(box.parent), box.name], capture_output=True, env=env,
                             check=True).stdout
        assert out == b"True\n"
    finally:
        held.release()


# -- UPDATE ------------------------------------------------------------------

def test_delete(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    for number in range(4):
        put(box, "new", f"{1000 + number}.host", b"x\n")
    messages = snapshot(box)
    assert mailbox(box).delete([messages[0], messages[2]]) == []
    assert [m.uid for m in snapshot(box)] == ["1001.host", "1003.host"]


def test_delete_finds_a_renamed_file_and_tolerates_a_gone_one(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"moved\n")
    put(box, "cur", "1001.host:2,", b"flags changed\n")
    gone = put(box, "new", "1002.host", b"gone\n")
    put(box, "new", "1000.hostX", b"a uid with the other as prefix: kept\n")
    messages = snapshot(box)
    os.rename(box / "new" / "1000.host", box / "cur" / "1000.host:2,S")  # a client or MUA marked it seen
    os.rename(box / "cur" / "1001.host:2,", box / "cur" / "1001.host:2,RS")
    gone.unlink()
    doomed = [m for m in messages if m.uid != "1000.hostX"]
    assert len(doomed) == 3
    assert mailbox(box).delete(doomed) == []
    assert [m.uid for m in snapshot(box)] == ["1000.hostX"]


def test_delete_failure_is_reported(tmp_path: Path) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"x\n")
    messages = snapshot(box)
    blocked = box / "cur" / "1001.host"
    blocked.mkdir()  # unlink() of a directory fails with something other than "not found"
    stuck = Message("1001.host", str(blocked), 1, str(blocked))
    failed = mailbox(box).delete([messages[0], stuck])
    assert failed == [stuck]
    assert not (box / "new" / "1000.host").exists()


# -- names and delivery --------------------------------------------------------

@pytest.mark.parametrize("name", ["alice", "a", "Bob_1", "x.y-z", "0", "_", "a" * 40])
def test_user_maildir_accepts_safe_names(tmp_path: Path, name: str) -> None:
    assert maildir.user_maildir(str(tmp_path), name) == os.path.join(str(tmp_path), name)


def test_user_maildir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert maildir.user_maildir("mail", "alice") == str(tmp_path / "mail" / "alice")


@pytest.mark.parametrize("name", ["", ".", "..", "../x", ".hidden", "-x", "a/b", "/etc", "a" * 41, "a\n", "a\x00",
                                  "a b", "\u00e9", "a\\b"])
def test_user_maildir_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(maildir.MaildirError):
        maildir.user_maildir(str(tmp_path), name)


def test_open_creates_the_maildir_once(tmp_path: Path) -> None:
    box = Mailbox(str(tmp_path), "alice")
    assert box.path == str(tmp_path / "alice")
    box.open()
    assert sorted(os.listdir(box.path)) == ["cur", "new", "tmp"]
    assert all((tmp_path / "alice" / sub).stat().st_mode & 0o777 == 0o700 for sub in ("", "cur", "new", "tmp"))
    put(tmp_path / "alice", "new", "1000.host", b"kept\n")
    box.open()  # idempotent: nothing is touched
    assert [m.uid for m in box.snapshot()] == ["1000.host"]


def test_open_completes_a_partial_maildir(tmp_path: Path) -> None:
    (tmp_path / "alice" / "cur").mkdir(parents=True)
    Mailbox(str(tmp_path), "alice").open()
    assert sorted(os.listdir(tmp_path / "alice")) == ["cur", "new", "tmp"]


def test_open_refuses_to_recreate_a_vanished_root(tmp_path: Path) -> None:
    """MSMP ADD and a first login fail cleanly instead of building a new tree (an unmounted disk)."""
    box = Mailbox(str(tmp_path / "gone"), "alice")
    with pytest.raises(FileNotFoundError):
        box.open()
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("name", ["..", "../x", ".hidden", "a/b", "/etc", ""])
def test_mailbox_refuses_unsafe_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(maildir.MaildirError):
        Mailbox(str(tmp_path), name)


def test_size_counts_what_a_snapshot_lists_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")  # 4 octets stored, 6 on the wire
    put(box, "cur", "1001.host:2,S", b"abc")
    put(box, "new", ".hidden", b"ignored")
    put(box, "tmp", "1002.host", b"not delivered yet")
    (box / "new" / "1003.host").mkdir()  # not a message
    opened = _count_message_opens(monkeypatch, box)
    assert mailbox(box).size() == (2, 7)
    assert opened == []
    assert Mailbox(str(tmp_path), "nobody").size() == (0, 0)


def test_big_mailbox_size_and_delete_in_thread_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_maildir(tmp_path)
    for number in range(10):
        put(box, "new", f"{1000 + number}.host", b"x" * number)
    assert mailbox(box).size() == (10, 45)
    messages = snapshot(box)
    assert mailbox(box).delete(messages[:6]) == []
    assert mailbox(box).size() == (4, 6 + 7 + 8 + 9)


def test_deliver(tmp_path: Path) -> None:
    box = tmp_path / "alice"
    paths = [maildir.deliver(str(box), b"Subject: %d\n\nbody\n" % number) for number in range(5)]
    assert len(set(paths)) == 5
    assert all(os.path.dirname(path) == str(box / "new") for path in paths)
    assert os.listdir(box / "tmp") == []
    assert Path(paths[2]).read_bytes() == b"Subject: 2\n\nbody\n"
    messages = snapshot(box)
    assert [m.uid for m in messages] == [os.path.basename(path) for path in paths]  # name order = delivery order
    assert all(":" not in m.uid and "/" not in m.uid for m in messages)


def test_deliver_names_sort_in_delivery_order_across_digit_counts(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Microseconds 99999 then 100001 within one second: the names must still sort in that order."""
    stamps = iter([1_700_000_000_099_999_000, 1_700_000_000_100_001_000, 1_700_000_001_000_000_000])

    class FakeClock:
        @staticmethod
        def time_ns() -> int:
            return next(stamps)

        @staticmethod
        def time() -> float:
            raise AssertionError("one clock reading per name: use time_ns()")

    monkeypatch.setattr(maildir, "time", FakeClock)
    box = tmp_path / "alice"
    paths = [maildir.deliver(str(box), b"x\n") for _ in range(3)]
    assert [m.uid for m in snapshot(box)] == [os.path.basename(path) for path in paths]
    assert os.path.basename(paths[0]).startswith("1700000000.M099999P")
