"""One message of a session's snapshot: plain data, no I/O.

Kept apart from `geventpop3.mail.maildir` so the sans-IO POP3 core (`pop3/protocol.py`)
can name messages without importing gevent, fcntl or anything that touches a disk.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Message:
    """One message of a session's snapshot."""

    uid: str  # the Maildir base name before ':' (what Dovecot's %f gives): the file's identity here
    path: str  # the file RETR/TOP stream: the original, or a filter's output
    size: int  # octets RETR sends: CRLF line ends, no dot-stuffing
    source: str  # the file in the Maildir, what UPDATE deletes
    error: str | None = None  # set when the message cannot be sent (a failed filter)
    file_id: int = 0  # device and inode of `source` at the snapshot: RETR opens that file or none
    uidl: str = ""  # what UIDL shows when it is not `uid`: Dovecot's UIDL of it (geventpop3.mail.dovecot_uidlist)
