"""Build and drive popload, the benchmark's C load client (loadtest/popload.c).

The Python client shares the two cores with the servers it measures: it costs about as
much CPU per session as geventpop3 itself, and in the held phase its scheduling of 2,000
greenlets in flight is part of every NOOP latency. popload does the same sessions with
the same checks from one epoll loop in C, so the instrument stays small beside what it
measures.

`build` compiles the source on demand (`cc -O2 -Wall -Werror`) into a cache directory,
keyed by a hash of the source and flags. `write_manifest` writes what the client checks
answers against: user, password, and every message's UIDL and expected bytes (CRLF ends,
not dot-stuffed, as `benchlib.Dataset.expected` holds them) in one blob file. `sessions`
runs mode (a) to the end; `Held` drives mode (b), pausing where the caller samples memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

SOURCE = Path(__file__).with_name("popload.c")
CFLAGS = ["-O2", "-Wall", "-Werror"]
LIBS = ["-lm"]


class PoploadError(Exception):
    """popload could not be built or run, or ended without its report."""


def build(cache_dir: str | os.PathLike[str]) -> str:
    """The path of the compiled client, compiling it first if the cache has no build of this source."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise PoploadError(f"popload needs a C compiler: {compiler!r} not found "
                           "(install gcc and libc6-dev, e.g. tools/install-system-deps.sh)")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join([compiler, *CFLAGS, *LIBS]).encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    exe = os.path.join(cache_dir, f"popload-{digest}")
    if os.access(exe, os.X_OK):
        return exe
    partial = f"{exe}.{os.getpid()}.tmp"
    done = subprocess.run([compiler, *CFLAGS, "-o", partial, str(SOURCE), *LIBS], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise PoploadError(f"compiling {SOURCE.name} failed: {first}")
    os.replace(partial, exe)
    return exe


def write_manifest(path: str | os.PathLike[str],
                   users: Iterable[tuple[str, str, Mapping[str, bytes]]]) -> str:
    """Write the manifest (and its blob beside it) for (user, password, {uidl: expected bytes})."""
    path = str(path)
    blob = path + ".blob"
    offset = 0
    with open(path, "w") as manifest, open(blob, "wb") as data:
        manifest.write(f"blob {os.path.abspath(blob)}\n")
        for user, password, messages in users:
            manifest.write(f"user {user} {password} {len(messages)}\n")
            for uidl, content in messages.items():
                manifest.write(f"msg {uidl} {offset} {len(content)}\n")
                data.write(content)
                offset += len(content)
    return path


def _report(line: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        raise PoploadError(f"popload printed no {what}: {line.strip()[:200]!r}") from None
    if not isinstance(value, dict):
        raise PoploadError(f"popload printed no {what}: {line.strip()[:200]!r}")
    return value


def _common(port: int, manifest: str, timeout: float, host: str) -> list[str]:
    return ["--host", host, "--port", str(port), "--manifest", manifest, "--timeout", f"{timeout:g}"]


def sessions(exe: str, port: int, manifest: str, clients: int, duration: float, timeout: float = 30.0,
             host: str = "127.0.0.1", max_sessions: int = 0) -> dict[str, Any]:
    """Mode (a): `clients` connections running full sessions for `duration` s; popload's JSON report."""
    args = [exe, "sessions", *_common(port, manifest, timeout, host), "--clients", str(clients),
            "--duration", f"{duration:g}", "--max-sessions", str(max_sessions)]
    try:
        done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=duration + timeout + 60)
    except subprocess.TimeoutExpired:
        raise PoploadError(f"popload sessions did not end within {duration + timeout + 60:g} s") from None
    if done.returncode != 0:
        raise PoploadError(f"popload sessions exited {done.returncode}: {done.stderr.strip()[:300]}")
    lines = done.stdout.strip().splitlines()
    return _report(lines[-1] if lines else "", "sessions report")


class Held:
    """Mode (b) as a context: `established()` after the logins, `round()` after each NOOP round, `done()`.

    popload waits on stdin between these steps, so the sessions stay open (and idle) while
    the caller reads server memory; each step's call lets it go on. Leaving the context
    kills what is left of it.
    """

    def __init__(self, exe: str, port: int, manifest: str, held: int, rounds: int, login_concurrency: int = 200,
                 inflight: int = 2000, establish_timeout: float = 300.0, timeout: float = 120.0,
                 host: str = "127.0.0.1") -> None:
        self.args = [exe, "held", *_common(port, manifest, timeout, host), "--held", str(held),
                     "--rounds", str(rounds), "--login-concurrency", str(login_concurrency),
                     "--inflight", str(inflight), "--establish-timeout", f"{establish_timeout:g}"]
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Held:
        self.process = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()

    def _event(self, name: str) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            stderr: IO[str] | None = self.process.stderr
            text = stderr.read().strip()[:300] if stderr is not None else ""
            raise PoploadError(f"popload held exited {self.process.returncode} before its {name} line: {text}")
        event = _report(line, f"{name} line")
        if event.get("event") != name:
            raise PoploadError(f"popload held: expected its {name} line, got {line.strip()[:200]!r}")
        return event

    def go_on(self) -> None:
        """Let popload take its next step (the caller has sampled what it wanted)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def established(self) -> dict[str, Any]:
        return self._event("held")

    def round(self) -> dict[str, Any]:
        return self._event("round")

    def done(self) -> dict[str, Any]:
        return self._event("done")
