"""`geventpop3 hash -s SCHEME` through the real command line: from a pipe and from a terminal
(pexpect: asked twice, no echo), its entries checked by our parser and by Dovecot's `doveadm pw -t`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pexpect
import pytest
from helpers import GEVENTPOP3, REPO, server_env, unpatched_close

from geventpop3.auth.schemes import parse

KEY = os.urandom(32)


def hash_command(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GEVENTPOP3, "hash", *args], input=stdin, cwd=REPO, env=server_env(),
                          capture_output=True, text=True, timeout=60)


def doveadm_verifies(entry: str, password: str) -> bool:
    doveadm = shutil.which("doveadm")
    assert doveadm, "doveadm is missing: run tools/install-system-deps.sh (dovecot-core)"
    result = subprocess.run([doveadm, "pw", "-t", entry, "-p", password], capture_output=True, timeout=30)
    return result.returncode == 0


@pytest.mark.parametrize(("args", "prefix"), [
    (["-s", "BLF-CRYPT", "bob"], "bob:{BLF-CRYPT}$2y$05$"),
    (["--scheme=argon2id"], "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$"),
    (["bob", "-s", "sha512-crypt"], "bob:{SHA512-CRYPT}$6$"),
    (["-sSSHA512"], "{SSHA512}"),
])
def test_hash_scheme_from_a_pipe_is_an_entry_dovecot_and_we_accept(args: list[str], prefix: str) -> None:
    result = hash_command(*args, stdin="s3cret-ü\n")
    assert result.returncode == 0 and result.stderr == "", result
    entry = result.stdout.strip()
    assert entry.startswith(prefix) and len(result.stdout.splitlines()) == 1, entry
    digest = entry.partition(":")[2] if entry.startswith("bob:") else entry
    stored = parse(digest, KEY)
    assert stored.verify("s3cret-ü") and not stored.verify("s3cret-u")
    assert doveadm_verifies(digest, "s3cret-ü") and not doveadm_verifies(digest, "s3cret-u")


def test_hash_scheme_on_a_terminal_asks_twice_without_echo() -> None:
    with unpatched_close():
        child = pexpect.spawn(sys.executable, ["-m", "geventpop3", "hash", "-s", "SHA256-CRYPT", "carol"],
                              cwd=str(REPO), env=server_env(), encoding="utf-8", timeout=30)
    try:
        child.expect("Password: ")
        child.sendline("tty-secret")
        child.expect("Again: ")
        child.sendline("tty-secret")
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close()
    assert child.exitstatus == 0, output
    assert "tty-secret" not in output  # no echo
    entry = output.strip().splitlines()[-1]
    assert entry.startswith("carol:{SHA256-CRYPT}$5$")
    digest = entry.partition(":")[2]
    assert parse(digest, KEY).verify("tty-secret") and doveadm_verifies(digest, "tty-secret")


@pytest.mark.parametrize(("args", "fragment"), [
    (["-s", "NOPE"], "unknown scheme 'NOPE': one of SCRYPT, BLF-CRYPT"),
    (["-s", "PLAIN"], "unknown scheme 'PLAIN'"),
    (["-s"], "-s needs a scheme"),
    (["-x"], "usage: geventpop3 hash [-s SCHEME] [NAME]"),
])
def test_hash_bad_scheme_is_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    result = hash_command(*args, stdin="pw\n")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, result.stderr


def test_hash_help_lists_the_schemes() -> None:
    result = hash_command("-h", stdin="")
    assert result.returncode == 0 and "-s, --scheme SCHEME" in result.stdout
    assert all(name in result.stdout for name in ("BLF-CRYPT", "ARGON2ID", "SHA512-CRYPT", "SCRYPT"))
