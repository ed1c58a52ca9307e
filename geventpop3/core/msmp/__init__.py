"""MSMP, the management protocol: its pure core (the socket side is geventpop3.service.msmp)."""

from geventpop3.core.msmp.protocol import MAX_LOGIN_FAILURES, Backend, MsmpProtocol

__all__ = ["MAX_LOGIN_FAILURES", "Backend", "MsmpProtocol"]
