"""auth.source.UsersSource: the users file read, or taken as another process read it, and
which content is in force (its digest is what a worker's hello is compared with)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from geventpop3.auth.source import UsersSource
from geventpop3.auth.users import UserDirectory
from geventpop3.core.names import UserError


def test_the_content_read_is_in_force_once_taken(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice:alicepw\n")
    source = UsersSource(str(path), [("bob", "bobpw")])
    users_file = source.read()
    assert users_file is not None and source.digest == ""  # read, not yet taken
    directory = UserDirectory()
    assert source.configure(directory, users_file) == (2, 0, 0)
    assert sorted(directory.names()) == ["alice", "bob"]
    assert source.matches(hashlib.sha256(b"alice:alicepw\n").hexdigest()) and not source.matches("")
    assert source.data == b"alice:alicepw\n"


def test_content_given_is_used_instead_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice:alicepw\n")
    source = UsersSource(str(path))
    directory = UserDirectory()
    source.configure(directory, source.use(b"carol:carolpw\n"))
    assert directory.names() == ["carol"]
    assert source.matches(hashlib.sha256(b"carol:carolpw\n").hexdigest())


def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^cannot read users file .*missing: No such file or directory$"):
        UsersSource(str(tmp_path / "missing")).read()


def test_a_bad_content_changes_nothing(tmp_path: Path) -> None:
    source = UsersSource(str(tmp_path / "users"))
    directory = UserDirectory()
    source.configure(directory, source.use(b"alice:alicepw\n"))
    digest = source.digest
    with pytest.raises(UserError):
        source.configure(directory, source.use(b"alice:alicepw\nno colon\n"))
    assert directory.names() == ["alice"] and source.digest == digest


def test_without_a_file_only_the_given_users_and_the_digest_of_nothing() -> None:
    source = UsersSource(None, [("bob", "bobpw")], [("demo", "demo")])
    assert source.read() is None and source.use(b"x") is None
    directory = UserDirectory()
    source.configure(directory, None)
    assert sorted(directory.names()) == ["bob", "demo"] and source.matches("")
