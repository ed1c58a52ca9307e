"""The seed's filters for real, through the real server: SpamAssassin and renattach (Debian packages).

`.ci/run` installs both; they are not skipped when missing, because they are part of
what the project promises.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import LineClient, ServerProcess

GTUBE = (
    b"From: Spammer <spam@example.net>\nTo: alice@example.org\nSubject: Buy now\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <20240101100000.666@example.net>\n\n"
    b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\n"
)
HAM = (
    b"From: Bob <bob@example.org>\nTo: Alice <alice@example.org>\nSubject: Lunch tomorrow\n"
    b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <20240101100000.12345@mail.example.org>\n\n"
    b"Hi Alice,\n\nAre we still on for lunch tomorrow at noon?\n\nBob\n"
)
EXE_ATTACHMENT = b"""From: a@example.org
To: alice@example.org
Subject: invoice
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="XYZ"

--XYZ
Content-Type: text/plain

See attached.
--XYZ
Content-Type: application/octet-stream; name="invoice.exe"
Content-Disposition: attachment; filename="invoice.exe"
Content-Transfer-Encoding: base64

TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
--XYZ--
"""


def retrieve_all(server: ServerProcess, user: str = "alice") -> tuple[list[int], list[bytes]]:
    """LIST sizes and RETR bodies (un-dot-stuffed, CRLF kept) of one session."""
    with LineClient(server.port, timeout=60) as client:
        assert client.greeting.startswith(b"+OK")
        count = int(client.login(user, server.users[user]).split()[3])
        sizes = [int(line.split()[1]) for line in client.multi("LIST")[1].splitlines()]
        bodies = [client.retr(number) for number in range(1, count + 1)]
        assert client.cmd("QUIT").startswith(b"+OK")
        assert client.read_until_closed(timeout=60) == b""  # closed by the server once the mailbox is unlocked
    return sizes, bodies


def headers(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def test_spamassassin_marks_gtube_as_spam_and_ham_as_ham(start_server: Callable[..., ServerProcess],
                                                         tmp_path: Path) -> None:
    prefs = tmp_path / "user_prefs"
    prefs.write_text("use_bayes 0\nbayes_auto_learn 0\n")  # nothing learnt, nothing written to $HOME
    server = start_server(config=(
        'transformer = "spam"\ntransformer_concurrency = 2\n'
        f'[transformers.spam]\ncommand = ["spamassassin", "-L", "-p", "{prefs}"]\n'
    ))
    spam_file = server.deliver("alice", GTUBE)
    server.deliver("alice", HAM)
    sizes, (spam, ham) = retrieve_all(server)
    assert sizes == [len(spam), len(ham)]
    assert b"\r\nX-Spam-Flag: YES\r\n" in headers(spam)
    assert b"X-Spam-Status: Yes" in headers(spam) and b"GTUBE" in spam
    assert b"X-Spam-Flag: YES" not in ham and b"X-Spam-Status: No" in headers(ham)
    assert b"Are we still on for lunch tomorrow at noon?" in ham
    assert Path(spam_file).read_bytes() == GTUBE  # the stored message is untouched


def test_renattach_renames_a_dangerous_attachment(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(extra_args=["-t", "renattach"])
    stored = server.deliver("alice", EXE_ATTACHMENT)
    server.deliver("alice", HAM)
    sizes, (filtered, plain) = retrieve_all(server)
    assert sizes == [len(filtered), len(plain)]
    assert b'filename="invoice.exe"' not in filtered and b"invoice_exe.bad" in filtered
    assert b"Subject: [filtered] invoice" in headers(filtered)
    assert b"See attached." in filtered
    assert b"Are we still on for lunch tomorrow at noon?" in plain and b"[filtered]" not in plain
    assert Path(stored).read_bytes() == EXE_ATTACHMENT
