"""The pytest plugin, as another project uses it: a suite run by pytest in a subprocess (pytester),
with the plugin found through its `pytest11` entry point, as pip installs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytest_plugins = ("pytester",)

SUITE = '''
import json, os, poplib, sys
import pytest

def record(server, name):
    with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as handle:
        json.dump({"pid": server.pid, "root": str(server.root)}, handle)

def test_fetch(pop3_server):
    record(pop3_server, "fetch")
    pop3_server.add_user("alice", "pw")
    uidl = pop3_server.deliver("alice", b"Subject: hi\\n\\nhello\\n")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.user("alice")
    client.pass_("pw")
    assert client.uidl()[1] == [b"1 " + uidl.encode()]
    assert client.retr(1)[1][-1] == b"hello"
    client.quit()

@pytest.mark.pop3_server(users={"bob": "bobpw"})
def test_fails_and_shows_the_log(pop3_server):
    record(pop3_server, "failing")
    client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
    client.user("bob")
    client.pass_("bobpw")
    assert client.stat()[0] == 1, "the mailbox is empty: this test fails on purpose"

@pytest.mark.parametrize("pop3_server", [{"tls": True, "users": {"carol": "c"}}], indirect=True)
def test_tls_by_parametrisation(pop3_server):
    client = poplib.POP3_SSL(pop3_server.host, pop3_server.pop3s_port, context=pop3_server.ssl_context())
    client.user("carol")
    client.pass_("c")
    client.quit()

@pytest.mark.parametrize("round", [1, 2])
def test_session_server_is_clean_for_each_test(pop3_server_session, round):
    record(pop3_server_session, "session")
    assert pop3_server_session.messages("dave") == {} and pop3_server_session.users == {"dave": "d"}
    pop3_server_session.add_user("eve", "e")
    pop3_server_session.deliver("dave", b"Subject: left behind\\n\\n.\\n")
    assert "gevent" not in sys.modules
'''

CONFTEST = '''
import pytest

@pytest.fixture(scope="session")
def pop3_server_session_options():
    return {"users": {"dave": "d"}}
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PYTHONPATH on which this checkout is installed as pip would: its metadata (with the
    pytest11 entry point from setup.py) first, then the package itself."""
    base = tmp_path_factory.mktemp("egg")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=REPO, check=True,
                   capture_output=True)
    entry_points = (base / "geventpop3.egg-info" / "entry_points.txt").read_text()
    assert "geventpop3 = geventpop3.testing.pytest_plugin" in entry_points
    return f"{base}:{REPO}"


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, installed: str) -> Path:
    """pytester ready to run a suite that knows nothing of geventpop3 but its fixtures; the directory
    where its tests record the servers they used."""
    monkeypatch.setenv("PYTHONPATH", installed)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    records = pytester.path / "records"
    records.mkdir()
    monkeypatch.setenv("RECORD_DIR", str(records))
    return records


def gone(record: Path) -> bool:
    """The server of a record has exited and its directory is removed."""
    seen = json.loads(record.read_text())
    return not Path(f"/proc/{seen['pid']}").exists() and not Path(seen["root"]).exists()


@pytest.mark.slow
def test_a_suite_using_the_fixtures_passes_and_fails_as_written(pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mail=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*the mailbox is empty: this test fails on purpose*",
                                 "*geventpop3 server log (pop3_server)*", "*pop3 login: user=bob*"])
    assert sorted(path.name for path in suite.iterdir()) == ["failing", "fetch", "session"]
    assert all(gone(record) for record in suite.iterdir())  # after a passing and a failing test alike


@pytest.mark.slow
def test_an_interrupted_suite_leaves_no_server(pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makepyfile(test_interrupted='''
import json, os, sys

def test_interrupted(pop3_server, pop3_server_session):
    for name, server in (("function", pop3_server), ("session", pop3_server_session)):
        with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as handle:
            json.dump({"pid": server.pid, "root": str(server.root)}, handle)
    assert "gevent" not in sys.modules
    raise KeyboardInterrupt
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert sorted(path.name for path in suite.iterdir()) == ["function", "session"]
    assert all(gone(record) for record in suite.iterdir())


def test_the_plugin_imports_no_server_code_until_a_fixture_is_used(pytester: pytest.Pytester, suite: Path) -> None:
    pytester.makepyfile(test_unrelated='''
import sys

def test_unrelated(request):
    assert "geventpop3.testing.pytest_plugin" in sys.modules  # loaded through its entry point
    assert not [name for name in sys.modules if name.split(".")[0] in ("gevent", "admin")
                or name.startswith("geventpop3.testing.") and name != "geventpop3.testing.pytest_plugin"]
''')
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


@pytest.mark.external  # one example runs fetchmail
def test_the_examples_in_docs_testing_md_pass(pytester: pytest.Pytester, suite: Path) -> None:
    """Every block of docs/testing.md that begins with `# name.py` is written out and run
    (poplib plain and over TLS with a fault, fetchmail over TLS): the page shows code that works."""
    blocks = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", (REPO / "docs" / "testing.md").read_text(), re.S)
    assert {name for name, _ in blocks} == {"test_first.py", "fetch.py", "test_fetch.py", "test_fetchmail.py"}
    for name, code in blocks:
        (pytester.path / name).write_text(code)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=4)
