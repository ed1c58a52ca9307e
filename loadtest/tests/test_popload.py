"""popload, the benchmark's C load client, against a real geventpop3 process (Pop3TestServer).

It is compiled as the benchmark compiles it, runs both modes for about a second, and
must report real sessions with no error; given expected data that differs from what was
delivered (one octet of a message, a UIDL, a size) it must report an error, so its
checks are real. A user shared by two connections exercises the [IN-USE] retry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from geventpop3.testing import Pop3TestServer
from loadtest.benchlib import crlf, deliver, make_message
from loadtest.popload import Held, PoploadError, build, sessions, write_manifest

pytestmark = pytest.mark.external  # a C compiler

MAILBOX_USERS = [f"m{i}" for i in range(3)]
HELD_USERS = [f"h{i:02d}" for i in range(40)]
Expected = dict[str, dict[str, bytes]]


@pytest.fixture(scope="module")
def popload(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build(tmp_path_factory.mktemp("popload-cache"))


@pytest.fixture(scope="module")
def bench_server() -> Iterator[tuple[Pop3TestServer, Expected]]:
    """A server with 10 messages of 4 KiB (dot lines included) for each mailbox user."""
    users = {user: f"pw-{user}" for user in MAILBOX_USERS + HELD_USERS}
    with Pop3TestServer(users=users) as server:
        expected: Expected = {}
        for user in MAILBOX_USERS + HELD_USERS:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(server.user_dir(user), sub), exist_ok=True)
        for user in MAILBOX_USERS:
            expected[user] = {}
            for index in range(10):
                uid = f"{1700000000 + index}.M{index:06d}P1.test-{user}"
                content = make_message(f"{user}-{index}", 4096)
                deliver(str(server.user_dir(user)), uid, content)
                expected[user][uid] = crlf(content)
        yield server, expected


def manifest(path: Path, expected: Expected, users: list[str]) -> str:
    return write_manifest(path, [(user, f"pw-{user}", expected.get(user, {})) for user in users])


def test_sessions_mode_runs_checked_sessions(popload: str, bench_server: tuple[Pop3TestServer, Expected],
                                             tmp_path: Path) -> None:
    server, expected = bench_server
    report = sessions(popload, server.port, manifest(tmp_path / "m", expected, MAILBOX_USERS),
                      clients=len(MAILBOX_USERS), duration=1.0, timeout=10)
    assert report["errors"] == 0, report["first_error"]
    assert report["sessions"] > 0
    assert report["first_error"] == ""
    assert report["elapsed"] >= 1.0
    assert 0 < report["client_cpu_s"] < report["elapsed"] + 1


def test_a_shared_user_is_retried_on_in_use(popload: str, bench_server: tuple[Pop3TestServer, Expected],
                                            tmp_path: Path) -> None:
    server, expected = bench_server
    report = sessions(popload, server.port, manifest(tmp_path / "m", expected, ["m0", "m0", "m0"]),
                      clients=3, duration=1.0, timeout=10)
    assert report["errors"] == 0, report["first_error"]
    assert report["sessions"] > 0
    assert report["in_use_retries"] > 0


def _flip_one_octet(expected: Expected) -> Expected:
    wrong = {user: dict(messages) for user, messages in expected.items()}
    uid = sorted(wrong["m1"])[4]
    body = bytearray(wrong["m1"][uid])
    body[len(body) // 2] ^= 0x01
    wrong["m1"][uid] = bytes(body)
    return wrong


def _rename_one_uid(expected: Expected) -> Expected:
    wrong = {user: dict(messages) for user, messages in expected.items()}
    uid = sorted(wrong["m2"])[0]
    wrong["m2"]["not-" + uid] = wrong["m2"].pop(uid)
    return wrong


def _drop_one_message(expected: Expected) -> Expected:
    wrong = {user: dict(messages) for user, messages in expected.items()}
    del wrong["m0"][sorted(wrong["m0"])[9]]
    return wrong


@pytest.mark.parametrize(("corrupt", "reason"), [
    (_flip_one_octet, "RETR 5 differs"), (_rename_one_uid, "UIDL does not match"), (_drop_one_message, "STAT"),
])
def test_wrong_expectations_are_reported_as_errors(popload: str, bench_server: tuple[Pop3TestServer, Expected],
                                                   tmp_path: Path, corrupt: Callable[[Expected], Expected],
                                                   reason: str) -> None:
    server, expected = bench_server
    report = sessions(popload, server.port, manifest(tmp_path / "m", corrupt(expected), MAILBOX_USERS),
                      clients=len(MAILBOX_USERS), duration=5.0, timeout=10)
    assert report["errors"] >= 1
    assert reason in report["first_error"]
    assert report["elapsed"] < 5.0  # after the first error no new session starts


def test_held_mode_times_noop_rounds(popload: str, bench_server: tuple[Pop3TestServer, Expected],
                                     tmp_path: Path) -> None:
    server, _ = bench_server
    path = write_manifest(tmp_path / "m", [(user, f"pw-{user}", {}) for user in HELD_USERS])
    with Held(popload, server.port, path, held=len(HELD_USERS), rounds=2, login_concurrency=8, inflight=16,
              timeout=10) as held:
        opened = held.established()
        assert opened["sessions"] == len(HELD_USERS), opened["first_error"]
        assert opened["failed_logins"] == 0
        held.go_on()
        for number in (1, 2):
            assert held.round()["round"] == number
            held.go_on()
        report = held.done()
    assert report["errors"] == 0, report["first_error"]
    assert report["noops"] == 2 * len(HELD_USERS)
    assert 0 < report["noop_p50_ms"] <= report["noop_p99_ms"] <= report["noop_max_ms"]
    assert report["noop_round_s"] > 0


def test_held_mode_counts_a_wrong_password_as_a_failed_login(popload: str,
                                                             bench_server: tuple[Pop3TestServer, Expected],
                                                             tmp_path: Path) -> None:
    server, _ = bench_server
    path = write_manifest(tmp_path / "m", [("h00", "pw-h00", {}), ("h01", "wrong", {})])
    with Held(popload, server.port, path, held=2, rounds=1, timeout=10) as held:
        opened = held.established()
        assert (opened["sessions"], opened["failed_logins"]) == (1, 1)
        assert "PASS: -ERR" in opened["first_error"]


def test_a_missing_compiler_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(PoploadError, match="needs a C compiler"):
        build(tmp_path / "cache")
