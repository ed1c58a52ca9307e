"""The POP3 core's STLS, AUTH (SASL PLAIN/LOGIN), CAPA per connection and plaintext policy, without I/O."""

from __future__ import annotations

import base64

import pytest

from geventpop3.core.lines import LINE_TOO_LONG, Delayed
from geventpop3.core.pop3.protocol import ERR_INSECURE, Login, Pop3Protocol, Refused, StartTls, State
from geventpop3.core.pop3.sasl import SaslError, decode_plain, decode_response
from geventpop3.core.pop3.security import ConnectionSecurity
from geventpop3.core.settings import Settings
from geventpop3.service.setting_checks import checked_settings


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def protocol(client: str = "192.0.2.7", server: str = "192.0.2.1", tls: bool = False, certificate: bool = True,
             settings: Settings | None = None, max_failures: int = 3) -> Pop3Protocol:
    if settings is None:
        settings = checked_settings()
        if certificate:  # as config.py does: with a certificate, plaintext logins only where secure
            settings.set("plaintext_auth", "tls", "config")
    security = ConnectionSecurity(settings, client, server, tls=tls, tls_available=certificate)
    return Pop3Protocol(max_failures, 0.5, security)


def capa(proto: Pop3Protocol) -> list[bytes]:
    response = proto.handle(b"CAPA")
    assert isinstance(response, bytes) and response.startswith(b"+OK")
    return response.split(b"\r\n")[1:-2]


def login(proto: Pop3Protocol) -> None:
    proto.login_succeeded("alice", [])


# -- the secure-connection rule -------------------------------------------------

@pytest.mark.parametrize(("client", "server", "tls", "trusted", "secure"), [
    ("192.0.2.7", "192.0.2.1", False, "none", False),
    ("192.0.2.7", "192.0.2.1", True, "none", True),  # TLS
    ("192.0.2.1", "192.0.2.1", False, "none", True),  # local: same address as the server
    ("::ffff:192.0.2.1", "192.0.2.1", False, "none", True),  # dual-stack listener, same address
    ("192.0.2.7", "192.0.2.1", False, "10.0.0.0/8,192.0.2.0/24", True),
    ("192.0.2.7", "192.0.2.1", False, "192.0.2.8/32", False),
    ("2001:db8::7", "2001:db8::1", False, "2001:db8::/32", True),
    ("2001:db8::7", "2001:db8::1", False, "0.0.0.0/0", False),  # other family
])
def test_secure_connection_rule(client: str, server: str, tls: bool, trusted: str, secure: bool) -> None:
    settings = checked_settings()
    settings.set("trusted_networks", trusted)
    assert ConnectionSecurity(settings, client, server, tls=tls).secure() is secure


def test_trusted_networks_validation_and_format() -> None:
    settings = checked_settings()
    assert str(settings.set("trusted_networks", "10.1.2.3/8, 2001:db8::1")) == "10.0.0.0/8,2001:db8::1/128"
    assert settings.get("trusted_networks") == "10.0.0.0/8,2001:db8::1/128"
    for bad in ("10.0.0.0/33", "example.com", "10.0.0.0/8,nonsense"):
        with pytest.raises(ValueError, match="CIDR"):
            settings.set("trusted_networks", bad)
    assert settings.get("trusted_networks") == "10.0.0.0/8,2001:db8::1/128"
    settings.set("trusted_networks", "none")
    assert settings.get("trusted_networks") == "none"


@pytest.mark.parametrize(("key", "good", "bad"), [
    ("plaintext_auth", ["tls", "always"], ["never", "TLS", "yes"]),
    ("tls_min_version", ["TLSv1.2", "TLSv1.3"], ["TLSv1.1", "tls1.3", "1.3"]),
])
def test_tls_settings_validate(key: str, good: list[str], bad: list[str]) -> None:
    settings = checked_settings()
    for value in good:
        assert settings.set(key, value) == value
    for value in bad:
        with pytest.raises(ValueError):
            settings.set(key, value)


# -- CAPA and the plaintext policy ----------------------------------------------

