"""geventpop3.core is sans-IO: every module in it imports in an interpreter where gevent,
sockets and subprocesses cannot be imported at all (import-linter checks the same
statically in CI; this checks what really happens at import time)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import geventpop3.core

BLOCKED = ("gevent", "socket", "_socket", "ssl", "select", "selectors", "subprocess", "sqlite3", "psycopg")

PROBE = """
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: geventpop3.core must not import it")
        return None

BLOCKED = set(sys.argv[1].split(","))
for name in BLOCKED:
    sys.modules.pop(name, None)
sys.meta_path.insert(0, Blocked())
import importlib
for module in sys.argv[2:]:
    importlib.import_module(module)
print("imported", len(sys.argv) - 2)
"""


ENV = {**os.environ, "PYTHONPATH": str(Path(geventpop3.core.__file__).parents[2])}


def core_modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(geventpop3.core.__path__, "geventpop3.core."))


def test_core_has_the_protocol_cores() -> None:
    names = core_modules()
    for expected in ("geventpop3.core.pop3.protocol", "geventpop3.core.msmp.protocol", "geventpop3.core.settings",
                     "geventpop3.core.names", "geventpop3.core.lines", "geventpop3.core.proxy_protocol"):
        assert expected in names


def test_every_core_module_imports_without_gevent_or_sockets() -> None:
    modules = core_modules()
    result = subprocess.run([sys.executable, "-c", PROBE, ",".join(BLOCKED), *modules],
                            capture_output=True, text=True, timeout=60,
                            env=ENV)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"imported {len(modules)}"


def test_the_probe_does_block_gevent() -> None:
    """The probe above would pass vacuously if blocking did not work: show that it refuses gevent."""
    result = subprocess.run([sys.executable, "-c", PROBE, ",".join(BLOCKED), "geventpop3.net.transport"],
                            capture_output=True, text=True, timeout=60,
                            env=ENV)
    assert result.returncode != 0
    assert "is blocked" in result.stderr
