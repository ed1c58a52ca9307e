"""`geventpop3-admin`: the interactive MSMP shell, the one-shot mode for scripts, the live view.

Exit status: 0 on +OK (and on Ctrl-C in the live view), 1 on -ERR or a refused login,
2 on a usage error or when the server cannot be reached (commands piped into the shell:
1 if any of them got -ERR). Errors are one line on stderr,
never a traceback. The password never appears on the command line: it comes from
--password-file, $GEVENTPOP3_ADMIN_PASSWORD, or a prompt without echo.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import ssl
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

from admin.client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    SYSTEM_SOCKET,
    MsmpAuthError,
    MsmpClient,
    MsmpConnectionError,
    MsmpError,
    Response,
    parse_stat,
    parse_user_line,
    tls_context,
)

PROG = "geventpop3-admin"
ENV_PASSWORD = "GEVENTPOP3_ADMIN_PASSWORD"
ENV_HISTORY = "GEVENTPOP3_ADMIN_HISTORY"
DEFAULT_HISTORY = "~/.geventpop3_admin_history"
PROMPT = "msmp> "

COMMANDS = ("ADD", "CAPA", "DELE", "GET", "HELP", "LIST", "LOGS", "PENALTY", "QUIT", "RELOAD", "SET", "STAT",
            "WATCH")
USER_COMMANDS = frozenset({"ADD", "DELE", "LIST", "LOGS"})
KEY_COMMANDS = frozenset({"GET", "SET"})
LOCAL_HELP = ("WATCH  live view of STAT, refreshed every second (Ctrl-C returns to the prompt)",)

EXIT_OK, EXIT_ERR, EXIT_FAIL, EXIT_INTERRUPTED = 0, 1, 2, 130

# Terminal control for the live view: home + clear screen, hide/show the cursor.
CLEAR, HIDE_CURSOR, SHOW_CURSOR = "\x1b[H\x1b[2J", "\x1b[?25l", "\x1b[?25h"


class UsageError(Exception):
    """A bad flag, file or argument: one line on stderr, exit status 2."""


# -- command line -------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_FAIL, f"{self.prog}: {message} (see {self.prog} -h)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {port}")
    return port


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 3600: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    try:
        from geventpop3 import __version__ as version
    except ImportError:  # the admin package installed without the server
        version = "unknown"
    parser = _Parser(
        prog=PROG,
        description="Administer a running geventpop3 server over MSMP: an interactive shell, "
        "or one command given after the flags (e.g. `%(prog)s STAT`, `%(prog)s SET maildir /srv/mail`).",
        epilog=f"The password is read from --password-file, else ${ENV_PASSWORD}, else prompted. "
        f"History: ${ENV_HISTORY} or {DEFAULT_HISTORY}. "
        "Exit status: 0 +OK, 1 -ERR or login refused, 2 usage or connection error.",
    )
    parser.add_argument("-s", "--socket", metavar="PATH",
                        help=f"the server's MSMP socket (default: {SYSTEM_SOCKET} as root, else your own "
                        "server's in $XDG_RUNTIME_DIR/geventpop3 or /tmp/geventpop3-UID, else the system's)")
    parser.add_argument("-L", "--address", dest="host", metavar="ADDR",
                        help=f"MSMP over TCP: the server's address (default {DEFAULT_HOST} with -P; IPv6 works: ::1)")
    parser.add_argument("-P", "--port", type=_port, metavar="PORT",
                        help=f"MSMP over TCP: the server's port (default {DEFAULT_PORT} with -L)")
    parser.add_argument("--tls", action="store_true",
                        help="implicit TLS (a server started with --admin-tls), verifying its certificate "
                        "and that it is for the address given")
    parser.add_argument("--cacert", metavar="FILE",
                        help="with --tls: trust only the CA certificates in FILE (PEM), not the system's")
    parser.add_argument("-u", "--user", default="admin", metavar="NAME", help="admin name (default %(default)s)")
    parser.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", "--live", dest="watch", action="store_true",
                        help="live view: STAT refreshed every second until Ctrl-C")
    parser.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS",
                        help="live view refresh interval (default %(default)s)")
    parser.add_argument("--timeout", type=_positive, default=10.0, metavar="SECONDS",
                        help="network timeout (default %(default)s)")
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument("command", nargs="*", metavar="COMMAND",
                        help="one MSMP command to send (one-shot mode); none starts the shell")
    return parser


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context --tls and --cacert ask for; UsageError for a CA file that cannot be used."""
    if args.cacert and not args.tls:
        raise UsageError("--cacert needs --tls")
    if args.socket is not None and (args.host is not None or args.port is not None):
        raise UsageError("-s/--socket or -L/-P (TCP), not both")
    if args.tls and args.host is None and args.port is None:
        raise UsageError("--tls is for MSMP over TCP: give -L and/or -P")
    if not args.tls:
        return None
    try:
        return tls_context(args.cacert)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise UsageError(f"cannot use CA file {args.cacert}: {why}") from None


