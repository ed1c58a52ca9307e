"""Users: name and password rules, the directory, timing parity, the users file and its reload."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import gevent
import pytest
from helpers import wait_until

from geventpop3.auth import schemes, users
from geventpop3.auth.schemes import SchemeError
from geventpop3.auth.users import Configured, UserDirectory
from geventpop3.core import names
from geventpop3.core.names import UserError

CHEAP = (16, 1, 1)  # scrypt cost for tests that check format, not strength


@pytest.mark.parametrize("name", ["a", "alice", "Bob", "x_1", "_x", "0", "a.b", "a-b", "a..b", "a" * 40])
def test_valid_usernames(name: str) -> None:
    assert names.valid_username(name)


@pytest.mark.parametrize("name", ["", ".", "..", ".a", "-a", "a/b", "../x", "a b", "a\n", "a:b", "a@b",
                                  "\u00e9", "a\x00", "a" * 41])
def test_invalid_usernames(name: str) -> None:
    assert not names.valid_username(name)


@pytest.mark.parametrize("password", ["x", "p@ss:w0rd", "\u00e9t\u00e9", "a" * 100, "$scrypt$looks-like-a-hash"])
def test_valid_passwords(password: str) -> None:
    assert names.valid_password(password)


@pytest.mark.parametrize("password", ["", "a b", "tab\there", "new\nline", "\x00", "\x7f", "a" * 101, "\u00a0",
                                      "\udcff"])
def test_invalid_passwords(password: str) -> None:
    assert not names.valid_password(password)


KEY = b"k" * 32


def verifies(password: str, encoded: str) -> bool:
    return schemes.parse(encoded, KEY).verify(password)


def test_hash_and_verify() -> None:
    encoded = users.hash_password("secret", CHEAP)
    assert encoded.startswith("$scrypt$n=16,r=1,p=1$")
    assert "secret" not in encoded
    assert verifies("secret", encoded)
    assert not verifies("Secret", encoded)
    assert not verifies("", encoded)
    assert not verifies("secret ", encoded)


def test_hash_is_salted() -> None:
    first, second = users.hash_password("same", CHEAP), users.hash_password("same", CHEAP)
    assert first != second
    assert verifies("same", first) and verifies("same", second)


def test_default_cost_hash_verifies() -> None:
    encoded = users.hash_password("pw")
    assert encoded.startswith("$scrypt$n=16384,r=8,p=1$")
    assert verifies("pw", encoded)


def test_non_utf8_password_hashes_and_verifies() -> None:
    """A password from argv or a client that is not UTF-8 arrives surrogate-escaped."""
    encoded = users.hash_password("pw\udcff", CHEAP)
    assert verifies("pw\udcff", encoded)
    assert not verifies("pw\udcfe", encoded)


@pytest.mark.parametrize("encoded", [
    "$scrypt$", "$scrypt$n=16,r=1,p=1$", "$scrypt$n=16,r=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=x,r=1,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16=1,r=1,p=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=16,r=1,p=1$!!!$ZGlnZXN0", "$scrypt$n=16,r=1,p=1$c2FsdA==$",
    "$scrypt$n=3,r=1,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16,r=0,p=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=1073741824,r=8,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16,r=1,p=1$c2FsdA==$ZGlnZXN0$extra",
])
def test_malformed_hash_is_refused_when_parsed(encoded: str) -> None:
    with pytest.raises(SchemeError):
        schemes.parse(encoded, KEY)
    directory = UserDirectory()
    with pytest.raises(UserError, match="user alice: .*scrypt"):
        directory.configure([("alice", encoded)])


class MemoryStore:
    """A stand-in for the SQLite store (the UserStore protocol)."""

    def __init__(self, initial: dict[str, str] | None = None) -> None:
        self.users = dict(initial or {})

    def load_users(self) -> dict[str, str]:
        return dict(self.users)

    def save_user(self, name: str, password_hash: str) -> None:
        self.users[name] = password_hash

    def delete_user(self, name: str) -> None:
        del self.users[name]


def test_directory_configured_plain_and_hashed() -> None:
    directory = UserDirectory()
    directory.configure([("alice", "alicepw"), ("bob", users.hash_password("bobpw", CHEAP))])
    assert "alice" in directory and "bob" in directory and "carol" not in directory
    assert len(directory) == 2
    assert directory.names() == ["alice", "bob"]
    assert directory.verify("alice", "alicepw")
    assert directory.verify("bob", "bobpw")
    assert not directory.verify("alice", "bobpw")
    assert not directory.verify("carol", "alicepw")
    assert not directory.verify("alice", "")


def test_directory_keeps_no_plain_password() -> None:
    directory = UserDirectory()
    directory.configure([("alice", "plaintext-secret")])
    assert "plaintext-secret" not in repr(vars(directory))


def test_directory_refuses_unsafe_configured_name() -> None:
    directory = UserDirectory()
    with pytest.raises(UserError):
        directory.configure([("alice", "pw"), ("../x", "pw")])


def test_directory_cached_login_still_rejects_wrong_password() -> None:
    directory = UserDirectory()
    directory.configure([("alice", "right")])
    assert directory.verify("alice", "right")
    assert directory.verify("alice", "right")  # from the fast cache
    assert not directory.verify("alice", "wrong")
    assert directory.verify("alice", "right")


@pytest.mark.slow
def test_directory_set_password_and_delete_with_store() -> None:
    store = MemoryStore({"old": users.hash_password("oldpw", CHEAP)})
    directory = UserDirectory(store)
    assert directory.verify("old", "oldpw")
    assert directory.set_password("new", "newpw") is True
    assert verifies("newpw", store.users["new"])
    assert directory.verify("new", "newpw")
    assert directory.set_password("new", "changed") is False
    assert not directory.verify("new", "newpw")  # the fast cache is dropped on change
    assert directory.verify("new", "changed")
    directory.delete("new")
    assert "new" not in directory and "new" not in store.users
    assert not directory.verify("new", "changed")
    with pytest.raises(UserError, match="does not exist"):
        directory.delete("new")


@pytest.mark.parametrize(("name", "password", "reason"), [
    ("../x", "pw", "Unsafe username"), ("", "pw", "Unsafe username"), ("ok", "has space", "Invalid password"),
    ("ok", "", "Invalid password"), ("ok", "x" * 101, "Invalid password"),
])
def test_directory_set_password_rules(name: str, password: str, reason: str) -> None:
    store = MemoryStore()
    directory = UserDirectory(store)
    with pytest.raises(UserError, match=reason):
        directory.set_password(name, password)
    assert store.users == {}


def _seconds(action) -> float:  # noqa: ANN001 - any callable
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def test_unknown_user_and_wrong_password_both_pay_the_slow_hash() -> None:
    """No tight bounds: each failure must cost at least a third of one real hash."""
    encoded = users.hash_password("pw")
    one_hash = min(_seconds(lambda: verifies("pw", encoded)) for _ in range(3))
    directory = UserDirectory()
    directory.configure([("alice", encoded)])
    assert directory.wait_calibrated(30)
    assert directory.verify("alice", "pw")  # fills the fast cache for alice
    unknown = min(_seconds(lambda: directory.verify("nobody", "pw")) for _ in range(2))
    wrong = min(_seconds(lambda: directory.verify("alice", "wrong")) for _ in range(2))
    assert unknown >= one_hash / 3, (unknown, one_hash)
    assert wrong >= one_hash / 3, (wrong, one_hash)


def test_a_failure_waits_the_conservative_floor_until_calibrated() -> None:
    """Before its class is measured, a failure takes the conservative floor (then the measured one)."""
    directory = UserDirectory()
    directory.configure([("alice", users.hash_password("pw", CHEAP))])
    assert not directory.calibrated()  # measured in the background, once this greenlet yields
    assert directory.failure_floor() == users.UNCALIBRATED_FLOOR
    assert directory.wait_calibrated(30)
    assert directory.failure_floor() < users.UNCALIBRATED_FLOOR


# -- users file and -u -----------------------------------------------------------

def pairs(path: Path) -> list[tuple[str, str]]:
    return [(entry.name, entry.secret) for entry in users.parse_users_file(str(path)).entries]


def test_parse_users_file(tmp_path: Path) -> None:
    hashed = users.hash_password("carolpw", CHEAP)
    path = tmp_path / "users"
    path.write_text(
        "# a comment\n"
        "\n"
        "alice:alicepw\n"
        "   bob:pass:with:colons   \n"
        "   # an indented comment\n"
        f"carol:{hashed}\n"
        "dave:p#not-a-comment\n"
        "erin::starts-with-a-colon\n"
    )
    assert pairs(path) == [
        ("alice", "alicepw"), ("bob", "pass:with:colons"), ("carol", hashed), ("dave", "p#not-a-comment"),
        ("erin", ":starts-with-a-colon"),
    ]
    parsed = users.parse_users_file(str(path))
    assert parsed.notes == []
    assert [entry.origin for entry in parsed.entries] == [f"{path}:{n}" for n in (3, 4, 6, 7, 8)]


def test_dovecot_passwd_file_lines(tmp_path: Path) -> None:
    """user:{SCHEME}hash:uid:gid:gecos:home:shell:extra: the fields after the password are
    ignored (one note for the file); an extra field that refuses or restricts logins leaves
    the entry out."""
    hashed = users.hash_password("pw", CHEAP)
    path = tmp_path / "passwd"
    path.write_text(
        f"alice:{hashed}:1000:1000::/home/alice:/bin/false:\n"
        f"bob:{hashed}:1001:1001:Bob B:/home/bob::userdb_mail=maildir:~/Maildir\n"
        f"carol:{hashed}::::::\n"
        f"dave:{hashed}\n"
        "erin:{PLAIN}erinpw::::::nologin\n"
        f"frank:{hashed}:1002:1002::/home/frank::allow_nets=192.0.2.0/24\n"
    )
    parsed = users.parse_users_file(str(path))
    assert [(entry.name, entry.secret) for entry in parsed.entries] == [
        ("alice", hashed), ("bob", hashed), ("carol", hashed), ("dave", hashed)]
    assert len(parsed.notes) == 2
    assert "ignored on 4 lines" in parsed.notes[0]
    assert "left out 2 users" in parsed.notes[1] and "erin, frank" in parsed.notes[1]
    directory = UserDirectory()
    directory.configure(parsed.entries)
    assert directory.names() == ["alice", "bob", "carol", "dave"]
    assert directory.verify("alice", "pw") and directory.verify("bob", "pw")


def test_an_unknown_scheme_is_refused_with_the_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("alice:alicepw\n# fine\nbob:{NO-SUCH-SCHEME}abc:1000:1000::/home/bob::\n")
    directory = UserDirectory()
    with pytest.raises(UserError) as info:
        directory.configure(users.parse_users_file(str(path)).entries)
    assert str(info.value).startswith(f"{path}:3: ")
    assert "NO-SUCH-SCHEME" in str(info.value)
    assert len(directory) == 0


def test_users_file_entries_feed_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:alicepw\nbob:{users.hash_password('bobpw', CHEAP)}\n")
    directory = UserDirectory()
    directory.configure(users.parse_users_file(str(path)).entries)
    assert directory.verify("alice", "alicepw") and directory.verify("bob", "bobpw")


@pytest.mark.parametrize(("content", "line", "what"), [
    ("alice:pw\nnocolon\n", 2, "expected name:password"),
    ("alice:\n", 1, "expected name:password"),
    (":pw\n", 1, "unsafe user name"),
    ("# ok\n../x:pw\n", 2, "unsafe user name"),
    ("a b:pw\n", 1, "unsafe user name"),
    ("a b:$scrypt$x:1:1::/home::\n", 1, "unsafe user name"),
])
def test_users_file_bad_lines(tmp_path: Path, content: str, line: int, what: str) -> None:
    path = tmp_path / "users"
    path.write_text(content)
    with pytest.raises(UserError) as info:
        users.parse_users_file(str(path))
    assert f"{path}:{line}:" in str(info.value)
    assert what in str(info.value)
    assert "pw" not in str(info.value).replace(str(path), "")  # no password echoed


def test_users_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"alice:\xff\xfe\n")
    with pytest.raises(UserError, match="UTF-8"):
        users.parse_users_file(str(path))


def test_users_file_missing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        users.parse_users_file(str(tmp_path / "missing"))


def test_parse_user_flag() -> None:
    assert users.parse_user_flag("alice:pw") == ("alice", "pw")
    assert users.parse_user_flag("alice:a:b c") == ("alice", "a:b c")
    for bad in ("alice", "alice:", ":pw", "../x:pw"):
        with pytest.raises(UserError):
            users.parse_user_flag(bad)


def test_parse_user_flag_error_never_shows_the_password() -> None:
    for text in ("bad name:hunter2", "../x:hunter2", "alice:"):
        with pytest.raises(UserError) as info:
            users.parse_user_flag(text)
        assert "hunter2" not in str(info.value)


@pytest.mark.slow
def test_unknown_user_pays_the_cost_of_the_entries_in_use() -> None:
    """Regression: unknown names were checked at the default cost whatever the entries used,
    so with dearer (or cheaper) hashes a wrong name answered faster than a wrong password."""
    dear = (2**16, 8, 1)  # four times the default cost
    encoded = users.hash_password("pw", dear)
    directory = UserDirectory()
    directory.configure([("alice", encoded)])
    assert directory.wait_calibrated(60)
    # Interleaved, the quickest of each: a burst of load on the shared machine slows one
    # round of both, not all of one kind.
    one_hash, unknown = [], []
    for _ in range(3):
        one_hash.append(_seconds(lambda: verifies("pw", encoded)))
        unknown.append(_seconds(lambda: directory.verify("nobody", "pw")))
    assert min(unknown) >= min(one_hash) / 2, (unknown, one_hash)


class FailingStore(MemoryStore):
    def delete_user(self, name: str) -> None:
        raise OSError("disk full")


def test_delete_withdraws_at_once_and_restores_when_the_store_fails() -> None:
    store = FailingStore({"alice": users.hash_password("pw", CHEAP)})
    directory = UserDirectory(store)
    assert directory.verify("alice", "pw")
    with pytest.raises(OSError, match="disk full"), directory.deleting("alice"):
        assert "alice" not in directory and not directory.verify("alice", "pw")
    assert "alice" in directory and directory.verify("alice", "pw")
    with pytest.raises(RuntimeError), directory.deleting("alice"):
        raise RuntimeError("the caller's step failed")
    assert directory.names() == ["alice"] and store.users.keys() == {"alice"}


def test_admins_are_credentials_without_a_store() -> None:
    admins = users.PasswordStore()
    admins.configure([("admin", "plain"), ("root", users.hash_password("hashed", CHEAP))])
    assert admins.verify("admin", "plain") and admins.verify("root", "hashed")
    assert not admins.verify("root", users.hash_password("hashed", CHEAP))
    assert not admins.verify("nobody", "plain")
    assert not hasattr(admins, "set_password") and not hasattr(admins, "delete")


# -- equal timing across cost classes, and the upgrade of weak store entries -----------

@pytest.mark.slow
def test_failures_cost_the_same_for_unknown_names_and_entries_of_any_class() -> None:
    """Regression: an entry of a cheaper class (a plain password: microseconds) answered a
    wrong password far sooner than an unknown name checked against a slow hash, which told
    the name exists. Now every failure is padded to the floor (the slowest class, measured).
    The four are measured in turn in each of 7 rounds (a change of machine load hits all
    alike); their medians may differ by half the floor at most (without padding the plain
    entry's failure takes about 0 and the others about the floor)."""
    cheaper = (2**10, 8, 1)
    directory = UserDirectory()
    directory.configure([("dear", users.hash_password("pw")), ("cheaper", users.hash_password("pw", cheaper)),
                         ("plain", "plainpw")])
    assert directory.wait_calibrated(60)
    floor = directory.failure_floor()
    samples: dict[str, list[float]] = {"nobody": [], "dear": [], "cheaper": [], "plain": []}
    for _ in range(7):
        for name, times in samples.items():
            times.append(_seconds(lambda name=name: directory.verify(name, "wrong")))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    assert min(medians.values()) >= 0.9 * floor, (medians, floor)
    assert max(medians.values()) - min(medians.values()) < 0.5 * directory.failure_floor(), (medians, floor)


def test_a_success_is_not_padded() -> None:
    directory = UserDirectory()
    directory.configure([("dear", users.hash_password("pw")), ("plain", "plainpw")])
    assert directory.wait_calibrated(60)
    assert _seconds(lambda: directory.verify("plain", "plainpw")) < directory.failure_floor() / 2


def test_a_weak_stored_entry_is_rehashed_at_the_default_cost_at_its_next_login() -> None:
    store = MemoryStore({"bob": users.hash_password("bobpw", CHEAP)})
    directory = UserDirectory(store)
    directory.configure([("carol", users.hash_password("carolpw", CHEAP))])
    assert directory.wait_calibrated(30)  # upgrades wait for idle hash threads
    assert directory.verify("bob", "bobpw") and directory.verify("carol", "carolpw")
    wait_until(lambda: not directory._upgrading)  # the upgrades run after the logins answered
    default_class = ("SCRYPT", users.DEFAULT_COST)
    assert directory._entries["bob"].cost_class == default_class
    assert schemes.parse(store.users["bob"], KEY).cost_class == default_class  # saved: the store's entry
    # A file's or flag's entry is left as given: upgraded in memory only, it would be
    # hashed again at every start (`geventpop3 hash` makes strong entries for files).
    assert directory._entries["carol"].cost_class == ("SCRYPT", CHEAP)
    assert "carol" not in store.users
    assert directory.verify("bob", "bobpw") and not directory.verify("bob", "wrong")
    assert directory.verify("carol", "carolpw")


# -- reload: configure again -------------------------------------------------------------

def test_configure_again_adds_changes_and_removes_and_keeps_the_store_users() -> None:
    store = MemoryStore({"stored": users.hash_password("storedpw", CHEAP),
                         "both": users.hash_password("storepw", CHEAP)})
    directory = UserDirectory(store)
    assert directory.configure([("alice", "alicepw"), ("bob", "bobpw"), ("both", "filepw")]) == (3, 0, 0)
    assert directory.verify("both", "filepw") and not directory.verify("both", "storepw")  # the file wins
    assert directory.verify("alice", "alicepw")
    cached = directory._fast.copy()
    assert directory.configure([("alice", "alicepw"), ("bob", "newpw"), ("carol", "carolpw")]) == (1, 1, 1)
    assert directory._fast.get("alice") == cached.get("alice")  # unchanged: its cached login stays
    assert directory.verify("alice", "alicepw") and directory.verify("carol", "carolpw")
    assert directory.verify("bob", "newpw") and not directory.verify("bob", "bobpw")
    assert directory.verify("both", "storepw")  # dropped from the file: the store's entry is back
    assert directory.verify("stored", "storedpw")
    assert directory.names() == ["alice", "bob", "both", "carol", "stored"]


def test_configure_with_a_bad_entry_changes_nothing() -> None:
    directory = UserDirectory()
    directory.configure([("alice", "alicepw")])
    bad = [Configured("bob", "bobpw", 1, "users"), Configured("carol", "{NO-SUCH}x", 2, "users")]
    with pytest.raises(UserError, match="^users:2: "):
        directory.configure(bad)
    assert directory.names() == ["alice"] and directory.verify("alice", "alicepw")


def test_a_removed_user_mid_check_does_not_log_in() -> None:
    directory = UserDirectory()
    directory.configure([("alice", users.hash_password("pw", CHEAP))])
    check = gevent.spawn(directory.verify, "alice", "pw")
    gevent.sleep(0)  # the check waits for its hash thread
    directory.configure([])
    assert check.get(timeout=30) is False
