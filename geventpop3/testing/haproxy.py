"""HAProxy in front of geventpop3 (the PROXY protocol tests and bench_haproxy): a TCP-mode
configuration and `haproxy -db` in the foreground. Needs Debian's haproxy."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

_DEFAULTS = """defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
"""


def haproxy_config(backends: dict[int, list[str]], global_lines: Sequence[str] = ()) -> str:
    """A TCP-mode HAProxy configuration: for each frontend port on 127.0.0.1, a round-robin
    backend of the given `server` lines (e.g. "one 127.0.0.1:1100 send-proxy-v2")."""
    parts = ["global\n", *(f"    {line}\n" for line in global_lines), _DEFAULTS]
    for index, (port, servers) in enumerate(backends.items()):
        parts.append(f"frontend front{index}\n    bind 127.0.0.1:{port}\n    default_backend back{index}\n")
        parts.append(f"backend back{index}\n    balance roundrobin\n")
        parts.extend(f"    server {server}\n" for server in servers)
    return "".join(parts)


def start_haproxy(directory: Path, config: str, name: str = "haproxy") -> subprocess.Popen[bytes]:
    """`haproxy -db` (foreground, in its own session) on `config`, written to DIRECTORY/NAME.cfg,
    its output in NAME.log; the caller waits for its ports and stops it."""
    path = directory / f"{name}.cfg"
    path.write_text(config)
    with open(directory / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
