"""What one idle server-side TLS connection costs in memory, apart from the rest of the server (issue 10).

    python -m loadtest.tls_idle_memory MODE N CERT KEY CA

A server in this process accepts N loopback connections from a forked client, shakes
hands with geventpop3's own TLS context (geventpop3.net.tls.build_context), writes a line,
reads one, writes one, and keeps the socket with no greenlet waiting on it, as a held
session does. Printed: the growth of this process's RSS per connection (the client's
memory is in the child). MODE: `default`; `plain` (no TLS, the baseline); `bio` (the
OpenSSL object over memory BIOs, no SSLSocket); `release` (SSL_MODE_RELEASE_BUFFERS,
set through ctypes: Python's ssl module has no call for it); `tickets0`
(num_tickets = 0); `noticket` (OP_NO_TICKET); `tls12` (TLS 1.2 at most); `transport`
(what geventpop3 itself holds: `TlsTransport.accept`, the bare SSL object over the bare
descriptor, parked with its watcher and its deadline). Every mode but `transport` and
`plain` holds gevent's SSLSocket, the way geventpop3 held TLS sessions before.
"""

from gevent import monkey

monkey.patch_all()

import ctypes  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import gevent.socket  # noqa: E402

from geventpop3.net.tls import build_context  # noqa: E402
from geventpop3.net.transport import TlsTransport, Transport  # noqa: E402

MODES = ("default", "plain", "bio", "release", "tickets0", "noticket", "tls12", "transport")


class Idle:
    """The waiter of a parked transport that is never woken here."""

    def on_ready(self) -> None:
        pass

    def on_timeout(self) -> None:
        pass


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


def release_buffers(context: ssl.SSLContext) -> int:
    """SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS) on CPython's SSL_CTX; returns the new mode."""
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value  # PySSLContext.ctx
    return lib.SSL_CTX_ctrl(pointer, 33, 0x10, None)  # SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS


def server_context(mode: str, cert: str, key: str) -> ssl.SSLContext:
    context = build_context(cert, key)
    if mode == "release" and not release_buffers(context) & 0x10:
        raise SystemExit("could not set SSL_MODE_RELEASE_BUFFERS")
    if mode == "tickets0":
        context.num_tickets = 0
    if mode == "noticket":
        context.options |= ssl.OP_NO_TICKET
    if mode == "tls12":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def over_bio(conn: socket.socket, context: ssl.SSLContext) -> tuple:
    """Handshake and one exchange through memory BIOs: the OpenSSL object without an SSLSocket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)

    def until_done(step):  # noqa: ANN001, ANN202
        while True:
            try:
                result = step()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    conn.sendall(outgoing.read())
                incoming.write(conn.recv(65536))
        if outgoing.pending:
            conn.sendall(outgoing.read())
        return result

    until_done(tls.do_handshake)
    tls.write(b"+OK hello\r\n")
    conn.sendall(outgoing.read())
    until_done(lambda: tls.read(100))
    tls.write(b"+OK\r\n")
    conn.sendall(outgoing.read())
    return conn, tls, incoming, outgoing


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in MODES:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    mode, count, cert, key, ca = argv[0], int(argv[1]), *argv[2:]
    context = server_context(mode, cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    if os.fork() == 0:  # the clients, in a child: their memory is not this process's
        client_context = ssl.create_default_context(cafile=ca)
        kept = []

        def one(_: int) -> None:
            sock = socket.create_connection(("127.0.0.1", port))
            if mode != "plain":
                sock = client_context.wrap_socket(sock, server_hostname="127.0.0.1")
            sock.recv(100)
            sock.sendall(b"NOOP\r\n")
            sock.recv(100)
            kept.append(sock)

        gevent.pool.Pool(100).map(one, range(count))
        time.sleep(60)
        os._exit(0)
    held: list[object] = []

    def handle(conn: socket.socket) -> None:
        if mode == "bio":
            held.append(over_bio(conn, context))
            return
        if mode == "transport":
            transport = TlsTransport.accept(Transport(conn), context)
            transport.write(b"+OK hello\r\n")
            transport.flush()
            while transport.read() is None:
                gevent.socket.wait_read(transport.fd, 30)
            transport.write(b"+OK\r\n")
            transport.flush()
            transport.park(Idle(), 3600)  # idle from here, as a held session
            held.append(transport)
            return
        sock = conn if mode == "plain" else context.wrap_socket(conn, server_side=True)
        sock.sendall(b"+OK hello\r\n")
        sock.recv(100)
        sock.sendall(b"+OK\r\n")
        held.append(sock)  # idle from here: no greenlet waits on it

    gc.collect()
    gevent.sleep(0.5)
    before = rss_kib()
    for _ in range(count):
        gevent.spawn(handle, listener.accept()[0])
    deadline = time.monotonic() + 300
    while len(held) < count and time.monotonic() < deadline:
        gevent.sleep(0.05)
    gc.collect()
    gevent.sleep(0.5)
    after = rss_kib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = rss_kib()
    print(f"{mode}: {len(held)} idle server-side connections: {(after - before) / len(held):.1f} KiB each "
          f"(RSS {before} -> {after} KiB; after malloc_trim(0) {(trimmed - before) / len(held):.1f} KiB each)")
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