def test_capa_on_an_insecure_connection_offers_stls_and_no_password_mechanism() -> None:
    lines = capa(protocol())
    assert b"STLS" in lines and b"USER" not in lines
    assert b"SASL" in lines  # bare, as Dovecot: no mechanism
    assert not any(line.startswith(b"SASL ") for line in lines)


def test_capa_after_tls_lists_user_and_sasl_but_not_stls() -> None:
    lines = capa(protocol(tls=True))
    assert b"USER" in lines and b"SASL PLAIN LOGIN" in lines and b"STLS" not in lines


def test_capa_without_a_certificate_has_no_stls() -> None:
    assert b"STLS" not in capa(protocol(client="192.0.2.1", certificate=False))


def test_capa_in_transaction_has_no_stls() -> None:
    proto = protocol(client="192.0.2.1")
    login(proto)
    assert b"STLS" not in capa(proto)


def test_plaintext_auth_always_allows_insecure_connections() -> None:
    settings = checked_settings()
    settings.set("plaintext_auth", "always")
    proto = protocol(settings=settings)
    assert b"USER" in capa(proto)
    assert proto.handle(b"USER alice") == b"+OK\r\n"
    assert proto.handle(b"PASS pw") == Login("alice", "pw", "user")


def test_user_on_an_insecure_connection_is_refused_as_a_failed_login() -> None:
    proto = protocol()
    assert proto.handle(b"USER alice") == Refused("alice", "user")
    assert proto.login_failed("insecure") == Delayed(0.5, ERR_INSECURE)
    assert proto.failures == 1
    assert proto.handle(b"PASS pw") == b"-ERR Send USER first\r\n"


@pytest.mark.parametrize(("line", "mech"), [(b"AUTH PLAIN " + b64(b"\0alice\0pw"), "plain"), (b"AUTH LOGIN", "login"),
                                            (b"auth plain", "plain")])
def test_auth_on_an_insecure_connection_is_refused(line: bytes, mech: str) -> None:
    assert protocol().handle(line) == Refused(None, mech)


def test_the_failure_limit_counts_insecure_refusals() -> None:
    proto = protocol(max_failures=2)
    proto.handle(b"USER a")
    proto.login_failed("insecure")
    assert not proto.closing
    proto.handle(b"AUTH PLAIN")
    proto.login_failed("insecure")
    assert proto.closing


def test_a_setting_change_applies_between_user_and_pass() -> None:
    settings = checked_settings()
    settings.set("plaintext_auth", "always")
    proto = protocol(settings=settings)
    assert proto.handle(b"USER alice") == b"+OK\r\n"
    settings.set("plaintext_auth", "tls")
    assert proto.handle(b"PASS pw") == Refused("alice", "user")


# -- STLS --------------------------------------------------------------------------

def test_stls_starts_tls_and_forgets_user() -> None:
    proto = protocol()
    settings = checked_settings()
    settings.set("plaintext_auth", "always")
    proto.security.settings = settings
    assert proto.handle(b"USER alice") == b"+OK\r\n"
    assert proto.handle(b"STLS") == StartTls()
    proto.tls_started()
    assert proto.state is State.AUTHORIZATION
    assert proto.handle(b"PASS pw") == b"-ERR Send USER first\r\n"
    assert proto.handle(b"STLS") == b"-ERR TLS is already active\r\n"


def test_stls_refusals() -> None:
    assert protocol(certificate=False).handle(b"STLS") == b"-ERR TLS is not available\r\n"
    assert protocol(tls=True).handle(b"stls") == b"-ERR TLS is already active\r\n"
    assert protocol().handle(b"STLS now") == b"-ERR Syntax error\r\n"
    proto = protocol(client="192.0.2.1")
    login(proto)
    assert proto.handle(b"STLS") == b"-ERR Already logged in\r\n"


# -- SASL --------------------------------------------------------------------------

def test_auth_alone_lists_the_mechanisms() -> None:
    assert protocol(tls=True).handle(b"AUTH") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    assert protocol().handle(b"AUTH") == b"+OK\r\n.\r\n"


def test_auth_plain_initial_response() -> None:
    proto = protocol(tls=True)
    assert proto.handle(b"AUTH PLAIN " + b64(b"\0alice\0pass word")) == Login("alice", "pass word", "plain")


