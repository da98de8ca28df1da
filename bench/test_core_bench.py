"""Micro-benchmarks of the Cython MVCC core (`fastetcd._core.MVCC`).

Not unit tests: run with `python -m pytest bench/test_core_bench.py --benchmark-only`.
Each benchmark also checks the result it times, so a core that got fast by getting wrong fails here.

A regression gate in CI (.ci/run), like bench/test_transport_bench.py: compared on minimums with the baseline
bench/baselines/*/0002_core.json, failing only past +150% (a shared 2-core machine moves figures by tens of
percent; a core path that went back to Python objects per key moves them by more). The whole file takes
~15 s (the 100k-key fixture is built once per module), so CI runs all of it, up to three times: the 100k-key
scans are bound by memory and cache, and a neighbour thrashing the cache can slow a whole run 3-4x; a real
regression fails every attempt. Refresh the baseline after an
intended change, on an idle machine of CI's kind:

    python -m pytest bench/test_core_bench.py --benchmark-only --benchmark-storage=bench/baselines \
        --benchmark-save=core        # writes 000N_core.json: replace 0002_core.json with it
Shapes follow bench/compare.py and TARGETS.md: 8-byte keys with 256-byte values for single-key work,
a kube-like prefix of 100k keys × 1 KiB for lists and counts.
"""
from __future__ import annotations

import itertools
import os

import pytest
from fastetcd._core import MVCC, KeyVersion

VAL_256 = os.urandom(256)
VAL_1K = os.urandom(1024)
N_PREFIX = 100_000
PREFIX = b"/registry/pods/default/"
PREFIX_END = PREFIX[:-1] + bytes([PREFIX[-1] + 1])
# Puts are timed in fixed batches so every run applies the same number of revisions and memory stays
# bounded (a plain benchmark() loop would pick its own, possibly huge, iteration count).
PUT_ITERATIONS = 1_000
PUT_ROUNDS = 50


def small_key(i: int) -> bytes:
    return b"k%07d" % i  # 8 bytes, like the etcd benchmark tool's keys


def put_next(m: MVCC, key: bytes, value: bytes) -> None:
    m.put(key, value, 0, m.rev + 1, 0)


@pytest.fixture(scope="module")
def kube() -> MVCC:
    """100k objects under one prefix, plus neighbours on both sides that no scan of the prefix may touch."""
    m = MVCC()
    for i in range(1_000):
        put_next(m, b"/registry/events/%06d" % i, VAL_256)
    for i in range(N_PREFIX):
        put_next(m, PREFIX + b"pod-%06d" % i, VAL_1K)
    for i in range(1_000):
        put_next(m, b"/registry/services/%06d" % i, VAL_256)
    return m


def test_put_new_key(benchmark) -> None:
    m = MVCC()
    keys = (small_key(i) for i in itertools.count())
    start = m.rev

    def put() -> None:
        m.put(next(keys), VAL_256, 0, m.rev + 1, 0)

    benchmark.pedantic(put, iterations=PUT_ITERATIONS, rounds=PUT_ROUNDS, warmup_rounds=1)
    applied = m.rev - start
    assert applied >= PUT_ITERATIONS * PUT_ROUNDS
    assert m.count(b"\0", b"\0", m.rev) == applied


def test_put_overwrite(benchmark) -> None:
    m = MVCC()
    n_keys = 10_000
    for i in range(n_keys):
        put_next(m, small_key(i), VAL_256)
    keys = itertools.cycle([small_key(i) for i in range(n_keys)])

    def put() -> None:
        m.put(next(keys), VAL_256, 0, m.rev + 1, 0)

    benchmark.pedantic(put, iterations=PUT_ITERATIONS, rounds=PUT_ROUNDS, warmup_rounds=1)
    assert m.count(b"\0", b"\0", m.rev) == n_keys
    kvs, count = m.range(small_key(0), b"", m.rev, 0, False)
    assert count == 1 and VAL_256 in kvs[0]


def test_point_range(benchmark, kube: MVCC) -> None:
    rev = kube.rev
    keys = itertools.cycle([PREFIX + b"pod-%06d" % i for i in range(0, N_PREFIX, 7)])

    def get() -> tuple[list[bytes], int]:
        return kube.range(next(keys), b"", rev, 0, False)

    kvs, count = benchmark(get)
    assert count == 1 and len(kvs) == 1 and VAL_1K in kvs[0]


def test_point_get(benchmark, kube: MVCC) -> None:
    """The engine's point read (Put with prev_kv / ignore_value, Txn checks): one key's fields and value."""
    rev = kube.rev
    keys = itertools.cycle([PREFIX + b"pod-%06d" % i for i in range(0, N_PREFIX, 7)])

    def get() -> KeyVersion:
        return kube.get(next(keys), rev)

    got = benchmark(get)
    assert got.mod_revision <= rev and got.value == VAL_1K and VAL_1K in got.kv


def test_range_items_500(benchmark, kube: MVCC) -> None:
    """The engine's sorted / filtered Range and Txn compares read items, not bytes: 500 keys, no limit."""
    rev = kube.rev
    start, end = PREFIX + b"pod-%06d" % 0, PREFIX + b"pod-%06d" % 500

    items, count = benchmark(kube.range_items, start, end, rev, 0)
    assert count == len(items) == 500
    assert items[0].key == start and items[-1].value == VAL_1K and VAL_1K in items[-1].kv


@pytest.mark.parametrize("keys_only", [False, True], ids=["values", "keys_only"])
@pytest.mark.parametrize("page", ["first", "middle"])
def test_prefix_range_limit_500(benchmark, kube: MVCC, keys_only: bool, page: str) -> None:
    rev = kube.rev
    # kube-apiserver pages through a list with `limit` and needs the exact `count` of what remains.
    first = 0 if page == "first" else N_PREFIX // 2
    start = PREFIX + b"pod-%06d" % first

    kvs, count = benchmark(kube.range, start, PREFIX_END, rev, 500, keys_only)
    assert len(kvs) == 500
    assert count == N_PREFIX - first
    assert (VAL_1K in kvs[0]) is not keys_only
    assert start in kvs[0]
    assert PREFIX + b"pod-%06d" % (first + 499) in kvs[-1]


def test_count_prefix(benchmark, kube: MVCC) -> None:
    rev = kube.rev
    assert benchmark(kube.count, PREFIX, PREFIX_END, rev) == N_PREFIX
