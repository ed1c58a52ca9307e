"""The persisted totals are the registry's: a definition marked persisted goes through
the store and on after a restart, with nothing to add to the store."""

from __future__ import annotations

from pathlib import Path

from geventpop3.core.counters import COUNTER, GAUGE, REGISTRY, Definition
from geventpop3.core.metrics import Metrics
from geventpop3.state.sqlite import SqliteStore

PARKED = Definition("parked_sessions", GAUGE, "Parked sessions", "geventpop3_parked_sessions",
                    "POP3 sessions waiting for input without a greenlet")
STLS = Definition("stls_upgrades", COUNTER, "STLS upgrades", "geventpop3_stls_upgrades",
                  "POP3 connections upgraded to TLS by STLS", persisted=True)
EXTENDED = (*REGISTRY, PARKED, STLS)


def test_a_persisted_definition_survives_a_restart_and_a_gauge_does_not(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    before = Metrics(EXTENDED)
    before.connection_opened()
    before.stls_upgrades += 4
    before.parked_sessions = 2
    before.auth_penalty_delays = 3  # counted, reported, but not kept across restarts
    store = SqliteStore(path)
    store.save_counters(before.snapshot())
    store.close()
    reopened = SqliteStore(path)
    after = Metrics(EXTENDED)
    after.restore(reopened.load_counters())
    reopened.close()
    assert after.snapshot() == before.snapshot()
    assert (after.stls_upgrades, after.total_connections, after.max_concurrent) == (4, 1, 1)
    assert (after.parked_sessions, after.current_connections, after.auth_penalty_delays) == (0, 0, 0)
