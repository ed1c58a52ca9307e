"""What a setting's value needs of this machine, checked where a value enters the server.

core.settings parses values without touching the disk; the process that reads the
config file and answers MSMP `SET` passes these checks to `Settings`, so a bad
Maildir root or a missing filter program is refused there, once. A worker applies the
value its supervisor already checked and does not repeat them.
"""

from __future__ import annotations

import os
import shlex
import shutil

from geventpop3.core.settings import Check, SettingError, Settings
from geventpop3.mail.maildir_root import NotAMaildirRoot, check_root


def maildir_root(settings: Settings, path: str) -> str:
    """An empty directory or a Maildir root, never a system directory (mail.maildir_root)."""
    try:
        return check_root(path)
    except NotAMaildirRoot as exc:
        raise SettingError(str(exc)) from None


def filter_program(settings: Settings, value: str) -> str:
    """`none`, a named filter or chain, or a command line whose program exists and is
    executable: caught at SET, not at RETR."""
    if value == "none" or value in settings.named_filters or value in settings.filter_chains:
        return value
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise SettingError(f"cannot split command line: {exc}") from None
    if not argv:
        raise SettingError("empty command")
    program = argv[0]
    found = shutil.which(program) if os.sep not in program else program
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise SettingError(f"program not found or not executable: {program}")
    return value


CHECKS: dict[str, Check] = {"maildir": maildir_root, "transformer": filter_program}


def checked_settings() -> Settings:
    """Settings that check values against this machine: for the process that takes them in."""
    return Settings(CHECKS)
