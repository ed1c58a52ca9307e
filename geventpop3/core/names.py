"""Names the server takes from clients and files, and the UIDL formats: pure rules, checked
before any path is built from a name."""

from __future__ import annotations

import re

USERNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,39}\Z")

HASHED_UID_PREFIX = "~"  # UIDLs made from a hash; no UIDL taken from a name starts with it
UIDL_BASE_NAME = "%f"  # the UIDL formats of `uidl_format`, named as Dovecot's pop3_uidl_format names them
UIDL_DOVECOT = "%08Xu%08Xv"
UIDL_FORMATS = (UIDL_BASE_NAME, UIDL_DOVECOT)


class UserError(Exception):
    """A user operation that cannot be done; str() is the MSMP reason."""


class HashingBusy(UserError):
    """Too many logins already wait for a hash thread: answer a temporary failure at once."""

    def __init__(self) -> None:
        super().__init__("Server busy, try again later")


def valid_username(name: str) -> bool:
    """1-40 of letters, digits, `.`, `_`, `-`; never starting with `.` or `-`."""
    return USERNAME_RE.match(name) is not None


def valid_password(password: str) -> bool:
    """1-100 printable characters without whitespace."""
    return 0 < len(password) <= 100 and password.isprintable() and not any(c.isspace() for c in password)
