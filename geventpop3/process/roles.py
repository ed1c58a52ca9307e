"""The single process's role (`--workers 1`), and what a role is.

`Server(config, role).run()` (geventpop3.process.server) runs the same steps for every
kind of process; a role says what each step is, from the building blocks the server
offers. Three roles, no inheritance between them:
- `Single` (here): binds, drops, opens the state, reads the users, serves everything;
- `Supervisor` (geventpop3.process.supervisor): the same, except that POP3 is served by
  worker processes it starts, tells and watches;
- `Worker` (geventpop3.process.worker): serves POP3 on listeners inherited from its
  supervisor, with no state of its own, told everything over its channel.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from geventpop3.auth.users import UserDirectory

if TYPE_CHECKING:  # server.App makes a Single: the types only, no cycle
    from geventpop3.process.server import Endpoints, Server
    from geventpop3.service.context import ServerContext

log = logging.getLogger(__name__)


class Single:
    """One process does it all."""

    def bind(self, server: Server) -> None:
        server.bind_all()

    def drop(self, server: Server) -> None:
        """With TLS and --run-as, the keeper first: the key may be root's alone, and a
        reload must read it again (geventpop3.process.keeper)."""
        config = server.config
        if config.tls is not None and config.run_as is not None and os.geteuid() == 0:
            server.start_keeper({})
        server.drop_privileges()

    def prepare(self, server: Server) -> ServerContext:
        """The POP3 users: the store's, with the configured ones (flags, users file) over them."""
        config = server.config
        return server.prepare_context(lambda: server.configured_users(
            UserDirectory(server.store, server.hasher, allow_weak=config.allow_weak_schemes)))

    def serve(self, server: Server, ctx: ServerContext) -> None:
        server.serve_pop3()
        server.serve_admin(ctx)

    def started(self, server: Server, ctx: ServerContext) -> None:
        server.log_start()
        log.info("geventpop3 ready: maildir=%s users=%d state=%s", ctx.settings.maildir, len(ctx.users),
                 server.store.location if server.store is not None else "none")

    def ready(self, server: Server, served: Endpoints) -> int:
        return server.write_ready_file(served)

    def hangup(self, server: Server) -> None:
        server.reload_when_serving()

    def reload(self, server: Server) -> list[str]:
        return server.reload_local(server.users.read)

    def shutdown(self, server: Server) -> None:
        server.remove_ready_file()
        server.stop_serving()
        server.close_state()
        log.info("stopped")

    def close_state(self, server: Server) -> None:
        server.close_state()
