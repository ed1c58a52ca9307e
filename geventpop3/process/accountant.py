"""The whole server's accounting across processes: workers ask, the supervisor answers.

With `--workers N` the supervisor holds the one `LocalAccounting` (geventpop3.core.accounting:
connections per source, logins per user and source, the authentication penalty), as
Dovecot's anvil does for its login processes, so the limits and the penalty are the
server's, not each worker's. A worker's `RemoteAccounting` has the same interface and asks
over its channel: `connect`, `login` and `failed` are an `Ask` answered by an `Answer` of
the same id (the calling greenlet waits; others run on); `disconnect` and `login_done`
are gathered for TELL_DELAY into one `Tell` (nothing to wait for), sent at the latest
just before the next `Ask`, so the supervisor counts an end before any later question.
Each message costs both processes a wake-up and JSON both ways: fewer of them is what
keeps a connection cheap. The supervisor answers each in its reader of that worker's
channel (`answer`, `told`), with the worker's slot as the owner, so a worker that dies
takes its connections and logins in flight with it (`LocalAccounting.forget`).

Should the supervisor not answer within ASK_TIMEOUT (it is stopping, or wedged), the
worker decides alone, with its own local accounting, and says so once in the log.
"""

from __future__ import annotations

import itertools
import logging
from typing import Literal

import gevent
from gevent import Timeout
from gevent.event import AsyncResult

from geventpop3.core.accounting import ADMITTED, LocalAccounting
from geventpop3.process import messages
from geventpop3.process.channel import Channel
from geventpop3.process.messages import Answer, Ask, Tell

log = logging.getLogger(__name__)

ASK_TIMEOUT = 5.0  # seconds a worker waits for the supervisor's answer before deciding alone
# Seconds the ends of connections and logins are gathered before they are told (unless a
# question goes first): one message for several sessions. Counts stay high that much
# longer at most, never lower than they are.
TELL_DELAY = 0.005
REFUSED_LOGIN = "max_sessions_per_user_ip"


class RemoteAccounting:
    """A worker's accounting: the supervisor's, asked over `channel`; `local` when it does not answer."""

    def __init__(self, channel: Channel, local: LocalAccounting, timeout: float = ASK_TIMEOUT) -> None:
        self.channel = channel
        self.local = local
        self.timeout = timeout
        self.pending: dict[int, AsyncResult[Answer]] = {}
        self._ids = itertools.count(1)
        self._warned = False
        # Ends of connections and logins, gathered for TELL_DELAY (or until the next question)
        self._disconnects: dict[str, int] = {}
        self._logins: list[tuple[str, str, bool]] = []
        self._timer = gevent.get_hub().loop.timer(TELL_DELAY)
        self._scheduled = False

    def connect(self, source: str) -> str:
        answer = self._ask("connect", source)
        return answer.refused if answer is not None else ADMITTED

    def disconnect(self, source: str) -> None:
        self._disconnects[source] = self._disconnects.get(source, 0) + 1
        self._later()

    def login(self, user: str, source: str) -> int | None:
        answer = self._ask("login", source, user)
        if answer is None:
            return 0
        return None if answer.refused else int(answer.value)

    def login_done(self, user: str, source: str, verified: bool) -> None:
        self._logins.append((user, source, verified))
        self._later()

    def failed(self, source: str, user: str = "") -> float:
        answer = self._ask("failed", source, user)
        return answer.value if answer is not None else self.local.failed(source, user)

    def answered(self, answer: Answer) -> None:
        """The supervisor's `Answer`: wakes the greenlet that asked (none if it gave up)."""
        result = self.pending.pop(answer.id, None)
        if result is not None:
            result.set(answer)

    def flush(self) -> None:
        """Send what was told since the last flush, in one `Tell`."""
        self._timer.stop()
        self._scheduled = False
        if self._disconnects or self._logins:
            tell = Tell(self._disconnects, tuple(self._logins))
            self._disconnects, self._logins = {}, []
            self.channel.send(messages.encode(tell))

    def _later(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._timer.start(self.flush)

    def _ask(self, what: Literal["connect", "login", "failed"], source: str, user: str = "") -> Answer | None:
        self.flush()  # what was told goes first: an end told before a question counts before it
        ask_id = next(self._ids)
        result: AsyncResult[Answer] = AsyncResult()
        self.pending[ask_id] = result
        self.channel.send(messages.encode(Ask(ask_id, what, source, user)))
        try:
            return result.get(timeout=self.timeout)
        except Timeout:
            if not self._warned:
                self._warned = True
                log.warning("the supervisor did not answer within %.0f s: this worker decides alone "
                            "(its own limits and penalty) while it does not", self.timeout)
            return None
        finally:
            self.pending.pop(ask_id, None)


def answer(accounting: LocalAccounting, ask: Ask, owner: int) -> Answer:
    """The supervisor's answer to worker `owner`'s question."""
    if ask.what == "connect":
        return Answer(ask.id, refused=accounting.connect(ask.source, owner))
    if ask.what == "login":
        failures = accounting.login(ask.user, ask.source, owner)
        return Answer(ask.id, REFUSED_LOGIN) if failures is None else Answer(ask.id, value=failures)
    return Answer(ask.id, value=accounting.failed(ask.source, ask.user, owner))


def told(accounting: LocalAccounting, tell: Tell, owner: int) -> None:
    """What worker `owner` tells the supervisor's accounting."""
    for source, count in tell.disconnects.items():
        for _ in range(count):
            accounting.disconnect(source, owner)
    for user, source, verified in tell.logins:
        accounting.login_done(user, source, verified, owner)
