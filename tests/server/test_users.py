"""Users: name and password rules, scrypt hashing, the directory, timing parity, the users file."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
from helpers import wait_until

from geventpop3 import users
from geventpop3.users import UserDirectory, UserError

CHEAP = (16, 1, 1)  # scrypt cost for tests that check format, not strength


@pytest.mark.parametrize("name", ["a", "alice", "Bob", "x_1", "_x", "0", "a.b", "a-b", "a..b", "a" * 40])
def test_valid_usernames(name: str) -> None:
    assert users.valid_username(name)


@pytest.mark.parametrize("name", ["", ".", "..", ".a", "-a", "a/b", "../x", "a b", "a\n", "a:b", "a@b",
                                  "\u00e9", "a\x00", "a" * 41])
def test_invalid_usernames(name: str) -> None:
    assert not users.valid_username(name)


@pytest.mark.parametrize("password", ["x", "p@ss:w0rd", "\u00e9t\u00e9", "a" * 100, "$scrypt$looks-like-a-hash"])
def test_valid_passwords(password: str) -> None:
    assert users.valid_password(password)


@pytest.mark.parametrize("password", ["", "a b", "tab\there", "new\nline", "\x00", "\x7f", "a" * 101, "\u00a0",
                                      "\udcff"])
def test_invalid_passwords(password: str) -> None:
    assert not users.valid_password(password)


def test_hash_and_verify() -> None:
    encoded = users.hash_password("secret", CHEAP)
    assert users.is_password_hash(encoded)
    assert encoded.startswith("$scrypt$n=16,r=1,p=1$")
    assert "secret" not in encoded
    assert users.verify_password("secret", encoded)
    assert not users.verify_password("Secret", encoded)
    assert not users.verify_password("", encoded)
    assert not users.verify_password("secret ", encoded)


def test_hash_is_salted() -> None:
    first, second = users.hash_password("same", CHEAP), users.hash_password("same", CHEAP)
    assert first != second
    assert users.verify_password("same", first) and users.verify_password("same", second)


def test_default_cost_hash_verifies() -> None:
    encoded = users.hash_password("pw")
    assert encoded.startswith("$scrypt$n=16384,r=8,p=1$")
    assert users.verify_password("pw", encoded)


def test_non_utf8_password_hashes_and_verifies() -> None:
    """A password from argv or a client that is not UTF-8 arrives surrogate-escaped."""
    encoded = users.hash_password("pw\udcff", CHEAP)
    assert users.verify_password("pw\udcff", encoded)
    assert not users.verify_password("pw\udcfe", encoded)


@pytest.mark.parametrize("encoded", [
    "", "plain", "$scrypt$", "$scrypt$n=16,r=1,p=1$", "$scrypt$n=16,r=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=x,r=1,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16=1,r=1,p=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=16,r=1,p=1$!!!$ZGlnZXN0", "$scrypt$n=16,r=1,p=1$c2FsdA==$", "$bcrypt$n=16,r=1,p=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=3,r=1,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16,r=0,p=1$c2FsdA==$ZGlnZXN0",
    "$scrypt$n=1073741824,r=8,p=1$c2FsdA==$ZGlnZXN0", "$scrypt$n=16,r=1,p=1$c2FsdA==$ZGlnZXN0$extra",
])
def test_verify_malformed_hash_is_false_never_raises(encoded: str) -> None:
    assert users.verify_password("pw", encoded) is False


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
    directory.add_configured([("alice", "alicepw"), ("bob", users.hash_password("bobpw", CHEAP))])
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
    directory.add_configured([("alice", "plaintext-secret")])
    assert "plaintext-secret" not in repr(vars(directory))


def test_directory_refuses_unsafe_configured_name() -> None:
    directory = UserDirectory()
    with pytest.raises(UserError):
        directory.add_configured([("alice", "pw"), ("../x", "pw")])


def test_directory_cached_login_still_rejects_wrong_password() -> None:
    directory = UserDirectory()
    directory.add_configured([("alice", "right")])
    assert directory.verify("alice", "right")
    assert directory.verify("alice", "right")  # from the fast cache
    assert not directory.verify("alice", "wrong")
    assert directory.verify("alice", "right")


def test_directory_set_password_and_delete_with_store() -> None:
    store = MemoryStore({"old": users.hash_password("oldpw", CHEAP)})
    directory = UserDirectory(store)
    assert directory.verify("old", "oldpw")
    assert directory.set_password("new", "newpw") is True
    assert users.verify_password("newpw", store.users["new"])
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
    one_hash = min(_seconds(lambda: users.verify_password("pw", encoded)) for _ in range(3))
    directory = UserDirectory()
    directory.add_configured([("alice", encoded)])
    assert directory.verify("alice", "pw")  # fills the fast cache for alice
    unknown = min(_seconds(lambda: directory.verify("nobody", "pw")) for _ in range(2))
    wrong = min(_seconds(lambda: directory.verify("alice", "wrong")) for _ in range(2))
    assert unknown >= one_hash / 3, (unknown, one_hash)
    assert wrong >= one_hash / 3, (wrong, one_hash)


# -- users file and -u -----------------------------------------------------------

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
    )
    assert users.parse_users_file(str(path)) == [
        ("alice", "alicepw"), ("bob", "pass:with:colons"), ("carol", hashed), ("dave", "p#not-a-comment"),
    ]


def test_users_file_entries_feed_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"alice:alicepw\nbob:{users.hash_password('bobpw', CHEAP)}\n")
    directory = UserDirectory()
    directory.add_configured(users.parse_users_file(str(path)))
    assert directory.verify("alice", "alicepw") and directory.verify("bob", "bobpw")


@pytest.mark.parametrize(("content", "line", "what"), [
    ("alice:pw\nnocolon\n", 2, "expected name:password"),
    ("alice:\n", 1, "expected name:password"),
    (":pw\n", 1, "unsafe user name"),
    ("# ok\n../x:pw\n", 2, "unsafe user name"),
    ("a b:pw\n", 1, "unsafe user name"),
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


def test_unknown_user_pays_the_cost_of_the_entries_in_use() -> None:
    """Regression: unknown names were checked at the default cost whatever the entries used,
    so with dearer (or cheaper) hashes a wrong name answered faster than a wrong password."""
    dear = (2**16, 8, 1)  # four times the default cost
    encoded = users.hash_password("pw", dear)
    one_hash = min(_seconds(lambda: users.verify_password("pw", encoded)) for _ in range(2))
    directory = UserDirectory()
    directory.add_configured([("alice", encoded)])
    unknown = min(_seconds(lambda: directory.verify("nobody", "pw")) for _ in range(2))
    assert unknown >= one_hash / 2, (unknown, one_hash)


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
    admins = users.Credentials()
    admins.add_configured([("admin", "plain"), ("root", users.hash_password("hashed", CHEAP))])
    assert admins.verify("admin", "plain") and admins.verify("root", "hashed")
    assert not admins.verify("root", users.hash_password("hashed", CHEAP))
    assert not admins.verify("nobody", "plain")
    assert not hasattr(admins, "set_password") and not hasattr(admins, "delete")


# -- equal timing across entry costs, and the upgrade of cheap entries ----------------

def test_failures_cost_the_same_for_unknown_names_and_entries_of_any_cost() -> None:
    """Regression: an entry of a cheaper cost answered a wrong password in a quarter of the
    time an unknown name took, which told the name exists. The three are measured in turn
    in each of 11 rounds (so a change of machine load hits all three alike); their medians
    may be twice apart at most, a bound a busy machine keeps (before the fix: 8 times)."""
    cheaper = (2**12, 8, 1)
    directory = UserDirectory()
    directory.add_configured([("dear", users.hash_password("pw")), ("cheap", users.hash_password("pw", cheaper))])
    for _ in range(2):  # warm up: the dummy hash, the top-up list, the threads
        directory.verify("nobody", "x")
        directory.verify("cheap", "x")
    samples: dict[str, list[float]] = {"nobody": [], "dear": [], "cheap": []}
    for _ in range(11):
        for name, times in samples.items():
            times.append(_seconds(lambda name=name: directory.verify(name, "wrong")))
    medians = {name: statistics.median(times) for name, times in samples.items()}
    assert max(medians.values()) < 2 * min(medians.values()), medians


def test_top_up_brings_any_cost_to_the_reference_work() -> None:
    reference = users.DEFAULT_COST
    for cost in [(16, 1, 1), (2**10, 8, 1), (2**12, 8, 1), (2**13, 8, 2), None]:
        total = users.cost_work(cost) if cost is not None else 0
        total += sum(users.cost_work(part) for part in users.top_up_costs(cost, reference))
        assert 0.99 * users.cost_work(reference) <= total <= users.cost_work(reference), cost
    assert users.top_up_costs(reference, reference) == ()
    assert users.top_up_costs((2**15, 8, 1), reference) == ()


def test_a_cheap_stored_entry_is_rehashed_at_the_default_cost_at_its_next_login() -> None:
    store = MemoryStore({"bob": users.hash_password("bobpw", CHEAP)})
    directory = UserDirectory(store)
    directory.add_configured([("carol", users.hash_password("carolpw", CHEAP))])
    assert directory.verify("bob", "bobpw") and directory.verify("carol", "carolpw")
    wait_until(lambda: not directory._upgrading)  # the upgrades run after the logins answered
    assert users.hash_cost(directory._hashes["bob"]) == users.DEFAULT_COST
    assert users.hash_cost(store.users["bob"]) == users.DEFAULT_COST  # saved: it is the store's entry
    # A file's or flag's entry is left as given: upgraded in memory only, it would be
    # hashed again at every start (`geventpop3 hash` makes strong entries for files).
    assert users.hash_cost(directory._hashes["carol"]) == CHEAP
    assert "carol" not in store.users
    assert directory.verify("bob", "bobpw") and not directory.verify("bob", "wrong")
    assert directory.verify("carol", "carolpw")
