"""MSMP cannot wreck the host (issue 10): `SET maildir` takes only an empty directory or
a Maildir root, never `/` or a system directory; `ADD` never turns an existing
directory or file into a Maildir; `transformer_programs` limits what `SET transformer`
may name. Real server process, real MSMP client, real directories."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from helpers import ServerProcess, admin, pop3

SYSTEM_DIRECTORIES = ["/", "/etc", "/usr", "/usr/lib", "/var", "/home", "/root", "/proc", "/dev", "/tmp"]


def make_maildir(path: Path) -> None:
    for part in ("cur", "new", "tmp"):
        (path / part).mkdir(parents=True)


def test_set_maildir_refuses_the_root_and_system_directories(server: ServerProcess) -> None:
    with admin(server) as client:
        for target in SYSTEM_DIRECTORIES:
            link = server.root / f"link{len(os.listdir(server.root))}"
            link.symlink_to(target)
            for value in (target, str(link)):
                answer = client.command(f"SET maildir {value}")
                assert not answer.ok, value
                assert "system directory" in answer.text, (value, answer.text)
        assert client.get("maildir") == str(server.maildir)
    assert not os.path.exists("/etc/cur")


def test_set_maildir_takes_an_empty_directory_or_a_maildir_root(server: ServerProcess) -> None:
    empty = server.root / "empty"
    empty.mkdir()
    root = server.root / "root"
    make_maildir(root / "dave")
    (root / ".deleted" / "old.20240101000000").mkdir(parents=True)
    (root / ".geventpop3.locks").write_bytes(b"")
    mixed = server.root / "mixed"
    make_maildir(mixed / "erin")
    (mixed / "notes.txt").write_text("not a Maildir\n")
    plain = server.root / "plain"
    (plain / "frank").mkdir(parents=True)  # a directory without cur/new/tmp
    with admin(server) as client:
        assert client.set("maildir", str(empty)) == "Changed value"
        assert client.get("maildir") == str(empty)
        assert client.set("maildir", str(root)) == "Changed value"
        for refused in (mixed, plain, mixed / "notes.txt", server.root / "missing"):
            answer = client.command(f"SET maildir {refused}")
            assert not answer.ok and answer.text.startswith("Invalid value:"), (refused, answer.text)
        assert client.get("maildir") == str(root)
        assert client.add_user("dave", "davepw") == "Added user"
    pop3(server, "dave", "davepw").quit()  # the new root serves at once


def test_add_refuses_a_path_that_exists_and_is_not_a_maildir(server: ServerProcess) -> None:
    plain = server.maildir / "plain"
    plain.mkdir()
    (plain / "precious").write_text("keep me\n")
    (server.maildir / "afile").write_text("a file\n")
    (server.maildir / "linked").symlink_to(server.root)
    make_maildir(server.maildir / "ready")
    with admin(server) as client:
        for name in ("plain", "afile", "linked"):
            answer = client.command(f"ADD {name} pw-{name}")
            assert not answer.ok and "not a Maildir" in answer.text, (name, answer.text)
        assert client.add_user("ready", "readypw") == "Added user"  # an existing Maildir is fine
        assert set(client.list_users()) == {"alice", "bob", "carol", "ready"}
    assert sorted(os.listdir(plain)) == ["precious"]  # nothing created in it
    assert (server.maildir / "afile").read_text() == "a file\n"
    assert not (server.root / "cur").exists()


def test_transformer_programs_restricts_set_transformer(start_server: Callable[..., ServerProcess]) -> None:
    config = (
        'transformer_programs = ["spam"]\n'
        'transformer = "cat"\n'  # the config file can still set anything
        '[transformers.spam]\ncommand = ["cat"]\n'
        '[transformers.other]\ncommand = ["cat"]\n'
    )
    server = start_server(config=config)
    with admin(server) as client:
        assert client.get("transformer") == "cat"
        assert client.get("transformer_programs") == "spam"
        for value in ("cat", "/bin/cat", "other"):
            answer = client.command(f"SET transformer {value}")
            assert not answer.ok and "transformer_programs" in answer.text, (value, answer.text)
        assert client.get("transformer") == "cat"
        assert client.set("transformer", "spam") == "Changed value"
        assert client.set("transformer", "none") == "Changed value"  # switching filters off is always allowed
        answer = client.command("SET transformer_programs *")
        assert not answer.ok and "config file" in answer.text


def test_any_program_by_default(server: ServerProcess) -> None:
    with admin(server) as client:
        assert client.get("transformer_programs") == "*"
        assert client.set("transformer", "cat") == "Changed value"
