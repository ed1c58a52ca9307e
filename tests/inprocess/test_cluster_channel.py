"""The supervisor-worker channel over a real socketpair: messages in order, big ones whole,
an over-long line dropped without losing the next."""

from __future__ import annotations

import gevent

from geventpop3.process.channel import Channel, Frame, encode, socketpair


def received(data: list[bytes], max_line: int = 1 << 20) -> list[Frame]:
    ours, theirs = socketpair()
    reader = Channel(ours, max_line)
    got: list[Frame] = []
    listener = gevent.spawn(lambda: got.extend(reader.messages()))
    for chunk in data:
        theirs.sendall(chunk)
    theirs.close()
    listener.join(timeout=30)
    reader.close()
    assert listener.dead
    return got


def test_messages_arrive_in_order_whatever_the_chunking() -> None:
    wire = b"".join(encode({"op": "report", "n": n}) for n in range(200))
    chunks = [wire[i:i + 7] for i in range(0, len(wire), 7)]
    assert [m["n"] for m in received(chunks)] == list(range(200))


def test_a_message_of_many_megabytes_arrives_whole() -> None:
    users = "alice:secret\n" * 1_000_000  # 13 MB, as init carries a users file
    got = received([encode({"op": "init", "users_data": users}), encode({"op": "after"})], max_line=1 << 30)
    assert got[0]["users_data"] == users and got[1] == {"op": "after"}


def test_an_over_long_line_is_dropped_and_the_next_message_kept() -> None:
    big = encode({"op": "flood", "data": "x" * 50_000})
    got = received([encode({"op": "before"}), big, b"not json\n", encode({"op": "after"})], max_line=10_000)
    assert got == [{"op": "before"}, {"op": "after"}]


def test_what_one_turn_sends_is_written_in_order_also_past_a_full_socket_buffer() -> None:
    """Sends of one turn of the loop are written in one go; what the socket does not take
    then goes to the writer, and whatever is sent meanwhile queues behind it."""
    ours, theirs = socketpair()
    sender, reader = Channel(ours), Channel(theirs)
    sender.start()
    gevent.sleep(0)  # the writer waits: the next sends are batched
    blob = "x" * 100_000
    for n in range(50):  # 5 MB in one turn: far more than the socket buffer
        sender.send({"op": "report", "n": n, "blob": blob})
    got: list[int] = []

    def read() -> None:
        for message in reader.messages():
            got.append(message["n"])
            if len(got) == 60:
                return

    listener = gevent.spawn(read)
    gevent.sleep(0.01)
    for n in range(50, 60):  # sent while the writer still has the rest of the batch
        sender.send({"op": "report", "n": n})
    listener.join(timeout=30)
    sender.close()
    reader.close()
    assert got == list(range(60))
