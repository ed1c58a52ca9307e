"""Mailbox snapshots over Maildirs Dovecot left behind, in process, over real files:
UIDLs and order from dovecot-uidlist, sizes from ,W= names, and hostile uidlists.

The real Dovecot is the reference in tests/external/test_dovecot_migration.py; here are the
cases Dovecot does not make on its own (bad and repeated UIDLs, hostile files)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from geventpop3.core.message import Message
from geventpop3.core.names import UIDL_DOVECOT
from geventpop3.mail import dovecot_uidlist, maildir
from geventpop3.mail.maildir import Mailbox

VALIDITY = 0x6B0F40BD


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    dovecot_uidlist.clear_cache()
    yield
    dovecot_uidlist.clear_cache()


def make_box(tmp_path: Path, files: dict[str, bytes]) -> Mailbox:
    root = tmp_path / "mail"
    root.mkdir(exist_ok=True)
    box = Mailbox(str(root), "alice")
    box.open()
    for name, content in files.items():
        sub = "cur" if ":" in name else "new"
        (Path(box.path) / sub / name).write_bytes(content)
    return box


def write_uidlist(box: Mailbox, *records: str) -> Path:
    path = Path(box.path) / dovecot_uidlist.NAME
    path.write_text(f"3 V{VALIDITY} N100 G0123\n" + "".join(f"{line}\n" for line in records))
    return path


def shown(messages: list[Message]) -> list[str]:
    return [m.uidl or m.uid for m in messages]


def test_saved_uidls_win_then_the_format_then_the_base_name(tmp_path: Path) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b:2,S": b"b\n", "102.c": b"c\n", "099.new": b"n\n"})
    write_uidlist(box, "1 :101.b", "2 Psaved-by-dovecot :100.a", "3 P :102.c")
    assert shown(box.snapshot()) == ["101.b", "saved-by-dovecot", "102.c", "099.new"]  # UID order, unlisted last
    assert shown(box.snapshot(UIDL_DOVECOT)) == [f"00000001{VALIDITY:08x}", "saved-by-dovecot", "102.c", "099.new"]


def test_dovecots_pop3_order_comes_first(tmp_path: Path) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b": b"b\n", "102.c": b"c\n"})
    write_uidlist(box, "1 :100.a", "2 O2 :101.b", "3 O1 :102.c")
    assert [m.uid for m in box.snapshot()] == ["102.c", "101.b", "100.a"]


def test_a_saved_uidl_rfc1939_forbids_is_hashed(tmp_path: Path) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b": b"b\n", "102.c": b"c\n"})
    write_uidlist(box, f"1 P{'x' * 71} :100.a", "2 P~tilde :101.b", "3 Pcaf\u00e9 :102.c")
    uidls = shown(box.snapshot())
    assert all(u.startswith("~") and len(u) == 33 for u in uidls) and len(set(uidls)) == 3
    assert uidls == shown(box.snapshot())  # stable


def test_repeated_uidls_stay_unique(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b": b"b\n", "102.c": b"c\n", "200.z": b"z\n"})
    # Two saved UIDLs alike, and one equal to the base name of a message Dovecot never saw.
    write_uidlist(box, "1 Psame :100.a", "2 Psame :101.b", "3 P200.z :102.c")
    uidls = shown(box.snapshot(UIDL_DOVECOT))
    assert uidls[0] == "same" and uidls[2] == "200.z"
    assert uidls[1].startswith("~") and uidls[3].startswith("~") and len(set(uidls)) == 4
    assert sum("2 UIDLs" in r.getMessage() for r in caplog.records) == 1


def test_deleting_finds_the_file_by_its_name_not_its_uidl(tmp_path: Path) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b": b"b\n"})
    write_uidlist(box, "1 :100.a", "2 :101.b")
    messages = box.snapshot(UIDL_DOVECOT)
    os.rename(messages[1].source, os.path.join(box.path, "cur", "101.b:2,S"))  # a flag changed meanwhile
    assert box.delete(messages) == []
    assert os.listdir(os.path.join(box.path, "new")) + os.listdir(os.path.join(box.path, "cur")) == []


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "bad header", "too big"])
def test_a_hostile_uidlist_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n"})
    path = Path(box.path) / dovecot_uidlist.NAME
    if kind == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.write_text("3 V1 N9\n1 Pstolen :100.a\n")
        path.symlink_to(elsewhere)
    elif kind == "fifo":
        os.mkfifo(path)  # never opened for long: O_NONBLOCK, then fstat says not a file
    elif kind == "directory":
        path.mkdir()
    elif kind == "bad header":
        path.write_text("V1 N9\n1 Pstolen :100.a\n")
    else:
        write_uidlist(box, "1 Pstolen :100.a")
        with open(path, "r+b") as handle:
            handle.truncate(dovecot_uidlist.MAX_SIZE + 1)
    for _ in range(2):
        assert shown(box.snapshot(UIDL_DOVECOT)) == ["100.a"]
    notes = [r.getMessage() for r in caplog.records if "not using" in r.getMessage()]
    assert len(notes) == 1, notes  # once per version of the file, not at every login


def test_the_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    box = make_box(tmp_path, {"100.a": b"a\n", "101.b": b"b\n"})
    path = write_uidlist(box, "1 :100.a")
    first = dovecot_uidlist.load(box.path, [])
    assert first is not None and dovecot_uidlist.load(box.path, []) is first
    with open(path, "a") as handle:  # Dovecot appends a record
        handle.write("2 Pnew :101.b\n")
    again = dovecot_uidlist.load(box.path, [])
    assert again is not first and again is not None and again.records["101.b"].pop3_uidl == "new"
    assert shown(box.snapshot()) == ["100.a", "new"]
    path.unlink()
    assert dovecot_uidlist.load(box.path, []) is None and shown(box.snapshot()) == ["100.a", "101.b"]


def test_a_big_uidlist_is_read_off_the_event_loop_and_gives_the_same(tmp_path: Path) -> None:
    names = {f"{1000 + i}.m": b"x\n" for i in range(40)}
    box = make_box(tmp_path, names)
    padding = "G" + "0" * 3000  # an extension Dovecot may write, to pass UIDLIST_LOOP_MAX
    write_uidlist(box, *(f"{i + 1} {padding} :{name}" for i, name in enumerate(names)),
                  *(f"{100 + i} {padding} :gone.{i}" for i in range(400)))
    assert os.path.getsize(Path(box.path) / dovecot_uidlist.NAME) > maildir.UIDLIST_LOOP_MAX
    assert shown(box.snapshot(UIDL_DOVECOT)) == [f"{i + 1:08x}{VALIDITY:08x}" for i in range(40)]


# -- sizes from names ------------------------------------------------------------

def test_w_sizes_from_names_and_from_the_uidlist(tmp_path: Path) -> None:
    content = b"Subject: x\n\nbody\n"  # 17 octets, 20 with CRLF
    box = make_box(tmp_path, {
        "100.right,S=17,W=20": content,
        "101.wrong,S=17,W=25:2,S": content,  # plausible: shown as Dovecot shows it, the file unread
        "102.stale,S=16,W=25": content,  # S= does not fit the file: measured
        "103.huge,W=99": content,  # more than any CRLF form of 17 octets: measured
        "104.small,W=3": content,  # less than the file: measured
        "105.list": content,  # W from dovecot-uidlist
        "106.badlist": content,  # W and S from dovecot-uidlist that do not fit: measured
    })
    write_uidlist(box, "1 W21 :105.list", "2 W22 S3 :106.badlist")
    sizes = {m.uid.split(",")[0]: m.size for m in box.snapshot()}
    assert sizes == {"100.right": 20, "101.wrong": 25, "102.stale": 20, "103.huge": 20, "104.small": 20,
                     "105.list": 21, "106.badlist": 20}
    assert maildir.crlf_size(os.path.join(box.path, "new", "100.right,S=17,W=20")) == 20  # W= checked once


@pytest.mark.parametrize(("name", "raw", "size"), [
    ("1.a,S=5,W=7", 5, 7), ("1.a,W=7,S=5:2,S", 5, 7), ("1.a,W=5", 5, 5), ("1.a,W=12", 5, 12),
    ("1.a,W=13", 5, None), ("1.a,W=4", 5, None), ("1.a,S=6,W=7", 5, None), ("1.a,W=", 5, None),
    ("1.a,W=7x", 5, None), ("1.a:2,W=7", 5, None), ("1.a,W=00000000000000000000007", 5, None),
    ("1.a", 5, None), ("1.a,XW=7", 5, None),
])
def test_size_from_name(name: str, raw: int, size: int | None) -> None:
    assert maildir.size_from_name(name, raw) == size
