"""pytest fixtures that give your tests a real etcd v3 endpoint: a fastetcd process on a free port.

Installed with fastetcd and loaded by pytest automatically (the ``pytest11`` entry point), so a project
that has ``fastetcd`` installed only asks for a fixture::

    def test_config_roundtrip(etcd_endpoint):          # "127.0.0.1:PORT", a fresh, empty fastetcd
        host, port = etcd_endpoint.rsplit(":", 1)
        ...

Fixtures (each server has a fresh data dir of its own, is ready, i.e. answers a Range, before the test
starts, and is stopped with SIGTERM afterwards; a server that does not exit cleanly then, or had exited
with an error, fails the test):

- ``etcd_endpoint`` / ``fastetcd_server``: one server per test (``fastetcd_server`` is the
  :class:`fastetcd.testing.ServerProcess`: ``.endpoint``, ``.port``, ``.pid``, ``.log_tail()``, ...).
- ``etcd_endpoint_session`` / ``fastetcd_server_session``: one server for the whole run, shared by every
  test that asks for it (faster; tests see each other's keys, so give each its own prefix).
- ``fastetcd_factory``: a function starting more servers (``fastetcd_factory(extra_args)``), all stopped
  after the test; for tests of restarts or of flags.

Options (distinct ``--fastetcd-`` names so they never collide with a project's own):

- ``--fastetcd-server-arg=ARG`` (repeatable): extra fastetcd flags for every server, e.g.
  ``--fastetcd-server-arg=--transport=native``.
- ``--fastetcd-cosmos-endpoint`` / ``--fastetcd-cosmos-key`` / ``--fastetcd-cosmos-database`` (or the
  environment variables ``FASTETCD_PYTEST_COSMOS_ENDPOINT``, ``..._KEY``, ``..._DATABASE``): run every server
  on Azure Cosmos DB (``pip install 'fastetcd[cosmos]'``), one new container per server, deleted after it.
  The variables are not fastetcd's own ``FASTETCD_COSMOS_*``, so a shell set up for a production server does
  not point a test run at it by accident.

A project that defines a fixture of the same name (a ``conftest.py`` fixture ``etcd_endpoint``) keeps its
own: pytest prefers conftest fixtures to plugin ones. ``-p no:fastetcd.pytest_plugin`` turns the plugin off.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from fastetcd.testing import CosmosTarget, ServerProcess, start_fastetcd

ENV_PREFIX = "FASTETCD_PYTEST_"

ServerStarter = Callable[..., ServerProcess]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastetcd", "fastetcd servers for tests (fastetcd.pytest_plugin)")
    group.addoption("--fastetcd-server-arg", action="append", default=[], metavar="ARG",
                    help="extra flag for every fastetcd the fixtures start (repeatable), "
                         "e.g. --fastetcd-server-arg=--transport=native")
    group.addoption("--fastetcd-cosmos-endpoint", default=None, metavar="URL",
                    help=f"run the fixtures' servers on this Azure Cosmos DB account "
                         f"[env {ENV_PREFIX}COSMOS_ENDPOINT]")
    group.addoption("--fastetcd-cosmos-key", default=None, metavar="KEY",
                    help=f"its account key (prefer the environment variable) [env {ENV_PREFIX}COSMOS_KEY]")
    group.addoption("--fastetcd-cosmos-database", default=None, metavar="NAME",
                    help=f"database for the servers' containers (default fastetcd-pytest) "
                         f"[env {ENV_PREFIX}COSMOS_DATABASE]")


def _option(config: pytest.Config, name: str, default: str | None = None) -> str | None:
    value = config.getoption(f"--fastetcd-{name.replace('_', '-')}")
    if value is None:
        value = os.environ.get(ENV_PREFIX + name.upper())
    return value if value is not None else default


def _cosmos_target(config: pytest.Config) -> CosmosTarget | None:
    endpoint = _option(config, "cosmos_endpoint")
    if not endpoint:
        return None
    return CosmosTarget(endpoint=endpoint, key=_option(config, "cosmos_key", "") or "",
                        database=_option(config, "cosmos_database", "fastetcd-pytest") or "fastetcd-pytest")


def _delete_container(target: CosmosTarget, container: str) -> None:
    """Drop a finished server's container: every server got a new one, and they cost money on Azure."""
    from azure.cosmos import CosmosClient, exceptions

    client = CosmosClient(target.endpoint, credential=target.key or _azure_credential())
    try:
        client.get_database_client(target.database).delete_container(container)
    except exceptions.CosmosResourceNotFoundError:
        pass  # the server never created it (it failed to start)


