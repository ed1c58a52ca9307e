"""The admin plane over TLS: `--admin-tls` on the server, `geventpop3-admin --tls [--cacert]` and
`MsmpClient(ssl_context=...)` verifying it; the warning for plaintext MSMP beyond loopback."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from helpers import ADMIN, REPO, ServerProcess, TlsFiles, make_tls_files, run_server, wait_until

from admin.client import MsmpClient, MsmpConnectionError, tls_context


def start_admin_tls(start: Callable[..., ServerProcess], files: TlsFiles, **kwargs: object) -> ServerProcess:
    return start(listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                 extra_args=[*files.server_args(0), "--admin-tls"], **kwargs)


def run_admin(server: ServerProcess, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEVENTPOP3_ADMIN")}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), GEVENTPOP3_ADMIN_PASSWORD=ADMIN[1])
    argv = [sys.executable, "-m", "admin", "-L", "127.0.0.1", "-P", str(server.admin_port), "-u", ADMIN[0], *args]
    return subprocess.run(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def test_admin_shell_over_tls_verifies_with_cacert(start_server: Callable[..., ServerProcess], tls_files: TlsFiles,
                                                   tmp_path: Path) -> None:
    server = start_admin_tls(start_server, tls_files)
    shown = run_admin(server, tmp_path, "--tls", "--cacert", str(tls_files.ca), "STAT")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^Total connections\s+\d+$", shown.stdout, re.M)
    assert re.search(r"^Certificate expires in days\s+\d+$", shown.stdout, re.M)
    reloaded = run_admin(server, tmp_path, "--tls", "--cacert", str(tls_files.ca), "RELOAD")
    assert (reloaded.returncode, reloaded.stdout) == (0, "Reloaded\n"), reloaded.stderr
    assert f"MSMP listening on 127.0.0.1:{server.admin_port} (TLS)" in server.log()


def test_admin_shell_refuses_a_server_it_cannot_verify(start_server: Callable[..., ServerProcess],
                                                       tls_files: TlsFiles, tmp_path: Path) -> None:
    server = start_admin_tls(start_server, tls_files)
    stranger = make_tls_files(tmp_path / "stranger")  # another CA: the server's certificate is not its
    for args in (["--tls", "--cacert", str(stranger.ca)], ["--tls"]):  # a foreign CA; the system store
        refused = run_admin(server, tmp_path, *args, "STAT")
        assert refused.returncode == 2, refused
        assert refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
        assert re.match(r"geventpop3-admin: TLS certificate of 127\.0\.0\.1:\d+ not trusted: "
                        r"unable to get local issuer certificate$", refused.stderr), refused.stderr
    wait_until(lambda: "MSMP 127.0.0.1:" in server.log() and "tls handshake failed" in server.log())
    assert "Traceback" not in server.log()


def test_the_host_name_is_checked_against_the_address_given(start_server: Callable[..., ServerProcess],
                                                            tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("mail.example.org")  # valid, from a trusted CA, but not for 127.0.0.1
    cert, key, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    ca.cert_pem.write_to_path(str(cafile))
    server = start_server(listen=["127.0.0.1"], admin_listen=["127.0.0.1"],
                          extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--pop3s-port", "0",
                                      "--admin-tls"])
    refused = run_admin(server, tmp_path, "--tls", "--cacert", str(cafile), "STAT")
    assert refused.returncode == 2 and "IP address mismatch" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_the_client_library_speaks_tls_and_sees_a_reloaded_certificate(
        start_server: Callable[..., ServerProcess], tls_files: TlsFiles) -> None:
    server = start_admin_tls(start_server, tls_files)
    with MsmpClient("127.0.0.1", server.admin_port, ssl_context=tls_context(str(tls_files.ca))) as client:
        client.login(*ADMIN)
        assert "Certificate expires in days" in client.stat()
        assert client.reload() == "Reloaded"
        assert client.list_users() == ["alice", "bob", "carol"]
    plain = MsmpClient("127.0.0.1", server.admin_port, timeout=2)
    with pytest.raises(MsmpConnectionError):  # a plaintext client gets no greeting
        plain.connect()
    plain.close()


def test_tls_to_a_plaintext_admin_port_is_one_line(server: ServerProcess, tls_files: TlsFiles,
                                                   tmp_path: Path) -> None:
    refused = run_admin(server, tmp_path, "--tls", "--cacert", str(tls_files.ca), "STAT")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "TLS handshake with 127.0.0.1" in refused.stderr and "--admin-tls" in refused.stderr


def test_a_bad_cacert_or_cacert_without_tls_is_a_usage_error(server: ServerProcess, tmp_path: Path) -> None:
    for args, needle in ((["--tls", "--cacert", str(tmp_path / "missing.pem")], "cannot use CA file"),
                         (["--cacert", str(tmp_path / "missing.pem")], "--cacert needs --tls")):
        result = run_admin(server, tmp_path, *args, "STAT")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


def test_garbage_instead_of_a_handshake_closes_the_admin_connection(start_server: Callable[..., ServerProcess],
                                                                    tls_files: TlsFiles) -> None:
    server = start_admin_tls(start_server, tls_files)
    with socket.create_connection(("127.0.0.1", server.admin_port), timeout=10) as sock:
        sock.sendall(b"USER admin\r\nPASS adminpw\r\nSTAT\r\n")
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:  # closed with our garbage unread
            answer = b""
        assert answer == b""  # closed, nothing answered in plaintext
    wait_until(lambda: "tls handshake failed" in server.log())
    assert "Traceback" not in server.log()
    # The server still serves verified TLS clients.
    context = ssl.create_default_context(cafile=str(tls_files.ca))
    with MsmpClient("127.0.0.1", server.admin_port, ssl_context=context) as client:
        client.login(*ADMIN)


def test_admin_tls_without_a_certificate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_server("-d", str(tmp_path / "mail"), "--no-state", "-p", "0", "-P", "0", "--admin-tls")
    assert result.returncode == 2
    assert result.stderr == "geventpop3: --admin-tls needs a certificate (--tls-cert)\n"
    config = tmp_path / "admin.toml"
    config.write_text("admin_tls = true\n")
    result = run_server("-d", str(tmp_path / "mail"), "--no-state", "-p", "0", "-P", "0", "--config", str(config))
    assert result.returncode == 2 and "--admin-tls needs a certificate" in result.stderr


WARNING = "beyond loopback, without --admin-tls"


def test_plaintext_msmp_beyond_loopback_is_a_warning(start_server: Callable[..., ServerProcess],
                                                     tls_files: TlsFiles) -> None:
    # Binding 0.0.0.0 on a free port is no traffic; the clients below still talk over loopback.
    wide = start_server(listen=["127.0.0.1"], admin_listen=["0.0.0.0"])
    assert re.search(r"WARNING MSMP listens on 0\.0\.0\.0:\d+, " + WARNING, wide.log()), wide.log()
    with_tls = start_server(listen=["127.0.0.1"], admin_listen=["0.0.0.0"],
                            extra_args=[*tls_files.server_args(0), "--admin-tls"])
    loopback = start_server(listen=["127.0.0.1"], admin_listen=["127.0.0.1", "127.0.0.2"])
    for quiet in (with_tls, loopback):
        assert WARNING not in quiet.log(), quiet.log()
