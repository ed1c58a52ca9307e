"""What may be a Maildir root, and what is a user's Maildir: the checks that keep MSMP
`SET maildir` and `ADD` from turning system directories into mailboxes.

A Maildir root set over MSMP must be an existing directory that is
  - not `/`, not a top-level directory (`/etc`, `/home`, `/var`, `/srv`, `/tmp`, ...),
    and not inside the system trees in `SYSTEM_TREES` (`/etc/...`, `/usr/...`, ...),
    judged on its real path, after symbolic links;
  - and either empty, or a Maildir root already: every entry is a user Maildir (a
    directory, not a link, named like a user, with `cur`, `new` and `tmp` directories)
    or one of the server's own entries (`SERVER_ENTRIES`).
The config file and `-d` are the operator's word and are not checked here.
"""

from __future__ import annotations

import os
import stat

from geventpop3.core.names import valid_username
from geventpop3.mail.maildir import LOCK_FILE

DELETED_DIR = ".deleted"  # under the Maildir root: where MSMP DELE moves mail aside
# Entries of a Maildir root that are not user Maildirs but belong there.
SERVER_ENTRIES = frozenset({LOCK_FILE, DELETED_DIR, "lost+found"})
# Trees that belong to the operating system: nothing inside them is a Maildir root.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/run", "/sbin",
                "/sys", "/usr")
MAILDIR_PARTS = ("cur", "new", "tmp")


class NotAMaildirRoot(ValueError):
    """str() says why the directory cannot be a Maildir root."""


def is_maildir(path: str) -> bool:
    """A real directory (not a link) with `cur`, `new` and `tmp` directories in it."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return all(stat.S_ISDIR(os.lstat(os.path.join(path, part)).st_mode) for part in MAILDIR_PARTS)
    except OSError:
        return False


def system_directory(path: str) -> bool:
    """`/`, a top-level directory, or anything inside a system tree (a real path)."""
    if path == "/" or os.path.dirname(path) == "/":
        return True
    return any(path.startswith(tree + "/") for tree in SYSTEM_TREES)


def check_root(path: str) -> str:
    """The real path of `path` if it may be a Maildir root; NotAMaildirRoot otherwise.

    Lists the directory and looks at each entry: a root with many users costs a few
    stat calls per user, once, when an admin changes the root."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise NotAMaildirRoot("not an existing directory")
    if system_directory(real):
        raise NotAMaildirRoot("a system directory cannot be the Maildir root")
    try:
        with os.scandir(real) as entries:
            for entry in entries:
                if entry.name in SERVER_ENTRIES:
                    continue
                if not valid_username(entry.name) or not is_maildir(entry.path):
                    raise NotAMaildirRoot("neither empty nor a Maildir root (holds entries that are not Maildirs)")
    except OSError as exc:
        raise NotAMaildirRoot(f"cannot list the directory: {exc.strerror}") from None
    return real
