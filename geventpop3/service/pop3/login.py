"""From credentials to an open mailbox, in one place: Dovecot's login/post-login boundary.

`LoginPipeline.open` runs every step a POP3 login takes, in this order, and returns
`Opened` (the mailbox locked, its snapshot filtered) or `Failed(reason)`:

1. the per user+source limit (`max_sessions_per_user_ip`): logins in flight, counted by
   `ctx.accounting` (the whole server's) from here to the end of this call, whatever its outcome;
2. the password check, a source with recent failures waiting behind clean ones for a
   hash thread; a right password clears the source's penalty (when the login ends);
3. the Maildir opened (created at a user's first login) and its lock taken;
4. with a shared store, the lease other instances see;
5. the snapshot (scan, size cache; `max_messages_per_mailbox` and `max_message_size`) and
   the first run of the filters; a client gone meanwhile ends the login (ClientGone).

A failure after step 3 gives the lock (and lease) back. `reason` is one of the protocol
core's `LOGIN_FAILURES` keys; the session counts, logs and answers it (with the penalty's
delay for guessing). The pipeline is one per service and keeps nothing per session.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from geventpop3.core.message import Message
from geventpop3.core.names import HashingBusy
from geventpop3.core.peer import Peer
from geventpop3.core.pop3.protocol import Login
from geventpop3.mail import maildir
from geventpop3.service.context import ServerContext
from geventpop3.service.filters import ClientGone
from geventpop3.state import leases

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Opened:
    """Logged in: the mailbox is locked (and leased) until the session releases it."""

    mailbox: maildir.Mailbox
    messages: list[Message]  # the snapshot, filtered: a message the filters could not prepare has its error


@dataclass(frozen=True, slots=True)
class Failed:
    """Not logged in, for `reason` (a key of geventpop3.core.pop3.protocol.LOGIN_FAILURES)."""

    reason: str


class LoginPipeline:
    """Every step between a `Login` action and a logged-in session (see the module doc)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def open(self, login: Login, peer: Peer, client_gone: Callable[[], bool]) -> Opened | Failed:
        """Check, lock, lease, scan and filter, counted in max_sessions_per_user_ip while it runs.
        Raises ClientGone (nothing held then) when the client left during the first filter run."""
        accounting = self.ctx.accounting  # the whole server's (with workers: the supervisor's)
        source = peer.source
        failures = accounting.login(login.user, source)
        if failures is None:
            self.ctx.metrics.refused_user_ip += 1
            return Failed("user-ip")
        verified: list[bool] = []
        try:
            return self._open(login, peer, client_gone, failures, verified)
        finally:  # logged in, failed or killed: no longer in flight; a right password forgets the penalty
            accounting.login_done(login.user, source, bool(verified))

    def _open(self, login: Login, peer: Peer, client_gone: Callable[[], bool], failures: int,
              verified: list[bool]) -> Opened | Failed:
        ctx = self.ctx
        user = login.user
        try:  # a source with recent failures waits behind clean ones for a hash thread
            ok = ctx.users.verify(user, login.password, priority=failures)
        except HashingBusy:
            return Failed("busy")
        if not ok:
            # With a shared store that is down, this instance cannot be sure its users are
            # current: every failure is temporary then (delayed all the same).
            shared = ctx.shared
            return Failed("auth" if shared is None or shared.available else "unverified")
        verified.append(True)
        try:
            mailbox = maildir.Mailbox(ctx.settings.maildir, user)
            mailbox.open()  # creates the Maildir at a user's first login
            if not mailbox.lock():
                return Failed("in-use")
        except (OSError, maildir.MaildirError) as exc:
            log.error("pop3 mailbox error: user=%s error=%s", loggable(user), exc)
            return Failed("temp")
        if ctx.shared is not None:  # the lease other instances see; the lock above is this host's
            lease = ctx.shared.leases.acquire(user)
            if lease != leases.HELD:
                mailbox.release()
                return Failed("in-use" if lease == leases.IN_USE else "temp")
        settings = ctx.settings
        try:
            messages = mailbox.snapshot(settings.uidl_format, settings.max_messages_per_mailbox,
                                        settings.max_message_size, client_gone)
            if ctx.filters is not None:
                messages = ctx.filters.prepare(messages, user=user, address=peer.address, port=peer.port,
                                               client_gone=client_gone)
        except (ClientGone, maildir.Cancelled) as exc:  # nobody to answer: free the mailbox now (a disconnect)
            self.release(mailbox)
            log.info("pop3 login abandoned: user=%s rip=%s rport=%d: client gone while %s",
                     loggable(user), peer.address, peer.port,
                     "scanning" if isinstance(exc, maildir.Cancelled) else "filtering")
            if isinstance(exc, ClientGone):
                raise
            raise ClientGone("client gone while its mailbox was being scanned") from None
        except maildir.TooManyMessages as exc:  # refused, nothing touched: the owner must clean up
            self.release(mailbox)
            log.error("pop3 mailbox refused: user=%s %s; nothing deleted", loggable(user), exc)
            return Failed("perm")
        except Exception as exc:
            self.release(mailbox)
            log.error("pop3 mailbox scan failed: user=%s error=%s", loggable(user), exc)
            return Failed("temp")
        return Opened(mailbox, messages)

    def release(self, mailbox: maildir.Mailbox) -> None:
        """Give up the lock and, with a shared store, the lease (at logout, or a failure past the lock)."""
        mailbox.release()
        if self.ctx.shared is not None:
            self.ctx.shared.leases.release(mailbox.user)


def loggable(name: str | None) -> str:
    """A user name safe to put in a log line (no spaces, no control characters)."""
    if name is None:
        return "-"
    return _UNSAFE_LOG_CHARS.sub("?", name)[:64] or "?"


_UNSAFE_LOG_CHARS = re.compile(r"[^A-Za-z0-9._@+-]")
