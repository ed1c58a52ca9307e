"""The one place test and load runs get certificates: a throw-away CA (trustme) and a server
certificate it signed for localhost, 127.0.0.1 and ::1, written as PEM files.

trustme is a test extra, imported only when a certificate is made.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Certificates:
    """A CA certificate (what clients trust) and the server's chain and key it signed."""

    ca: Path  # --cacert, -CAfile
    cert: Path  # the server's chain, leaf first
    key: Path  # its private key, mode 0600

    def server_args(self) -> list[str]:
        """The server's flags for this certificate (STLS; add --pop3s-port for implicit TLS)."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def client_context(self, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A client context that verifies the server against this CA, host name included."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if maximum is not None:
            context.maximum_version = maximum
        return context


def _trustme() -> Any:
    try:
        import trustme
    except ImportError:
        raise RuntimeError("certificates need trustme: pip install 'geventpop3[testing]'") from None
    return trustme


def make_certificates(directory: str | os.PathLike[str], *, rsa: bool = False,
                      common_name: str | None = None) -> Certificates:
    """A new CA and a server certificate for localhost, 127.0.0.1 and ::1, in `directory`
    (ca.pem, cert.pem, key.pem).

    ECDSA P-256 by default (fastest to make); `rsa=True` for RSA 2048, the key Dovecot's
    published TLS figures were measured with (a handshake's cost depends on it).
    `common_name` sets the subject's CN too (fetchmail wants one)."""
    trustme = _trustme()
    key_type = trustme.KeyType.RSA if rsa else trustme.KeyType.ECDSA
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA(key_type=key_type)
    leaf = authority.issue_cert("localhost", "127.0.0.1", "::1", common_name=common_name, key_type=key_type)
    files = Certificates(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    authority.cert_pem.write_to_path(str(files.ca))
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(files.cert), append=index > 0)
    files.key.touch(0o600)  # never readable by others, not even for a moment
    leaf.private_key_pem.write_to_path(str(files.key))
    files.key.chmod(0o600)
    return files


def make_stray_key(path: str | os.PathLike[str]) -> Path:
    """A private key (mode 0600) that belongs to no certificate made here: a mismatched key pair."""
    stray = Path(path)
    _trustme().CA().issue_cert("other.example").private_key_pem.write_to_path(str(stray))
    stray.chmod(0o600)
    return stray
