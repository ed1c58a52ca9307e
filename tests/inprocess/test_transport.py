"""The connection transport on real socketpairs: reads, batched writes, parking, idle timeout, close."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Iterator

import gevent
import pytest
from gevent.event import Event
from gevent.socket import wait_read

from geventpop3.net.transport import FLUSH_THRESHOLD, RECV_SIZE, Transport


class Waiter:
    """What the transport wakes, as Events a test can wait on."""

    def __init__(self) -> None:
        self.ready = Event()
        self.timed_out = Event()

    def answer_parked(self) -> bool:
        return False  # never answers on the event loop: unparked, then on_ready

    def on_ready(self) -> None:
        self.ready.set()

    def on_timeout(self) -> None:
        self.timed_out.set()


@pytest.fixture
def pair() -> Iterator[tuple[Transport, socket.socket]]:
    """A transport on one end of a TCP-like stream and the raw client on the other."""
    server_side, client = socket.socketpair()
    server_side.setblocking(False)
    client.settimeout(5)
    transport = Transport(server_side)
    yield transport, client
    transport.close()
    client.close()


def test_read_returns_none_when_nothing_was_sent(pair: tuple[Transport, socket.socket]) -> None:
    transport, _ = pair
    assert transport.read() is None


def test_read_after_a_short_read_does_not_ask_the_kernel_again(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    client.sendall(b"NOOP\r\n")
    wait_read(transport.fd, timeout=5)
    assert transport.read() == b"NOOP\r\n"
    client.sendall(b"more\r\n")
    # The client had sent all it had when the short read happened: the burst is over.
    assert transport.read() is None
    assert transport.read() == b"more\r\n"


def test_read_returns_empty_bytes_at_eof(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    client.close()
    assert _read_blocking(transport) == b""


def test_a_full_read_is_followed_by_another(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    client.sendall(b"x" * (RECV_SIZE + 10))
    assert len(_read_blocking(transport)) == RECV_SIZE
    assert transport.read() == b"x" * 10


def test_writes_are_batched_until_flush(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    sent: list[int] = []
    transport.on_sent = sent.append
    transport.write(b"+OK one\r\n")
    transport.write(b"+OK two\r\n")
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    transport.flush()
    client.setblocking(True)
    assert _recv_exactly(client, 18) == b"+OK one\r\n+OK two\r\n"
    assert sent == [18]  # one write for the whole batch
    assert transport.sent == 18


def test_a_large_queue_flushes_by_itself(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    reader = gevent.spawn(_recv_exactly, client, FLUSH_THRESHOLD)
    transport.set_timeout(5)
    transport.write(b"a" * (FLUSH_THRESHOLD // 2))
    assert transport.sent == 0
    transport.write(b"b" * (FLUSH_THRESHOLD // 2))
    assert transport.sent == FLUSH_THRESHOLD
    assert reader.get(timeout=5) == b"a" * (FLUSH_THRESHOLD // 2) + b"b" * (FLUSH_THRESHOLD // 2)


def test_park_wakes_on_data_without_holding_a_greenlet(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    waiter = Waiter()
    greenlets_before = _greenlet_count()
    transport.park(waiter, timeout=30)
    assert transport.parked
    assert _greenlet_count() == greenlets_before  # waiting costs a watcher and a timer, no greenlet
    client.sendall(b"STAT\r\n")
    assert waiter.ready.wait(5)
    assert not transport.parked
    assert not waiter.timed_out.is_set()
    assert _read_blocking(transport) == b"STAT\r\n"


def test_park_wakes_when_the_client_vanishes(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    waiter = Waiter()
    transport.park(waiter, timeout=30)
    client.close()
    assert waiter.ready.wait(5)
    assert _read_blocking(transport) == b""


def test_park_times_out_when_the_client_is_silent(pair: tuple[Transport, socket.socket]) -> None:
    transport, _ = pair
    waiter = Waiter()
    started = time.monotonic()
    transport.park(waiter, timeout=0.2)
    assert waiter.timed_out.wait(5)
    assert time.monotonic() - started >= 0.19
    assert not waiter.ready.is_set()
    assert not transport.parked


def test_unpark_means_the_waiter_is_not_called(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    waiter = Waiter()
    transport.park(waiter, timeout=0.05)
    transport.unpark()
    client.sendall(b"x\r\n")
    assert not waiter.ready.wait(0.3)
    assert not waiter.timed_out.is_set()


def test_park_again_after_a_wake(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    for n in range(3):
        waiter = Waiter()
        transport.park(waiter, timeout=30)
        client.sendall(b"%d\r\n" % n)
        assert waiter.ready.wait(5)
        assert _read_blocking(transport) == b"%d\r\n" % n


def test_close_sends_last_words_and_what_is_queued(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    transport.park(Waiter(), timeout=30)
    transport.write(b"+OK queued\r\n")
    transport.close(b"-ERR Idle timeout, closing connection\r\n")
    assert transport.closed and not transport.parked
    assert _recv_all(client) == b"+OK queued\r\n-ERR Idle timeout, closing connection\r\n"
    transport.close(b"again")  # idempotent: nothing more is sent, nothing raises


def test_close_to_a_vanished_client_does_not_raise(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    client.close()
    transport.close(b"-ERR shutting down\r\n")
    assert transport.closed


def test_a_client_that_stops_reading_cannot_block_a_send_forever(pair: tuple[Transport, socket.socket]) -> None:
    transport, _ = pair
    transport.set_timeout(0.2)
    with pytest.raises(OSError):  # TimeoutError: the send gave up; the session ends the connection
        for _ in range(200):
            transport.write(b"z" * FLUSH_THRESHOLD)


def _read_blocking(transport: Transport) -> bytes | None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        wait_read(transport.fd, timeout=5)
        data = transport.read()
        if data is not None:
            return data
    raise AssertionError("nothing to read")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _greenlet_count() -> int:
    from greenlet import greenlet

    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def test_a_parked_transport_holds_one_watcher_and_no_timer(pair: tuple[Transport, socket.socket]) -> None:
    """Memory per held session: the watcher's callback is the transport itself (no bound
    method, no argument tuple), and the deadline is a link in the IdleClock's ring of its tick,
    not a timer object per session (10,000 held sessions make every such object count)."""
    transport, _ = pair
    transport.park(Waiter(), timeout=30)
    assert transport._watcher.callback is transport
    assert transport._watcher.args == ()
    assert transport._next_due is not None  # linked into the clock's ring of its tick
    transport.unpark()
    assert transport._next_due is None and transport._prev_due is None


def test_deadlines_of_many_parked_transports_are_kept_apart(pair: tuple[Transport, socket.socket]) -> None:
    """One clock for every transport: a short deadline fires, a long one beside it does not,
    and a transport woken by data is no longer timed out."""
    transport, client = pair
    others = [socket.socketpair() for _ in range(2)]
    short, long = (Transport(server) for server, _ in others)
    waiters = [Waiter(), Waiter(), Waiter()]
    started = time.monotonic()
    try:
        transport.park(waiters[0], timeout=0.3)
        short.park(waiters[1], timeout=0.3)
        long.park(waiters[2], timeout=30)
        client.sendall(b"NOOP\r\n")
        assert waiters[0].ready.wait(5)
        assert waiters[1].timed_out.wait(5)
        assert time.monotonic() - started >= 0.29
        assert not waiters[0].timed_out.wait(0.5)  # woken by data: its deadline is gone
        assert not waiters[2].timed_out.is_set() and long.parked
    finally:
        for one in (short, long):
            one.close()
        for _, peer in others:
            peer.close()


@pytest.mark.parametrize(("parked_for", "rearmed_to"), [(0.1, 0.6), (30, 0.2)], ids=["later", "earlier"])
def test_rearm_moves_the_deadline(pair: tuple[Transport, socket.socket], parked_for: float, rearmed_to: float) -> None:
    """A parked session answering on the loop rearms at every command. A later deadline is
    only noted, and the clock relinks the transport when its old ring comes due (no early
    expiry); an earlier one (the idle timeout lowered by MSMP SET meanwhile) holds."""
    transport, _ = pair
    waiter = Waiter()
    started = time.monotonic()
    transport.park(waiter, timeout=parked_for)
    transport.rearm(rearmed_to)
    assert waiter.timed_out.wait(5)
    assert rearmed_to - 0.01 <= time.monotonic() - started < 5
    assert not transport.parked and transport._next_due is None


def test_a_rearmed_transport_woken_by_data_is_not_timed_out(pair: tuple[Transport, socket.socket]) -> None:
    transport, client = pair
    waiter = Waiter()
    transport.park(waiter, timeout=0.1)
    transport.rearm(0.3)
    client.sendall(b"NOOP\r\n")
    assert waiter.ready.wait(5)
    assert not transport.parked and transport._due is None
    assert not waiter.timed_out.wait(0.6)
