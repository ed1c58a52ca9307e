"""`uidl_format` on a running server, without Dovecot installed: a dovecot-uidlist as Dovecot
writes it (the real Dovecot is in test_dovecot_migration.py), poplib as the client."""

from __future__ import annotations

from pathlib import Path

from helpers import ServerProcess, admin, pop3

from geventpop3.mail import dovecot_uidlist

UIDLIST = "3 V1796161725 N4 G2f8d1f10bd400f6bc37a000083ecc375\n1 W9 :1733000001.M1P1.mx\n2 Pkept :1733000002.M2P1.mx\n"


def dovecot_maildir(server: ServerProcess) -> None:
    box = server.maildir / "alice"
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    (box / "cur" / "1733000001.M1P1.mx:2,S").write_bytes(b"S: a\n\nb\n")
    (box / "cur" / "1733000002.M2P1.mx:2,").write_bytes(b"S: b\n\nb\n")
    (box / "new" / "1733000000.M0P1.mx").write_bytes(b"S: new\n\nc\n")  # delivered after Dovecot
    (box / dovecot_uidlist.NAME).write_text(UIDLIST)


def test_dovecot_uidls_on_a_running_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, config='uidl_format = "%08Xu%08Xv"\n')
    dovecot_maildir(server)
    server.start()
    try:
        session = pop3(server, "alice", "alicepw")
        assert session.uidl()[1] == [b"1 000000016b0f40bd", b"2 kept", b"3 1733000000.M0P1.mx"]
        assert session.list()[1] == [b"1 9", b"2 11", b"3 13"]  # 1: W from dovecot-uidlist, not measured (11)
        session.quit()
        with admin(server) as client:
            assert client.get("uidl_format") == "%08Xu%08Xv"
            refused = client.command("SET uidl_format %f")
            assert not refused.ok and "read-only over MSMP" in refused.text
    finally:
        server.stop()


def test_the_default_shows_base_names_and_saved_uidls(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path)
    dovecot_maildir(server)
    server.start()
    try:
        session = pop3(server, "alice", "alicepw")
        assert session.uidl()[1] == [b"1 1733000001.M1P1.mx", b"2 kept", b"3 1733000000.M0P1.mx"]
        session.quit()
    finally:
        server.stop()
