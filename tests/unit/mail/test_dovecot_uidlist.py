"""Dovecot's dovecot-uidlist parser (sans-IO): Dovecot's own lines, and hostile ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geventpop3.mail.dovecot_uidlist import MAX_LINE, Record, UidListError, parse

# As Dovecot 2.3 writes it (seen in tests/external/test_dovecot_migration.py's trees).
DOVECOT_FILE = (b"3 V1796161725 N6 G2f8d1f10bd400f6bc37a000083ecc375\n"
                b"1 W32 :1733000001.M1P1.host\n"
                b"2 P000000026b0f40bd W24 :1733000002.M2P1.host\n"
                b"3 :1733000003.M3P1.host,S=18,W=21\n"
                b"5 P O2 GX :1733000005.M5P1.host\n")


def test_dovecot_version_3() -> None:
    parsed = parse(DOVECOT_FILE)
    assert (parsed.version, parsed.uid_validity, parsed.next_uid, parsed.skipped) == (3, 1796161725, 6, 0)
    assert parsed.records == {
        "1733000001.M1P1.host": Record(1, virtual_size=32),
        "1733000002.M2P1.host": Record(2, pop3_uidl="000000026b0f40bd", virtual_size=24),
        "1733000003.M3P1.host,S=18,W=21": Record(3),
        "1733000005.M5P1.host": Record(5, pop3_uidl="", pop3_order=2),  # empty P: the base name
    }


def test_version_1() -> None:
    parsed = parse(b"1 1234 3\n1 1000.a\n2 1001.b:2,S\n")
    assert parsed.uid_validity == 1234
    assert parsed.records == {"1000.a": Record(1), "1001.b": Record(2)}


@pytest.mark.parametrize("header", [b"", b"3", b"2 V1 N2", b"3 N2 G00", b"3 V0 N2", b"3 V1 N0", b"x V1 N2",
                                    b"3 V99999999999 N2", b"1 1", b"1 a b", b"\xff\xfe", b"3 V-1 N2"])
def test_a_header_that_is_not_dovecots_makes_the_file_unused(header: bytes) -> None:
    with pytest.raises(UidListError):
        parse(header + b"\n1 :1000.a\n")


def test_malformed_lines_are_skipped_and_counted() -> None:
    lines = [
        b"1 :1000.a",  # kept
        b"x :bad",  # not a UID
        b"0 :zero",  # UID 0
        b"1 :again",  # not ascending
        b"4294967295 :too.high",  # (uint32)-1
        b"7 p1 :lower.case.extension",
        b"8 P1",  # no file name
        b"9 :",  # empty name
        b"10 :../../etc/passwd",  # a slash
        b"11 :nul\0name",
        b"12 :" + b"x" * MAX_LINE,  # too long
        b"",  # an empty line is nothing
        b"13 W12 :1013.b",  # kept
        b"14 :1000.a",  # a name listed again: the last record wins (as Dovecot)
    ]
    parsed = parse(b"3 V7 N20\n" + b"\n".join(lines) + b"\n15 :torn.append")
    assert parsed.records == {"1000.a": Record(14), "1013.b": Record(13, virtual_size=12)}
    assert parsed.skipped == 11
    assert parsed.first_skipped == "line 3: not a UID"


def test_names_and_uidls_keep_bytes_that_are_not_utf8() -> None:
    parsed = parse(b"3 V7 N3\n1 P\xff\x01 :caf\xe9.host\n")
    ((name, record),) = parsed.records.items()
    assert name == "caf\udce9.host"  # as os.listdir names it (surrogateescape)
    assert record.pop3_uidl == "\udcff\x01"  # kept: the caller hashes a UIDL RFC 1939 does not allow


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_fail_with_uidlisterror(data: bytes) -> None:
    try:
        parsed = parse(data)
    except UidListError:
        return
    for name, record in parsed.records.items():
        assert name and "/" not in name and ":" not in name and 0 < record.uid < 2**32 - 1


UIDL_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=70)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**32 - 2), st.text("abcXYZ019.,=-_", min_size=1, max_size=40),
                          st.one_of(st.none(), UIDL_TEXT)), max_size=30))
def test_what_dovecot_writes_reads_back(entries: list[tuple[int, str, str | None]]) -> None:
    entries = sorted({uid: (uid, name, uidl) for uid, name, uidl in entries}.values())
    names: dict[str, Record] = {}
    lines = [b"3 V42 N%d G0123" % (entries[-1][0] + 1 if entries else 1)]
    for uid, name, uidl in entries:
        ext = b"" if uidl is None else b" P" + uidl.encode()
        lines.append(b"%d%s :%s" % (uid, ext, name.encode()))
        names[name] = Record(uid, pop3_uidl=uidl)
    parsed = parse(b"\n".join(lines) + b"\n")
    assert parsed.skipped == 0 and parsed.records == names
