"""What every session of either protocol shares: one instance per server process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from geventpop3.auth.users import Hasher, PasswordStore, UserDirectory
from geventpop3.core.accounting import Accounting, LocalAccounting
from geventpop3.core.metrics import AccessLog, Metrics
from geventpop3.core.penalty import Penalty
from geventpop3.core.settings import Settings

if TYPE_CHECKING:  # for the types only: they use this module, and would bring gevent in
    from geventpop3.net.tls import ServerTls
    from geventpop3.service.filters import FilterRunner
    from geventpop3.state.persister import Persister
    from geventpop3.state.shared import SessionShare


@dataclass
class ServerContext:
    settings: Settings
    users: UserDirectory
    metrics: Metrics = field(default_factory=Metrics)
    access_log: AccessLog = field(default_factory=AccessLog)
    # The background writer of counters and access logs, the one user of the
    # persistent store; None when no state is kept.
    persister: Persister | None = None
    # Filters for retrieved mail, None until configured.
    filters: FilterRunner | None = None
    # POP3 users with an open session in this process -> number of sessions.
    logged_in: dict[str, int] = field(default_factory=dict)
    # The certificate and the SSLContext new TLS connections get; None: no TLS (no STLS, no POP3S).
    tls: ServerTls | None = None
    # What is shared with other instances through a PostgreSQL store (leases, live settings
    # and users, STAT over every instance; a cluster worker: its leases only); None with SQLite or no state.
    shared: SessionShare | None = None
    # Failed logins by client source, shared by POP3 and MSMP (made from settings and metrics).
    penalty: Penalty = field(init=False)
    # Open connections and logins in flight per source, and the penalty, as the POP3 limits
    # ask for them: this process's (over `penalty`), or a worker's supervisor's (geventpop3.process.accountant).
    accounting: Accounting = field(init=False)
    # The password-hashing threads every check of this process waits for: the users' (the
    # server makes the directory with the one it configures from the settings).
    hasher: Hasher = field(init=False)
    # MSMP administrators, checked like POP3 users but a separate set, on the same hasher.
    admins: PasswordStore = field(init=False)

    def __post_init__(self) -> None:
        self.hasher = self.users.hasher
        self.admins = PasswordStore(self.hasher)
        # Failed logins under names that are no user share one access-log bucket.
        self.access_log.known_user = self.users.__contains__
        self.penalty = Penalty(self.settings, self.metrics)
        self.accounting = LocalAccounting(self.settings, self.penalty)