def read_password(args: argparse.Namespace, where: str) -> str:
    """--password-file wins (explicit), then the environment, then a prompt without echo."""
    if args.password_file:
        try:
            with open(args.password_file, encoding="utf-8") as handle:
                password = handle.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise UsageError(f"cannot read password file {args.password_file}: {why}") from None
        if not password:
            raise UsageError(f"password file {args.password_file} is empty")
        return password
    from_env = os.environ.get(ENV_PASSWORD)
    if from_env:
        return from_env
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", getpass.GetPassWarning)
        try:
            password = getpass.getpass(f"Password for {args.user}@{where}: ")
        except EOFError:
            password = ""
    if not password:
        raise UsageError(f"no password given (use a terminal, ${ENV_PASSWORD} or --password-file)")
    return password


# -- output -------------------------------------------------------------------------------


def table(rows: list[tuple[str, str]], indent: str = "") -> str:
    """Two aligned columns, the first padded to its widest cell."""
    if not rows:
        return ""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{indent}{name.ljust(width)}  {value}".rstrip() for name, value in rows)


def render(command_line: str, response: Response, as_json: bool, interactive: bool = False) -> str:
    """The text to print for one response: a readable table, or JSON."""
    words = command_line.split()
    keyword = words[0].upper() if words else ""
    if not response.ok:
        if as_json:
            return json.dumps({"ok": False, "message": response.text})
        return f"error: {response.text or 'failed'}"
    if keyword == "STAT":
        stats = parse_stat(response.lines)
        return json.dumps(stats) if as_json else table(list(stats.items()))
    if keyword == "LIST" and len(words) == 1:
        names = [line.strip() for line in response.lines if line.strip()]
        if as_json:
            return json.dumps(names)
        return "\n".join(names) if names or not interactive else "(no users)"
    if keyword == "LIST":
        infos = [dict(parse_user_line(line), line=line) for line in response.lines if line.strip()]
        if as_json:
            return json.dumps(infos[0] if len(infos) == 1 else infos)
        return "\n\n".join(table([(k, v) for k, v in info.items() if k != "line"]) for info in infos)
    if keyword in ("LOGS", "HELP", "CAPA") or (keyword == "PENALTY" and not response.text):
        lines = list(response.lines)
        if keyword == "HELP" and interactive:
            lines += LOCAL_HELP
        if as_json:
            return json.dumps(lines)
        if not lines and interactive:
            return {"LOGS": "(no log entries)", "PENALTY": "(no penalised sources)"}.get(keyword, "")
        return "\n".join(lines)
    if as_json:
        return json.dumps({"ok": True, "message": response.text})
    return response.text or ("OK" if interactive else "")


# STAT lines that are not counters (gauges, clocks): a rate of change means nothing for them.
_NO_RATE = ("current", "maximum", "uptime", "seconds", "days")


def _rate(name: str, old: str | None, new: str, elapsed: float) -> str:
    if any(word in name.lower() for word in _NO_RATE):
        return ""
    try:
        delta = float(new) - float(old) if old is not None else 0.0
    except ValueError:
        return ""
    return f"{delta / elapsed:+.1f}/s" if delta and elapsed > 0 else ""


CERTIFICATE_DAYS = "Certificate expires in days"
RENEW_DAYS = 14  # the live view flags a certificate this close to its end


def _note(name: str, old: str | None, new: str, elapsed: float) -> str:
    """What the live view shows beside a value: its rate, or a word on a certificate near its end."""
    if name == CERTIFICATE_DAYS and new.lstrip("-").isdigit() and int(new) < RENEW_DAYS:
        return "EXPIRED" if int(new) < 0 else "renew soon"
    return _rate(name, old, new, elapsed)


def live_view(client: MsmpClient, out: TextIO, interval: float = 1.0, as_json: bool = False,
              where: str = "", limit: int | None = None) -> None:
    """STAT every `interval` seconds, redrawn in place on a terminal, until Ctrl-C (or `limit` frames).

    Off a terminal each frame is appended (a table and a blank line, or one JSON object per
    line), which suits logging to a file. Counters also show their rate of change.
    """
    redraw = out.isatty() and not as_json
    previous: dict[str, str] = {}
    previous_time = time.monotonic()
    next_frame = previous_time
    frame = 0
    if redraw:
        out.write(HIDE_CURSOR)
    try:
        while limit is None or frame < limit:
            stats = client.stat()
            now = time.monotonic()
            frame += 1
            if as_json:
                out.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stat": stats}) + "\n")
            else:
                elapsed = now - previous_time
                rows = [(f"{name}:", f"{value:<12} {_note(name, previous.get(name), value, elapsed)}")
                        for name, value in stats.items()]
                header = f"geventpop3 {where}  {time.strftime('%H:%M:%S')}  refresh {frame}  (Ctrl-C to stop)"
                out.write((CLEAR if redraw else "") + header + "\n\n" + table(rows) + "\n" + ("" if redraw else "\n"))
            out.flush()
            previous, previous_time = stats, now
            next_frame += interval
            delay = next_frame - time.monotonic()
            if delay < 0:  # fell behind (slow server): keep the pace, do not burst
                next_frame, delay = time.monotonic(), 0.0
            if limit is None or frame < limit:
                time.sleep(delay)
    finally:
        if redraw:
            out.write(SHOW_CURSOR)
            out.flush()


