"""Shared fixtures: fresh real etcd (the oracle) and fresh fastetcd (the subject) processes.

`--subject=etcd` swaps fastetcd for a second real etcd, which validates the harness itself: every
comparison must then pass.

`--transport=native` starts every fastetcd on the native (libnghttp2) transport instead of grpcio.

`--store=cosmos` runs every fastetcd the fixtures start on the Cosmos store: one Cosmos test server
(tests/cosmos_server) for the whole session, and a fresh container per fastetcd data dir (the same one
again when a test restarts fastetcd on the same dir), each node with a leadership lease of 1 s.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# Tests run from a plain checkout too (after `setup.py build_ext --inplace`), not only after a pip install.
_SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("fastetcd") is None:
    sys.path.insert(0, str(_SRC))

pytest.register_assert_rewrite("interop.scenario")

from cosmos_fixture import CosmosServer, cosmos_server_running  # noqa: E402
from servers import ServerFactory, ServerPair  # noqa: E402

from fastetcd.testing import (  # noqa: E402
    CosmosTarget,
    ServerProcess,
    TestPki,
    make_pki,
    set_default_tls,
    set_fastetcd_defaults,
    start_etcd,
    start_server,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastetcd")
    group.addoption("--diff-seeds", type=int, default=12,
                    help="number of random sequences in the differential test (seeds 0..N-1)")
    group.addoption("--diff-seed-start", type=int, default=0,
                    help="first seed of the differential test (to explore new sequences)")
    group.addoption("--diff-ops", type=int, default=1500, help="operations per differential sequence")
    group.addoption("--watch-diff-seeds", type=int, default=5,
                    help="random sequences in the watch/lease differential test (from --diff-seed-start)")
    group.addoption("--watch-diff-ops", type=int, default=400,
                    help="operations per watch/lease differential sequence")
    group.addoption("--subject", choices=("fastetcd", "etcd"), default="fastetcd",
                    help="server under test; 'etcd' checks the harness against the oracle itself")
    group.addoption("--transport", choices=("grpcio", "native"), default="grpcio",
                    help="client transport of every fastetcd the fixtures start (fastetcd --transport)")
    group.addoption("--store", choices=("embedded", "cosmos"), default="embedded",
                    help="fastetcd's store; 'cosmos' uses one Cosmos test server for the session and a "
                         "fresh container per data dir")
    group.addoption("--tls", action="store_true", default=False,
                    help="every server the fixtures start serves mutual TLS on https:// URLs (one test CA), "
                         "and every harness client uses it")
    group.addoption("--fastetcd-arg", action="append", default=[], metavar="ARG",
                    help="extra command-line argument for every fastetcd the tests start (repeatable; "
                         "use --fastetcd-arg=--flag for arguments that start with '-')")


@pytest.fixture(scope="session")
def cosmos_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CosmosServer]:
    """One Cosmos test server (a node process) for the whole session; tests share it, one container each."""
    with cosmos_server_running(tmp_path_factory.mktemp("cosmos-server")) as server:
        yield server


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """One test CA with server and client certificates for the session (fastetcd.testing.make_pki)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session", autouse=True)
def harness_tls(request: pytest.FixtureRequest) -> Iterator[bool]:
    """With --tls, the process-wide TLS of fastetcd.testing: servers serve mTLS, clients present the
    session CA's client certificate. True when on."""
    if not request.config.getoption("--tls"):
        yield False
        return
    pki: TestPki = request.getfixturevalue("test_pki")
    previous = set_default_tls(pki.server_tls(client_cert_auth=True), pki.client_tls())
    try:
        yield True
    finally:
        set_default_tls(*previous)


