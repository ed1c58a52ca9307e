"""Admin credentials as the README gives them: `-a name:$scrypt$...` and `-a name:password`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers import ServerProcess

from admin.client import MsmpAuthError, MsmpClient
from geventpop3.auth.users import hash_password

CHEAP = (2**8, 8, 1)


def test_admin_given_as_a_scrypt_hash_logs_in_with_the_password(start_server: Callable[..., ServerProcess]) -> None:
    """Regression: the hash of `-a admin:$scrypt$...` was hashed again, so only the hash itself logged in."""
    encoded = hash_password("s3cret", CHEAP)
    server = start_server(extra_args=["-a", f"hashed:{encoded}"])
    with MsmpClient("127.0.0.1", server.admin_port, timeout=15) as client:
        client.login("hashed", "s3cret")
        assert client.list_users() == ["alice", "bob", "carol"]
    with MsmpClient("127.0.0.1", server.admin_port, timeout=15) as client, pytest.raises(MsmpAuthError):
        client.login("hashed", encoded)
