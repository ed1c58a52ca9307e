"""The live configuration: one typed, validated object every session reads.

MSMP `SET`/`GET` go through `Settings.set()`/`Settings.get()`; flags and the config
file go through the same parsers, so a value is validated the same way wherever it
comes from. Listeners are told about every change (persistence, logging, resizing
limits), which is how a change takes effect without a restart.

The parsers here are pure. What a value needs of the machine (the Maildir root is one,
the filter program exists) is a `Check` the caller passes in
(geventpop3.service.setting_checks): the process that reads the config and takes MSMP
`SET` checks; a worker applies the value its supervisor already checked.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from geventpop3.core.names import UIDL_BASE_NAME, UIDL_FORMATS

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 40
MAX_VALUE_LENGTH = 100


class SettingError(ValueError):
    """A key that does not exist or a value that does not validate; str() says why."""


class SettingNotSaved(SettingError):
    """A valid change that could not be persisted, so it was not made; str() says why."""


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


def _absolute_path(text: str) -> str:
    """A directory name made absolute; what is there is a check's business (setting_checks)."""
    return os.path.abspath(text)


ANY_PROGRAM = "*"


def _program_names(text: str) -> tuple[str, ...]:
    """`*` (any program), or names separated by commas: named filters or programs."""
    names = tuple(name.strip() for name in text.split(","))
    if names == (ANY_PROGRAM,):
        return names
    for name in names:
        if not name or not _is_token(name) or name == ANY_PROGRAM:
            raise SettingError("must be * or names without spaces, separated by commas")
    return names


def _is_token(text: str) -> bool:
    return text.isprintable() and not any(ch.isspace() for ch in text)


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingError("must be one of DEBUG, INFO, WARNING, ERROR")
    return level


class Networks(tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]):
    """A CIDR list (`trusted_networks`), shown as MSMP GET and the store write it back."""

    def __str__(self) -> str:
        return ",".join(str(network) for network in self) or "none"


def _networks(text: str) -> Networks:
    """Comma- or space-separated CIDR networks (a bare address is a /32 or /128); `none`: empty."""
    words = text.replace(",", " ").split()
    if words == ["none"]:
        return Networks()
    networks = []
    for word in words:
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise SettingError(f"not a network in CIDR notation: {word[:50]}") from None
    return Networks(networks)


