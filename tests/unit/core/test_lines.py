"""Line framing: the 255-octet limit, bare LF, lines split across reads, dot-stuffing."""

from __future__ import annotations

import random

import pytest

from geventpop3.core.lines import (
    LINE_TOO_LONG,
    MAX_COMMAND_LINE,
    MAX_RESPONSE_LINE,
    LineBuffer,
    dot_stuff_lines,
    response_line,
    single_line,
)


def test_crlf_and_bare_lf() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"USER a\r\nPASS b\nSTAT\r\n") == [b"USER a", b"PASS b", b"STAT"]
    assert buffer.pending == 0


def test_empty_lines() -> None:
    assert LineBuffer().feed(b"\r\n\n\r\n") == [b"", b"", b""]


def test_only_the_final_cr_is_stripped() -> None:
    assert LineBuffer().feed(b"A\rB\r\r\n\rC\n") == [b"A\rB\r", b"\rC"]


def test_line_split_across_feeds() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"US") == []
    assert buffer.pending == 2
    assert buffer.feed(b"ER alice\r") == []
    assert buffer.feed(b"\nPA") == [b"USER alice"]
    assert buffer.pending == 2
    assert buffer.feed(b"SS x\r\n") == [b"PASS x"]
    assert buffer.pending == 0


def test_byte_by_byte() -> None:
    buffer = LineBuffer()
    out: list[object] = []
    for byte in b"LIST 1\r\nUIDL\nNOOP\r\n":
        out += buffer.feed(bytes([byte]))
    assert out == [b"LIST 1", b"UIDL", b"NOOP"]


def test_binary_and_nul_bytes_pass_through() -> None:
    assert LineBuffer().feed(b"\x00\xff\xfe X\x00\r\n") == [b"\x00\xff\xfe X\x00"]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_exactly_255_octets_is_accepted(ending: bytes) -> None:
    body = b"X" * (MAX_COMMAND_LINE - len(ending))
    assert LineBuffer().feed(body + ending + b"NOOP\r\n") == [body, b"NOOP"]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_256_octets_is_too_long(ending: bytes) -> None:
    body = b"X" * (MAX_COMMAND_LINE + 1 - len(ending))
    assert LineBuffer().feed(body + ending + b"NOOP\r\n") == [LINE_TOO_LONG, b"NOOP"]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
@pytest.mark.parametrize("length", [MAX_COMMAND_LINE, MAX_COMMAND_LINE + 1])
def test_boundary_lines_split_in_every_position(ending: bytes, length: int) -> None:
    body = b"Y" * (length - len(ending))
    data = body + ending + b"NOOP\r\n"
    expected = [body if length <= MAX_COMMAND_LINE else LINE_TOO_LONG, b"NOOP"]
    for cut in range(1, len(data)):
        buffer = LineBuffer()
        assert buffer.feed(data[:cut]) + buffer.feed(data[cut:]) == expected, cut
        assert buffer.pending == 0


def test_one_mebibyte_line_in_pieces_reported_once_memory_small() -> None:
    buffer = LineBuffer()
    out: list[object] = []
    piece = b"Z" * 4096
    for _ in range(256):
        out += buffer.feed(piece)
        assert buffer.pending < MAX_COMMAND_LINE
    out += buffer.feed(b"Z\r\nNOOP\r\n")
    assert out == [LINE_TOO_LONG, b"NOOP"]
    assert buffer.pending == 0


def test_one_mebibyte_line_in_one_feed() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"Q" * (1 << 20) + b"\r\nSTAT\r\n") == [LINE_TOO_LONG, b"STAT"]
    assert buffer.pending == 0


def test_long_line_without_end_then_more_feeds() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"A" * 300) == [LINE_TOO_LONG]
    assert buffer.pending == 0
    assert buffer.feed(b"A" * 300) == []
    assert buffer.feed(b"A\nNO") == []
    assert buffer.feed(b"OP\n") == [b"NOOP"]


def test_long_partial_grows_past_limit_over_feeds() -> None:
    buffer = LineBuffer()
    assert buffer.feed(b"B" * 200) == []
    assert buffer.pending == 200
    assert buffer.feed(b"B" * 200) == [LINE_TOO_LONG]
    assert buffer.pending == 0
    assert buffer.feed(b"\r\nQUIT\r\n") == [b"QUIT"]


