"""fastetcd.pytest_plugin as a user's project sees it: a test suite of its own, run by pytest (pytester),
using the plugin's fixtures with a common Python etcd client (etcd-sdk-python, python-etcd3's maintained
fork).

The inner run is a subprocess: a user's test process never imports fastetcd.proto (which would clash with the
client's own copies of etcd's messages in protobuf's descriptor pool), and this test process does.
The plugin comes from the ``pytest11`` entry point when fastetcd is installed (CI's ``pip install .``);
``-p fastetcd.pytest_plugin`` is then a no-op, and loads it where fastetcd runs from a checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cosmos_fixture import CosmosServer, cosmos_server_fixture  # noqa: F401

import fastetcd

pytest_plugins = ["pytester"]

# The user's tests. Each records which server it saw (endpoint, pid) in seen.jsonl beside them.
USER_TESTS = '''
import json, os
from pathlib import Path

import pyetcd

SEEN = Path(__file__).parent / "seen.jsonl"


def client(endpoint):
    host, port = endpoint.rsplit(":", 1)
    return pyetcd.client(host=host, port=int(port))


def record(name, server):
    with SEEN.open("a") as f:
        f.write(json.dumps({"test": name, "endpoint": server.endpoint, "pid": server.pid,
                            "argv": server.proc.args}) + "\\n")


def test_session_first(etcd_endpoint_session, fastetcd_server_session):
    assert etcd_endpoint_session == fastetcd_server_session.endpoint
    record("session_first", fastetcd_server_session)
    c = client(etcd_endpoint_session)
    c.put("/shared/marker", "from-first")


def test_session_second(etcd_endpoint_session, fastetcd_server_session):
    record("session_second", fastetcd_server_session)
    value, _ = client(etcd_endpoint_session).get("/shared/marker")
    assert value == b"from-first"  # the same server, and its data, as the first test


def test_fresh_first(etcd_endpoint, fastetcd_server):
    record("fresh_first", fastetcd_server)
    c = client(etcd_endpoint)
    assert c.get("/app/config") == (None, None)
    events, cancel = c.watch_prefix("/app/")
    c.put("/app/config", "v1")
    event = next(iter(events))
    cancel()
    assert (type(event).__name__, event.key, event.value) == ("PutEvent", b"/app/config", b"v1")


def test_fresh_second(etcd_endpoint, fastetcd_server):
    record("fresh_second", fastetcd_server)
    c = client(etcd_endpoint)
    assert c.get("/app/config") == (None, None)  # a new server: the first test's key is not here
    assert c.get("/shared/marker") == (None, None)


def test_server_args(fastetcd_factory):
    server = fastetcd_factory(["--name=second"])
    record("factory", server)
    assert [m.name for m in client(server.endpoint).members] == ["second"]


def test_crash_on_purpose(fastetcd_factory):
    server = fastetcd_factory()
    record("crashed", server)
    server.kill()  # the test's own doing: teardown must not call it a failure
'''


@pytest.fixture(autouse=True)
def same_fastetcd(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner pytest imports the fastetcd this test imported (installed, or a checkout's src/)."""
    src = str(Path(fastetcd.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester.runpytest_subprocess("-p", "fastetcd.pytest_plugin", "-p", "no:cacheprovider", *args,
                                         timeout=300)


def _seen(pytester: pytest.Pytester) -> dict[str, dict]:
    lines = (pytester.path / "seen.jsonl").read_text().splitlines()
    return {row["test"]: row for row in map(json.loads, lines)}


def _gone(pid: int) -> bool:
    # The fixtures reap their servers, so a stopped server's pid no longer exists.
    return not Path(f"/proc/{pid}").exists()


def test_fixtures_in_a_user_project(pytester: pytest.Pytester) -> None:
    result = _run(pytester)
    result.assert_outcomes(passed=6)
    seen = _seen(pytester)
    # Session-scoped: one server for both tests.
    assert seen["session_first"]["endpoint"] == seen["session_second"]["endpoint"]
    assert seen["session_first"]["pid"] == seen["session_second"]["pid"]
    # Function-scoped: a server per test, none of them the session's.
    servers = {(seen[t]["endpoint"], seen[t]["pid"])
               for t in ("session_first", "fresh_first", "fresh_second", "factory")}
    assert len(servers) == 4
    # Every server was stopped (and reaped) by the end of the run.
    assert all(_gone(row["pid"]) for row in seen.values())


def test_server_arg_option(pytester: pytest.Pytester) -> None:
    # --fastetcd-server-arg reaches every server; the factory's own args come after it and win.
    result = _run(pytester, "--fastetcd-server-arg=--name=from-option", "-k", "args or fresh_first")
    result.assert_outcomes(passed=2, deselected=4)
    seen = _seen(pytester)
    assert "--name=from-option" in seen["fresh_first"]["argv"]
    argv = seen["factory"]["argv"]
    assert argv.index("--name=from-option") < argv.index("--name=second")


def test_options_do_not_clash_with_this_repo(pytester: pytest.Pytester) -> None:
    # The repo's tests/conftest.py has --transport, --store, --fastetcd-arg; the plugin's names are distinct,
    # so a session with both (CI, where the entry point loads the plugin into this suite) starts: pytest
    # refuses an option added twice. --help loads the conftest of the directory it is given.
    tests_dir = Path(__file__).resolve().parent
    result = pytester.runpytest_subprocess("-p", "fastetcd.pytest_plugin", "--help", str(tests_dir))
    assert result.ret == 0, result.stderr.str()
    for line in ("--fastetcd-server-arg=ARG", "--fastetcd-cosmos-endpoint=URL",  # the plugin's
                 "--fastetcd-arg=ARG", "--transport=*"):  # tests/conftest.py's
        result.stdout.fnmatch_lines([f"  {line}*"])


def test_cosmos_option(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                       cosmos_server: CosmosServer) -> None:  # noqa: F811
    # The Cosmos options, from the environment: every server on its own container, deleted after it.
    monkeypatch.setenv("FASTETCD_PYTEST_COSMOS_ENDPOINT", cosmos_server.endpoint)
    monkeypatch.setenv("FASTETCD_PYTEST_COSMOS_KEY", cosmos_server.key)
    result = _run(pytester, "-k", "fresh")
    result.assert_outcomes(passed=2, deselected=4)
    for row in _seen(pytester).values():
        argv = row["argv"]
        assert argv[argv.index("--store") + 1] == "cosmos"
        assert argv[argv.index("--cosmos-endpoint") + 1] == cosmos_server.endpoint
    db = cosmos_server.client().get_database_client("fastetcd-pytest")
    assert list(db.list_containers()) == []
