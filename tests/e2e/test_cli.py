"""The command line as operators run it: `python -m geventpop3 ...` in a subprocess.

Help and version exit 0; every bad flag, value or config file prints exactly one line on
stderr and exits 2, never a traceback. A few in-process checks of `parse_config` pin the
precedence of flags over the config file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import run_server

from geventpop3 import __version__
from geventpop3.config import UsageError
from geventpop3.flags import parse_config


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the server command; loopback and ephemeral ports in case a bad case starts it anyway."""
    return run_server("-l", "127.0.0.1", "-L", "127.0.0.1", "-p", "0", "-P", "0", "-d", str(tmp_path / "mail"),
                      "--state-dir", str(tmp_path / "state"), *args, cwd=tmp_path)


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("geventpop3: ")
    for fragment in fragments:
        assert fragment in line
    return line


def assert_parse_error(tmp_path: Path, args: list[str], *fragments: str) -> str:
    """The same check in process (fast): parse_config raises the one line main() prints."""
    argv = ["-d", str(tmp_path / "mail"), "--state-dir", str(tmp_path / "state"), *args]
    with pytest.raises(UsageError) as info:
        parse_config(argv)
    message = str(info.value)
    assert message and "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(tmp_path: Path, flag: str) -> None:
    result = run(tmp_path, flag)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: geventpop3")
    for option in ("--pop3-address", "--users-file", "--config", "--maildir", "--state-dir"):
        assert option in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_version(tmp_path: Path, flag: str) -> None:
    result = run(tmp_path, flag)
    assert result.returncode == 0
    assert result.stdout == f"geventpop3 {__version__}\n"
    assert result.stderr == ""


@pytest.mark.parametrize(("args", "fragment"), [
    (["--bogus"], "--bogus"),
    (["-x"], "-x"),
    (["extra-positional"], "extra-positional"),
    (["-p", "70000"], "70000"),
    (["-p", "abc"], "abc"),
    (["-p", "-1"], "-p"),
    (["-P", "65536"], "65536"),
    (["--metrics-port", "x"], "x"),
    (["--config"], "--config"),
    (["--max-connections", "abc"], "max_connections"),
    (["--max-connections", "0"], "max_connections"),
    (["--idle-timeout", "0"], "idle_timeout"),
    (["--idle-timeout", "nan"], "idle_timeout"),
    (["--login-failure-delay", "-1"], "login_failure_delay"),
    (["--log-level", "LOUD"], "log_level"),
    (["-t", "/nonexistent/filter"], "transformer"),
    (["-t", "'unbalanced"], "transformer"),
    (["-u", "alice"], "user"),
    (["-u", "../x:pw"], "user"),
    (["-u", "alice:"], "user"),
    (["-a", "root"], "admin"),
    (["-u", "alice:{NO-SUCH-SCHEME}x"], "invalid user alice: unknown password scheme {NO-SUCH-SCHEME}"),
    (["-a", "root:$scrypt$n=3,r=1,p=1$c2FsdA==$ZGlnZXN0"], "invalid admin root: impossible scrypt cost"),
    (["--uidl-format", "%u"], "uidl_format"),
    (["--uidl-format", "%08xu%08xv"], "uidl_format"),
])
def test_bad_flags(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_parse_error(tmp_path, args, fragment)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--bogus"], "--bogus"), (["-p", "70000"], "70000"), (["--idle-timeout", "0"], "idle_timeout"),
    (["-u", "alice"], "user"), (["--uidl-format", "%v"], "invalid uidl_format '%v': must be one of %f, %08Xu%08Xv"),
])
def test_bad_flags_as_run(tmp_path: Path, args: list[str], fragment: str) -> None:
    assert_usage_error(run(tmp_path, *args), fragment)


def test_bad_user_flag_does_not_echo_the_password(tmp_path: Path) -> None:
    line = assert_usage_error(run(tmp_path, "-u", "bad name:hunter2"))
    assert "hunter2" not in line


def test_missing_users_file(tmp_path: Path) -> None:
    assert_usage_error(run(tmp_path, "--users-file", str(tmp_path / "missing")), "users file", "missing")


def test_users_file_is_a_directory(tmp_path: Path) -> None:
    # The users file is read at start-up, after privileges are dropped: so a run, not a parse.
    assert_usage_error(run(tmp_path, "--users-file", str(tmp_path)), "users file")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"alice:pw\nbroken line\n", ":2:"),
    (b"../evil:pw\n", "unsafe user name"),
    (b"alice:\xff\xfe\n", "UTF-8"),
    (b"alice:pw\n\nbob:{NO-SUCH-SCHEME}pw:1000:1000::/home/bob::\n", ":3: unknown password scheme {NO-SUCH-SCHEME}"),
])
def test_bad_users_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "users"
    path.write_bytes(content)
    line = assert_usage_error(run(tmp_path, "--users-file", str(path)), fragment)
    assert "pw" not in line.replace(str(path), "")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_parse_error(tmp_path, ["--config", str(tmp_path / "nope.toml")], "config file")


@pytest.mark.parametrize("content", [b"this is not toml", b"a = [1,\n", b"x = 1\nx = 2\n", b"\xff = 1\n",
                                     b"\x00\x01\x02"])
def test_bad_config_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "server.toml"
    path.write_bytes(content)
    assert_parse_error(tmp_path, ["--config", str(path)], "config file")


def test_bad_config_toml_as_run(tmp_path: Path) -> None:
    config = write_config(tmp_path, "this is not toml\n")
    assert_usage_error(run(tmp_path, "--config", config), "config file", "line 1")


