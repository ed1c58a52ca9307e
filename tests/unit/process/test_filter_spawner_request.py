"""The filter spawner's request parser: only what geventpop3.service.filters sends is run."""

from __future__ import annotations

import json

import pytest

from geventpop3.process.filter_spawner import Request


def encode(**fields: object) -> bytes:
    base: dict[str, object] = {"argv": ["/bin/cat"], "env": {"PATH": "/bin"}, "max_output": 100, "timeout": 5}
    base.update(fields)
    return json.dumps(base).encode()


def test_a_request_as_the_runner_sends_it() -> None:
    assert Request.parse(encode()) == Request(["/bin/cat"], {"PATH": "/bin"}, 100, 5.0)


@pytest.mark.parametrize("data", [
    b"not json", b"[]", encode(argv=[]), encode(argv=[""]), encode(argv="/bin/cat"), encode(argv=["/bin/cat", 1]),
    encode(env={"A": 1}), encode(env=[]), encode(max_output=-1), encode(max_output=True), encode(max_output="1"),
    encode(timeout=0), encode(timeout=10**6), encode(timeout=None),
])
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Request.parse(data)
