"""The control plane between the supervisor and its workers: one frozen dataclass per message.

A message crosses the channel (geventpop3.process.channel, JSON lines) as a JSON object:
`encode` gives `{"op": <its OP>, <its fields>}` (and `"seq"` when the sender waits for an
`Ack`), `decode` checks the op and every field's type and gives the dataclass back, or
raises MessageError: a message this side does not know (another version of geventpop3
at the other end, a field missing or of another type) is refused with one log line
(`decoded`), never half applied. Each end dispatches through a table from message type to
handler, so a new message is one dataclass here and one entry in the table of its reader.

The worker's first message, `Hello`, carries PROTOCOL_VERSION; the supervisor stops a
worker that speaks another one (started from another checkout, say) before it sends it
anything. Raise PROTOCOL_VERSION whenever a message or a field changes.

Supervisor -> worker: Init (the answer to Hello), Set, User, DelUser, Reload,
PenaltyClear, StoreState, Answer, Refresh. Worker -> supervisor: Hello, Ready, Ack, Report,
Ask, Tell.

Ask and Answer are a request and its answer, matched by `id`: the worker's questions to
the supervisor's one accounting of connections, logins and failures
(geventpop3.core.accounting, geventpop3.process.accountant); Tell is what needs no
answer (several ends of connections and logins in one message). Refresh asks a worker
for a Report now (MSMP STAT, a Prometheus scrape).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, get_args, get_origin, get_type_hints

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 3


class MessageError(ValueError):
    """A message this side cannot take: one line saying why."""


@dataclass(frozen=True)
class Hello:
    """A worker is up: the SHA-256 of the users file it read ("" if none, or unreadable)."""

    OP: ClassVar[str] = "hello"
    version: int  # PROTOCOL_VERSION of the worker's code: required, so an older worker's hello is refused
    users_digest: str


@dataclass(frozen=True)
class Init:
    """The supervisor's answer to Hello: everything in force that the configuration does not say."""

    OP: ClassVar[str] = "init"
    settings: dict[str, str]  # every key, as the supervisor formats it
    users: dict[str, str]  # the store's users: name -> password entry
    withdrawn: tuple[str, ...] = ()  # users whose MSMP DELE is in progress: no login until its end
    users_data: str | None = None  # the users file in force, if the worker read another one
    lease_prefix: str | None = None  # with --state-url: the prefix of the worker's lease owner
    store_available: bool = True  # with --state-url: whether the database answers


@dataclass(frozen=True)
class Set:
    """A setting's new value, already checked by the supervisor: the worker only parses it."""

    OP: ClassVar[str] = "set"
    key: str
    value: str


@dataclass(frozen=True)
class User:
    """A user's password entry as the supervisor stored it; None: deleted by another instance."""

    OP: ClassVar[str] = "user"
    name: str
    entry: str | None


@dataclass(frozen=True)
class DelUser:
    """One step of an MSMP DELE: withdraw the name (`begin`), then forget it (`commit`) or put it back."""

    OP: ClassVar[str] = "deluser"
    name: str
    step: Literal["begin", "commit", "rollback"]


@dataclass(frozen=True)
class Reload:
    """SIGHUP or MSMP RELOAD: the users file's content in force in the supervisor (None: no users file),
    and the certificate and key to use from now on."""

    OP: ClassVar[str] = "reload"
    users_data: str | None = None
    cert: str | None = None  # the certificate and key (PEM) the keeper read; None: keep the current ones
    key: str | None = None


@dataclass(frozen=True)
class PenaltyClear:
    """MSMP PENALTY CLEAR: one source's failures forgotten, or every source's (None)."""

    OP: ClassVar[str] = "penalty-clear"
    address: str | None


@dataclass(frozen=True)
class StoreState:
    """With --state-url: whether the shared database answers (failed logins are temporary while it does not)."""

    OP: ClassVar[str] = "store"
    available: bool


@dataclass(frozen=True)
class Ack:
    """The worker applied the broadcast numbered `applied` (and every earlier one)."""

    OP: ClassVar[str] = "ack"
    applied: int


@dataclass(frozen=True)
class Ready:
    """The worker serves."""

    OP: ClassVar[str] = "ready"
    pid: int


@dataclass(frozen=True)
class Report:
    """A worker's counters, sessions and access-log entries (geventpop3.process.aggregate
    makes and sums `fields`; this module carries them as they are)."""

    OP: ClassVar[str] = "report"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ask:
    """A failed guess from `source` (at `user`): the supervisor, which owns the penalty,
    counts it and answers its delay in an `Answer` of the same `id`. Connections and
    logins are counted in shared memory instead (geventpop3.process.table)."""

    OP: ClassVar[str] = "ask"
    id: int
    source: str
    user: str = ""


@dataclass(frozen=True)
class Answer:
    """The supervisor's answer to the worker's `Ask` of the same `id`: the failure's delay."""

    OP: ClassVar[str] = "answer"
    id: int
    value: float = 0.0


@dataclass(frozen=True)
class Tell:
    """A right password from `source`, which had recent failures: the supervisor forgets
    its penalty (nothing to answer)."""

    OP: ClassVar[str] = "tell"
    succeeded: str


