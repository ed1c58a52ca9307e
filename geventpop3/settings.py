"""The live configuration: one typed, validated object every session reads.

MSMP `SET`/`GET` go through `Settings.set()`/`Settings.get()`; flags and the config
file go through the same parsers, so a value is validated the same way wherever it
comes from. Listeners are told about every change (persistence, logging, resizing
limits), which is how a change takes effect without a restart.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 40
MAX_VALUE_LENGTH = 100


class SettingError(ValueError):
    """A key that does not exist or a value that does not validate; str() says why."""


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise SettingError("not an integer") from None
        if not low <= value <= high:
            raise SettingError(f"must be between {low} and {high}")
        return value

    return parse


def _float_range(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise SettingError("not a number") from None
        if not low <= value <= high:  # also rejects nan
            raise SettingError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise SettingError("must be one of " + ", ".join(choices))
        return text

    return parse


def _directory(text: str) -> str:
    path = os.path.abspath(text)
    if not os.path.isdir(path):
        raise SettingError("not an existing directory")
    return path


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingError("must be one of DEBUG, INFO, WARNING, ERROR")
    return level


@dataclass(frozen=True)
class Key:
    """One setting: its parser (raises SettingError), default and meaning."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


KEYS: dict[str, Key] = {
    key.name: key
    for key in (
        Key("maildir", _directory, None, "Maildir root; new POP3 sessions use it"),
        Key("transformer", str, "none", "filter for retrieved mail: program, config name or none"),
        Key("max_connections", _int_range(1, 1_000_000), 10_000, "POP3 connection limit"),
        Key("idle_timeout", _float_range(1, 86_400), 600.0, "seconds before an idle POP3 session is closed"),
        Key("login_failure_delay", _float_range(0, 60), 2.0, "seconds to wait before answering a failed login"),
        Key("max_login_failures", _int_range(1, 100), 3, "failed logins before a connection is closed"),
        Key("user_limit", _int_range(1, 10_000_000), 100_000, "most POP3 users MSMP ADD may create"),
        Key("admin_idle_timeout", _float_range(1, 86_400), 600.0, "seconds before an idle MSMP session is closed"),
        Key("log_level", _log_level, "INFO", "server log level"),
        Key("transformer_timeout", _float_range(0.1, 3600), 30.0, "seconds a filter may run per message"),
        Key("transformer_concurrency", _int_range(1, 1024), 4, "most filter processes at once"),
        Key("transformer_failure", _choice("tempfail", "passthrough"), "tempfail",
            "on filter failure: -ERR [SYS/TEMP] or the original message"),
        Key("log_retention_count", _int_range(1, 10_000_000), 1000, "access-log entries kept per user"),
        Key("log_retention_days", _int_range(1, 36_500), 90, "days access-log entries are kept"),
        Key("auth_penalty_max", _float_range(0, 3600), 15.0, "most seconds a failed login from one source waits"),
        Key("auth_penalty_forget", _float_range(1, 86_400), 300.0,
            "seconds without a failure before a source's penalty is forgotten"),
        Key("auth_penalty_sources", _int_range(1, 10_000_000), 100_000, "most sources the penalty tracks"),
        Key("auth_hash_threads", _int_range(1, 64), 2, "threads that verify passwords (scrypt)"),
        Key("auth_hash_queue", _int_range(1, 100_000), 100,
            "logins that may wait for a hash thread; beyond, a login fails at once as temporary"),
    )
}


Listener = Callable[[str, Any, Any], None]


class Settings:
    """Current values by key; attribute access for the hot path (`settings.idle_timeout`)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {name: key.default for name, key in KEYS.items()}
        self._listeners: list[Listener] = []
        # Named filters from the config file: name -> argv. Not settable over MSMP.
        self.named_transformers: dict[str, list[str]] = {}
        # Named chains: name -> names of named_transformers run in order (geventpop3.filters).
        self.transformer_chains: dict[str, list[str]] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def parse(self, key: str, text: str) -> Any:
        """Validate `text` for `key` without changing anything."""
        if key not in KEYS:
            raise SettingError("Invalid key")
        if not text:
            raise SettingError("empty value")
        value = KEYS[key].parse(text)
        if key == "transformer":
            self._check_transformer(value)  # the program must exist: caught at SET, not at RETR
        return value

    def set(self, key: str, text: str, source: str = "msmp") -> Any:
        """Validate and apply; listeners hear about the change. Returns the new value."""
        value = self.parse(key, text)
        self.apply(key, value, source)
        return value

    def apply(self, key: str, value: Any, source: str) -> None:
        old = self._values[key]
        self._values[key] = value
        if old != value and source != "config":  # start-up values are not changes
            log.info("setting %s changed from %s to %s (by %s)", key, format_value(old), format_value(value), source)
        for listener in list(self._listeners):
            listener(key, old, value)

    def get(self, key: str) -> str:
        if key not in KEYS:
            raise SettingError("Invalid key")
        return format_value(self._values[key])

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _check_transformer(self, value: str) -> None:
        if value == "none" or value in self.named_transformers or value in self.transformer_chains:
            return
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


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
