"""The `geventpop3` command line: flags -> `Config` (geventpop3.config) -> `App.run()`;
and `geventpop3 hash [NAME]`, which makes a hashed entry for `-u`, `-a` or a users file.

A bad flag or value prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import NoReturn

from geventpop3 import __version__
from geventpop3.config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_MAILDIR,
    DEFAULT_POP3_PORT,
    DEFAULT_POP3S_PORT,
    Config,
    UsageError,
    load_config,
    parse_port,
)
from geventpop3.users import hash_password, valid_password, valid_username

HASH_USAGE = "usage: geventpop3 hash [NAME]  (reads the password without echo, or one line from stdin)"


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
    add("--tls-cert", metavar="FILE", help="PEM certificate chain, leaf first: enables STLS and POP3S")
    add("--tls-key", metavar="FILE", help="PEM private key (default: the certificate file)")
    add("--pop3s-port", type=_port, metavar="PORT",
        help=f"implicit-TLS POP3 port on the POP3 addresses; 0: none (default {DEFAULT_POP3S_PORT} with a certificate)")
    add("--admin-tls", action="store_true",
        help="MSMP listeners speak implicit TLS with the --tls-cert certificate (geventpop3-admin --tls)")
    add("--run-as", metavar="USER",
        help="after binding every listener, drop root for good and run as USER (see docs/deploy.md)")
    add("--run-as-group", metavar="GROUP", help="with --run-as: the group to run as (default: USER's own)")
    add("--workers", metavar="N",
        help="POP3 worker processes behind the same ports, under one supervisor (default: the number of "
             "CPUs); 1: a single process")
    add("--demo", action="store_true", help="add user demo (password demo) with a welcome message if empty")
    return parser


def parse_config(argv: list[str]) -> Config:
    """Flags (and the config file they name) -> Config; UsageError on anything invalid."""
    return load_config(build_parser().parse_args(argv))


def hash_command(args: list[str]) -> int:
    """`geventpop3 hash [NAME]`: print `$scrypt$...` (or `NAME:$scrypt$...`) for a password
    read without echo from a terminal (asked twice), or as one line from a pipe."""
    if args in (["-h"], ["--help"]):
        print(HASH_USAGE)
        return 0
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(f"geventpop3 hash: {HASH_USAGE}", file=sys.stderr)
        return 2
    name = args[0] if args else None
    if name is not None and not valid_username(name):
        print(f"geventpop3 hash: unsafe user name {name!r}", file=sys.stderr)
        return 2
    try:
        if sys.stdin.isatty():
            password = getpass.getpass("Password: ")
            if getpass.getpass("Again: ") != password:
                print("geventpop3 hash: the passwords differ", file=sys.stderr)
                return 2
        else:
            password = sys.stdin.readline().rstrip("\r\n")
    except (EOFError, KeyboardInterrupt):
        print("geventpop3 hash: no password given", file=sys.stderr)
        return 2
    if not valid_password(password):
        print("geventpop3 hash: invalid password: 1 to 100 printable characters, no spaces", file=sys.stderr)
        return 2
    digest = hash_password(password)
    print(f"{name}:{digest}" if name is not None else digest)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (after gevent monkey-patching, see __main__)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash"]:
        return hash_command(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        config = load_config(args)
    except UsageError as exc:
        print(f"geventpop3: {exc}", file=sys.stderr)
        return 2
    if config.workers > 1:
        from geventpop3.cluster.supervisor import Supervisor

        return Supervisor(config, argv).run()
    from geventpop3.app import App

    return App(config).run()
