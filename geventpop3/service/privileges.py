"""Who the server and its filters run as.

The server binds its listeners (port 110 needs root), then drops to `--run-as USER`
(and `--run-as-group GROUP`) for good, before it reads any Maildir, state or users
file: a flaw exploited later gets that user, not root. Filters never run as root nor
as the server's user while the server starts as root: they run as `filter_user`
(`--filter-user`, default `geventpop3-filter` when that user exists, else `nobody`);
see `filter_user` below and geventpop3.process.filter_spawner.
"""

from __future__ import annotations

import contextlib
import grp
import importlib
import os
import pwd
from dataclasses import dataclass

UNPRIVILEGED_USER = "nobody"
FILTER_USER = "geventpop3-filter"  # the dedicated user docs/filters.md tells how to create
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


def _identity(entry: pwd.struct_passwd) -> Identity:
    gid = entry.pw_gid
    if entry.pw_name == UNPRIVILEGED_USER:  # nobody's group, whatever the distribution calls it
        for name in UNPRIVILEGED_GROUPS:
            try:
                gid = grp.getgrnam(name).gr_gid
                break
            except KeyError:
                continue
    return Identity(entry.pw_name, entry.pw_uid, gid, entry.pw_dir)


def filter_user(name: str | None, server: Identity | None) -> tuple[Identity | None, str | None]:
    """Who filters run as while the server starts as root, and why none may run (or None).

    `name` given (`--filter-user`): that user, or PrivilegeError when it is unknown, root
    or `server` (the --run-as user): the operator's explicit word is checked at once.
    Not given: `geventpop3-filter` if it exists, else `nobody`; when that is the server's
    own user or missing, no user and the reason (no filter may run).
    """
    if name is not None:
        try:
            entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        except (KeyError, OverflowError):
            raise PrivilegeError(f"unknown user {name!r} for --filter-user") from None
        if entry.pw_uid == 0:
            raise PrivilegeError(f"--filter-user {name}: filters never run as root")
        if server is not None and entry.pw_uid == server.uid:
            raise PrivilegeError(f"--filter-user {name}: that is the server's own user (--run-as), "
                                 "a filter could read every Maildir")
        return _identity(entry), None
    for default in (FILTER_USER, UNPRIVILEGED_USER):
        try:
            entry = pwd.getpwnam(default)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            continue
        if server is not None and entry.pw_uid == server.uid:
            return None, (f"filters would run as {default}, the server's own user (--run-as): create the user "
                          f"{FILTER_USER} or set --filter-user (docs/filters.md)")
        return _identity(entry), None
    return None, f"no user {FILTER_USER} or {UNPRIVILEGED_USER} to run filters as: set --filter-user"


def filter_identity() -> Identity | None:
    """Who filters run as without a configuration (an embedded runner): None (our own user) unless root."""
    if os.geteuid() != 0:
        return None
    identity, problem = filter_user(None, None)
    if identity is None:
        raise PrivilegeError(problem or "no user to run filters as")
    return identity
