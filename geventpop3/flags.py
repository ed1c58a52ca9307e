"""The server's command line: flags (and the config file they name) -> `Config`.

Shared by the `geventpop3` command (geventpop3.cli) and the worker processes it starts
(geventpop3.process), which parse the supervisor's own command line again.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from geventpop3 import __version__
from geventpop3.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_MAILDIR,
    DEFAULT_POP3_PORT,
    DEFAULT_POP3S_PORT,
    SYSTEM_ADMIN_SOCKET,
    Config,
    UsageError,
    load_config,
    parse_port,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _port(text: str) -> int:
    try:
        return parse_port(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="geventpop3",
        description="A POP3 server on gevent serving Maildir mail, with the MSMP management protocol.",
        epilog="Settings precedence: defaults < --config < values SET over MSMP (persisted) < flags. "
               "`geventpop3 hash [-s SCHEME] [NAME]` makes a hashed entry (geventpop3 hash -h).",
    )
    add = parser.add_argument
    add("-v", "--version", action="version", version=f"geventpop3 {__version__}")
    add("-l", "--pop3-address", action="append", metavar="ADDR",
        help="POP3 listen address, IPv4/IPv6 or host name; repeatable (default: all interfaces, both families)")
    add("-p", "--pop3-port", type=_port, metavar="PORT", help=f"POP3 port (default {DEFAULT_POP3_PORT})")
    add("-L", "--admin-address", action="append", metavar="ADDR",
        help="MSMP over TCP on this address; repeatable (with -P alone: 127.0.0.1 and ::1)")
    add("-P", "--admin-port", type=_port, metavar="PORT",
        help=f"MSMP over TCP on this port (with -L alone: {DEFAULT_ADMIN_PORT}; default: no TCP, the socket only)")
    add("--admin-socket", metavar="PATH",
        help=f"MSMP's UNIX socket, mode 0600 (default {SYSTEM_ADMIN_SOCKET} as root, else "
             "$XDG_RUNTIME_DIR/geventpop3/msmp.sock or /tmp/geventpop3-UID/msmp.sock); none: TCP only")
    add("--admin-group", metavar="GROUP",
        help="the admin socket is mode 0660 with this group, for admins who are not the server's user")
    add("-u", "--user", action="append", default=[], metavar="NAME:PASS", help="a POP3 user; repeatable")
    add("-a", "--admin", action="append", default=[], metavar="NAME:PASS", help="an MSMP admin; repeatable")
    add("-t", "--transformer", metavar="CMD", help="filter for retrieved mail, a command line (no shell)")
    add("-d", "--maildir", metavar="DIR", help=f"Maildir root (default {DEFAULT_MAILDIR}; created if missing)")
    add("--users-file", metavar="FILE",
        help="name:password, name:$scrypt$... or Dovecot passwd-file lines (name:{SCHEME}hash:...); "
             "re-read at SIGHUP and MSMP RELOAD")
    add("--allow-weak-schemes", action="store_true",
        help="accept weak password schemes (MD5-CRYPT, PLAIN-MD5, SMD5, DES-CRYPT, ...) in users and admins")
    add("--state-dir", metavar="DIR", help="persistent state (SQLite) directory (default: beside the Maildir root)")
    add("--state-url", metavar="URL",
        help="postgresql://... : users, settings, counters, access logs and mailbox leases in PostgreSQL, "
             "shared by several instances (default: SQLite in --state-dir)")
    add("--config", metavar="FILE", help="TOML config file")
    add("--no-state", action="store_true",
        help="keep no persistent state: users from flags and files only, counters and access logs in memory")
    add("--max-connections", metavar="N", help="POP3 connection limit (default 10000)")
    add("--idle-timeout", metavar="SECONDS", help="close idle POP3 sessions after this (default 600)")
    add("--login-failure-delay", metavar="SECONDS", help="delay before a failed login is answered (default 2)")
    add("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    add("--uidl-format", metavar="FORMAT",
        help="UIDLs: %%f (the Maildir base name, the default) or %%08Xu%%08Xv (Dovecot's default, "
             "from dovecot-uidlist); see docs/migrating.md")
    add("--metrics-address", metavar="ADDR", help="Prometheus endpoint address (default 127.0.0.1)")
    add("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus metrics on this port (default: off)")
    add("--tls-cert", metavar="FILE", help="PEM certificate chain, leaf first: enables STLS and POP3S")
    add("--tls-key", metavar="FILE", help="PEM private key (default: the certificate file)")
    add("--pop3s-port", type=_port, metavar="PORT",
        help=f"implicit-TLS POP3 port on the POP3 addresses; 0: none (default {DEFAULT_POP3S_PORT} with a certificate)")
    add("--admin-tls", action="store_true",
        help="MSMP listeners speak implicit TLS with the --tls-cert certificate (geventpop3-admin --tls)")
    add("--run-as", metavar="USER",
        help="after binding every listener, drop root for good and run as USER (see docs/deploy.md)")
    add("--run-as-group", metavar="GROUP", help="with --run-as: the group to run as (default: USER's own)")
    add("--filter-user", metavar="USER",
        help="filters run as USER while the server starts as root; never root nor the --run-as user "
             "(default: geventpop3-filter if it exists, else nobody; see docs/filters.md)")
    add("--workers", metavar="N",
        help="POP3 worker processes behind the same ports, under one supervisor (default: the number of "
             "CPUs); 1: a single process")
    add("--demo", action="store_true", help="add user demo (password demo) with a welcome message if empty")
    add("--ready-file", metavar="FILE",
        help="once serving, write the bound addresses and ports here as JSON (for port 0 and test harnesses)")
    return parser


def parse_config(argv: list[str], config_data: bytes | None = None) -> Config:
    """Flags (and the config file they name, or its content `config_data`) -> Config; UsageError on anything invalid."""
    return load_config(build_parser().parse_args(argv), config_data)
