"""geventpop3.process.messages: what one end encodes the other decodes to the same message,
through JSON as the channel carries it; what it does not know it refuses."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from geventpop3.process import messages
from geventpop3.process.messages import (
    PROTOCOL_VERSION,
    Ack,
    Answer,
    Ask,
    ControlMessage,
    DelUser,
    Hello,
    Init,
    MessageError,
    PenaltyClear,
    Ready,
    Received,
    Refresh,
    Reload,
    Report,
    Set,
    StoreState,
    Tell,
    User,
    decode,
    decoded,
    encode,
)

text = st.text(max_size=20)
names = st.dictionaries(text, text, max_size=4)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=10)
any_message: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(Hello, st.integers(), text),
    st.builds(Init, names, names, st.lists(text, max_size=3).map(tuple), st.none() | text, st.none() | text,
              st.booleans()),
    st.builds(Set, text, text),
    st.builds(User, text, st.none() | text),
    st.builds(DelUser, text, st.sampled_from(["begin", "commit", "rollback"])),
    st.builds(Reload, st.none() | text),
    st.builds(PenaltyClear, st.none() | text),
    st.builds(StoreState, st.booleans()),
    st.builds(Ack, st.integers()),
    st.builds(Ready, st.integers()),
    st.builds(Report, st.dictionaries(text.filter(lambda key: key not in ("op", "seq")), json_values, max_size=4)),
    st.builds(Ask, st.integers(), text, text),
    st.builds(Answer, st.integers(), st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(Tell, text),
    st.builds(Refresh, st.integers()),
)


def through_json(frame: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(frame))  # type: ignore[no-any-return]


@given(any_message, st.none() | st.integers(min_value=0))
def test_every_message_decodes_to_what_was_encoded(message: ControlMessage, seq: int | None) -> None:
    assert decode(through_json(encode(message, seq))) == Received(message, seq)


def test_every_message_type_has_its_own_op() -> None:
    assert len(messages.TYPES) == 15
    assert {cls.OP for cls in messages.TYPES.values()} == set(messages.TYPES)


@pytest.mark.parametrize("frame", [
    {"op": "sync"},  # the old second message of a SET: gone
    {"op": "deluser-begin", "name": "alice"},  # the old withdrawal message
    {"op": 3},
    {},
    {"op": "hello", "users_digest": ""},  # a worker older than the version field
    {"op": "set", "key": "idle_timeout"},
    {"op": "set", "key": "idle_timeout", "value": 600},
    {"op": "deluser", "name": "alice", "step": "maybe"},
    {"op": "ack", "applied": True},
    {"op": "ask", "id": 1},
    {"op": "ask", "id": 1, "source": ["192.0.2.1"]},
    {"op": "answer", "id": 1, "value": "0.5"},
    {"op": "tell"},
    {"op": "tell", "succeeded": ["192.0.2.1"]},
    {"op": "init", "settings": {}, "users": {"alice": 1}},
    {"op": "init", "settings": {}, "users": {}, "withdrawn": "alice"},
    {"op": "ready", "pid": 1, "seq": "one"},
])
def test_what_this_side_does_not_know_is_refused(frame: dict[str, Any]) -> None:
    with pytest.raises(MessageError):
        decode(frame)


def test_a_refused_message_is_one_log_line_and_the_next_one_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    frames = [{"op": "sync"}, encode(Ready(7))]
    with caplog.at_level(logging.ERROR):
        assert list(decoded(frames, "worker 1")) == [Received(Ready(7))]
    assert [record.getMessage() for record in caplog.records] == [
        "worker 1: message refused (another version of geventpop3?): unknown message 'sync'"]


def test_the_hello_carries_this_code_s_protocol_version() -> None:
    hello = decode(encode(Hello(PROTOCOL_VERSION, "abc"))).message
    assert isinstance(hello, Hello) and hello.version == PROTOCOL_VERSION


def test_a_report_carries_its_fields_as_they_are() -> None:
    frame = encode(Report({"counters": {"retr": 2}, "current": 1}))
    assert frame == {"op": "report", "counters": {"retr": 2}, "current": 1}
