"""The start-up configuration: flags and the TOML file, layered and validated once.

Precedence, lowest first: built-in defaults, the `--config` file, values changed over
MSMP `SET` and persisted in the state store (applied by the app once the store is
open), then flags given on the command line. A flag is the operator's explicit word
for this start; a persisted SET is the operator's latest word otherwise.

Every value is checked here, in one place: ports, listen addresses, filter commands
and chains, settings (through `Settings.parse`), users, admins, the `--run-as`
identity, and the TLS certificate and key (loaded into the context the server will
use, while still root; reloads read them again on the privileged side, the keeper,
geventpop3.process.keeper). Nothing else here touches the disk beyond reading the config
file: the users file is read by start-up (auth.source.UsersSource) after privileges are dropped, as
the user that will serve, so a file that user cannot read stops the start there;
creating the Maildir root and the state directory is start-up's job too.
"""

from __future__ import annotations

import argparse
import grp
import os
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from geventpop3.auth.schemes import SchemeError, parse
from geventpop3.auth.users import is_plain, parse_user_flag
from geventpop3.core.names import UserError
from geventpop3.core.settings import KEYS, SettingError, Settings
from geventpop3.net.tls import ServerTls, TlsError, key_permission_warning
from geventpop3.service.privileges import Identity, PrivilegeError, filter_user, resolve
from geventpop3.service.setting_checks import checked_settings

DEFAULT_POP3_PORT = 110
DEFAULT_POP3S_PORT = 995
DEFAULT_ADMIN_PORT = 4321  # MSMP over TCP, when asked for (-P, -L, admin_port, admin_address)
# MSMP's UNIX socket when started as root; other users get one in their runtime directory.
SYSTEM_ADMIN_SOCKET = "/run/geventpop3/msmp.sock"
MAX_SOCKET_PATH = 107  # octets: sockaddr_un's sun_path, its final NUL left out
DEFAULT_MAILDIR = "./mail"
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
MAX_WORKERS = 256

# Flags that set a live setting of the same name (`--idle-timeout` -> idle_timeout).
FLAG_SETTINGS = ("max_connections", "idle_timeout", "login_failure_delay", "log_level", "uidl_format")

# Keys of the config file that are not live settings, with their TOML types.
FILE_ONLY_KEYS: dict[str, type | tuple[type, ...]] = {
    "pop3_address": (str, list), "admin_address": (str, list), "pop3_port": int, "admin_port": int,
    "metrics_port": int, "users": list, "admins": list, "users_file": str, "state_dir": str,
    "metrics_address": str, "transformers": dict, "tls_cert": str, "tls_key": str, "pop3s_port": int,
    "run_as": str, "run_as_group": str, "admin_tls": bool, "allow_weak_schemes": bool, "state_url": str,
    "instance_name": str, "workers": int, "filter_user": str, "admin_socket": str, "admin_group": str,
}
# Live settings the file gives as TOML values; they are checked by Settings.parse, only these by type here.
_SETTING_TYPES: dict[str, type | tuple[type, ...]] = {
    "maildir": str, "trusted_networks": (str, list), "proxy_networks": (str, list), "transformer_programs": (str, list),
}
# TOML lists, given to the parser comma-separated
_LIST_SETTINGS = ("trusted_networks", "proxy_networks", "transformer_programs")


class UsageError(Exception):
    """One line for the operator; the process exits 2."""


