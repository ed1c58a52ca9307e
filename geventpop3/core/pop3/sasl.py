"""SASL for POP3 AUTH (RFC 5034): the PLAIN (RFC 4616) and LOGIN exchanges, without I/O.

An exchange is fed the client's response lines one at a time and answers with the
next challenge (bytes to send), the credentials it gathered (a `Credentials`), or a
`SaslError` whose text is the `-ERR` line. The POP3 core turns credentials into the
same `Login` action USER/PASS produce, so both paths share every later check.
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")

CONTINUE = b"+ \r\n"
LOGIN_USERNAME = b"+ VXNlcm5hbWU6\r\n"  # base64 "Username:"
LOGIN_PASSWORD = b"+ UGFzc3dvcmQ6\r\n"  # base64 "Password:"

ERR_CANCELLED = b"-ERR Authentication cancelled\r\n"
ERR_BASE64 = b"-ERR Invalid base64 data\r\n"
ERR_MALFORMED = b"-ERR Malformed authentication data\r\n"
ERR_AUTHZID = b"-ERR [AUTH] Authorization identity must equal the authentication identity\r\n"
ERR_MECHANISM = b"-ERR Unsupported authentication mechanism\r\n"


class SaslError(Exception):
    """The exchange failed before any password check: `args[0]` is the -ERR line."""


@dataclass(frozen=True, slots=True)
class Credentials:
    user: str
    password: str


def decode_response(line: bytes) -> bytes:
    """A client response: `*` cancels, `=` is empty (RFC 5034 section 4), else strict base64."""
    if line == b"*":
        raise SaslError(ERR_CANCELLED)
    if line == b"=":
        return b""
    try:
        return b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError(ERR_BASE64) from None


def decode_plain(message: bytes) -> Credentials:
    """RFC 4616: [authzid] NUL authcid NUL passwd; only authzid empty or equal to authcid."""
    parts = message.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SaslError(ERR_MALFORMED)
    authzid, authcid, password = _text(parts[0]), _text(parts[1]), _password(parts[2])
    if authzid and authzid != authcid:
        raise SaslError(ERR_AUTHZID)
    return Credentials(authcid, password)


def _password(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")  # as PASS: any octets, compared as given


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(ERR_MALFORMED) from None


class SaslExchange:
    """One AUTH exchange in progress. `start()` then `step(line)` until it returns Credentials."""

    __slots__ = ("mechanism", "_user")

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism  # "PLAIN" or "LOGIN"
        self._user: str | None = None

    def start(self, initial: bytes | None) -> bytes | Credentials:
        """The first challenge, or (with an initial response) what that response gives."""
        if initial is None:
            return CONTINUE if self.mechanism == "PLAIN" else LOGIN_USERNAME
        return self.step(initial)

    def step(self, line: bytes) -> bytes | Credentials:
        data = decode_response(line)
        if self.mechanism == "PLAIN":
            return decode_plain(data)
        if self._user is None:
            user = _text(data)
            if not user:
                raise SaslError(ERR_MALFORMED)
            self._user = user
            return LOGIN_PASSWORD
        password = _password(data)
        if not password:
            raise SaslError(ERR_MALFORMED)
        return Credentials(self._user, password)
