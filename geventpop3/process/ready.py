"""`--ready-file`: where the server says, once it serves, which addresses and ports it bound.

With port 0 the kernel picks the ports, so a harness that starts the server (such as
geventpop3.testing) learns them here without racing for free ports. The file is JSON,
written under a temporary name and renamed, so a reader sees all of it or nothing:
`{"pid": 1234, "pop3": [{"host": "127.0.0.1", "port": 40001}], "pop3s": [], "msmp": [...],
"metrics": [], "msmp_socket": [{"path": "/run/geventpop3/msmp.sock"}]}`. It is removed when the
server shuts down.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket

SERVICES = ("pop3", "pop3s", "msmp", "metrics")


def endpoints(bound: dict[str, list[socket.socket]]) -> dict[str, list[dict[str, object]]]:
    """{service: [{host, port}, ...]} of the listening sockets by service; MSMP's UNIX
    socket as `msmp_socket`: [{path}]."""
    served: dict[str, list[dict[str, object]]] = {
        service: [{"host": sock.getsockname()[0], "port": sock.getsockname()[1]} for sock in bound.get(service, [])]
        for service in SERVICES}
    served["msmp_socket"] = [{"path": sock.getsockname()} for sock in bound.get("msmp_socket", [])]
    return served


def write(path: str, served: dict[str, list[dict[str, object]]]) -> None:
    """Write the file atomically (OSError if it cannot be written)."""
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump({"pid": os.getpid(), **served}, handle)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