@dataclass
class Config:
    """Everything the app needs to start, resolved from flags and the config file."""

    pop3_addresses: list[str] | None  # None: all interfaces, both families
    pop3_port: int
    admin_addresses: list[str] | None  # None: the loopback addresses (listen.LOOPBACK)
    admin_port: int | None  # None: no MSMP over TCP (neither a port nor an address configured)
    maildir: str  # absolute; created at start-up if missing
    users: list[tuple[str, str]]  # from flags and the config file; the users file is read at start-up
    admins: list[tuple[str, str]]
    state_dir: str | None  # None: no persistent state (--no-state)
    settings: Settings
    explicit: dict[str, str] = field(default_factory=dict)  # setting -> value given as a flag
    metrics_address: str = DEFAULT_METRICS_ADDRESS
    metrics_port: int | None = None
    demo: bool = False
    tls: ServerTls | None = None  # the certificate, key and context; None: no TLS
    pop3s_port: int = 0  # implicit-TLS POP3; 0: none
    warnings: list[str] = field(default_factory=list)  # logged once logging is set up
    users_file: str | None = None
    run_as: Identity | None = None  # drop to this user once every listener is bound
    filter_user: Identity | None = None  # filters run as this user while the server starts as root
    filter_problem: str | None = None  # why no filter may run under a root start (no filter_user)
    admin_tls: bool = False  # MSMP listeners speak implicit TLS with `tls`'s certificate
    state_url: str | None = None  # a PostgreSQL store shared by several instances; None: SQLite in state_dir
    instance_name: str | None = None  # this instance in a shared store (None: <host>-<POP3 port>)
    allow_weak_schemes: bool = False  # users and admins may have PLAIN-MD5, NTLM, ... entries
    ready_file: str | None = None  # where to write the bound endpoints once serving (--ready-file)
    workers: int = 1  # POP3 worker processes; 1: one process, no supervisor (geventpop3.process)
    config_data: bytes | None = None  # the config file as read: workers parse this, never the file again
    admin_socket: str | None = None  # MSMP's UNIX socket (absolute); None: none (TCP only)
    admin_group: int | None = None  # the socket is 0660 with this group; None: 0600


