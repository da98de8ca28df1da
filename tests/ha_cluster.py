"""Several fastetcd processes over one Cosmos container: a replicated cluster for the HA tests.

Every node reaches the Cosmos test server through a TCP proxy of its own (tests/tcp_proxy.py), so one
node can be cut off from Cosmos while the others keep their connections. Nodes are real processes started
with the harness of fastetcd.testing; a node is killed with ``kill(i)`` (SIGKILL), paused with
``signal(i, SIGSTOP)`` and brought back with ``restart(i)`` on the same port.
"""

from __future__ import annotations

import signal as signals
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from cosmos_fixture import CosmosServer
from tcp_proxy import TcpProxy

from fastetcd.proto import rpc_pb2
from fastetcd.testing import (
    CosmosTarget,
    ServerProcess,
    channel,
    free_port,
    maintenance_stub,
    start_fastetcd,
    wait_ready,
)

# Leadership timing the HA tests run with (fastetcd's --ha-lease etc.): short, so a failover takes a
# few seconds, and still 10x the loopback round trip.
LEASE_S = 3.0


@dataclass
class Node:
    name: str
    workdir: Path
    port: int
    proxy: TcpProxy
    process: ServerProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class HaCluster:
    cosmos: CosmosServer
    root: Path
    size: int = 3
    extra_args: tuple[str, ...] = ()
    container: str = ""
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.container = self.container or f"ha-{self.root.name}-{int(time.time() * 1000) % 10**9}"
        up = urlsplit(self.cosmos.endpoint)
        for i in range(self.size):
            proxy = TcpProxy(up.hostname or "127.0.0.1", up.port or 443)
            self.nodes.append(Node(f"n{i}", self.root / f"n{i}", free_port(), proxy))

    def start(self, *which: int) -> None:
        for i in which or range(self.size):
            self.start_node(i, wait=False)
        for i in which or range(self.size):
            node = self.nodes[i]
            assert node.process is not None
            wait_ready(node.process, timeout=60)

    def start_node(self, i: int, *, wait: bool = True) -> ServerProcess:
        node = self.nodes[i]
        node.process = start_fastetcd(
            node.workdir, ["--ha-lease", f"{LEASE_S}s", *self.extra_args], port=node.port, name=node.name,
            cosmos=CosmosTarget(node.proxy.endpoint, self.cosmos.key), container=self.container, wait=wait,
            timeout=60,
        )
        return node.process

    restart = start_node

    def endpoints(self, *which: int) -> list[str]:
        return [self.nodes[i].endpoint for i in (which or range(self.size))]

    def live(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.process is not None and n.process.alive()]

    def status(self, i: int, timeout: float = 2.0) -> rpc_pb2.StatusResponse:
        with channel(self.nodes[i].endpoint) as ch:
            return maintenance_stub(ch).Status(rpc_pb2.StatusRequest(), timeout=timeout)

    def leader(self, timeout: float = 30.0, among: list[int] | None = None) -> int:
        """The index of the node that every live node (or ``among``) names as leader, once they agree."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                statuses = {i: self.status(i) for i in (among if among is not None else self.live())}
                leaders = {s.leader for s in statuses.values()}
                if len(leaders) == 1 and 0 not in leaders:
                    (leader_id,) = leaders
                    for i, s in statuses.items():
                        if s.header.member_id == leader_id:
                            return i
                last = {i: (s.header.member_id, s.leader, s.raftTerm) for i, s in statuses.items()}
            except Exception as e:  # noqa: BLE001 - a node mid-failover may not answer yet
                last = e
            time.sleep(0.1)
        raise AssertionError(f"no agreed leader within {timeout}s: {last}")

    def kill(self, i: int) -> None:
        proc = self.nodes[i].process
        assert proc is not None
        proc.kill()

    def signal(self, i: int, sig: int) -> None:
        proc = self.nodes[i].process
        assert proc is not None
        proc.proc.send_signal(sig)

    def close(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.alive():
                try:
                    node.process.proc.send_signal(signals.SIGCONT)
                except ProcessLookupError:
                    pass
                node.process.stop()
            node.proxy.close()