@dataclass(frozen=True)
class Refresh:
    """The supervisor wants a `Report` now, carrying `refresh` = `id` (STAT, a scrape)."""

    OP: ClassVar[str] = "refresh"
    id: int


ControlMessage = (Hello | Init | Set | User | DelUser | Reload | PenaltyClear | StoreState | Ack | Ready | Report
                  | Ask | Answer | Tell | Refresh)
TYPES: dict[str, type[ControlMessage]] = {cls.OP: cls for cls in get_args(ControlMessage)}


class Received(NamedTuple):
    """A decoded message, and its sequence number if the sender waits for an Ack."""

    message: ControlMessage
    seq: int | None = None


def encode(message: ControlMessage, seq: int | None = None) -> dict[str, Any]:
    """The JSON object that carries `message` (Channel frames it as one line)."""
    if isinstance(message, Report):
        frame = {"op": Report.OP, **message.fields}
    else:
        frame = {"op": message.OP}
        for name, _, _ in _specs(type(message)):
            value = getattr(message, name)
            frame[name] = list(value) if isinstance(value, tuple) else value
    if seq is not None:
        frame["seq"] = seq
    return frame


def decode(frame: dict[str, Any]) -> Received:
    """The message `frame` carries; MessageError if this side does not know it."""
    op = frame.get("op")
    cls = TYPES.get(op) if isinstance(op, str) else None
    if cls is None:
        raise MessageError(f"unknown message {op!r}")
    seq = frame.get("seq")
    if seq is not None and not _is_int(seq):
        raise MessageError(f"{op}: seq is not a number")
    if cls is Report:
        return Received(Report({key: value for key, value in frame.items() if key not in ("op", "seq")}), seq)
    values = {}
    for name, required, check in _specs(cls):
        if name not in frame:
            if required:
                raise MessageError(f"{op}: no {name}")
            continue
        values[name] = check(frame[name], cls.OP, name)
    return Received(cls(**values), seq)


def decoded(frames: Iterable[dict[str, Any]], sender: str) -> Iterator[Received]:
    """The messages of `frames` this side knows; each other one refused with a log line."""
    for frame in frames:
        try:
            yield decode(frame)
        except MessageError as exc:
            log.error("%s: message refused (another version of geventpop3?): %s", sender, exc)


Check = Callable[[Any, str, str], Any]  # (value, op, field name) -> the value as the field wants it


def _specs(cls: type[ControlMessage]) -> list[tuple[str, bool, Check]]:
    """(name, required, check) of each field of `cls`, worked out once: the accounting
    messages cross the channel several times per connection."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = _SPECS[cls] = [(name, _required(cls, name), _check(hint)) for name, hint in _hints(cls).items()]
    return specs


_SPECS: dict[type[ControlMessage], list[tuple[str, bool, Check]]] = {}


def _check(hint: Any) -> Check:
    """A check of one field's type, a direct one for the plain types (what _conform does, faster)."""
    if hint is float:
        def number(value: Any, op: str, name: str) -> Any:
            if type(value) is float or type(value) is int:
                return float(value)
            return _conform(value, hint, f"{op}: {name}")  # raises
        return number
    exact: type | None = hint if hint in (str, bool, int) else None
    if exact is not None:
        def plain(value: Any, op: str, name: str) -> Any:
            if type(value) is exact:
                return value
            return _conform(value, hint, f"{op}: {name}")  # raises
        return plain
    if get_origin(hint) is Literal and all(isinstance(arg, str) for arg in get_args(hint)):
        allowed = frozenset(get_args(hint))

        def literal(value: Any, op: str, name: str) -> Any:
            if type(value) is str and value in allowed:
                return value
            return _conform(value, hint, f"{op}: {name}")  # raises
        return literal
    return lambda value, op, name: _conform(value, hint, f"{op}: {name}")


def _hints(cls: type[ControlMessage]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        names = {item.name for item in dataclasses.fields(cls)}
        hints = _HINTS[cls] = {name: hint for name, hint in get_type_hints(cls).items() if name in names}
    return hints


_HINTS: dict[type[ControlMessage], dict[str, Any]] = {}


def _required(cls: type[ControlMessage], name: str) -> bool:
    item = next(item for item in dataclasses.fields(cls) if item.name == name)
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _conform(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field's type `hint` wants it (a JSON list as a tuple); MessageError if it is not one."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
    elif origin is not None and type(None) in args:  # X | None
        if value is None:
            return None
        return _conform(value, next(arg for arg in args if arg is not type(None)), where)
    elif origin is tuple:
        if isinstance(value, list) and (len(args) == 2 and args[1] is Ellipsis):  # tuple[X, ...]
            return tuple(_conform(item, args[0], where) for item in value)
        if isinstance(value, list) and len(value) == len(args):  # tuple[X, Y, Z]
            return tuple(_conform(item, arg, where) for item, arg in zip(value, args, strict=True))
    elif origin is dict:
        if isinstance(value, dict):
            return {_conform(k, args[0], where): _conform(v, args[1], where) for k, v in value.items()}
    elif hint is int:
        if _is_int(value):
            return value
    elif hint is float:
        if _is_int(value) or isinstance(value, float):
            return float(value)
    elif hint in (str, bool) and isinstance(value, hint):
        return value
    raise MessageError(f"{where} is not {getattr(hint, '__name__', hint)}: {value!r}"[:200])