def parse_port(value: object) -> int:
    """A TCP port from a flag (text) or the config file (an integer); UsageError otherwise."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise UsageError(f"invalid port: {value!r}")
    return value


def load_config(args: argparse.Namespace, config_data: bytes | None = None, checked: bool = True) -> Config:
    """The Config for parsed flags `args` (see flags.build_parser): each step validates its part.
    `config_data`: the config file's content as the supervisor read it (a worker's start).
    `checked`: settings values are checked against this machine (setting_checks); a worker
    takes what its supervisor checked, with the parsers alone (no disk, no PATH look-up)."""
    if args.config and config_data is None:
        config_data = read_config_bytes(args.config)
    file_values = read_config_file(args.config, config_data) if config_data is not None else {}
    settings = checked_settings() if checked else Settings()
    settings.named_filters, settings.filter_chains = filters_from_file(file_values.get("transformers", {}))
    maildir = os.path.abspath(args.maildir or file_values.get("maildir") or DEFAULT_MAILDIR)
    explicit = explicit_settings(args)
    apply_settings(settings, file_values, explicit)
    server_tls, pop3s_port, warnings = tls_config(args, file_values, settings)
    admin_tls = bool(args.admin_tls or file_values.get("admin_tls", False))
    shared = shared_store_for(args, file_values)
    if admin_tls and server_tls is None:
        raise UsageError("--admin-tls needs a certificate (--tls-cert)")
    run_as = run_as_for(args, file_values)
    filter_identity, filter_problem = filter_user_for(args, file_values, run_as, settings)
    allow_weak = bool(args.allow_weak_schemes or file_values.get("allow_weak_schemes", False))
    admin_addresses = args.admin_address or _as_list(file_values.get("admin_address"))
    admin_port = _optional_port(args.admin_port, file_values.get("admin_port"))
    if admin_port is None and admin_addresses:
        admin_port = DEFAULT_ADMIN_PORT
    admin_socket, admin_group = admin_socket_for(args, file_values, admin_port is not None)
    return Config(
        pop3_addresses=args.pop3_address or _as_list(file_values.get("pop3_address")),
        pop3_port=_first_port(args.pop3_port, file_values.get("pop3_port"), DEFAULT_POP3_PORT),
        admin_addresses=admin_addresses,
        admin_port=admin_port,
        maildir=maildir,
        users=_pairs(args.user + list(file_values.get("users", [])), "user", allow_weak),
        admins=_pairs(args.admin + list(file_values.get("admins", [])), "admin", allow_weak),
        state_dir=state_dir_for(args, file_values, maildir),
        settings=settings,
        explicit=explicit,
        metrics_address=args.metrics_address or file_values.get("metrics_address", DEFAULT_METRICS_ADDRESS),
        metrics_port=_optional_port(args.metrics_port, file_values.get("metrics_port")),
        demo=args.demo,
        tls=server_tls,
        pop3s_port=pop3s_port,
        warnings=warnings + plain_password_warnings(args),
        users_file=args.users_file or file_values.get("users_file"),
        run_as=run_as,
        filter_user=filter_identity,
        filter_problem=filter_problem,
        admin_tls=admin_tls,
        allow_weak_schemes=allow_weak,
        ready_file=ready_file_for(args),
        **shared,
        workers=workers_for(args.workers, file_values.get("workers")),
        config_data=config_data,
        admin_socket=admin_socket,
        admin_group=admin_group,
    )


def default_admin_socket(euid: int, environ: Mapping[str, str]) -> str:
    """Where MSMP's UNIX socket is when none is given: SYSTEM_ADMIN_SOCKET for root, else
    geventpop3/msmp.sock in $XDG_RUNTIME_DIR, else /tmp/geventpop3-<uid>/msmp.sock.
    (admin.client.default_socket finds it the same way.)"""
    if euid == 0:
        return SYSTEM_ADMIN_SOCKET
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        return os.path.join(runtime, "geventpop3", "msmp.sock")
    return f"/tmp/geventpop3-{euid}/msmp.sock"


def admin_socket_for(args: argparse.Namespace, file_values: dict[str, Any], tcp: bool) -> tuple[str | None, int | None]:
    """MSMP's UNIX socket path (None: `none`, TCP only) and its group's id (`admin_group`),
    checked: an absolute path short enough for a socket address, a group that exists."""
    given: str | None = args.admin_socket if args.admin_socket is not None else file_values.get("admin_socket")
    group: str | None = args.admin_group or file_values.get("admin_group")
    if given == "none":
        if not tcp:
            raise UsageError("admin_socket none needs MSMP over TCP (-P/--admin-port or -L/--admin-address): "
                             "MSMP would be unreachable")
        if group is not None:
            raise UsageError("admin_group needs the admin socket (admin_socket is none)")
        return None, None
    if given == "":
        raise UsageError("invalid admin_socket '': a path, or none")
    path = os.path.abspath(given) if given else default_admin_socket(os.geteuid(), os.environ)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"invalid admin_socket {path!r}: longer than {MAX_SOCKET_PATH} octets, "
                         "too long for a UNIX socket")
    if group is None:
        return path, None
    try:
        gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise UsageError(f"unknown group {group!r} for admin_group") from None
    return path, gid


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers_for(flag: str | None, from_file: object) -> int:
    """`--workers` (text) or the file's `workers` (an integer): 1 to MAX_WORKERS; default: the CPUs."""
    value: object = flag if flag is not None else from_file
    if value is None:
        return default_workers()
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise UsageError(f"invalid workers {value!r}: a number of processes from 1 to {MAX_WORKERS}")
    return value


def tls_config(args: argparse.Namespace, file_values: dict[str, Any],
               settings: Settings) -> tuple[ServerTls | None, int, list[str]]:
    """The certificate and key loaded (a usable pair, or UsageError), the POP3S port, and warnings.

    Without a certificate plaintext logins stay allowed everywhere (`plaintext_auth`
    defaults to `always`); with one it becomes `tls` unless the file says otherwise.
    """
    cert: str | None = args.tls_cert or file_values.get("tls_cert")
    key: str | None = args.tls_key or file_values.get("tls_key")
    port = _optional_port(args.pop3s_port, file_values.get("pop3s_port"))
    if not cert:
        if port:
            raise UsageError("--pop3s-port needs a certificate (--tls-cert)")
        if key:
            raise UsageError("--tls-key needs a certificate (--tls-cert)")
        return None, 0, []
    if "plaintext_auth" not in file_values:  # with a certificate, passwords only over secure connections
        settings.apply("plaintext_auth", "tls", "config")
    cert, key = os.path.abspath(cert), os.path.abspath(key or cert)
    try:
        server_tls = ServerTls(cert, key, settings.tls_min_version)
    except TlsError as exc:
        raise UsageError(str(exc)) from None
    warning = key_permission_warning(key)
    return server_tls, DEFAULT_POP3S_PORT if port is None else port, [warning] if warning else []


