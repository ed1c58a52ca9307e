"""Command line and TOML config file -> a `Config` for the app.

Precedence, lowest first: built-in defaults, the `--config` file, values changed
over MSMP `SET` and persisted in the state store, then flags given on the command
line. A flag is the operator's explicit word for this start; a persisted SET is the
operator's latest word otherwise. A bad flag or value prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, NoReturn

from geventpop3 import __version__
from geventpop3.settings import KEYS, SettingError, Settings
from geventpop3.users import UserError, parse_user_flag, parse_users_file

DEFAULT_POP3_PORT = 110
DEFAULT_ADMIN_PORT = 4321
DEFAULT_MAILDIR = "./mail"


class UsageError(Exception):
    """One line for the operator; the process exits 2."""


@dataclass
class Config:
    """Everything the app needs to start, resolved from flags and the config file."""

    pop3_addresses: list[str] | None  # None: all interfaces, both families
    pop3_port: int
    admin_addresses: list[str]
    admin_port: int
    users: list[tuple[str, str]]
    admins: list[tuple[str, str]]
    state_dir: str | None  # None: no persistent state (tests of the core)
    settings: Settings
    explicit: dict[str, str] = field(default_factory=dict)  # setting -> value given as a flag
    metrics_address: str = "127.0.0.1"
    metrics_port: int | None = None
    demo: bool = False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="geventpop3",
        description="A POP3 server on gevent serving Maildir mail, with the MSMP management protocol.",
        epilog="Settings precedence: defaults < --config < values SET over MSMP (persisted) < flags.",
    )
    add = parser.add_argument
    add("-v", "--version", action="version", version=f"geventpop3 {__version__}")
    add("-l", "--pop3-address", action="append", metavar="ADDR",
        help="POP3 listen address, IPv4/IPv6 or host name; repeatable (default: all interfaces, both families)")
    add("-p", "--pop3-port", type=_port, metavar="PORT", help=f"POP3 port (default {DEFAULT_POP3_PORT})")
    add("-L", "--admin-address", action="append", metavar="ADDR",
        help="MSMP listen address; repeatable (default: 127.0.0.1 and ::1)")
    add("-P", "--admin-port", type=_port, metavar="PORT", help=f"MSMP port (default {DEFAULT_ADMIN_PORT})")
    add("-u", "--user", action="append", default=[], metavar="NAME:PASS", help="a POP3 user; repeatable")
    add("-a", "--admin", action="append", default=[], metavar="NAME:PASS", help="an MSMP admin; repeatable")
    add("-t", "--transformer", metavar="CMD", help="filter for retrieved mail, a command line (no shell)")
    add("-d", "--maildir", metavar="DIR", help=f"Maildir root (default {DEFAULT_MAILDIR}; created if missing)")
    add("--users-file", metavar="FILE", help="name:password (or name:$scrypt$...) lines")
    add("--state-dir", metavar="DIR", help="persistent state (SQLite) directory (default: beside the Maildir root)")
    add("--config", metavar="FILE", help="TOML config file")
    add("--no-state", action="store_true",
        help="keep no persistent state: users from flags and files only, counters and access logs in memory")
    add("--max-connections", metavar="N", help="POP3 connection limit (default 10000)")
    add("--idle-timeout", metavar="SECONDS", help="close idle POP3 sessions after this (default 600)")
    add("--login-failure-delay", metavar="SECONDS", help="delay before a failed login is answered (default 2)")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    add("--metrics-address", metavar="ADDR", help="Prometheus endpoint address (default 127.0.0.1)")
    add("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus metrics on this port (default: off)")
    add("--demo", action="store_true", help="add user demo (password demo) with a welcome message if empty")
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}")
    return int(text)


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path}: not UTF-8 text") from None


_FLAG_SETTINGS = {
    "max_connections": "max_connections",
    "idle_timeout": "idle_timeout",
    "login_failure_delay": "login_failure_delay",
    "log_level": "log_level",
}
_FILE_ONLY_KEYS = {
    "pop3_address", "pop3_port", "admin_address", "admin_port", "users", "admins", "users_file",
    "state_dir", "metrics_address", "metrics_port", "transformers",
}
# TOML types of the keys used as they are (settings keys go through their parsers instead).
_FILE_TYPES: dict[str, type | tuple[type, ...]] = {
    "pop3_address": (str, list), "admin_address": (str, list), "pop3_port": int, "admin_port": int,
    "metrics_port": int, "users": list, "admins": list, "users_file": str, "state_dir": str, "maildir": str,
    "metrics_address": str, "transformers": dict,
}


def _check_file_types(values: dict[str, Any]) -> None:
    """A value of the wrong TOML type is one clear line, not a traceback later on."""
    for key, kinds in _FILE_TYPES.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds) or (
                isinstance(value, list) and not all(isinstance(item, str) for item in value)):
            raise UsageError(f"config file: {key} has the wrong type")
        if key.endswith("_port") and not 0 <= value <= 65535:
            raise UsageError(f"config file: invalid port {value!r}")
        if key.endswith("_address") and not value:
            raise UsageError(f"config file: {key} is empty")


def parse_config(argv: list[str]) -> Config:
    args = build_parser().parse_args(argv)
    file_values: dict[str, Any] = _load_toml(args.config) if args.config else {}
    unknown = set(file_values) - set(KEYS) - _FILE_ONLY_KEYS
    if unknown:
        raise UsageError(f"config file: unknown key {sorted(unknown)[0]!r}")
    _check_file_types(file_values)

    settings = Settings()
    for name, spec in file_values.get("transformers", {}).items():
        chain = spec.get("chain") if isinstance(spec, dict) else None
        if chain is not None:
            if not isinstance(chain, list) or not chain or not all(isinstance(w, str) for w in chain):
                raise UsageError(f"config file: transformers.{name}.chain must be a list of transformer names")
            settings.transformer_chains[name] = chain
            continue
        command = spec.get("command") if isinstance(spec, dict) else None
        if isinstance(command, str):
            command = shlex.split(command)
        if not isinstance(command, list) or not command or not all(isinstance(w, str) for w in command):
            raise UsageError(f"config file: transformers.{name}.command must be a list of words")
        settings.named_transformers[name] = command
    for name, chain in settings.transformer_chains.items():
        missing = [step for step in chain if step not in settings.named_transformers]
        if missing:
            raise UsageError(f"config file: transformers.{name}.chain names no command: {missing[0]}")

    maildir = args.maildir or file_values.get("maildir") or DEFAULT_MAILDIR
    try:
        os.makedirs(maildir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create Maildir root {maildir}: {exc.strerror}") from None

    explicit: dict[str, str] = {}
    if args.maildir:
        explicit["maildir"] = args.maildir
    if args.transformer:
        explicit["transformer"] = args.transformer
    for flag, key in _FLAG_SETTINGS.items():
        if getattr(args, flag) is not None:
            explicit[key] = getattr(args, flag)

    # Defaults < config file < flags; persisted SET values are slotted in by the app.
    layered = {key: str(value) for key, value in file_values.items() if key in KEYS}
    layered["maildir"] = maildir
    layered.update(explicit)
    for key, text in layered.items():
        try:
            settings.apply(key, settings.parse(key, text), "config")
        except SettingError as exc:
            raise UsageError(f"invalid {key} {text!r}: {exc}") from None

    users = _users(args.user, file_values.get("users", []), args.users_file or file_values.get("users_file"))
    admins = _pairs(args.admin + list(file_values.get("admins", [])), "admin")

    state_dir = args.state_dir or file_values.get("state_dir")
    if args.no_state:
        state_dir = None
    elif state_dir is None:
        root = os.path.abspath(maildir)
        state_dir = os.path.join(os.path.dirname(root), os.path.basename(root) + ".state")

    metrics_port = args.metrics_port if args.metrics_port is not None else file_values.get("metrics_port")
    return Config(
        pop3_addresses=args.pop3_address or _as_list(file_values.get("pop3_address")),
        pop3_port=_pick(args.pop3_port, file_values.get("pop3_port"), DEFAULT_POP3_PORT),
        admin_addresses=args.admin_address or _as_list(file_values.get("admin_address")) or ["127.0.0.1", "::1"],
        admin_port=_pick(args.admin_port, file_values.get("admin_port"), DEFAULT_ADMIN_PORT),
        users=users,
        admins=admins,
        state_dir=state_dir,
        settings=settings,
        explicit=explicit,
        metrics_address=args.metrics_address or file_values.get("metrics_address", "127.0.0.1"),
        metrics_port=metrics_port,
        demo=args.demo,
    )


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _pick(flag: int | None, from_file: Any, default: int) -> int:
    if flag is not None:
        return flag
    if from_file is None:
        return default
    if not isinstance(from_file, int) or not 0 <= from_file <= 65535:
        raise UsageError(f"config file: invalid port {from_file!r}")
    return from_file


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    try:
        return [parse_user_flag(item) for item in items]
    except UserError as exc:
        raise UsageError(f"invalid {what}: {exc}") from None


def _users(flags: list[str], from_file: list[str], users_file: str | None) -> list[tuple[str, str]]:
    users = _pairs(flags + list(from_file), "user")
    if users_file:
        try:
            users.extend(parse_users_file(users_file))
        except OSError as exc:
            raise UsageError(f"cannot read users file {users_file}: {exc.strerror}") from None
        except UserError as exc:
            raise UsageError(str(exc)) from None
    return users


def main(argv: list[str] | None = None) -> int:
    """Entry point (after gevent monkey-patching, see __main__)."""
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"geventpop3: {exc}", file=sys.stderr)
        return 2
    from geventpop3.app import App

    return App(config).run()
