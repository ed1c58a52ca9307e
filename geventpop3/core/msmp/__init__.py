"""MSMP, the management protocol: the pure core (protocol) and the socket side (session)."""

from geventpop3.core.msmp.protocol import MAX_LOGIN_FAILURES, Backend, MsmpProtocol

__all__ = ["MAX_LOGIN_FAILURES", "Backend", "MsmpProtocol"]
