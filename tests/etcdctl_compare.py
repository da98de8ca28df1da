"""What the etcdctl black-box tests (test_etcdctl_compat, test_etcdctl_watch_lease) share: normalizing
etcdctl output so two clusters compare equal, and collecting every difference of a scenario.

Only what must differ between two clusters is normalized: the cluster/member ids and raft term in
`-w json` output, and the client log line's timestamp, connection pointer and endpoint.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

_IDS = ("cluster_id", "member_id", "raft_term")


def _normalize_json(value: object) -> object:
    """Mask ids wherever a header carries them, but keep the keys: a nested header that carries ids on
    one server and not on the other is a real difference a client can see."""
    if isinstance(value, dict):
        return {k: ("<id>" if k in _IDS else _normalize_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize_json(v) for v in value]
    return value


def json_line(line: str) -> dict[str, object] | None:
    """The JSON object a whole output line holds (`-w json` output, a client log line), else None."""
    stripped = line.strip()
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        doc = json.loads(stripped)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _normalize_line(line: str, endpoint: str) -> str:
    doc = json_line(line)
    if doc is None:
        return line.replace(endpoint, "<endpoint>")
    if doc.get("logger") == "etcd-client" or "ts" in doc:
        # A client log line: its time and the Go pointer in "target" differ between any two runs.
        doc.pop("ts", None)
        doc.pop("target", None)
    return json.dumps(_normalize_json(doc), sort_keys=False)


def normalize(text: str, endpoint: str) -> str:
    """etcdctl output of one server with what differs between any two clusters masked."""
    return "\n".join(_normalize_line(line, endpoint) for line in text.split("\n"))


@dataclass
class Outcome:
    rc: int
    out: str
    err: str

    def show(self) -> str:
        return f"rc={self.rc}\n--- stdout ---\n{self.out}--- stderr ---\n{self.err}"


class Comparison:
    """Runs commands on both servers and collects the differences instead of stopping at the first, so
    one failing test lists every incompatibility of its scenario (`check` fails the test with them)."""

    def __init__(self) -> None:
        self.mismatches: list[str] = []
        self.count = 0
        # One worker: the subject's command runs while the oracle's runs in the calling thread (each
        # etcdctl run is mostly process start-up and waiting).
        self.pool = ThreadPoolExecutor(max_workers=1)

    def differs(self, cmd: str, got: Outcome, want: Outcome) -> None:
        self.mismatches.append(f"$ {cmd}\n=== fastetcd ===\n{got.show()}\n=== etcd ===\n{want.show()}")

    def check(self) -> None:
        self.pool.shutdown()
        if self.mismatches:
            pytest.fail(
                f"{len(self.mismatches)} of {self.count} etcdctl commands differ:\n\n"
                + "\n\n".join(self.mismatches),
                pytrace=False,
            )

    def __enter__(self) -> Comparison:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown()