def read_config_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None


def read_config_file(path: str, data: bytes) -> dict[str, Any]:
    """The TOML file's content `data`, with its keys known and its non-setting values of the right type."""
    try:
        values = tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path}: not UTF-8 text") from None
    unknown = set(values) - set(KEYS) - set(FILE_ONLY_KEYS)
    if unknown:
        raise UsageError(f"config file: unknown key {sorted(unknown)[0]!r}")
    for key, kinds in (FILE_ONLY_KEYS | _SETTING_TYPES).items():
        value = values.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and kinds is not bool) or not isinstance(value, kinds) or (
                isinstance(value, list) and not all(isinstance(item, str) for item in value)):
            raise UsageError(f"config file: {key} has the wrong type")
        if key.endswith("_address") and not value:
            raise UsageError(f"config file: {key} is empty")
        if key.endswith("_port"):
            parse_port(value)
    return values


def filters_from_file(table: dict[str, Any]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Named filter commands and chains of `[transformers]`: (name -> argv, name -> step names).

    The one place they are checked: every command is a non-empty list of words (a
    string is split like a shell would, without running one) and every chain step
    names a command, so nothing later needs to check again.
    """
    commands: dict[str, list[str]] = {}
    chains: dict[str, list[str]] = {}
    for name, spec in table.items():
        chain = spec.get("chain") if isinstance(spec, dict) else None
        if chain is not None:
            if not isinstance(chain, list) or not chain or not all(isinstance(w, str) for w in chain):
                raise UsageError(f"config file: transformers.{name}.chain must be a list of transformer names")
            chains[name] = chain
            continue
        command = spec.get("command") if isinstance(spec, dict) else None
        if isinstance(command, str):
            try:
                command = shlex.split(command)
            except ValueError as exc:
                raise UsageError(f"config file: transformers.{name}.command: {exc}") from None
        if not isinstance(command, list) or not command or not all(isinstance(w, str) for w in command):
            raise UsageError(f"config file: transformers.{name}.command must be a list of words")
        commands[name] = command
    for name, chain in chains.items():
        missing = [step for step in chain if step not in commands]
        if missing:
            raise UsageError(f"config file: transformers.{name}.chain names no command: {missing[0]}")
    return commands, chains


def explicit_settings(args: argparse.Namespace) -> dict[str, str]:
    """Settings given as flags: they win over the file and over persisted SET values."""
    explicit: dict[str, str] = {}
    if args.maildir:
        explicit["maildir"] = os.path.abspath(args.maildir)
    if args.transformer:
        explicit["transformer"] = args.transformer
    for key in FLAG_SETTINGS:
        if getattr(args, key) is not None:
            explicit[key] = getattr(args, key)
    return explicit


def apply_settings(settings: Settings, file_values: dict[str, Any], explicit: dict[str, str]) -> None:
    """Defaults < config file < flags, each value through the parser MSMP SET uses.

    `maildir` is left to start-up: its parser wants an existing directory, and
    creating it is not the parser's business.
    """
    layered = {key: ",".join(value) if key in _LIST_SETTINGS and isinstance(value, list) else str(value)
               for key, value in file_values.items() if key in KEYS and key != "maildir"}
    layered.update((key, value) for key, value in explicit.items() if key != "maildir")
    for key, text in layered.items():
        try:
            settings.apply(key, settings.parse(key, text), "config")
        except SettingError as exc:
            raise UsageError(f"invalid {key} {text!r}: {exc}") from None


def run_as_for(args: argparse.Namespace, file_values: dict[str, Any]) -> Identity | None:
    """The user (and group) `--run-as`/`run_as` name, looked up now: an unknown one is a usage error."""
    try:
        return resolve(args.run_as or file_values.get("run_as"), args.run_as_group or file_values.get("run_as_group"))
    except PrivilegeError as exc:
        raise UsageError(str(exc)) from None


def filter_user_for(args: argparse.Namespace, file_values: dict[str, Any], run_as: Identity | None,
                    settings: Settings) -> tuple[Identity | None, str | None]:
    """The user `--filter-user`/`filter_user` names (an unknown one, root or the --run-as user:
    a usage error), or the default one (geventpop3.service.privileges.filter_user).

    Started as root with a filter configured, a default that cannot be used stops the start
    too: every login would fail its filtering. Without a filter it is only logged (a later
    `SET transformer` fails each run with the reason)."""
    try:
        identity, problem = filter_user(args.filter_user or file_values.get("filter_user"), run_as)
    except PrivilegeError as exc:
        raise UsageError(str(exc)) from None
    if problem is not None and os.geteuid() == 0 and settings.transformer != "none":
        raise UsageError(problem)
    return identity, problem


def state_dir_for(args: argparse.Namespace, file_values: dict[str, Any], maildir: str) -> str | None:
    """Where state lives: as given, none with --no-state, else `<maildir>.state` beside the root."""
    if args.no_state:
        return None
    given: str | None = args.state_dir or file_values.get("state_dir")
    if given:
        return os.path.abspath(given)
    return os.path.join(os.path.dirname(maildir), os.path.basename(maildir) + ".state")


def shared_store_for(args: argparse.Namespace, file_values: dict[str, Any]) -> dict[str, Any]:
    """`--state-url`/`state_url` (a PostgreSQL URL psycopg can parse, psycopg installed)
    and `instance_name`, checked here; whether the database answers is start-up's question."""
    url = args.state_url or file_values.get("state_url")
    name = file_values.get("instance_name")
    if url is None:
        if name is not None:
            raise UsageError("instance_name needs a shared store (state_url)")
        return {}
    if args.no_state:
        raise UsageError("--state-url and --no-state exclude each other")
    from geventpop3.state.postgres import INSTANCE_NAME, check_url

    try:
        check_url(url)
    except ValueError as exc:
        raise UsageError(f"invalid state_url: {exc}") from None
    if name is not None and not INSTANCE_NAME.match(name):
        raise UsageError(f"invalid instance_name {name!r}: 1 to 63 letters, digits, '.', '_', '-'")
    return {"state_url": url, "instance_name": name}


def ready_file_for(args: argparse.Namespace) -> str | None:
    """The --ready-file path, absolute, in a directory that exists (checked now: a typo is a usage error)."""
    if not args.ready_file:
        return None
    path: str = os.path.abspath(args.ready_file)
    if not os.path.isdir(os.path.dirname(path)):
        raise UsageError(f"--ready-file: no directory {os.path.dirname(path)}")
    return path


def _as_list(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _first_port(flag: int | None, from_file: object, default: int) -> int:
    port = _optional_port(flag, from_file)
    return default if port is None else port


def _optional_port(flag: int | None, from_file: object) -> int | None:
    if flag is not None:
        return flag
    return None if from_file is None else parse_port(from_file)


def _pairs(items: list[str], what: str, allow_weak: bool) -> list[tuple[str, str]]:
    """NAME:PASS entries of flags or the config file, their password schemes checked now."""
    pairs = []
    for item in items:
        try:
            name, secret = parse_user_flag(item)
        except UserError as exc:
            raise UsageError(f"invalid {what}: {exc}") from None
        try:
            parse(secret, b"", allow_weak)
        except SchemeError as exc:
            raise UsageError(f"invalid {what} {name}: {exc}") from None
        pairs.append((name, secret))
    return pairs


def plain_password_warnings(args: argparse.Namespace) -> list[str]:
    """One line per flag (`-u`, `-a`) given with a plain password: the command line is
    visible to every local user (ps, /proc) and kept in shell histories. Logged once the
    server is ready, so a start-up error stays one line."""
    warnings = []
    for flag, what, entries in (("-u", "user", args.user), ("-a", "admin", args.admin)):
        names = [name for name, _, secret in (entry.partition(":") for entry in entries)
                 if is_plain(secret)]
        if names:
            warnings.append(f"plain password on the command line for {what} "
                            f"{', '.join(names)} (visible in ps); give {flag} NAME:$scrypt$... "
                            "from `geventpop3 hash`, or a users file")
    return warnings
