"""Prometheus metrics, under etcd's names where etcd has the concept, and fastetcd's own beside them.

The objects here are incremented where things happen (the transports, the writer, the stores); values
that already live in the engine (db size, keys, watchers) are read at scrape time by
``engine/state_metrics.py`` instead of being copied on every request. Everything is registered in
prometheus_client's default registry, which also carries the process metrics
(``process_resident_memory_bytes`` and friends).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# etcd exposes no *_created series; scrapers comparing the two should see the same families.
disable_created_metrics()


class Tally:
    """A count the hot path keeps as a plain int (``tally.n += k``), added to its Prometheus counter
    whenever the registry is read. prometheus_client's ``inc()`` takes a lock; a transport counted four
    times per call with it, which was ~8% of a small Range's server CPU. Event-loop thread only."""

    __slots__ = ("counter", "n")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.n = 0
        _TALLIES.append(self)

    def flush(self) -> None:
        n, self.n = self.n, 0
        if n:
            self.counter.inc(n)


_TALLIES: list[Tally] = []


class _FlushTallies:
    """Registered first, so every scrape (and ``REGISTRY.get_sample_value``) flushes the tallies before
    the counters are read."""

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        for t in _TALLIES:
            t.flush()
        return []


REGISTRY.register(_FlushTallies())


class TallyHistogram:
    """A histogram the hot path observes into plain ints, exported as an ordinary Prometheus histogram
    (``_bucket``/``_count``/``_sum``). prometheus_client's ``observe`` takes two locks and walks the
    bounds in Python, and a lone put paid for three of them on its critical path. One observing thread
    at a time (each store observes from one thread: the event loop, or its SQLite thread); a scrape from
    another thread may see a count one step behind its buckets."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def describe(self) -> list:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> list:
        counts = list(self._counts)
        cumulative = []
        acc = 0
        for bound, n in zip((*self._bounds, float("inf")), counts, strict=True):
            acc += n
            cumulative.append((floatToGoString(bound), acc))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, self._sum)
        return [family]

# etcd's disk histograms: 1 ms doubling up to about 8 s.
_DISK_BUCKETS = tuple(0.001 * 2**i for i in range(14))

MVCC_PUT = Tally(Counter("etcd_mvcc_put_total", "Total number of puts seen by this member."))
WAL_FSYNC = TallyHistogram(
    "etcd_disk_wal_fsync_duration_seconds",
    "The latency distributions of fsync called by WAL.",
    buckets=_DISK_BUCKETS,
)
BACKEND_COMMIT = Histogram(
    "etcd_disk_backend_commit_duration_seconds",
    "The latency distributions of commit called by backend.",
    buckets=_DISK_BUCKETS,
)
GRPC_RECEIVED_BYTES = Counter(
    "etcd_network_client_grpc_received_bytes_total", "The total number of bytes received from grpc clients."
)
GRPC_SENT_BYTES = Counter(
    "etcd_network_client_grpc_sent_bytes_total", "The total number of bytes sent to grpc clients."
)
GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "Total number of RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_RECEIVED = Tally(GRPC_RECEIVED_BYTES)  # what the transports count into, per message
GRPC_SENT = Tally(GRPC_SENT_BYTES)

# fastetcd's own
BATCH_SIZE = TallyHistogram(
    "fastetcd_group_commit_batch_requests",
    "Requests applied together in one group commit (one durable store step).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
STORE_APPEND = TallyHistogram(
    "fastetcd_store_append_duration_seconds",
    "Latency of one durable append of a group commit to the store.",
    buckets=_DISK_BUCKETS,
)
STORE_THROTTLED = Counter(
    "fastetcd_store_throttled_total",
    "Group commits the store refused for load (Cosmos DB 429s beyond the SDK's retries).",
)
COSMOS_REQUEST_UNITS = Counter(
    "fastetcd_cosmos_request_units_total", "Cosmos DB request units charged for log appends."
)

# grpc-go's names for status codes, as grpc_server_handled_total's grpc_code label carries them.
GO_CODE_NAMES = {
    "OK": "OK", "CANCELLED": "Canceled", "UNKNOWN": "Unknown", "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition", "ABORTED": "Aborted", "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented", "INTERNAL": "Internal", "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss", "UNAUTHENTICATED": "Unauthenticated",
}


class RpcMetrics:
    """The counters of one gRPC method, resolved once so that a call costs no label lookups (tallies)."""

    __slots__ = ("_labels", "started", "_handled")

    def __init__(self, grpc_type: str, path: str) -> None:
        service, method = path.lstrip("/").split("/")
        self._labels = (grpc_type, service, method)
        self.started = Tally(GRPC_STARTED.labels(*self._labels))
        self._handled: dict[str, Tally] = {}

    def start(self) -> None:
        self.started.n += 1

    def handled(self, code: str) -> None:
        """Count a finished call; ``code`` is a grpc.StatusCode name (``OK``, ``INVALID_ARGUMENT``, ...)."""
        tally = self._handled.get(code)
        if tally is None:
            labels = (*self._labels, GO_CODE_NAMES.get(code, code))
            tally = self._handled[code] = Tally(GRPC_HANDLED.labels(*labels))
        tally.n += 1
