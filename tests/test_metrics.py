"""metrics.py's hot-path stand-ins against prometheus_client's own types: same exposition, cheaper calls."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from fastetcd.metrics import Tally, TallyHistogram, _FlushTallies

BUCKETS = (0.001, 0.002, 0.004, 1.0)
# on a bound, between bounds, below the first, above the last, and the same value twice
SAMPLES = (0.001, 0.0015, 0.0, 0.0041, 7.5, 0.002, 0.002, 1.0)


def test_tally_histogram_exposes_what_a_prometheus_histogram_would():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = TallyHistogram("x_seconds", "Doc.", BUCKETS, registry=ours)
    hist = Histogram("x_seconds", "Doc.", buckets=BUCKETS, registry=theirs)
    for v in SAMPLES:
        tally.observe(v)
        hist.observe(v)
    assert generate_latest(ours) == generate_latest(theirs)
    assert ours.get_sample_value("x_seconds_bucket", {"le": "0.002"}) == 5
    assert ours.get_sample_value("x_seconds_count") == len(SAMPLES)


def test_tally_reaches_its_counter_when_the_registry_is_read():
    registry = CollectorRegistry()
    registry.register(_FlushTallies())
    tally = Tally(Counter("y_total", "Doc.", registry=registry))
    tally.n += 3
    assert registry.get_sample_value("y_total") == 3
    tally.n += 2
    assert registry.get_sample_value("y_total") == 5