@pytest.fixture(scope="session", autouse=True)
def fastetcd_store(request: pytest.FixtureRequest, fastetcd_transport: str) -> Iterator[str]:
    """The store every fastetcd started by the fixtures uses ("embedded" or "cosmos"); also applies
    --transport and --fastetcd-arg to every fastetcd command line (fastetcd.testing's defaults)."""
    store = request.config.getoption("--store")
    provider: Callable[[], CosmosTarget] | None = None
    if store == "cosmos":
        cosmos: CosmosServer = request.getfixturevalue("cosmos_session_server")
        target = CosmosTarget(cosmos.endpoint, cosmos.key)

        def cosmos_target() -> CosmosTarget:
            if not cosmos.alive():
                raise RuntimeError(f"the Cosmos test server died; its log:\n{cosmos.log_tail()}")
            return target

        provider = cosmos_target

    extra_args = ["--transport", fastetcd_transport, *request.config.getoption("--fastetcd-arg")]
    if store == "cosmos":
        # A lone node killed and restarted waits out its own leadership lease before writing again
        # (store/leadership.py); these suites restart single nodes and time leases around the restart,
        # so they run with a short one. tests/test_ha_cosmos.py tests the timing itself.
        extra_args[:0] = ["--ha-lease", "1s"]
    previous = set_fastetcd_defaults(extra_args, provider)
    try:
        yield store
    finally:
        set_fastetcd_defaults(previous.extra_args, previous.cosmos)


@pytest.fixture(scope="session")
def fastetcd_transport(request: pytest.FixtureRequest) -> str:
    """The client transport every fastetcd started by the fixtures uses ("grpcio" or "native"); it goes
    first among fastetcd's extra args (fastetcd_store), so a test's own --transport wins."""
    return request.config.getoption("--transport")


@pytest.fixture
def subject_kind(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--subject")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """start(kind, name, extra_args=(), **kw): every server started through it is killed at teardown."""
    started: list[ServerProcess] = []

    def start(kind: str, name: str, extra_args: Sequence[str] = (), **kwargs: object) -> ServerProcess:
        server = start_server(kind, tmp_path / name, extra_args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def etcd_server(server_factory: ServerFactory) -> ServerProcess:
    return server_factory("etcd", "oracle")


@pytest.fixture
def subject_server(server_factory: ServerFactory, subject_kind: str) -> ServerProcess:
    return server_factory(subject_kind, "subject")


@pytest.fixture
def server_pair(tmp_path: Path, subject_kind: str) -> Iterator[ServerPair]:
    """A fresh subject and a fresh oracle, started concurrently (start-up is mostly waiting)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        subject_f = pool.submit(start_server, subject_kind, tmp_path / "subject")
        oracle_f = pool.submit(start_etcd, tmp_path / "oracle")
    started = [f.result() for f in (subject_f, oracle_f) if f.exception() is None]
    try:
        yield ServerPair(subject_f.result(), oracle_f.result())  # re-raises a failed start
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def etcd_endpoint(server_pair: ServerPair) -> str:
    return server_pair.oracle.endpoint


@pytest.fixture
def fastetcd_endpoint(server_pair: ServerPair) -> str:
    return server_pair.subject.endpoint


# The servers an interoperability test (tests/test_interop_*.py) runs against: fastetcd on each transport,
# and real etcd 3.5.1, which must pass the same assertions (the oracle keeps the expected table honest).
INTEROP_SERVERS = ("grpcio", "native", "etcd")


@pytest.fixture(params=INTEROP_SERVERS, ids=["fastetcd-grpcio", "fastetcd-native", "etcd"])
def interop_server(request: pytest.FixtureRequest, server_factory: ServerFactory) -> ServerProcess:
    """A fresh server with /metrics on a port of its own (``metrics_url``), one of INTEROP_SERVERS; its
    kind for the scenario's expectations is ``request.param`` (see interop_server_kind)."""
    if request.param == "etcd":
        return server_factory("etcd", "etcd", metrics=True)
    # A test's own --transport comes after the defaults (conftest's --transport option), so it wins.
    transport = request.param
    return server_factory("fastetcd", f"fastetcd-{transport}", ["--transport", transport], metrics=True)


@pytest.fixture
def interop_server_kind(interop_server: ServerProcess, request: pytest.FixtureRequest) -> str:
    """"grpcio" or "native" (fastetcd on that transport) or "etcd": what interop_server is."""
    return request.node.callspec.params["interop_server"]
