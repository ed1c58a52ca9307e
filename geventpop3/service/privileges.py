"""Who the server and its filters run as.

The server binds its listeners (port 110 needs root), then drops to `--run-as USER`
(and `--run-as-group GROUP`) for good, before it reads any Maildir, state or users
file: a flaw exploited later gets that user, not root. Filters never run as root:
they run as the server's user, or as `nobody` while the server itself is root.
"""

from __future__ import annotations

import contextlib
import grp
import importlib
import os
import pwd
from dataclasses import dataclass

UNPRIVILEGED_USER = "nobody"
UNPRIVILEGED_GROUPS = ("nogroup", "nobody")  # Debian's, then Red Hat's
ROOT_WARNING = ("running as root without --run-as: a flaw in the server would give an attacker the whole "
                "machine; start as root with --run-as USER to bind and then drop (see docs/deploy.md)")


# Imported lazily by the server or the standard library: loaded before the drop, because the
# dropped user may not be able to read the Python installation (e.g. one under /root).
PRELOAD = (
    "encodings.ascii", "encodings.latin_1", "encodings.idna", "encodings.utf_8", "stringprep",
    "gevent.threadpool", "gevent._threading", "gevent.subprocess", "gevent.fileobject", "gevent.resolver.thread",
    "gevent.resolver.blocking", "gevent.pywsgi", "prometheus_client", "prometheus_client.core",
    "prometheus_client.metrics_core", "prometheus_client.exposition",
)


class PrivilegeError(Exception):
    """Dropping privileges failed or is impossible; str() is one line for the operator."""


@dataclass(frozen=True)
class Identity:
    """A user and group to run as, resolved from the system's databases."""

    user: str
    uid: int
    gid: int
    home: str


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, OverflowError):
        raise PrivilegeError(f"unknown user {name!r} for --run-as") from None


def _group(name: str) -> int:
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except (KeyError, OverflowError):
        raise PrivilegeError(f"unknown group {name!r} for --run-as-group") from None


def resolve(user: str | None, group: str | None) -> Identity | None:
    """The identity `--run-as`/`--run-as-group` name (group default: the user's own); None without."""
    if user is None:
        if group is not None:
            raise PrivilegeError("--run-as-group needs --run-as")
        return None
    entry = _user(user)
    if entry.pw_uid == 0:
        raise PrivilegeError(f"--run-as {user}: that is root, nothing would be dropped")
    gid = entry.pw_gid if group is None else _group(group)
    return Identity(entry.pw_name, entry.pw_uid, gid, entry.pw_dir)


def preload() -> None:
    """Import now what would otherwise be imported after the drop (see PRELOAD)."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def drop(identity: Identity) -> None:
    """Become `identity` for good (groups, gid, uid), and check root cannot be taken back.

    Already running as exactly that user and group (a service manager started us so):
    nothing to do. Any other non-root start cannot switch: PrivilegeError.
    """
    if os.geteuid() != 0:
        if os.getresuid() == (identity.uid,) * 3 and os.getresgid() == (identity.gid,) * 3:
            return
        raise PrivilegeError(f"--run-as {identity.user}: only a server started as root can switch users")
    try:
        os.initgroups(identity.user, identity.gid)
        os.setgid(identity.gid)
        os.setuid(identity.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {identity.user}: {exc.strerror or exc}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError(f"switched to user {identity.user} but could take root back: refusing to run")
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3:
        raise PrivilegeError(f"switching to user {identity.user} left another user or group id in place")


def filter_identity() -> Identity | None:
    """Who filters run as: None (the server's own user) unless the server is root, then `nobody`."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise PrivilegeError(f"no user {UNPRIVILEGED_USER!r} to run filters as while the server is root") from None
    gid = entry.pw_gid
    for name in UNPRIVILEGED_GROUPS:
        try:
            gid = grp.getgrnam(name).gr_gid
            break
        except KeyError:
            continue
    return Identity(entry.pw_name, entry.pw_uid, gid, entry.pw_dir)


def become(identity: Identity) -> None:
    """In a forked child before exec: take `identity` with no supplementary groups."""
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
