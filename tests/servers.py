"""Start and stop real etcd 3.5.1 and fastetcd processes for tests, and run etcdctl against them.

Every process runs in its own session so that a kill reaches anything it spawned, and every
process is killed by the fixture that started it, whether the test passed or not.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc

START_TIMEOUT_S = 30.0

# Big enough for the oversized-request tests: the client must be able to send what the server rejects.
UNLIMITED_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it, so parallel runs do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    kind: str  # "etcd" or "fastetcd"
    proc: subprocess.Popen[bytes]
    endpoint: str  # "127.0.0.1:PORT"
    data_dir: Path
    log_path: Path
    _log_file: object = field(repr=False, default=None)
    cosmos_container: str | None = None  # set when a fastetcd runs on the Cosmos store

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's whole session (it is its own group leader) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])


def _spawn(kind: str, argv: list[str], endpoint: str, data_dir: Path, log_path: Path,
           env: dict[str, str] | None = None) -> ServerProcess:
    # Closed by ServerProcess.kill; a file (not a pipe) so a chatty server never blocks on a full pipe.
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    return ServerProcess(kind, proc, endpoint, data_dir, log_path, log_file)


def range_answers(endpoint: str, timeout: float = 1.0) -> bool:
    """True when the server answers a Range with OK (not merely accepts TCP connections)."""
    with grpc.insecure_channel(endpoint) as channel:
        stub = rpc_pb2_grpc.KVStub(channel)
        try:
            stub.Range(rpc_pb2.RangeRequest(key=b"__ready_probe__"), timeout=timeout)
        except grpc.RpcError:
            return False
    return True


def wait_ready(server: ServerProcess, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.kind} exited with code {server.proc.returncode} before answering;"
                f" log tail:\n{server.log_tail()}"
            )
        if range_answers(server.endpoint, timeout=1.0):
            return
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(
        f"{server.kind} did not answer a Range within {timeout}s; log tail:\n{server.log_tail()}"
    )


def start_etcd(data_dir: Path, extra_args: Sequence[str] = (), fsync: bool = False) -> ServerProcess:
    """A fresh single-member real etcd. fsync is off by default: the oracle's answers do not depend on
    it and the runs are several times faster; crash tests that want etcd's durability pass fsync=True."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client = f"127.0.0.1:{free_port()}"
    peer = f"http://127.0.0.1:{free_port()}"
    argv = [
        "etcd",
        "--name", "oracle",
        "--data-dir", str(data_dir / "etcd"),
        "--listen-client-urls", f"http://{client}",
        "--advertise-client-urls", f"http://{client}",
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"oracle={peer}",
        "--log-level", "error",
    ]
    if not fsync:
        argv.append("--unsafe-no-fsync")
    argv.extend(extra_args)
    server = _spawn("etcd", argv, client, data_dir, data_dir / "etcd.log")
    wait_ready(server)
    return server


@dataclass(frozen=True)
class CosmosTarget:
    """A Cosmos DB account (the test server) that fastetcd processes store their data in."""

    endpoint: str
    key: str
    database: str = "fastetcd-tests"


# Set by conftest for `--store cosmos`: called on every fastetcd start that does not choose its store.
_default_cosmos: Callable[[], CosmosTarget] | None = None


def set_default_cosmos(provider: Callable[[], CosmosTarget] | None) -> None:
    """Make every fastetcd started without an explicit store use this Cosmos account (None: embedded)."""
    global _default_cosmos
    _default_cosmos = provider


# Set by conftest for `--transport`: the client transport of every fastetcd that does not choose its own.
_default_transport = "grpcio"


def set_default_transport(transport: str) -> None:
    """Make every fastetcd started without an explicit --transport use ``transport``."""
    global _default_transport
    _default_transport = transport


def default_store() -> str:
    return "embedded" if _default_cosmos is None else "cosmos"