# -- connection ---------------------------------------------------------------------------


class Connection:
    """A logged-in client plus what it takes to log in again after the server dropped us."""

    def __init__(self, host: str | None, port: int | None, timeout: float, user: str,
                 ssl_context: ssl.SSLContext | None = None, path: str | None = None) -> None:
        self.user = user
        self.password = ""
        self.client = MsmpClient(host, port, timeout, ssl_context, path)

    @property
    def where(self) -> str:
        return self.client.where

    def open(self, get_password: Callable[[], str]) -> MsmpClient:
        """Connect (fail fast if the server is unreachable), then ask for the password and log in."""
        self.client.connect()
        self.password = get_password()
        self.client.login(self.user, self.password)
        return self.client

    def ensure(self) -> MsmpClient:
        """The client, reconnected and logged in again if the previous connection is gone."""
        if not self.client.usable:
            self.client.close()
            self.client.connect()
            self.client.login(self.user, self.password)
            _err("(reconnected)")
        return self.client

    def close(self) -> None:
        try:
            if self.client.usable:
                self.client.quit()
        except (MsmpError, OSError):
            pass
        self.client.close()


# -- one-shot mode ------------------------------------------------------------------------


def run_once(conn: Connection, words: list[str], args: argparse.Namespace) -> int:
    keyword = words[0].upper()
    if keyword == "WATCH":
        return run_watch(conn, args)
    line = " ".join(words)
    response = conn.client.command(line)
    text = render(line, response, args.json)
    if keyword == "QUIT" and response.ok:
        conn.client.close()
    if response.ok or args.json:
        if text:
            _out(text)
    else:
        _err(text)
    return EXIT_OK if response.ok else EXIT_ERR


def run_watch(conn: Connection, args: argparse.Namespace) -> int:
    try:
        live_view(conn.client, sys.stdout, args.interval, args.json, conn.where)
    except KeyboardInterrupt:
        if sys.stdout.isatty() and not args.json:
            _out("")
    return EXIT_OK


# -- interactive shell --------------------------------------------------------------------


