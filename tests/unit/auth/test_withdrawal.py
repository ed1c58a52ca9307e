"""users.UserDirectory.withdraw: a user taken out at once, then forgotten (commit) or put
back as it was (rollback), as a cluster worker does across the supervisor's DELE messages."""

from __future__ import annotations

import pytest

from geventpop3.auth.users import UserDirectory
from geventpop3.core.names import UserError


class Store:
    def __init__(self, users: dict[str, str], fail: bool = False) -> None:
        self.users = dict(users)
        self.fail = fail

    def load_users(self) -> dict[str, str]:
        return dict(self.users)

    def save_user(self, name: str, password_hash: str) -> None:
        self.users[name] = password_hash

    def delete_user(self, name: str) -> None:
        if self.fail:
            raise OSError("disk full")
        del self.users[name]


def directory(store: Store) -> UserDirectory:
    users = UserDirectory(store)
    users.set_password("alice", "alicepw")
    return users


def test_a_withdrawn_user_cannot_log_in_until_the_outcome() -> None:
    users = directory(Store({}))
    withdrawal = users.withdraw("alice")
    assert "alice" not in users and not users.verify("alice", "alicepw")
    with pytest.raises(UserError):  # no ADD of the name meanwhile
        users.set_password("alice", "other")
    withdrawal.rollback()
    assert users.verify("alice", "alicepw")


def test_commit_forgets_the_user_in_the_store_too() -> None:
    store = Store({})
    users = directory(store)
    users.withdraw("alice").commit()
    assert "alice" not in users and "alice" not in store.users


def test_rollback_puts_the_user_back_as_it_was() -> None:
    store = Store({})
    users = directory(store)
    withdrawal = users.withdraw("alice")
    withdrawal.rollback()
    withdrawal.commit()  # the first outcome counts
    assert users.verify("alice", "alicepw") and "alice" in store.users
    assert users.stored_entries().keys() == {"alice"}


def test_a_store_that_fails_at_commit_puts_the_user_back() -> None:
    users = directory(Store({}))
    users._store.fail = True  # type: ignore[union-attr]
    with pytest.raises(OSError):
        users.withdraw("alice").commit()
    assert users.verify("alice", "alicepw")


def test_no_such_user_cannot_be_withdrawn() -> None:
    with pytest.raises(UserError):
        UserDirectory().withdraw("nobody")
