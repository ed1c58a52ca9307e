"""Every listening socket of the server (POP3, MSMP, metrics): one place that resolves and binds.

A host name binds every address it resolves to. With port 0 the first listener picks
a free port and the others reuse it, so one number reaches every address. gevent
sockets are used whether or not the process is monkey-patched, so a StreamServer
never accepts on a blocking socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Sequence

from gevent import socket

log = logging.getLogger(__name__)

BACKLOG = 4096
# MSMP and metrics listen here unless told otherwise; ::1 is skipped quietly where IPv6 is missing.
LOOPBACK = ("127.0.0.1", "::1")


def open_listeners(addresses: Sequence[str] | None, port: int, label: str,
                   defaults: Sequence[str] | None = None, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening sockets for `label` ("POP3", "MSMP"...) on `addresses` and `port`.

    No addresses: the `defaults` if given (an IPv6 one that cannot be bound on this
    host is skipped with a log line), else one socket on all interfaces of both
    families. An address given explicitly that cannot be bound raises OSError whose
    text names the label, address and port. Nothing is leaked on failure.
    """
    if not addresses and not defaults:
        return [_wildcard(port, label, backlog)]
    optional_ipv6 = not addresses
    listeners: list[socket.socket] = []
    requested = port
    try:
        for address in addresses or defaults or ():
            try:
                bound = _bind_all(address, port, backlog, shared_port=requested == 0 and port != 0)
            except OSError as exc:
                if optional_ipv6 and ":" in address and _ipv6_unavailable(exc):
                    log.info("%s: IPv6 address %s unavailable (%s), skipped", label, address, exc)
                    continue
                raise _listen_error(label, address, port, exc) from None
            listeners.extend(bound)
            if bound and port == 0:
                port = bound[0].getsockname()[1]
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


UNIX_BACKLOG = 128


def open_unix_listener(path: str, label: str, owner: tuple[int, int] = (-1, -1),
                       group_access: bool = False, notes: list[str] | None = None) -> socket.socket:
    """A listening UNIX socket at `path`, made mode 0600 (0660 with `group_access`) from its
    start (no moment wider), then given to `owner` (uid, gid; -1: unchanged) without
    following a link. OSError whose text names the label and path otherwise.

    Its directory is made (0755) if missing; it must be a directory that no one but root,
    us or `owner` can write to (unless sticky), or anyone could replace the socket. What is
    at `path` already: a socket no one listens on (left by a killed server) is replaced; a
    live one is another server's, a link or any other file is not ours: the start stops
    there, nothing followed or removed. A replaced socket is said in `notes` (for the log
    once started: a start that fails later stays one line), else logged now."""
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        _check_directory(directory, owner[0])
        if _clear_stale(path):
            note = f"removed the stale socket {path}"
            if notes is not None:
                notes.append(note)
            else:
                log.info("%s", note)
        old_umask = os.umask(0o117 if group_access else 0o177)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        try:
            if owner != (-1, -1):
                os.chown(path, owner[0], owner[1], follow_symlinks=False)
            sock.listen(UNIX_BACKLOG)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    except OSError as exc:
        why = exc.strerror or str(exc)
        if why.startswith("cannot "):
            raise
        raise OSError(exc.errno, f"cannot listen for {label} on {path}: {why}") from None
    return sock


def _check_directory(directory: str, owner_uid: int) -> None:
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{directory} is not a directory")
    if info.st_uid not in (0, os.geteuid(), owner_uid):
        raise OSError(errno.EPERM, f"its directory {directory} belongs to uid {info.st_uid}, "
                                   "who could replace the socket")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise OSError(errno.EPERM, f"its directory {directory} is writable by others, who could replace the socket")


def _clear_stale(path: str) -> bool:
    """Remove a socket at `path` that no one listens on (True); OSError for anything else there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        raise OSError(errno.EEXIST, f"it exists and is {kind}: not replaced")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: a server that died without removing it
        return True
    except FileNotFoundError:
        return False
    except OSError:
        pass  # a full backlog, a timeout: someone is there
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another server listens there")


def socket_inode(path: str) -> int | None:
    """The inode of the socket at `path` (None if none is there): what `remove_unix_socket` checks."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_ino if stat.S_ISSOCK(info.st_mode) else None


def remove_unix_socket(path: str, inode: int | None) -> None:
    """Remove the socket file at `path` if it is still the one we bound (`inode`): a later
    server's socket stays. Quietly nothing when not allowed (a directory owned by root
    after the drop: the next start replaces it)."""
    if inode is not None and socket_inode(path) == inode:
        with contextlib.suppress(OSError):
            os.unlink(path)


def describe(sock: socket.socket) -> str:
    """`host:port` of a listener for the log, with IPv6 hosts in brackets; a UNIX socket's path."""
    if sock.family == socket.AF_UNIX:
        return str(sock.getsockname())
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wildcard(port: int, label: str, backlog: int) -> socket.socket:
    dualstack = socket.has_dualstack_ipv6()
    family, host = (socket.AF_INET6, "::") if dualstack else (socket.AF_INET, "0.0.0.0")
    try:
        return _listener(family, host, port, backlog, dualstack=dualstack)
    except OSError as exc:
        raise _listen_error(label, host, port, exc) from None


def _endpoints(address: str) -> list[tuple[int, str]]:
    """(family, host) to bind for an address or host name: every address it resolves to, once."""
    infos = socket.getaddrinfo(address, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    found: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        host = str(sockaddr[0])
        if family in (socket.AF_INET, socket.AF_INET6) and (family, host) not in found:
            found.append((family, host))
    return found


def _listener(family: int, host: str, port: int, backlog: int, dualstack: bool = False) -> socket.socket:
    """A listening socket with SO_REUSEADDR; an IPv6 one takes IPv4 clients too only if `dualstack`."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dualstack else 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind_all(address: str, port: int, backlog: int, shared_port: bool) -> list[socket.socket]:
    """Listeners for every address `address` resolves to; with `shared_port` (an ephemeral
    port picked for an earlier address) fall back to a fresh ephemeral port if that one is
    taken here."""
    listeners: list[socket.socket] = []
    try:
        for family, host in _endpoints(address):
            try:
                listeners.append(_listener(family, host, port, backlog))
            except OSError as exc:
                if not shared_port or exc.errno != errno.EADDRINUSE:
                    raise
                listeners.append(_listener(family, host, 0, backlog))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def _ipv6_unavailable(exc: OSError) -> bool:
    return isinstance(exc, socket.gaierror) or exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


def _listen_error(label: str, address: str, port: int, exc: OSError) -> OSError:
    if isinstance(exc, socket.gaierror):
        return OSError(exc.errno, f"cannot resolve {label} listen address {address!r}: {exc.strerror}")
    return OSError(exc.errno, f"cannot listen for {label} on {address} port {port}: {exc.strerror or exc}")