class Shell:
    """The `msmp> ` prompt: readline editing, persistent history, completion of commands, keys, users."""

    def __init__(self, conn: Connection, args: argparse.Namespace) -> None:
        self.conn = conn
        self.args = args
        self.history_path = os.path.expanduser(os.environ.get(ENV_HISTORY) or DEFAULT_HISTORY)
        self._users: list[str] | None = None
        self._keys: list[str] | None = None
        self._matches: list[str] = []
        self._readline: Any = None
        self.failures = 0  # -ERR answers; piped input (a script) then exits 1

    def run(self) -> int:
        interactive = sys.stdin.isatty()
        if interactive:
            self._setup_readline()
        prompt = PROMPT if interactive else ""
        try:
            while True:
                try:
                    line = input(prompt)
                except EOFError:
                    if interactive:
                        _out("")
                    return EXIT_ERR if self.failures and not interactive else EXIT_OK
                except KeyboardInterrupt:  # like a shell: drop the line, new prompt
                    _out("")
                    continue
                self._remember(line)
                try:
                    if self.handle(line):
                        return EXIT_ERR if self.failures and not interactive else EXIT_OK
                except KeyboardInterrupt:
                    _out("")
                    _err("interrupted")
                except MsmpAuthError:
                    raise
                except MsmpError as exc:
                    self.failures += 1
                    _err(f"error: {exc.text}")
                except MsmpConnectionError as exc:
                    _err(f"connection lost: {exc}")
                    try:
                        self.conn.ensure()
                    except MsmpConnectionError as again:
                        _err(str(again))
                        return EXIT_FAIL
        finally:
            self._save_history()

    def handle(self, line: str) -> bool:
        """Run one shell line; True when the shell should end."""
        words = line.split()
        if not words:
            return False
        keyword = words[0].upper()
        if keyword in ("QUIT", "EXIT"):
            self.conn.close()
            if not self.args.json:
                _out("Bye")
            return True
        client = self.conn.ensure()
        if keyword == "WATCH":
            try:
                live_view(client, sys.stdout, self.args.interval, self.args.json, self.conn.where)
            except KeyboardInterrupt:
                _out("")
            return False
        line = line.strip()
        response = client.command(line)
        text = render(line, response, self.args.json, interactive=True)
        if text:
            (_out if response.ok or self.args.json else _err)(text)
        if not response.ok:
            self.failures += 1
        if response.ok and keyword in ("ADD", "DELE"):
            self._users = None  # refreshed at the next completion
        return False

    # -- readline ----------------------------------------------------------------------

    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # e.g. a Python built without it: plain input() still works
            return
        self._readline = readline
        with contextlib.suppress(OSError, UnicodeDecodeError):
            readline.read_history_file(self.history_path)
        readline.set_history_length(1000)
        readline.set_auto_history(False)  # we add lines ourselves, leaving out passwords
        readline.set_completer(self.complete)
        readline.set_completer_delims(" \t")
        if "libedit" in (readline.__doc__ or ""):
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _remember(self, line: str) -> None:
        rl = self._readline
        words = line.split()
        # ADD carries a password: keep it out of the history file.
        if rl is None or not words or words[0].upper() == "ADD":
            return
        length = rl.get_current_history_length()
        if length and rl.get_history_item(length) == line:
            return
        rl.add_history(line)

    def _save_history(self) -> None:
        if self._readline is None:
            return
        try:
            # Create it private before readline writes to it: the history is the admin's.
            os.close(os.open(self.history_path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._readline.write_history_file(self.history_path)
        except OSError as exc:
            _err(f"cannot save history to {self.history_path}: {exc.strerror or exc}")

    def complete(self, text: str, state: int) -> str | None:
        """readline's completer: called with state 0, 1, 2... until it returns None."""
        if state == 0:
            try:
                rl = self._readline
                self._matches = self.candidates(rl.get_line_buffer(), rl.get_begidx(), text)
            except Exception:  # noqa: BLE001 - readline would swallow it silently anyway
                self._matches = []
        return self._matches[state] if state < len(self._matches) else None

    def candidates(self, line: str, begidx: int, text: str) -> list[str]:
        before = line[:begidx].split()
        if not before:
            found = [c for c in COMMANDS if c.startswith(text.upper())]
            return [c.lower() for c in found] if text and text.islower() else found
        if len(before) != 1:
            return []
        keyword = before[0].upper()
        if keyword in KEY_COMMANDS:
            return [k for k in self.keys() if k.startswith(text)]
        if keyword in USER_COMMANDS:
            return [u for u in self.users() if u.startswith(text)]
        return []

    def users(self) -> list[str]:
        if self._users is None:
            client = self.conn.client
            self._users = client.list_users() if client.usable else []
        return self._users

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self._keys_from_server() or _local_keys()
        return self._keys

    def _keys_from_server(self) -> list[str]:
        """Setting keys as the server lists them: CAPA `KEYS ...` lines, or a HELP line with `keys:`."""
        client = self.conn.client
        if not client.usable:
            return []
        for command, marker in (("CAPA", "keys "), ("HELP", "keys:")):
            response = client.command(command)
            keys: list[str] = []  # CAPA may spread them over several KEYS lines
            for line in response.lines if response.ok else []:
                at = line.lower().find(marker)
                if at == 0 or (at > 0 and marker == "keys:"):
                    keys.extend(k for k in line[at + len(marker):].replace(",", " ").split() if k.isidentifier())
            if keys:
                return keys
        return []


def _local_keys() -> list[str]:
    try:
        from geventpop3.core.settings import KEYS
    except ImportError:
        return ["maildir", "transformer"]
    return list(KEYS)


# -- main ---------------------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        context = client_tls(args)
    except UsageError as exc:
        _err(f"{PROG}: {exc}")
        return EXIT_FAIL
    conn = Connection(args.host, args.port, args.timeout, args.user, context, args.socket)
    try:
        for word in args.command:
            if any(c in word for c in "\r\n\0"):
                raise UsageError("a command must be a single line")
        conn.open(lambda: read_password(args, conn.where))
        if args.watch:
            return run_watch(conn, args)
        if args.command:
            return run_once(conn, args.command, args)
        return Shell(conn, args).run()
    except UsageError as exc:
        _err(f"{PROG}: {exc}")
        return EXIT_FAIL
    except MsmpAuthError as exc:
        _err(f"{PROG}: login failed: {exc.text}")
        return EXIT_ERR
    except MsmpConnectionError as exc:
        _err(f"{PROG}: {exc}")
        return EXIT_FAIL
    except MsmpError as exc:
        _err(f"{PROG}: {exc.text}")
        return EXIT_ERR
    except KeyboardInterrupt:
        _err("")
        return EXIT_INTERRUPTED
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