def cosmos_container_for(data_dir: Path) -> str:
    """The container that stands in for a data dir: fresh for every new dir, the same on a restart.

    The readable part helps when reading the Cosmos server's log; the digest makes it unique (pytest's
    tmp dirs repeat names like "subject" in every test)."""
    resolved = str(Path(data_dir).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{Path(resolved).parent.name}-{Path(resolved).name}")
    return f"{readable[-60:].lstrip('-')}-{digest}"


def cosmos_args(target: CosmosTarget, container: str) -> list[str]:
    """fastetcd flags for a Cosmos container (the key travels in FASTETCD_COSMOS_KEY, not argv)."""
    return [
        "--store", "cosmos",
        "--cosmos-endpoint", target.endpoint,
        "--cosmos-database", target.database,
        "--cosmos-container", container,
    ]  # fmt: skip


def fastetcd_env() -> dict[str, str]:
    """The child imports the fastetcd the tests imported (installed, editable, or src/ with a built core)."""
    import fastetcd

    pkg_parent = str(Path(fastetcd.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_fastetcd(data_dir: Path, extra_args: Sequence[str] = (), port: int | None = None, *,
                   cosmos: CosmosTarget | None = None, container: str | None = None,
                   wait: bool = True) -> ServerProcess:
    """A fastetcd on `data_dir`. Its store: `cosmos` if given, else the session default (`--store`),
    unless extra_args choose one. On Cosmos the container is `container` or the one standing in for
    `data_dir` (so a restart on the same dir finds its data)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    client = f"127.0.0.1:{port or free_port()}"
    env = fastetcd_env()
    store_args: list[str] = []
    if cosmos is None and _default_cosmos is not None and "--store" not in extra_args:
        cosmos = _default_cosmos()
    if cosmos is not None:
        container = container or cosmos_container_for(data_dir)
        store_args = cosmos_args(cosmos, container)
        env["FASTETCD_COSMOS_KEY"] = cosmos.key
    argv = [
        sys.executable, "-m", "fastetcd",
        "--name", "fe",
        "--data-dir", str(data_dir / "fastetcd"),
        "--listen-client-urls", f"http://{client}",
        "--advertise-client-urls", f"http://{client}",
        *store_args,
        *([] if "--transport" in extra_args else ["--transport", _default_transport]),
        *extra_args,
    ]
    server = _spawn("fastetcd", argv, client, data_dir, data_dir / "fastetcd.log", env=env)
    server.cosmos_container = container if cosmos is not None else None
    if wait:
        wait_ready(server)
    return server


def start_server(kind: str, data_dir: Path, extra_args: Sequence[str] = (),
                 **kwargs: object) -> ServerProcess:
    if kind == "etcd":
        return start_etcd(data_dir, extra_args, **kwargs)  # type: ignore[arg-type]
    if kind == "fastetcd":
        return start_fastetcd(data_dir, extra_args, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown server kind {kind!r}")


def run_etcdctl(endpoint: str, args: Sequence[str], stdin: str | None = None,
                timeout: float = 60.0) -> tuple[int, str, str]:
    """Run etcdctl (v3 API) against one endpoint; returns (exit code, stdout, stderr)."""
    env = dict(os.environ)
    env["ETCDCTL_API"] = "3"
    # Anything inherited (ETCDCTL_ENDPOINTS, certificates, …) would change what is being compared.
    for name in list(env):
        if name.startswith("ETCDCTL_") and name != "ETCDCTL_API":
            del env[name]
    proc = subprocess.run(
        ["etcdctl", f"--endpoints={endpoint}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


@dataclass
class ServerPair:
    """The server under test and the oracle it is compared with."""

    subject: ServerProcess
    oracle: ServerProcess


# start(kind, name, extra_args=(), **kwargs) -> ServerProcess; see the server_factory fixture.
ServerFactory = Callable[..., ServerProcess]


def kv_stub(channel: grpc.Channel) -> rpc_pb2_grpc.KVStub:
    return rpc_pb2_grpc.KVStub(channel)
