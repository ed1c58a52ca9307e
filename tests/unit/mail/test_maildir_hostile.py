"""Mailbox against hostile Maildir contents, in process, over real files (issue 9, points 2-5, 13).

The end-to-end versions (real server, poplib) are in tests/e2e/test_hostile_mailbox.py;
here are what needs a look inside: which directories were fsynced, whether the event
loop kept ticking, what the size cache holds.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from geventpop3.core.message import Message
from geventpop3.mail import maildir
from geventpop3.mail.maildir import Mailbox

SECRET = b"root:$6$secret:19000:0:99999:7:::\n"


def make_box(root: Path, user: str = "alice") -> Mailbox:
    root.mkdir(exist_ok=True)
    box = Mailbox(str(root), user)
    box.open()
    return box


def put(box: Mailbox, sub: str, name: str, content: bytes) -> Path:
    path = Path(box.path) / sub / name
    path.write_bytes(content)
    return path


# -- point 2: only regular files are mail ---------------------------------------

def test_only_regular_files_are_listed_sized_or_opened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = make_box(tmp_path / "mail")
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET)
    put(box, "new", "1000.host", b"a\n")
    (Path(box.path) / "new" / "1001.link").symlink_to(secret)
    (Path(box.path) / "cur" / "1002.zero:2,S").symlink_to("/dev/zero")
    os.mkfifo(Path(box.path) / "new" / "1003.fifo")
    (Path(box.path) / "new" / "1004.dir").mkdir()
    messages = box.snapshot()
    assert [m.uid for m in messages] == ["1000.host"]
    assert box.size() == (1, 2)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    # One line for the four entries, once: size() skipped the same ones, the mailbox has not changed.
    assert len(skipped) == 1 and "skipped 4 entries: 4 not a regular file" in skipped[0], skipped
    assert box.snapshot() == messages and len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
    (Path(box.path) / "new" / "1005.link").symlink_to(secret)  # a change: one more line
    box.snapshot()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2 and "skipped 5 entries" in skipped[1]
    with pytest.raises(maildir.NotMail):
        maildir.crlf_size(str(Path(box.path) / "new" / "1003.fifo"))  # never blocks
    with pytest.raises(OSError):
        maildir.crlf_size(str(Path(box.path) / "new" / "1001.link"))  # never followed


def test_open_message_checks_the_snapshot_file_identity(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    path = put(box, "new", "1000.host", b"first\n")
    [message] = box.snapshot()
    with maildir.open_message(message) as handle:
        assert handle.read(100) == b"first\n"
    replacement = put(box, "new", "other", b"second\n")
    replacement.rename(path)
    with pytest.raises(maildir.NotMail, match="replaced"):
        maildir.open_message(message)
    filtered = Message(message.uid, str(path), 7, "/elsewhere", file_id=message.file_id)
    with maildir.open_message(filtered) as handle:  # a filter's output is not the snapshot's file
        assert handle.read(100) == b"second\n"


def test_symlinked_subdirectory_is_not_scanned(tmp_path: Path) -> None:
    box = make_box(tmp_path / "mail")
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd").write_bytes(SECRET)
    (Path(box.path) / "cur").rmdir()
    (Path(box.path) / "cur").symlink_to(outside)
    put(box, "new", "1000.host", b"a\n")
    assert [m.uid for m in box.snapshot()] == ["1000.host"]
    assert box.size() == (1, 2)


# -- point 3: the size cache ------------------------------------------------------

def test_size_cache_is_not_read_through_a_symlink(tmp_path: Path) -> None:
    box = make_box(tmp_path / "mail")
    put(box, "new", "1000.host", b"a\nb\n")
    forged = tmp_path / "forged"
    forged.write_bytes(b"1000.host 4 999\n")
    (Path(box.path) / maildir.SIZE_CACHE).symlink_to(forged)
    assert [m.size for m in box.snapshot()] == [6]
    assert forged.read_bytes() == b"1000.host 4 999\n"


def test_size_cache_without_its_trailer_is_measured_again(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")
    box.snapshot()
    cache = Path(box.path) / maildir.SIZE_CACHE
    whole = cache.read_bytes()
    for cut in range(len(whole) - 1):  # every torn length, and one flipped byte
        cache.write_bytes(whole[:cut])
        assert [m.size for m in box.snapshot()] == [6], cut
    cache.write_bytes(whole.replace(b" 4 6\n", b" 4 7\n"))
    assert [m.size for m in box.snapshot()] == [6]
    assert cache.read_bytes() == whole


def test_oversized_size_cache_is_ignored_unread(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    put(box, "new", "1000.host", b"a\nb\n")
    cache = Path(box.path) / maildir.SIZE_CACHE
    with open(cache, "wb") as handle:
        handle.truncate(maildir.SIZE_CACHE_MAX + 1)  # sparse: costs no disk
    assert [m.size for m in box.snapshot()] == [6]
    assert cache.stat().st_size < 100


def test_files_created_are_new_files(tmp_path: Path) -> None:
    box = make_box(tmp_path / "mail")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    pid_name = Path(box.path) / f"{maildir.SIZE_CACHE}.{os.getpid()}.tmp"  # the old, predictable temp name
    pid_name.symlink_to(victim)
    put(box, "new", "1000.host", b"a\n")
    box.snapshot()
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(box.path)) == sorted(["cur", "new", "tmp", maildir.SIZE_CACHE, pid_name.name])
    mode = (Path(box.path) / maildir.SIZE_CACHE).stat().st_mode
    assert mode & 0o777 == 0o600


# -- point 4: names ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["a b", "a\r\nb", "\udcff\udcfe", "é", "x" * 71, "", "~plain", "a\x7f", "a\tb"])
def test_unsafe_names_get_a_hashed_uidl(name: str) -> None:
    uid = maildir.uid_of(name + ":2,S")
    assert uid.startswith("~") and 1 <= len(uid) <= 70
    assert all(0x21 <= ord(char) <= 0x7E for char in uid)
    assert uid == maildir.uid_of(name) == maildir.uid_of(name + ":2,RS")
    assert uid != maildir.uid_of(name + "x")


@pytest.mark.parametrize("name", ["1700000000.M1P2R3.host", "x" * 70, "a,b=c\\057", "!"])
def test_safe_names_keep_their_base_name(name: str) -> None:
    assert maildir.uid_of(name + ":2,S") == name


def test_non_utf8_name_is_listed_sized_and_deleted(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    raw = os.fsencode(box.path) + b"/new/1000.\xff\r\n.host"
    with open(raw, "wb") as handle:
        handle.write(b"a\nb\n")
    [message] = box.snapshot()
    assert message.uid == maildir.uid_of(os.fsdecode(b"1000.\xff\r\n.host"))
    assert message.size == 6
    assert box.snapshot() == [message]  # from the cache this time
    assert box.delete([message]) == []
    assert os.listdir(Path(box.path) / "new") == []


# -- point 5: durable deletes ---------------------------------------------------

@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths fsync was called on (watched, the real fsync still runs)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def watched(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(maildir.os, "fsync", watched)
    yield paths


def test_delete_fsyncs_the_directories_that_lost_files(tmp_path: Path, synced: list[str]) -> None:
    box = make_box(tmp_path)
    put(box, "new", "1000.host", b"a\n")
    put(box, "cur", "1001.host:2,S", b"b\n")
    put(box, "cur", "1002.host:2,S", b"c\n")
    messages = box.snapshot()
    synced.clear()
    assert box.delete([messages[0]]) == []
    assert synced == [os.path.join(box.path, "new")]
    synced.clear()
    assert box.delete(messages[1:]) == []
    assert synced == [os.path.join(box.path, "cur")]
    synced.clear()
    assert box.delete([]) == []
    assert synced == []


def test_size_cache_is_synced_before_it_replaces_the_old_one(tmp_path: Path, synced: list[str]) -> None:
    box = make_box(tmp_path)
    put(box, "new", "1000.host", b"a\n")
    box.snapshot()
    assert len(synced) == 1 and synced[0].startswith(os.path.join(box.path, maildir.SIZE_CACHE + "."))
    synced.clear()
    box.snapshot()
    assert synced == []  # a warm cache is neither written nor synced


# -- point 13: the event loop keeps running ----------------------------------------

def test_measuring_big_files_does_not_block_the_event_loop(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    first = Path(box.path) / "new" / "1000.big"
    block = (b"y" * 63 + b"\n") * (1 << 14)
    with open(first, "wb") as handle:
        for _ in range(48):
            handle.write(block)  # 48 MiB
    for number in range(1, 4):
        os.link(first, Path(box.path) / "new" / f"{1000 + number}.big")
    ticks: list[float] = []
    cpu_ticks: list[float] = []

    def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            cpu_ticks.append(time.thread_time())  # the event loop thread's own CPU: a pause by a busy machine adds none
            gevent.sleep(0.005)

    clock = gevent.spawn(ticker)
    try:
        gevent.sleep(0.02)
        started = time.perf_counter()
        messages = box.snapshot()
        took = time.perf_counter() - started
    finally:
        clock.kill()
    assert [m.size for m in messages] == [48 * len(block) * 65 // 64] * 4
    first_tick = next((i for i, tick in enumerate(ticks) if tick >= started), len(ticks))
    during = ticks[first_tick:]
    # On the event loop, nothing ticked for the whole 2 s; a loaded machine may pause any process.
    assert len(during) >= took / 0.05, (took, len(during))
    # Work done on the event loop's thread between two ticks shows as that thread's CPU time; a process
    # merely descheduled by a loaded machine accumulates none, so this holds however busy the machine is.
    cpu = cpu_ticks[first_tick:]
    cpu_gaps = [b - a for a, b in zip(cpu, cpu[1:], strict=False)]
    assert max(cpu_gaps) < 0.05, (took, sorted(cpu_gaps)[-3:])


# -- issue 22: bounded mailbox work ------------------------------------------------

def test_sparse_and_oversized_files_are_left_out_unread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = make_box(tmp_path)
    put(box, "new", "1000.host", b"a\n" * 50_000)  # 100 KB, not sparse: mail
    with open(Path(box.path) / "new" / "1001.sparse", "wb") as handle:
        handle.truncate(1 << 30)
    put(box, "new", "1002.big", b"b" * 200_000)
    started = time.process_time()
    messages = box.snapshot()
    assert time.process_time() - started < 0.5  # 1 GiB of holes was not read
    assert [m.uid for m in messages] == ["1000.host", "1002.big"] and messages[0].size == 150_000
    assert [m.uid for m in box.snapshot(max_message_size=180_000)] == ["1000.host"]
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert lines[0].endswith("skipped 1 entries: 1 sparse file (e.g. 'new/1001.sparse')")
    assert lines[1].endswith("skipped 2 entries: 2 over max_message_size (e.g. 'new/1001.sparse', 'new/1002.big')")


def test_more_messages_than_the_limit_refuse_the_snapshot_and_touch_nothing(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    for number in range(3):
        put(box, "new", f"100{number}.host", b"x\n")
    with pytest.raises(maildir.TooManyMessages, match="3 messages, over max_messages_per_mailbox"):
        box.snapshot(max_messages=2)
    assert len(os.listdir(Path(box.path) / "new")) == 3
    assert len(box.snapshot(max_messages=3)) == 3


def test_a_scan_in_the_pool_is_abandoned_once_the_client_is_gone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_box(tmp_path)
    first = put(box, "new", "1000.host", b"x" * 63 + b"\n")
    with open(first, "ab") as handle:
        handle.write((b"x" * 63 + b"\n") * (1 << 20))  # 64 MiB
    for number in range(1, 16):
        os.link(first, Path(box.path) / "new" / f"{1000 + number}.host")
    gone = False

    def _set_gone() -> None:
        nonlocal gone
        gone = True

    gevent.spawn_later(0.2, _set_gone)
    started = time.monotonic()
    with pytest.raises(maildir.Cancelled):
        box.snapshot(client_gone=lambda: gone)
    assert time.monotonic() - started < 0.2 + 2 * maildir.POOL_POLL + 0.3
    wait = time.monotonic() + 5
    while maildir._pool_jobs and time.monotonic() < wait:  # the thread stops at its next look at the flag
        gevent.sleep(0.01)
    assert not maildir._pool_jobs
    assert not (Path(box.path) / maildir.SIZE_CACHE).exists()  # an abandoned scan saves nothing


def test_message_chunks_stop_at_the_announced_size(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    path = put(box, "new", "1000.host", b"line\n" * 100_000)
    with open(path, "rb") as handle, pytest.raises(maildir.MessageChanged):
        for _ in maildir.message_chunks(handle, None, limit=300_000):
            pass
    with open(path, "rb") as handle:
        assert sum(len(c) for c in maildir.message_chunks(handle, None, limit=600_000)) == 600_000


def test_update_after_renames_maps_the_directories_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_box(tmp_path)
    for number in range(200):
        put(box, "new", f"{1000 + number}.host", b"x\n")
    messages = box.snapshot()
    for name in os.listdir(Path(box.path) / "new"):
        os.rename(Path(box.path) / "new" / name, Path(box.path) / "cur" / f"{name}:2,S")
    maps = []
    real = maildir._Subdirs.uid_map
    monkeypatch.setattr(maildir._Subdirs, "uid_map", lambda self: maps.append(1) or real(self))
    assert box.delete(messages) == []
    assert len(maps) == 1 and os.listdir(Path(box.path) / "cur") == []


def test_a_scan_of_many_files_gives_turns_and_stops_once_the_client_is_gone(tmp_path: Path) -> None:
    box = make_box(tmp_path)
    new = Path(box.path) / "new"
    for number in range(30_000):
        os.close(os.open(new / f"{1_700_000_000 + number}.M{number}.host", os.O_CREAT | os.O_WRONLY, 0o600))
    ticks: list[float] = []

    def ticker() -> None:
        while True:
            ticks.append(time.thread_time())  # this thread's CPU between ticks: a busy machine adds none
            gevent.sleep(0.001)

    clock = gevent.spawn(ticker)
    gc.collect()
    gc.freeze()  # the test process's own heap (every test so far) out of the collections measured here
    try:
        gevent.sleep(0.01)
        assert len(box.snapshot()) == 30_000
        busiest = max(later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False))
        asked: list[float] = []
        with pytest.raises(maildir.Cancelled):
            box.snapshot(client_gone=lambda: bool(asked.append(time.monotonic())) or len(asked) > 3)
    finally:
        gc.unfreeze()
        clock.kill()
    assert busiest < 0.05, busiest  # the loop's thread never worked 50 ms without a turn
    assert len(asked) == 4  # asked at each turn, given up at once
