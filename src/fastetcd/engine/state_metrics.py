"""The engine's state as Prometheus gauges, read at scrape time (nothing is copied on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fastetcd.engine.state_machine import StateMachine


class StateCollector(Collector):
    def __init__(self, sm: StateMachine) -> None:
        self.sm = sm

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sm = self.sm
        leader = 0 if sm.halted else 1  # a halted node has lost its store: it leads nothing
        yield GaugeMetricFamily(
            "etcd_server_has_leader", "Whether or not a leader exists. 1 is existence, 0 is not.", leader
        )
        yield GaugeMetricFamily(
            "etcd_server_is_leader", "Whether or not this member is a leader. 1 if is, 0 otherwise.", leader
        )
        yield GaugeMetricFamily(
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            sm.db_size(),
        )
        yield GaugeMetricFamily(
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            sm.db_size_in_use(),
        )
        yield GaugeMetricFamily("etcd_debugging_mvcc_keys_total", "Total number of keys.", sm.key_count())
        yield GaugeMetricFamily(
            "etcd_debugging_mvcc_watcher_total", "Total number of watchers.", sm.watch_hub.watcher_count()
        )
        yield GaugeMetricFamily(
            "etcd_debugging_mvcc_watch_stream_total",
            "Total number of watch streams.",
            sm.watch_hub.stream_count(),
        )
        yield GaugeMetricFamily(
            "etcd_server_quota_backend_bytes", "Current backend storage quota size in bytes.", sm.quota_bytes
        )
        yield GaugeMetricFamily(
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            sm.applied_index,
        )
        yield GaugeMetricFamily(
            "etcd_debugging_auth_revision", "The current revision of auth store.", sm.auth.revision
        )
        yield GaugeMetricFamily(
            "fastetcd_watch_ring_bytes",
            "Bytes of committed events held in the watch ring (bounded; shared by every watcher).",
            sm.watch_hub.ring_bytes(),
        )
