"""geventpop3.testing is imported by other projects' test processes: at import time it
loads only the standard library and the MSMP client, never gevent or the server."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO, server_env

MODULES = ["geventpop3.testing", "geventpop3.testing.server", "geventpop3.testing.launcher",
           "geventpop3.testing.lineclient", "geventpop3.testing.certs", "geventpop3.testing.ports",
           "geventpop3.testing.postgres", "geventpop3.testing.haproxy", "geventpop3.testing.pytest_plugin"]
CHECK = """import json, sys
import pytest  # the plugin's one import beyond the standard library, and what pytest brings
before = set(sys.modules)
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_the_harness_imports_only_the_standard_library_and_the_msmp_client() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, *MODULES], cwd=REPO, env=server_env(), capture_output=True,
                          text=True, timeout=60, check=True)
    loaded = json.loads(done.stdout)
    foreign = [name for name in loaded if name.split(".")[0] not in (*sys.stdlib_module_names, "geventpop3", "admin")]
    assert foreign == []
    ours = [name for name in loaded if name.split(".")[0] in ("geventpop3", "admin")]
    assert all(name in ("geventpop3", "admin", "admin.client") or name.startswith("geventpop3.testing")
               for name in ours), ours