def test_random_feeds_match_reference() -> None:
    """Random streams cut at random places give the same lines as one whole feed of a reference."""
    rng = random.Random(1939)
    for _ in range(300):
        lines = []
        for _ in range(rng.randint(0, 8)):
            length = rng.choice([0, 1, 5, 252, 253, 254, 255, 256, 400, 2000])
            lines.append(bytes(rng.choice(b"ab \x00\r") for _ in range(length)) + rng.choice([b"\n", b"\r\n"]))
        data = b"".join(lines)
        expected: list[object] = []
        for line in lines:
            if len(line) > MAX_COMMAND_LINE:
                expected.append(LINE_TOO_LONG)
            else:
                text = line[:-1]
                expected.append(text[:-1] if text.endswith(b"\r") else text)
        buffer = LineBuffer()
        out: list[object] = []
        position = 0
        while position < len(data):
            step = rng.randint(1, 600)
            out += buffer.feed(data[position:position + step])
            position += step
            assert buffer.pending < MAX_COMMAND_LINE
        assert out == expected
        assert buffer.pending == 0


def test_custom_limit() -> None:
    buffer = LineBuffer(limit=10)
    assert buffer.feed(b"12345678\r\n123456789\r\nok\n") == [b"12345678", LINE_TOO_LONG, b"ok"]


def test_dot_stuff_lines() -> None:
    assert dot_stuff_lines([]) == b".\r\n"
    assert dot_stuff_lines(["a", ".b", "..", ".", "", "c."]) == b"a\r\n..b\r\n...\r\n..\r\n\r\nc.\r\n.\r\n"
    assert dot_stuff_lines(["\u00e9"]) == "\u00e9\r\n.\r\n".encode()
    assert dot_stuff_lines(["\udcff"]) == b"?\r\n.\r\n"  # lone surrogate: replaced, never a crash


def test_response_line() -> None:
    assert response_line("+OK hi") == b"+OK hi\r\n"
    long = response_line("+OK " + "x" * 1000)
    assert len(long) == MAX_RESPONSE_LINE
    assert long.endswith(b"\r\n") and long.startswith(b"+OK xxx")
    exact = response_line("y" * (MAX_RESPONSE_LINE - 2))
    assert len(exact) == MAX_RESPONSE_LINE
    assert response_line("\u00e9" * 600).endswith(b"\r\n")
    assert len(response_line("\u00e9" * 600)) <= MAX_RESPONSE_LINE


def test_response_line_never_splits_a_character() -> None:
    line = response_line("+OK" + "é" * 400)  # two octets each after 3: the cut falls inside one
    assert len(line) <= MAX_RESPONSE_LINE
    assert line.endswith(b"\r\n")
    line[:-2].decode("utf-8")  # strict: raises if a character was cut in two


def test_single_line_is_what_a_fresh_buffer_gives() -> None:
    rng = random.Random(7)
    samples = [b"", b"\n", b"\r\n", b"\r", b"STAT", b"STAT\r\n", b"STAT\n", b"A\rB\r\r\n", b"NOOP\r\nSTAT\r\n",
               b"LIST 1\nX", b"x" * (MAX_COMMAND_LINE - 1) + b"\n", b"x" * MAX_COMMAND_LINE + b"\n",
               b"x" * (MAX_COMMAND_LINE - 2) + b"\r\n", b"x" * (MAX_COMMAND_LINE - 1) + b"\r\n"]
    samples += [bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 12))) for _ in range(2000)]
    for data in samples:
        lines = LineBuffer().feed(data)
        fresh = LineBuffer()
        fresh.feed(data)
        expected = lines[0] if len(lines) == 1 and fresh.empty and isinstance(lines[0], bytes) else None
        assert single_line(data) == expected, data
    assert single_line(b"USER a\r\n") == b"USER a"
    assert single_line(b"x" * MAX_COMMAND_LINE + b"\n") is None  # over the limit: the buffer reports it


def test_single_line_agrees_with_a_fresh_buffer_on_long_random_input() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        data = bytes(rng.choice(b"ab \r\n") for _ in range(rng.randrange(0, 300)))
        buffer = LineBuffer()
        lines = buffer.feed(data)
        expected = lines[0] if len(lines) == 1 and isinstance(lines[0], bytes) and buffer.empty else None
        assert single_line(data) == expected, data
