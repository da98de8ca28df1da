"""Start and stop the Cosmos DB-compatible test server (tests/cosmos_server/server.js) for tests.

The server is Node (@vercel/cosmosdb-server with a Cosmos-faithful document layer, see
tests/cosmos_server/README.md). `npm ci` runs on first use if node_modules is missing. Each server runs
in its own session on a kernel-chosen loopback port and is stopped by PID; it also exits by itself when
the test process that holds its stdin goes away, so a crashed test run leaves nothing behind.

Use in a test module (the fixture is registered under the name `cosmos_server`; for one server shared by
a module's tests import `cosmos_fixture, module_cosmos_server` and use the fixture `cosmos`)::

    from cosmos_fixture import CosmosServer, cosmos_server_fixture  # noqa: F401

    def test_something(cosmos_server):
        client = cosmos_server.client()            # azure.cosmos.CosmosClient
        cosmos_server.fault("429", count=3, retry_after_ms=50, kind="batch")
        cosmos_server.stats()["by_kind"]["batch"]
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fastetcd.testing import stop_process_group

SERVER_DIR = Path(__file__).resolve().parent / "cosmos_server"
START_TIMEOUT_S = 30.0
NPM_CI_TIMEOUT_S = 600.0
# The server does not check signatures, but the SDK signs every request with the key, so it must be
# valid base64.
COSMOS_KEY = base64.b64encode(b"fastetcd cosmos test server key!").decode()

FAULT_KINDS = ("all", "batch", "read", "write", "query", "changefeed", "readfeed", "meta")


def ensure_installed() -> None:
    """Install the server's npm dependencies from package-lock.json unless they are present."""
    marker = SERVER_DIR / "node_modules" / "@vercel" / "cosmosdb-server" / "package.json"
    if marker.exists():
        return
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the Cosmos test server needs Node.js 18+ ({tool} not found on PATH)")
    # Parallel test processes must not run two `npm ci` into the same folder.
    lock_path = Path(tempfile.gettempdir()) / f"fastetcd-cosmos-npm-ci-{os.getuid()}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise RuntimeError(f"npm ci in {SERVER_DIR} failed:\n{result.stdout}\n{result.stderr}")