@dataclass(frozen=True)
class Key:
    """One setting: its parser (raises SettingError), default and meaning."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    msmp: bool = True  # False: read-only over MSMP, set in the config file


KEYS: dict[str, Key] = {
    key.name: key
    for key in (
        Key("maildir", _absolute_path, None, "Maildir root (empty or a Maildir root); new POP3 sessions use it"),
        Key("transformer", str, "none", "filter for retrieved mail: program, config name or none"),
        Key("transformer_programs", _program_names, (ANY_PROGRAM,),
            "what MSMP SET transformer may name: * or a list of names", msmp=False),
        Key("max_connections", _int_range(1, 1_000_000), 10_000, "POP3 connection limit"),
        Key("idle_timeout", _float_range(1, 86_400), 600.0, "seconds before an idle POP3 session is closed"),
        Key("login_timeout", _float_range(1, 86_400), 60.0,
            "seconds from connect to a successful POP3 login before the connection is closed"),
        Key("max_connections_per_ip", _int_range(1, 1_000_000), 50,
            "POP3 connections from one IPv4 address or IPv6 /64"),
        Key("max_sessions_per_user_ip", _int_range(1, 1_000_000), 10,
            "POP3 logins of one user from one address in flight at once"),
        Key("login_failure_delay", _float_range(0, 60), 2.0, "seconds to wait before answering a failed login"),
        Key("max_login_failures", _int_range(1, 100), 3, "failed logins before a connection is closed"),
        Key("user_limit", _int_range(1, 10_000_000), 100_000, "most POP3 users MSMP ADD may create"),
        Key("admin_idle_timeout", _float_range(1, 86_400), 600.0, "seconds before an idle MSMP session is closed"),
        Key("admin_max_connections", _int_range(1, 100_000), 20,
            "MSMP connection limit, over TCP and on the socket each"),
        Key("admin_max_connections_per_source", _int_range(1, 100_000), 4,
            "MSMP connections from one source: an IPv4 address or IPv6 /64 over TCP, a peer uid on the socket"),
        Key("admin_login_timeout", _float_range(1, 86_400), 30.0,
            "seconds from connect to a successful MSMP login before the connection is closed"),
        Key("log_level", _log_level, "INFO", "server log level"),
        Key("transformer_timeout", _float_range(0.1, 3600), 30.0, "seconds a filter may run per message"),
        Key("transformer_concurrency", _int_range(1, 1024), 4, "most filter processes at once"),
        Key("transformer_max_output", _int_range(1024, 1 << 40), 64 << 20,
            "bytes a filter may write per message; more fails the filter"),
        Key("transformer_failure", _choice("tempfail", "passthrough"), "tempfail",
            "on filter failure: -ERR [SYS/TEMP] or the original message"),
        Key("log_retention_count", _int_range(1, 10_000_000), 1000, "access-log entries kept per user"),
        Key("log_retention_days", _int_range(1, 36_500), 90, "days access-log entries are kept"),
        Key("log_retention_total", _int_range(10, 1_000_000_000), 1_000_000, "access-log entries kept in all"),
        Key("plaintext_auth", _choice("tls", "always"), "always",
            "USER/PASS and AUTH PLAIN/LOGIN: tls (secure connections only) or always"),
        Key("trusted_networks", _networks, Networks(), "CIDR list of clients that count as secure without TLS"),
        Key("proxy_networks", _networks, Networks(),
            "CIDR list of load balancers: POP3 connections must come from them, with a PROXY protocol header"),
        Key("tls_min_version", _choice("TLSv1.2", "TLSv1.3"), "TLSv1.2", "oldest TLS version accepted"),
        Key("auth_penalty_max", _float_range(0, 3600), 15.0, "most seconds a failed login from one source waits"),
        Key("auth_penalty_forget", _float_range(1, 86_400), 300.0,
            "seconds without a failure before a source's penalty is forgotten"),
        Key("auth_penalty_sources", _int_range(1, 10_000_000), 100_000, "most sources the penalty tracks"),
        Key("auth_hash_threads", _int_range(1, 64), 2, "threads that verify passwords"),
        Key("auth_hash_queue", _int_range(1, 100_000), 1000,
            "logins that may wait for a hash thread; beyond, a login fails at once as temporary"),
        Key("lease_timeout", _float_range(2, 3600), 30.0,
            "with a PostgreSQL store: seconds before the mailbox leases of a dead instance expire"),
        Key("auth_hash_memory", _int_range(16, 65_536), 256,
            "MiB that memory-hard password checks (scrypt, argon2) may use at once"),
        Key("max_messages_per_mailbox", _int_range(1, 100_000_000), 100_000,
            "messages a mailbox may hold; a login to one holding more is refused (-ERR [SYS/PERM])"),
        Key("max_message_size", _int_range(1024, 1 << 50), 1 << 30,
            "octets a message file may have; bigger files are left out of the snapshot"),
        Key("uidl_format", _choice(*UIDL_FORMATS), UIDL_BASE_NAME,
            "UIDLs: %f (the Maildir base name) or %08Xu%08Xv (Dovecot's, from dovecot-uidlist)", msmp=False),
    )
}


Listener = Callable[[str, Any, Any], None]
Writer = Callable[[str, str], None]
Check = Callable[["Settings", Any], Any]  # a parsed value -> the value to keep; SettingError if unusable


class Settings:
    """Current values by key; attribute access for the hot path (`settings.idle_timeout`).

    Every value is also an instance attribute, kept equal by `apply`: a plain attribute
    read costs about 0.1 us, `__getattr__` (reached only after the ordinary lookup failed
    and built its AttributeError) about 1.5 us, and a held session reads idle_timeout at
    every command."""

    def __init__(self, checks: Mapping[str, Check] | None = None) -> None:
        self._checks: Mapping[str, Check] = checks or {}
        self._values: dict[str, Any] = {name: key.default for name, key in KEYS.items()}
        # Each value is also an instance attribute, kept equal by `apply`: `settings.idle_timeout`
        # is then a plain attribute read (a session reads a few per command), not a miss
        # followed by a __getattr__ call.
        self.__dict__.update(self._values)
        self._listeners: list[Listener] = []
        self._writers: list[Writer] = []
        # Named filters from the config file: name -> argv. Not settable over MSMP.
        self.named_filters: dict[str, list[str]] = {}
        # Named chains: name -> names of named_filters run in order (geventpop3.service.filters).
        self.filter_chains: dict[str, list[str]] = {}

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
        check = self._checks.get(key)
        return value if check is None else check(self, value)

    def set(self, key: str, text: str, source: str = "msmp") -> Any:
        """Validate, persist (the writers), then apply; listeners hear about the change.
        Returns the new value. A writer's SettingNotSaved leaves the old value in place.
        Over MSMP, also the limits of `check_msmp`."""
        value = self.parse(key, text)
        if source == "msmp":
            self.check_msmp(key, value)
        if format_value(value) != format_value(self._values[key]):
            for writer in list(self._writers):
                writer(key, format_value(value))
        self.apply(key, value, source)
        return value

    def check_msmp(self, key: str, value: Any) -> None:
        """What MSMP may not do although the config file may: change a read-only key,
        or name a filter `transformer_programs` does not list."""
        if not KEYS[key].msmp:
            raise SettingError("read-only over MSMP, set it in the config file")
        allowed = self._values["transformer_programs"]
        if key == "transformer" and value != "none" and ANY_PROGRAM not in allowed and value not in allowed:
            raise SettingError("not allowed by transformer_programs")

    def apply(self, key: str, value: Any, source: str) -> None:
        old = self._values[key]
        self._values[key] = self.__dict__[key] = value
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

    def drop_checks(self) -> None:
        """Parse values without the machine checks (a worker takes what its supervisor checked)."""
        self._checks = {}

    def unsubscribe(self, listener: Listener) -> None:
        """`listener` hears no more changes (a forked process leaving its parent's listeners)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def add_writer(self, writer: Writer) -> None:
        """`writer(key, value_text)` persists a change made by `set` before it is applied;
        it raises SettingNotSaved to refuse the change."""
        self._writers.append(writer)


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):  # a list setting: transformer_programs, trusted_networks
        return ",".join(str(item) for item in value) or "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
