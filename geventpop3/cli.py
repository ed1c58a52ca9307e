"""The `geventpop3` command line: flags -> `Config` (geventpop3.config) -> `Server(config, role).run()`;
and `geventpop3 hash [-s SCHEME] [NAME]`, which makes a hashed entry for `-u`, `-a` or a users file.

A bad flag or value prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import getpass
import sys

from geventpop3.auth.schemes import HASH_SCHEMES, SchemeError, hash_entry
from geventpop3.config import UsageError, load_config
from geventpop3.core.names import valid_password, valid_username
from geventpop3.flags import build_parser

HASH_USAGE = "usage: geventpop3 hash [-s SCHEME] [NAME]  (reads the password without echo, or one line from stdin)"
HASH_HELP = f"""{HASH_USAGE}

Prints an entry for a users file, `-u` or `-a`: NAME:HASH with a NAME, else HASH alone.
  -s, --scheme SCHEME  SCRYPT (default: geventpop3's $scrypt$), or a Dovecot scheme printed as
                       `doveadm pw -s SCHEME` would ({{SCHEME}}...): {", ".join(HASH_SCHEMES[1:])}"""


def _hash_args(args: list[str]) -> tuple[str, str | None]:
    """(scheme, name) of `hash [-s SCHEME] [NAME]`; UsageError (one line) otherwise."""
    scheme, rest = "SCRYPT", list(args)
    words: list[str] = []
    while rest:
        word = rest.pop(0)
        if word in ("-s", "--scheme"):
            if not rest:
                raise UsageError(f"{word} needs a scheme")
            scheme = rest.pop(0)
        elif word.startswith("--scheme="):
            scheme = word.partition("=")[2]
        elif word.startswith("-s") and len(word) > 2:
            scheme = word[2:]
        elif word.startswith("-"):
            raise UsageError(HASH_USAGE)
        else:
            words.append(word)
    if len(words) > 1:
        raise UsageError(HASH_USAGE)
    if scheme.upper() not in HASH_SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r}: one of {', '.join(HASH_SCHEMES)}")
    name = words[0] if words else None
    if name is not None and not valid_username(name):
        raise UsageError(f"unsafe user name {name!r}")
    return scheme, name


def _read_password() -> str:
    """The password without echo from a terminal (asked twice), else one line of stdin."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the passwords differ")
        return password
    return sys.stdin.readline().rstrip("\r\n")


def hash_command(args: list[str]) -> int:
    """`geventpop3 hash [-s SCHEME] [NAME]`: print `$scrypt$...` (or `{SCHEME}...`, as `doveadm pw`
    does), prefixed by `NAME:` if given, for a password read without echo from a terminal (asked
    twice), or as one line from a pipe."""
    if args in (["-h"], ["--help"]):
        print(HASH_HELP)
        return 0
    try:
        scheme, name = _hash_args(args)
        try:
            password = _read_password()
        except (EOFError, KeyboardInterrupt):
            raise UsageError("no password given") from None
        if not valid_password(password):
            raise UsageError("invalid password: 1 to 100 printable characters, no spaces")
        digest = hash_entry(password, scheme)
    except (UsageError, SchemeError) as exc:
        print(f"geventpop3 hash: {exc}", file=sys.stderr)
        return 2
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
    from geventpop3.process.server import Server

    if config.workers > 1:
        from geventpop3.process.supervisor import Supervisor

        return Server(config, Supervisor(argv)).run()
    from geventpop3.process.roles import Single

    return Server(config, Single()).run()