def _azure_credential() -> object:
    # fastetcd's own rule for an empty key: an Azure AD credential (azure-identity, installed by the user).
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


def _stop(server: ServerProcess, cosmos: CosmosTarget | None) -> None:
    """SIGTERM, then fail loudly (with the server's log) if it did not shut down cleanly, or had exited
    with an error of its own. A server already ended by a signal is left alone: that is a test's own
    ``kill()`` (a crash test), not a fault of the server."""
    was_alive = server.alive()
    code = server.stop()
    if cosmos is not None and server.cosmos_container:
        _delete_container(cosmos, server.cosmos_container)
    if (was_alive and code != 0) or code > 0:
        how = "exited after SIGTERM" if was_alive else "had exited"
        raise RuntimeError(f"fastetcd at {server.endpoint} {how} with code {code}; log tail:\n"
                           f"{server.log_tail()}")


class _Servers:
    """Starts fastetcd servers in fresh directories under one base dir and stops them all at the end."""

    def __init__(self, config: pytest.Config, base: Path) -> None:
        self.args = list(config.getoption("--fastetcd-server-arg"))
        self.cosmos = _cosmos_target(config)
        self.base = base
        self.started: list[ServerProcess] = []

    def start(self, extra_args: Sequence[str] = (), **kwargs: object) -> ServerProcess:
        workdir = self.base / f"server{len(self.started)}"
        if self.cosmos is not None:
            kwargs.setdefault("cosmos", self.cosmos)
        server = start_fastetcd(workdir, [*self.args, *extra_args], **kwargs)  # type: ignore[arg-type]
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        errors = []
        for server in reversed(self.started):
            try:
                _stop(server, self.cosmos)
            except Exception as e:  # stop the others all the same, then report
                errors.append(e)
        self.started.clear()
        if errors:
            raise errors[0]


@pytest.fixture
def fastetcd_factory(request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerStarter]:
    """``start(extra_args=(), **kwargs)`` → a ready :class:`~fastetcd.testing.ServerProcess` with a fresh
    data dir; keyword arguments go to :func:`fastetcd.testing.start_fastetcd`. All stopped after the test."""
    servers = _Servers(request.config, tmp_path_factory.mktemp("fastetcd"))
    try:
        yield servers.start
    finally:
        servers.stop_all()


@pytest.fixture
def fastetcd_server(fastetcd_factory: ServerStarter) -> ServerProcess:
    """A fastetcd for this test alone: fresh and empty."""
    return fastetcd_factory()


@pytest.fixture
def etcd_endpoint(fastetcd_server: ServerProcess) -> str:
    """``host:port`` of a fastetcd for this test alone (what gRPC dials, etcdctl's ``--endpoints``)."""
    return fastetcd_server.endpoint


@pytest.fixture(scope="session")
def fastetcd_server_session(request: pytest.FixtureRequest,
                            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One fastetcd shared by every test of the run that asks for it."""
    servers = _Servers(request.config, tmp_path_factory.mktemp("fastetcd-session"))
    try:
        yield servers.start()
    finally:
        servers.stop_all()


@pytest.fixture(scope="session")
def etcd_endpoint_session(fastetcd_server_session: ServerProcess) -> str:
    """``host:port`` of the run's shared fastetcd (see ``fastetcd_server_session``)."""
    return fastetcd_server_session.endpoint
