"""etcd's HTTP endpoints on --listen-metrics-urls (/health, /livez, /readyz, /version, /metrics) and the
grpc.health.v1 service, with real etcd 3.5.1 as the oracle where etcd 3.5.1 has them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerFactory

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import ServerProcess, free_port, run_etcdctl

ETCD_NAMES = {
    "etcd_server_has_leader", "etcd_server_is_leader", "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes", "etcd_debugging_mvcc_keys_total", "etcd_mvcc_put",
    "etcd_disk_wal_fsync_duration_seconds", "etcd_disk_backend_commit_duration_seconds",
    "etcd_server_proposals_committed_total", "etcd_network_client_grpc_received_bytes",
    "etcd_network_client_grpc_sent_bytes", "grpc_server_handled", "grpc_server_started",
    "etcd_debugging_mvcc_watcher_total", "etcd_debugging_mvcc_watch_stream_total",
    "etcd_server_quota_backend_bytes", "process_resident_memory_bytes",
    "etcd_debugging_auth_revision",
}


def start_with_metrics(factory: ServerFactory, kind: str, *extra: str) -> tuple[ServerProcess, str]:
    url = f"http://127.0.0.1:{free_port()}"
    return factory(kind, kind, ["--listen-metrics-urls", url, *extra]), url


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def samples(metrics_url: str) -> dict[tuple[str, tuple], float]:
    status, _, text = get(metrics_url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_carry_etcds_names_and_move_under_load(server_factory: ServerFactory) -> None:
    fe, url = start_with_metrics(server_factory, "fastetcd")
    status, ctype, text = get(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(text)}
    assert ETCD_NAMES <= families, ETCD_NAMES - families
    assert {"fastetcd_group_commit_batch_requests", "fastetcd_store_append_duration_seconds",
            "fastetcd_watch_ring_bytes"} <= families

    put_ok = ("grpc_server_handled_total", (("grpc_code", "OK"), ("grpc_method", "Put"),
                                            ("grpc_service", "etcdserverpb.KV"), ("grpc_type", "unary")))
    before = samples(url)
    with grpc.insecure_channel(fe.endpoint) as ch:
        kv = rpc_pb2_grpc.KVStub(ch)
        for i in range(50):
            kv.Put(rpc_pb2.PutRequest(key=b"m/%d" % i, value=b"v" * 100), timeout=10)
        try:
            kv.Range(rpc_pb2.RangeRequest(key=b""), timeout=10)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = samples(url)
    assert after[("etcd_mvcc_put_total", ())] - before[("etcd_mvcc_put_total", ())] == 50
    assert after[put_ok] - before.get(put_ok, 0) == 50
    bad_range = ("grpc_server_handled_total", (("grpc_code", "InvalidArgument"), ("grpc_method", "Range"),
                                                ("grpc_service", "etcdserverpb.KV"), ("grpc_type", "unary")))
    assert after[bad_range] == 1
    received = ("etcd_network_client_grpc_received_bytes_total", ())
    assert after[received] - before[received] >= 50 * 100
    assert after[("etcd_debugging_mvcc_keys_total", ())] == 50
    assert after[("etcd_server_proposals_committed_total", ())] >= 50
    assert after[("etcd_disk_wal_fsync_duration_seconds_count", ())] >= 1
    assert after[("etcd_server_has_leader", ())] == 1
    assert after[("process_resident_memory_bytes", ())] > 10_000_000


def test_health_version_and_probes_match_etcd(server_factory: ServerFactory) -> None:
    quota = ("--quota-backend-bytes", "1000000")
    pairs = [start_with_metrics(server_factory, kind, *quota) for kind in ("fastetcd", "etcd")]
    seen = []
    for server, url in pairs:
        # etcd answers /version on its client port (fastetcd on the metrics port as well)
        where = f"http://{server.endpoint}" if server.kind == "etcd" else url
        version = json.loads(get(where + "/version")[2])
        healthy = get(url + "/health")
        for i in range(30):  # until NOSPACE
            if run_etcdctl(server.endpoint, ["put", f"k{i}", "x" * 100_000])[0] != 0:
                break
        unhealthy = get(url + "/health")
        excluded = get(url + "/health?exclude=NOSPACE")
        seen.append((sorted(version), healthy[0], json.loads(healthy[2]), unhealthy[0],
                     json.loads(unhealthy[2]), excluded[0], json.loads(excluded[2])))
    assert seen[0] == seen[1]
    assert seen[0][4] == {"health": "false", "reason": "ALARM NOSPACE"}
    fe_url = pairs[0][1]
    assert get(fe_url + "/livez") == (200, "text/plain; charset=utf-8", "ok\n")
    assert get(fe_url + "/readyz?verbose")[2] == "[+]serializable_read ok\n[+]data_corruption ok\nok\n"
    assert get(fe_url + "/nope")[0] == 404


def test_grpc_health_service_answers_as_etcd(server_factory: ServerFactory) -> None:
    answers = []
    for kind in ("fastetcd", "etcd"):
        server = server_factory(kind, kind)
        with grpc.insecure_channel(server.endpoint) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            ok = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            try:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
                unknown = None
            except grpc.RpcError as e:
                unknown = (e.code(), e.details())
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            first = next(watch).status
            watch.cancel()
        answers.append((ok, unknown, first))
    assert answers[0] == answers[1]
    assert answers[0][0] == health_pb2.HealthCheckResponse.SERVING