def test_auth_plain_continuation_with_equal_authzid() -> None:
    proto = protocol(tls=True)
    assert proto.handle(b"AUTH PLAIN") == b"+ \r\n"
    assert proto.handle(b64(b"alice\0alice\0pw")) == Login("alice", "pw", "plain")


def test_auth_login_exchange() -> None:
    proto = protocol(tls=True)
    assert proto.handle(b"AUTH LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert proto.handle(b64(b"alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert proto.handle(b64(b"pw")) == Login("alice", "pw", "login")


def test_auth_login_with_the_user_name_as_initial_response() -> None:
    proto = protocol(tls=True)
    assert proto.handle(b"AUTH LOGIN " + b64(b"alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert proto.handle(b64(b"pw")) == Login("alice", "pw", "login")


@pytest.mark.parametrize(("lines", "error"), [
    ([b"AUTH PLAIN", b"*"], b"-ERR Authentication cancelled\r\n"),
    ([b"AUTH LOGIN", b"*"], b"-ERR Authentication cancelled\r\n"),
    ([b"AUTH LOGIN", b64(b"alice"), b"*"], b"-ERR Authentication cancelled\r\n"),
    ([b"AUTH PLAIN ab$c"], b"-ERR Invalid base64 data\r\n"),
    ([b"AUTH PLAIN", b"YWxpY2U"], b"-ERR Invalid base64 data\r\n"),  # padding missing
    ([b"AUTH PLAIN " + b64(b"alice\0pw")], b"-ERR Malformed authentication data\r\n"),
    ([b"AUTH PLAIN " + b64(b"\0\0pw")], b"-ERR Malformed authentication data\r\n"),
    ([b"AUTH PLAIN ="], b"-ERR Malformed authentication data\r\n"),
    ([b"AUTH PLAIN " + b64(b"\0\xffalice\0pw")], b"-ERR Malformed authentication data\r\n"),
    ([b"AUTH PLAIN " + b64(b"bob\0alice\0pw")],
     b"-ERR [AUTH] Authorization identity must equal the authentication identity\r\n"),
    ([b"AUTH CRAM-MD5"], b"-ERR Unsupported authentication mechanism\r\n"),
    ([b"AUTH PLAIN a b"], b"-ERR Syntax error\r\n"),
])
def test_sasl_errors_keep_authorization_without_counting(lines: list[bytes], error: bytes) -> None:
    proto = protocol(tls=True)
    *challenges, last = lines
    for line in challenges:
        response = proto.handle(line)
        assert isinstance(response, bytes) and response.startswith(b"+ ")
    assert proto.handle(last) == error
    assert proto.state is State.AUTHORIZATION and proto.failures == 0 and not proto.closing
    assert proto.handle(b"NOOP") == b"-ERR Not logged in\r\n"  # back to commands: the exchange is over


def test_a_line_too_long_ends_an_exchange() -> None:
    proto = protocol(tls=True)
    assert proto.handle(b"AUTH PLAIN") == b"+ \r\n"
    assert proto.handle(LINE_TOO_LONG) == b"-ERR Line too long\r\n"
    assert proto.handle(b"CAPA").startswith(b"+OK Capability")


def test_auth_in_transaction_is_refused() -> None:
    proto = protocol(tls=True)
    login(proto)
    assert proto.handle(b"AUTH PLAIN " + b64(b"\0alice\0pw")) == b"-ERR Already logged in\r\n"
    assert proto.handle(b"AUTH") == b"-ERR Already logged in\r\n"


def test_a_failed_sasl_login_is_a_failed_login() -> None:
    proto = protocol(tls=True, max_failures=1)
    assert isinstance(proto.handle(b"AUTH PLAIN " + b64(b"\0alice\0wrong")), Login)
    assert proto.login_failed("auth") == Delayed(0.5, b"-ERR [AUTH] Invalid user name or password\r\n")
    assert proto.closing


def test_sasl_decoding() -> None:
    assert decode_response(b"=") == b""
    assert decode_plain(b"\0user\0p\xffw").password == "p\udcffw"  # any octets, as PASS
    with pytest.raises(SaslError):
        decode_response(b"YQ=\n")
