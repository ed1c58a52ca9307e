"""geventpop3: a POP3 server on gevent with a live management protocol (MSMP)."""

__version__ = "0.1.0"
IMPLEMENTATION = f"geventpop3-{__version__}"
