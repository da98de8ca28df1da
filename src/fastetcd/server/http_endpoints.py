"""etcd's HTTP endpoints, transport-neutral: /health, /livez, /readyz, /version, /metrics.

``respond(method, target)`` returns (status, content type, body); an HTTP listener (the metrics listener,
or the native transport on the client port) only frames it. The answers are etcd's: /health is
``{"health":"true","reason":""}`` (false with the first active alarm as reason, 503), /version is
``{"etcdserver":...,"etcdcluster":...}``, /metrics is Prometheus text from prometheus_client.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from fastetcd import ETCD_CLUSTER_VERSION, ETCD_COMPAT_VERSION
from fastetcd.engine import alarms as alarm_types
from fastetcd.engine.state_machine import StateMachine

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
Response = tuple[int, str, bytes]


class HttpEndpoints:
    def __init__(self, sm: StateMachine) -> None:
        self.sm = sm

    def respond(self, method: str, target: str) -> Response:
        url = urlsplit(target)
        query = parse_qs(url.query, keep_blank_values=True)
        if method not in ("GET", "HEAD"):
            return 405, TEXT, b"Method Not Allowed\n"
        if url.path == "/health":
            return self._health(set(query.get("exclude", [])))
        if url.path in ("/livez", "/readyz"):
            return self._probe(url.path[1:], "verbose" in query)
        if url.path == "/version":
            body = {"etcdserver": ETCD_COMPAT_VERSION, "etcdcluster": ETCD_CLUSTER_VERSION}
            return 200, JSON, orjson.dumps(body)
        if url.path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        return 404, TEXT, b"404 page not found\n"

    def _failure(self, excluded: set[str]) -> str:
        """etcd's reason for unhealthy, "" when healthy: an alarm first, then a lost leader."""
        for _, alarm in self.sm.active_alarms():
            name = alarm_types.NAMES.get(alarm, "UNKNOWN")
            if name not in excluded:
                return f"ALARM {name}"
        if self.sm.halted is not None:
            return "RAFT NO LEADER"
        return ""

    def _health(self, excluded: set[str]) -> Response:
        reason = self._failure(excluded)
        body = orjson.dumps({"health": "false" if reason else "true", "reason": reason})
        return (503 if reason else 200), JSON, body

    def _probe(self, name: str, verbose: bool) -> Response:
        # livez: is the process serving at all; readyz: can it serve data (no corruption, a leader).
        checks = [("serializable_read", self.sm.halted is None)]
        if name == "readyz":
            checks.append(("data_corruption", not self.sm.has_alarm(alarm_types.CORRUPT)))
        ok = all(passed for _, passed in checks)
        lines = [f"[{'+' if ok_ else '-'}]{check} {'ok' if ok_ else 'failed'}" for check, ok_ in checks]
        tail = "ok" if ok else f"{name} check failed"
        body = "\n".join([*lines, tail]) if verbose or not ok else tail
        return (200 if ok else 503), TEXT, (body + "\n").encode()
