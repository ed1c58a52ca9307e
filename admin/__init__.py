"""The companion admin application of geventpop3: an MSMP client library and a shell.

Importing the package loads only the client (no readline, no terminal handling), so
the tests and the Locust load tests can use it cheaply.
"""

from admin.client import (
    MsmpAuthError,
    MsmpClient,
    MsmpConnectionError,
    MsmpError,
    MsmpProtocolError,
    MsmpTimeout,
    Response,
)

__all__ = [
    "MsmpAuthError",
    "MsmpClient",
    "MsmpConnectionError",
    "MsmpError",
    "MsmpProtocolError",
    "MsmpTimeout",
    "Response",
]
