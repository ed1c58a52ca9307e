"""The whole server's accounting across processes: shared counts, the supervisor's penalty.

With `--workers N` the limits and the penalty are the server's, not each worker's (as
Dovecot's anvil keeps them for its login processes). A worker's `RemoteAccounting` has
the interface of `LocalAccounting` (geventpop3.core.accounting) and splits it by cost:

- `connect`, `disconnect`, `login`, `login_done`, at every connection and login, are
  counted by the worker itself in the shared table (geventpop3.process.table) under a
  short cross-process lock: no message, no wake-up of another process. `login` reads
  there the recent failures of the source too, which the supervisor publishes;
- `failed` (a wrong password: rare) is an `Ask` answered by an `Answer` of the same id
  (the calling greenlet waits; others run on): the supervisor alone owns the penalty
  (with `--state-url` it is shared with the other hosts through the database), publishes
  the source's failures into the table and answers the delay;
- a right password from a source with failures is a `Tell` (the supervisor forgets them).

The supervisor answers in its reader of that worker's channel (`answer`, `told`) and,
when a worker ends, forgets its connections and logins in the table
(`AccountingTable.forget`). Should the supervisor not answer a failure within ASK_TIMEOUT
(it is stopping, or wedged), the worker uses its own penalty, and says so once in the log.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING

from gevent import Timeout
from gevent.event import AsyncResult

from geventpop3.process import messages
from geventpop3.process.messages import Answer, Ask, Tell

if TYPE_CHECKING:
    from geventpop3.core.accounting import LocalAccounting
    from geventpop3.core.settings import Settings
    from geventpop3.process.channel import Channel
    from geventpop3.process.table import AccountingTable

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0  # seconds a worker waits for the supervisor's answer before deciding alone


class RemoteAccounting:
    """Worker slot `owner`'s accounting: counts in `table`, failures asked over `channel`
    (`local`'s penalty when the supervisor does not answer)."""

    def __init__(self, channel: Channel, table: AccountingTable, owner: int, settings: Settings,
                 local: LocalAccounting, timeout: float = ASK_TIMEOUT) -> None:
        self.channel = channel
        self.table = table
        self.owner = owner
        self.settings = settings
        self.local = local
        self.timeout = timeout
        self.pending: dict[int, AsyncResult[Answer]] = {}
        self._ids = itertools.count(1)
        self._warned = False

    def connect(self, source: str) -> str:
        return self.table.connect(source, self.owner, self.settings)

    def disconnect(self, source: str) -> None:
        self.table.disconnect(source, self.owner)

    def login(self, user: str, source: str) -> int | None:
        return self.table.login(user, source, self.owner, self.settings)

    def login_done(self, user: str, source: str, verified: bool) -> None:
        if self.table.login_done(user, source, self.owner, float(self.settings.auth_penalty_forget), verified):
            self.channel.send(messages.encode(Tell(source)))

    def failed(self, source: str, user: str = "") -> float:
        ask_id = next(self._ids)
        result: AsyncResult[Answer] = AsyncResult()
        self.pending[ask_id] = result
        self.channel.send(messages.encode(Ask(ask_id, source, user)))
        try:
            answer = result.get(timeout=self.timeout)
            assert answer is not None
            return answer.value
        except Timeout:
            if not self._warned:
                self._warned = True
                log.warning("the supervisor did not answer within %.0f s: this worker counts failed logins "
                            "alone (its own penalty) while it does not", self.timeout)
            return self.local.failed(source, user)
        finally:
            self.pending.pop(ask_id, None)

    def answered(self, answer: Answer) -> None:
        """The supervisor's `Answer`: wakes the greenlet that asked (none if it gave up)."""
        result = self.pending.pop(answer.id, None)
        if result is not None:
            result.set(answer)


def answer(accounting: LocalAccounting, ask: Ask) -> Answer:
    """The supervisor's answer to a worker's failed guess (its penalty publishes the
    source's failures into the table: `Penalty.changed`)."""
    return Answer(ask.id, value=accounting.failed(ask.source, ask.user))


def told(accounting: LocalAccounting, tell: Tell) -> None:
    """A right password: the source's penalty is forgotten."""
    accounting.penalty.succeeded(tell.succeeded)