@dataclass
class CosmosServer:
    proc: subprocess.Popen[bytes]
    port: int
    endpoint: str  # what clients connect to, e.g. "http://127.0.0.1:PORT/"
    tls: bool
    log_path: Path
    key: str = COSMOS_KEY
    _log_file: Any = field(repr=False, default=None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for azure.cosmos (sync or aio) CosmosClient(endpoint, key, **kwargs)."""
        # The TLS mode serves the npm package's self-signed certificate, which expired in 2021.
        return {"connection_verify": False} if self.tls else {}

    def client(self, **kwargs: Any) -> Any:
        """A synchronous azure.cosmos.CosmosClient for this server."""
        from azure.cosmos import CosmosClient

        return CosmosClient(self.endpoint, self.key, **{**self.client_kwargs(), **kwargs})

    def async_client(self, **kwargs: Any) -> Any:
        """An azure.cosmos.aio.CosmosClient for this server (use `async with`)."""
        from azure.cosmos.aio import CosmosClient

        return CosmosClient(self.endpoint, self.key, **{**self.client_kwargs(), **kwargs})

    # ---- control endpoint -------------------------------------------------------------------------

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        import ssl

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.endpoint.rstrip("/") + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        context = ssl._create_unverified_context() if self.tls else None
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return json.load(resp)

    def fault(
        self, mode: str, *, count: int | None = None, kind: str | list[str] = "all", **params: Any
    ) -> Any:
        """Replace the fault rules with one rule.

        mode: "429" (retry_after_ms), "delay" (ms), "drop" (close the connection without answering,
        nothing applied), "drop_after" (apply the request, then close without answering), "status"
        (status, substatus, retry_after_ms), "none". count: how many matching requests to affect
        (None = until cleared). kind: operation kind(s) the rule applies to, from FAULT_KINDS.
        probability: fraction of matching requests affected (default 1).
        """
        rule: dict[str, Any] = {"mode": mode, "kind": kind, **params}
        if count is not None:
            rule["count"] = count
        return self._control("POST", "/_fault", rule)

    def faults(self, rules: list[dict[str, Any]]) -> Any:
        """Replace the fault rules with several (the first matching rule applies to a request)."""
        return self._control("POST", "/_fault", {"rules": rules})

    def clear_faults(self) -> None:
        self._control("DELETE", "/_fault")

    def fault_rules(self) -> list[dict[str, Any]]:
        return self._control("GET", "/_fault")["rules"]

    def stats(self) -> dict[str, Any]:
        """Request counts since start or the last reset: total, by_kind, by_status, faults_injected,
        batch_operations, bytes_in, connections_opened."""
        return self._control("GET", "/_stats")

    def reset_stats(self) -> dict[str, Any]:
        """Zero the counters; returns the counts before the reset."""
        return self._control("POST", "/_stats/reset", {})

    # ---- lifecycle --------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server by its PID (its own process group) and reap it."""
        stop_process_group(self.proc, signal.SIGTERM, timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_cosmos_server(
    log_dir: Path | None = None, *, tls: bool = False, log_requests: bool = False
) -> CosmosServer:
    """Start a fresh, empty server on 127.0.0.1 and a free port; wait until it accepts requests."""
    ensure_installed()
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="cosmos-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"cosmos-server-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")
    cmd = ["node", str(SERVER_DIR / "server.js"), "--port", "0", "--host", "127.0.0.1", "--exit-with-stdin"]
    if tls:
        cmd.append("--tls")
    if log_requests:
        cmd.append("--log-requests")
    proc = subprocess.Popen(
        cmd,
        cwd=SERVER_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log_file,
        start_new_session=True,
    )
    server: CosmosServer | None = None
    try:
        ready = _read_ready_line(proc, log_path)
        server = CosmosServer(
            proc=proc,
            port=int(ready["port"]),
            endpoint=ready["endpoint"],
            tls=bool(ready["tls"]),
            log_path=log_path,
            _log_file=log_file,
        )
        return server
    finally:
        if server is None:
            stop_process_group(proc, signal.SIGKILL, timeout=5)
            log_file.close()


def _read_ready_line(proc: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            log = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"Cosmos test server did not become ready (exit={proc.poll()}):\n{buf!r}\n{log}"
            )
        readable, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.2))
        if readable:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # stdout closed: the process is exiting; the next round reports it
                time.sleep(0.05)
            buf += chunk
    ready = json.loads(buf.split(b"\n", 1)[0])
    if not ready.get("ready"):
        raise RuntimeError(f"unexpected first line from the Cosmos test server: {buf!r}")
    return ready


@contextmanager
def cosmos_server_running(log_dir: Path | None = None, **kwargs: Any) -> Iterator[CosmosServer]:
    """start_cosmos_server(log_dir, **kwargs), stopped on the way out."""
    server = start_cosmos_server(log_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="cosmos_server")
def cosmos_server_fixture(tmp_path: Path) -> Iterator[CosmosServer]:
    """A fresh, empty Cosmos test server over plain HTTP, stopped by PID after the test."""
    with cosmos_server_running(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def module_cosmos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CosmosServer]:
    """One server for a whole test module (starting one per test costs up to seconds on a loaded machine);
    its tests use containers of their own."""
    with cosmos_server_running(tmp_path_factory.mktemp("cosmos")) as server:
        yield server


@pytest.fixture(name="cosmos")
def cosmos_fixture(module_cosmos_server: CosmosServer) -> Iterator[CosmosServer]:
    """The module's server, with no fault rules and zeroed statistics (fault rules cleared again after)."""
    module_cosmos_server.clear_faults()
    module_cosmos_server.reset_stats()
    yield module_cosmos_server
    module_cosmos_server.clear_faults()