def test_unknown_config_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, "idle_timeout = 30\nbogus_key = 1\n")
    assert_usage_error(run(tmp_path, "--config", config), "unknown key", "bogus_key")


@pytest.mark.parametrize(("text", "fragment"), [
    ('idle_timeout = "abc"', "idle_timeout"),
    ("idle_timeout = 0", "idle_timeout"),
    ("idle_timeout = [1]", "idle_timeout"),
    ("max_connections = -5", "max_connections"),
    ("max_connections = 1.5", "max_connections"),
    ('log_level = "LOUD"', "log_level"),
    ('transformer_failure = "maybe"', "transformer_failure"),
    ("max_login_failures = 0", "max_login_failures"),
    ('transformer = "/nonexistent/filter"', "transformer"),
    ("pop3_port = 70000", "port"),
    ('admin_port = "x"', "admin_port"),
    ("metrics_port = 99999", "port"),
    ('metrics_port = "abc"', "metrics_port"),
    ("pop3_port = true", "pop3_port"),
    ("pop3_address = 5", "pop3_address"),
    ("pop3_address = []", "pop3_address"),
    ("admin_address = []", "admin_address"),
    ("admin_address = [1]", "admin_address"),
    ('transformers = "x"', "transformers"),
    ("transformers = {a = 5}", "transformers.a"),
    ("transformers = {a = {command = []}}", "transformers.a"),
    ('transformers = {a = {chain = ["nope"]}}', "transformers.a.chain names no command: nope"),
    ("transformers = {a = {chain = []}}", "transformers.a.chain"),
    ("users = [1]", "users"),
    ('users = ["alice"]', "user"),
    ('users = ["../x:pw"]', "user"),
    ("admins = 5", "admins"),
    ("users_file = 5", "users_file"),
    ("state_dir = 5", "state_dir"),
    ("maildir = 5", "maildir"),
    ("metrics_address = 5", "metrics_address"),
    ('allow_weak_schemes = "yes"', "allow_weak_schemes has the wrong type"),
    ('users = ["alice:{NO-SUCH-SCHEME}x"]', "invalid user alice: unknown password scheme"),
    ('uidl_format = "%08Xv%08Xu"', "uidl_format"),
    ("uidl_format = 1", "uidl_format"),
])
def test_invalid_config_values(tmp_path: Path, text: str, fragment: str) -> None:
    config = write_config(tmp_path, text + "\n")
    assert_parse_error(tmp_path, ["--config", config], fragment)


@pytest.mark.parametrize(("text", "fragment"), [
    ('idle_timeout = "abc"', "idle_timeout"), ('transformers = "x"', "transformers"), ("users = [1]", "users"),
])
def test_invalid_config_values_as_run(tmp_path: Path, text: str, fragment: str) -> None:
    config = write_config(tmp_path, text + "\n")
    assert_usage_error(run(tmp_path, "--config", config), fragment)


# -- in process: precedence -----------------------------------------------------

def test_uidl_format_from_the_file_or_a_flag(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'uidl_format = "%08Xu%08Xv"\n')
    argv = ["-d", str(tmp_path / "mail"), "--no-state", "--config", config]
    assert parse_config(argv).settings.uidl_format == "%08Xu%08Xv"
    assert parse_config([*argv, "--uidl-format", "%f"]).settings.uidl_format == "%f"
    assert parse_config(argv[:3]).settings.uidl_format == "%f"  # the default: what geventpop3 always showed


def test_flags_override_config_file(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(tmp_path, f'idle_timeout = 30\nlog_level = "debug"\nmaildir = "{other}"\n'
                                    'pop3_port = 1110\nusers = ["carol:carolpw"]\n')
    parsed = parse_config(["--config", config, "--idle-timeout", "45", "-d", str(tmp_path / "mail"),
                           "-u", "alice:pw", "-p", "2110"])
    assert parsed.settings.idle_timeout == 45
    assert parsed.settings.log_level == "DEBUG"
    assert parsed.maildir == str(tmp_path / "mail")
    assert parsed.pop3_port == 2110
    assert parsed.explicit["idle_timeout"] == "45"
    assert ("alice", "pw") in parsed.users and ("carol", "carolpw") in parsed.users


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'idle_timeout = 30\npop3_port = 1110\npop3_address = "::1"\n')
    parsed = parse_config(["--config", config, "-d", str(tmp_path / "mail")])
    assert parsed.settings.idle_timeout == 30
    assert parsed.pop3_port == 1110
    assert parsed.pop3_addresses == ["::1"]
    assert parsed.explicit == {"maildir": str(tmp_path / "mail")}


def test_allow_weak_schemes_from_the_flag_or_the_file(tmp_path: Path) -> None:
    assert not parse_config(["-d", str(tmp_path / "mail")]).allow_weak_schemes
    assert parse_config(["-d", str(tmp_path / "mail"), "--allow-weak-schemes"]).allow_weak_schemes
    config = write_config(tmp_path, "allow_weak_schemes = true\n")
    assert parse_config(["-d", str(tmp_path / "mail"), "--config", config]).allow_weak_schemes


def test_defaults(tmp_path: Path) -> None:
    parsed = parse_config(["-d", str(tmp_path / "mail")])
    assert parsed.pop3_addresses is None  # all interfaces, both families
    assert parsed.pop3_port == 110
    assert parsed.admin_addresses is None  # the loopback addresses, IPv6 skipped where it is missing
    assert parsed.settings.idle_timeout == 600
    assert parsed.users == []
    assert parsed.maildir == str(tmp_path / "mail")
    assert not (tmp_path / "mail").exists()  # parsing creates nothing; start-up does
    assert parsed.state_dir == str(tmp_path / "mail.state")

