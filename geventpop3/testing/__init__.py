"""A real POP3 server for tests: `Pop3TestServer` (geventpop3.testing.server) and the pytest
plugin (geventpop3.testing.pytest_plugin).

The names are loaded on first use, so the plugin, which pytest loads into every run where
geventpop3 is installed, costs nothing until a fixture is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from geventpop3.testing.server import Pop3TestServer, Pop3TestServerError

__all__ = ["Pop3TestServer", "Pop3TestServerError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from geventpop3.testing import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
