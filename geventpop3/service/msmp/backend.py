"""The MSMP backend of the real server: what ADD, DELE, LIST, SET, GET, STAT and LOGS do.

It owns no state of its own: every fact lives in the `ServerContext` (settings, users,
metrics, access log, store), so what an admin changes is what the POP3 sessions see.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from gevent.lock import Semaphore

from geventpop3.core.metrics import AccessEntry
from geventpop3.core.names import UserError, valid_password, valid_username
from geventpop3.core.penalty import source_of
from geventpop3.mail.maildir import Mailbox
from geventpop3.mail.maildir_root import DELETED_DIR, is_maildir
from geventpop3.service.context import ServerContext
from geventpop3.state import StoreError

log = logging.getLogger(__name__)


class ManagementBackend:
    """Implements geventpop3.core.msmp.protocol.Backend over a ServerContext."""

    def __init__(self, ctx: ServerContext, reload: Callable[[], list[str]] | None = None) -> None:
        self.ctx = ctx
        self._reload = reload  # App.reload: what SIGHUP does
        # One SET at a time: its store write yields, and two SETs of one key must not
        # leave the store and the live value disagreeing.
        self._setting = Semaphore()

    # -- admins ---------------------------------------------------------------
    def check_admin(self, name: str, password: str, peer: str) -> bool:
        """Same cost for an unknown name as for a wrong password (users.PasswordStore); the
        penalty of `peer` orders the wait for a hash thread, a success clears it."""
        penalty = self.ctx.penalty
        ok = self.ctx.admins.verify(name, password, priority=penalty.failures(peer))
        if ok:
            penalty.succeeded(peer)
        return ok

    def login_failure_delay(self, peer: str) -> float:
        """The penalty of `peer`'s source (geventpop3.core.penalty), shared with POP3; read at
        each failure, so `SET login_failure_delay` applies to open sessions."""
        return self.ctx.penalty.failed(peer)

    def penalties(self) -> list[str]:
        return [entry.line() for entry in self.ctx.penalty.entries()]

    def clear_penalty(self, address: str | None) -> int:
        try:
            cleared = self.ctx.penalty.clear(address)
        except ValueError:
            raise UserError("Invalid address") from None
        which = "all sources" if address is None else source_of(address.split("/", 1)[0])
        log.info("MSMP: penalty cleared for %s (%d sources)", which, cleared)
        return cleared

    # -- users ----------------------------------------------------------------
    def _root(self) -> str | None:
        root: str | None = self.ctx.settings.maildir
        return root

    def add_user(self, name: str, password: str) -> bool:
        if not valid_username(name):
            raise UserError("Unsafe username")
        if not valid_password(password):
            raise UserError("Invalid password")
        users = self.ctx.users
        if name not in users and len(users) >= self.ctx.settings.user_limit:
            raise UserError("User limit reached")
        root = self._root()
        if root is not None:
            # Maildir first: an account is never left without a place for its mail.
            mailbox = Mailbox(root, name)
            if os.path.lexists(mailbox.path) and not is_maildir(mailbox.path):
                # Never turn a directory or file that happens to be there into a Maildir.
                log.error("MSMP: not adding %s: %s exists and is not a Maildir", name, mailbox.path)
                raise UserError("Cannot add user: its path exists and is not a Maildir")
            try:
                mailbox.open()  # a vanished root is an error, not something to recreate
            except OSError as exc:
                log.error("cannot create Maildir %s: %s", mailbox.path, exc)
                raise UserError("Cannot create Maildir") from None
        try:
            created = users.set_password(name, password)
        except StoreError as exc:
            log.error("MSMP: user %s not saved: %s", name, exc)
            raise UserError("Cannot save user, state database unavailable") from None
        log.info("MSMP: %s user %s", "added" if created else "changed password of", name)
        return created

    def delete_user(self, name: str) -> None:
        """Withdraw the user, move its Maildir aside, then forget it in the store.

        The user is withdrawn first, before anything can yield, so no POP3 login slips in
        (and recreates an empty Maildir) while the store write waits for the disk. If the
        move or the write fails, the user and its mail are put back and the answer is -ERR.
        """
        users = self.ctx.users
        if name not in users:
            raise UserError("User does not exist")
        root = self._root()
        mailbox = Mailbox(root, name) if root is not None else None
        path = mailbox.path if mailbox is not None else None
        if self.ctx.logged_in.get(name) or (mailbox is not None and mailbox.in_use()) or self._leased(name):
            raise UserError("User is currently logged in")
        moved: str | None = None
        try:
            with users.deleting(name):
                if root is not None and path is not None and os.path.isdir(path):
                    moved = self._move_aside(root, path, name)
        except StoreError as exc:
            if moved is not None and path is not None:
                self._move_back(moved, path, name)
            log.error("MSMP: user %s not deleted: %s", name, exc)
            raise UserError("Cannot delete user, state database unavailable") from None
        log.info("MSMP: deleted user %s", name)

    def _leased(self, name: str) -> bool:
        """With a shared store: a session on another instance holds the mailbox's lease."""
        shared = self.ctx.shared
        if shared is None:
            return False
        try:
            return shared.leases.holder(name) is not None
        except StoreError as exc:
            log.error("MSMP: user %s not deleted: %s", name, exc)
            raise UserError("Cannot delete user, state database unavailable") from None

    @staticmethod
    def _move_aside(root: str, path: str, name: str) -> str:
        """Rename the Maildir to `<root>/.deleted/<user>.<YYYYmmddHHMMSS>[-k]`."""
        attic = os.path.join(root, DELETED_DIR)
        stamp = time.strftime("%Y%m%d%H%M%S")
        try:
            os.makedirs(attic, mode=0o700, exist_ok=True)
            for k in range(1000):
                target = os.path.join(attic, f"{name}.{stamp}" + (f"-{k}" if k else ""))
                if not os.path.exists(target):
                    os.rename(path, target)
                    log.info("MSMP: moved Maildir of %s to %s", name, target)
                    return target
        except OSError as exc:
            log.error("cannot move Maildir %s aside: %s", path, exc)
        raise UserError("Cannot move Maildir aside; user kept")

    @staticmethod
    def _move_back(moved: str, path: str, name: str) -> None:
        """Undo `_move_aside` for a user kept after all. Should that fail, the mail stays
        where it was moved (never lost, never merged into a new Maildir) and the log says where."""
        try:
            if os.path.lexists(path):
                raise FileExistsError(f"{path} exists")
            os.rename(moved, path)
        except OSError as exc:
            log.error("MSMP: user %s kept, but its Maildir stays at %s: %s", name, moved, exc)

    def list_users(self) -> list[str]:
        return self.ctx.users.names()

    def user_info(self, name: str) -> str:
        if name not in self.ctx.users:
            raise UserError("User does not exist")
        entries = self._log_count(name)
        root = self._root()
        messages, octets = Mailbox(root, name).size() if root is not None else (0, 0)
        logged_in = "yes" if self.ctx.logged_in.get(name) else "no"
        return f"{name} {entries} logs messages={messages} octets={octets} logged-in={logged_in}"

    # -- access log -----------------------------------------------------------
    # With a store there is always a persister (app.py), the one reader and writer of
    # the stored access log; without one, the entries live only in memory.
    def _in_memory(self, name: str) -> list[AccessEntry]:
        return [entry for entry in self.ctx.access_log.pending if entry.user == name]

    def _log_count(self, name: str) -> int:
        persister = self.ctx.persister
        if persister is not None:
            # Counts under the persister's lock: an entry flushed between the count of the
            # stored ones and of the unsaved ones would otherwise be missed.
            return persister.log_count(name)
        return len(self._in_memory(name))

    def logs(self, user: str, n: int) -> list[str]:
        persister = self.ctx.persister
        # The persister flushes first and falls back to memory if the store cannot be read.
        entries = persister.logs(user, n) if persister is not None else self._in_memory(user)
        if not entries and user not in self.ctx.users:
            raise UserError("Invalid user")
        return [entry.line() for entry in entries[-n:]]

    # -- settings and statistics ----------------------------------------------
    def set_setting(self, key: str, value: str) -> None:
        """Validated, persisted, then applied (Settings.set); -ERR if it could not be saved."""
        with self._setting:
            self.ctx.settings.set(key, value, source="msmp")

    def get_setting(self, key: str) -> str:
        return self.ctx.settings.get(key)

    def stat_lines(self) -> list[str]:
        shared = self.ctx.shared  # with a shared store: totals over every instance, and per instance
        return shared.stat_lines(self.ctx.metrics) if shared is not None else self.ctx.metrics.stat_lines()

    def reload(self) -> list[str]:
        log.info("MSMP: reload")
        return self._reload() if self._reload is not None else []

