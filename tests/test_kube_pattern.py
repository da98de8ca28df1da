"""kube-apiserver's pattern of use, against the server under test (`--subject=etcd` runs it against etcd).

While optimistic writers update, delete and create pods (Txn: If mod_revision == X Then Put/Delete Else
Get, exactly the shapes kube-apiserver sends) and short-lived Events are written under leases that only
the server expires:
- list /registry/pods/ at one revision R in pages (limit 50, continue at last key + "\\0", count),
- watch from R+1 with prev_kv and progress_notify on one stream opened with require-leader metadata,
  with a WatchProgressRequest every 100 ms and count_only polls,
- compact with kube's CAS on compact_rev_key.
Then the list plus the events must rebuild exactly the final state (nothing lost, duplicated, reordered;
every prev_kv right), the events' revisions must be exactly the acknowledged writes after R, progress
responses must never go backwards nor behind delivered events, and each expired Event key must produce a
DELETE in one revision per lease, neither before its TTL nor long after.

etcd 3.5.1 answers a WatchProgressRequest at once, with watch_id -1 and the current revision, even while
the stream's watchers are still replaying history, so its reply can overtake events (#15220, fixed in
3.5.8). fastetcd must not: for it the test also asserts that no event at or below a progress revision
arrives after that progress response.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from servers import ServerFactory
from watch_streams import REQUIRE_LEADER, Received, WatchStream

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import ServerProcess, prefix_end
from fastetcd.testing import channel as dial

PODS = b"/registry/pods/"
EVENTS = b"/registry/events/"
COMPACT_KEY = b"compact_rev_key"
INITIAL_PODS = 180
PAGE = 50
WRITERS = 4
WORKLOAD_S = 4.0
EVENT_TTL_S = 3  # etcd's minimum TTL is 2 s (it raises smaller ones)
EVENT_BATCH_EVERY_S = 0.4
PROGRESS_EVERY_S = 0.1
NOTIFY_INTERVAL = "1s"  # --experimental-watch-progress-notify-interval
EXPIRY_SLACK_S = 5.0  # a lease may be revoked this long after its TTL ran out
EARLY_TOLERANCE_S = 0.5  # client-side clock slack for "not before its TTL"

Cmp = rpc_pb2.Compare


def _pod_value(rng: random.Random, name: bytes, gen: int) -> bytes:
    body = rng.randbytes(rng.randint(50, 400)).hex()
    return b'{"kind":"Pod","metadata":{"name":"%s","generation":%d},"spec":"%s"}' % (name, gen, body.encode())


def _mod_is(key: bytes, rev: int) -> rpc_pb2.Compare:
    return Cmp(key=key, target=Cmp.MOD, result=Cmp.EQUAL, mod_revision=rev)


def _get(key: bytes) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))


@dataclass
class Write:
    rev: int
    kind: int  # kv_pb2.Event.PUT / DELETE
    key: bytes
    value: bytes = b""


@dataclass
class Shared:
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    writes: list[Write] = field(default_factory=list)
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)


def _writer(kv: rpc_pb2_grpc.KVStub, seed: int, names: list[bytes], shared: Shared) -> None:
    """kube-apiserver's GuaranteedUpdate / Delete / Create: compare on the mod_revision the writer last
    saw; on a conflict the Else branch's Get refreshes it."""
    rng = random.Random(seed)
    seen: dict[bytes, int] = {}  # key -> mod_revision last seen (0: does not exist)
    made = 0
    try:
        while not shared.stop.is_set():
            r = rng.random()
            if r < 0.15:
                made += 1
                key = PODS + b"new-%d-%d" % (seed, made)
                expect = 0
            else:
                key = PODS + rng.choice(names)
                expect = seen.get(key, 1)  # a guess: the first attempt usually conflicts
            value = _pod_value(rng, key, rng.randint(1, 99))
            delete = r > 0.9 and expect != 0
            op = (rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key)) if delete
                  else rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value)))
            resp = kv.Txn(rpc_pb2.TxnRequest(compare=[_mod_is(key, expect)], success=[op],
                                             failure=[_get(key)]), timeout=10)
            if resp.succeeded:
                with shared.lock:
                    shared.writes.append(Write(resp.header.revision,
                                               kv_pb2.Event.DELETE if delete else kv_pb2.Event.PUT,
                                               key, b"" if delete else value))
                seen[key] = 0 if delete else resp.header.revision
            else:
                kvs = resp.responses[0].response_range.kvs
                seen[key] = kvs[0].mod_revision if kvs else 0
                with shared.lock:
                    shared.conflicts += 1
    except grpc.RpcError as e:
        shared.errors.append(f"writer {seed}: {e.code()} {e.details()}")


@dataclass
class EventKey:
    key: bytes
    lease: int
    granted_at: float  # monotonic, just before LeaseGrant was sent
    value: bytes


def _event_writer(kv: rpc_pb2_grpc.KVStub, lease: rpc_pb2_grpc.LeaseStub, shared: Shared,
                  out: list[EventKey]) -> None:
    """Events as kube-apiserver writes them: a LeaseGrant, then create-if-absent Txns attaching it."""
    n = 0
    try:
        while not shared.stop.wait(EVENT_BATCH_EVERY_S):
            t0 = time.monotonic()
            lease_id = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=EVENT_TTL_S), timeout=10).ID
            for _ in range(3):
                n += 1
                key = EVENTS + b"default/pod.%06d" % n
                value = b'{"kind":"Event","reason":"Scheduled","n":%d}' % n
                put = rpc_pb2.PutRequest(key=key, value=value, lease=lease_id)
                resp = kv.Txn(rpc_pb2.TxnRequest(compare=[_mod_is(key, 0)],
                                                 success=[rpc_pb2.RequestOp(request_put=put)],
                                                 failure=[_get(key)]), timeout=10)
                if not resp.succeeded:
                    shared.errors.append(f"event key {key!r} existed already")
                out.append(EventKey(key, lease_id, t0, value))
    except grpc.RpcError as e:
        shared.errors.append(f"event writer: {e.code()} {e.details()}")


def _count_poller(kv: rpc_pb2_grpc.KVStub, shared: Shared, out: list[tuple[int, int]]) -> None:
    """kube-apiserver's object-count metric: count_only Ranges. Records (revision, count)."""
    try:
        while not shared.stop.wait(0.2):
            resp = kv.Range(rpc_pb2.RangeRequest(key=PODS, range_end=prefix_end(PODS), count_only=True),
                            timeout=10)
            out.append((resp.header.revision, resp.count))
    except grpc.RpcError as e:
        shared.errors.append(f"count poller: {e.code()} {e.details()}")


def _progress_requester(stream: WatchStream, stop: threading.Event) -> None:
    while not stop.wait(PROGRESS_EVERY_S):
        stream.request_progress()


def list_pods(kv: rpc_pb2_grpc.KVStub) -> tuple[int, list[kv_pb2.KeyValue]]:
    """kube-apiserver's paginated list: the first page fixes the revision, the others read at it."""
    end = prefix_end(PODS)
    first = kv.Range(rpc_pb2.RangeRequest(key=PODS, range_end=end, limit=PAGE), timeout=10)
    rev, total = first.header.revision, first.count
    items = list(first.kvs)
    resp = first
    while resp.more:
        resp = kv.Range(rpc_pb2.RangeRequest(key=items[-1].key + b"\x00", range_end=end, limit=PAGE,
                                             revision=rev), timeout=10)
        # The header carries the current revision, not the one read at.
        assert resp.header.revision >= rev
        assert resp.count == total - len(items), (
            f"page count {resp.count}, but {total} - {len(items)} keys remain at revision {rev}")
        assert len(resp.kvs) == min(PAGE, resp.count)
        items.extend(resp.kvs)
    assert len(items) == total, f"pages hold {len(items)} pods, the first page's count said {total}"
    keys = [kv.key for kv in items]
    assert keys == sorted(set(keys)), "pages overlap or are out of order"
    return rev, items


@pytest.fixture
def kube_server(server_factory: ServerFactory, subject_kind: str) -> Iterator[ServerProcess]:
    yield server_factory(subject_kind, "kube",
                         [f"--experimental-watch-progress-notify-interval={NOTIFY_INTERVAL}"])


def test_kube_apiserver_pattern(kube_server: ServerProcess, subject_kind: str) -> None:
    rng = random.Random(1)
    channel = dial(kube_server.endpoint)  # kube-apiserver's mutual TLS under --tls
    kv, lease = rpc_pb2_grpc.KVStub(channel), rpc_pb2_grpc.LeaseStub(channel)
    names = [b"default/pod-%04d" % i for i in range(INITIAL_PODS)]
    for name in names:
        key = PODS + name
        put = rpc_pb2.PutRequest(key=key, value=_pod_value(rng, key, 1))
        kv.Txn(rpc_pb2.TxnRequest(compare=[_mod_is(key, 0)], success=[rpc_pb2.RequestOp(request_put=put)],
                                  failure=[_get(key)]), timeout=10)

    shared = Shared()
    event_keys: list[EventKey] = []
    counts: list[tuple[int, int]] = []
    threads = [threading.Thread(target=_writer, args=(kv, i, names, shared)) for i in range(WRITERS)]
    threads.append(threading.Thread(target=_event_writer, args=(kv, lease, shared, event_keys)))
    threads.append(threading.Thread(target=_count_poller, args=(kv, shared, counts)))
    stream = WatchStream(channel, metadata=REQUIRE_LEADER)
    progress_stop = threading.Event()
    progress = threading.Thread(target=_progress_requester, args=(stream, progress_stop))
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)  # the list runs while writes go on, as it does in a live cluster
        list_rev, listed = list_pods(kv)
        # Must equal one unpaginated read at that revision.
        whole = kv.Range(rpc_pb2.RangeRequest(key=PODS, range_end=prefix_end(PODS), revision=list_rev))
        assert list(whole.kvs) == listed, "the paginated list differs from one Range at its revision"

        for prefix in (PODS, EVENTS):
            stream.create(rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix),
                                                     start_revision=list_rev + 1, prev_kv=True,
                                                     progress_notify=True))
        assert stream.wait_created(2), f"watches not created: {stream.responses()} {stream.error}"
        created = [r.resp for r in stream.received if r.resp.created]
        assert not any(c.canceled for c in created), created
        pods_id, events_id = created[0].watch_id, created[1].watch_id
        progress.start()

        time.sleep(WORKLOAD_S / 2)
        _compact_like_kube(kv, list_rev)
        time.sleep(WORKLOAD_S / 2)
        shared.stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not shared.errors, shared.errors

        # A last pod write: once its event is in, every earlier pod event must be too.
        sentinel = kv.Put(rpc_pb2.PutRequest(key=PODS + b"zz-sentinel", value=b"end")).header.revision
        assert stream.wait(lambda rs: any(r.watch_id == pods_id and e.kv.mod_revision >= sentinel
                                          for r in rs for e in r.events), 20), (
            f"the pods watch never delivered revision {sentinel}; stream error {stream.error}")
        # Wait for every Event key's lease to run out and its DELETE to arrive.
        last_expiry = max((e.granted_at for e in event_keys), default=time.monotonic()) + EVENT_TTL_S
        pending = {e.key for e in event_keys}
        stream.wait(lambda rs: pending <= {e.kv.key for r in rs if r.watch_id == events_id
                                           for e in r.events if e.type == kv_pb2.Event.DELETE},
                    max(0.0, last_expiry + EXPIRY_SLACK_S - time.monotonic()))
        # Idle for a while so periodic progress notifications have their chance.
        time.sleep(max(0.0, last_expiry + 2.5 - time.monotonic()))
        progress_stop.set()
        progress.join()
        final = kv.Range(rpc_pb2.RangeRequest(key=PODS, range_end=prefix_end(PODS), revision=sentinel))
        received = list(stream.received)
        assert stream.error is None, f"watch stream failed: {stream.error}"

        pod_events = _check_pod_events(received, pods_id, list_rev, listed, shared.writes, sentinel,
                                       final.kvs)
        _check_counts(counts, list_rev, listed, pod_events)
        replies, notifies, overtaken = _check_progress(received, {pods_id, events_id},
                                                       strict=subject_kind == "fastetcd")
        _check_expiry(received, events_id, event_keys, kv, lease)
        assert shared.conflicts > 0 and len(shared.writes) > 100, (
            f"the workload did too little: {len(shared.writes)} writes, {shared.conflicts} conflicts")
        print(f"list at {list_rev}: {len(listed)} pods; {len(shared.writes)} writes, {shared.conflicts}"
              f" conflicts, {len(pod_events)} pod events up to {sentinel}; {len(event_keys)} Event keys"
              f" expired; progress: {replies} replies, {notifies} notifications, {overtaken} overtaken")
    finally:
        shared.stop.set()
        progress_stop.set()
        for t in [*threads, progress]:
            if t.is_alive():
                t.join(timeout=30)
        stream.close()
        channel.close()


def _compact_like_kube(kv: rpc_pb2_grpc.KVStub, rev: int) -> None:
    """kube-apiserver's compactor: CAS on compact_rev_key's version, then Compact (not physical)."""
    got = kv.Range(rpc_pb2.RangeRequest(key=COMPACT_KEY))
    version = got.kvs[0].version if got.kvs else 0
    cas = kv.Txn(rpc_pb2.TxnRequest(
        compare=[Cmp(key=COMPACT_KEY, target=Cmp.VERSION, result=Cmp.EQUAL, version=version)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=COMPACT_KEY, value=str(rev).encode()))],
        failure=[_get(COMPACT_KEY)]))
    assert cas.succeeded
    kv.Compact(rpc_pb2.CompactionRequest(revision=rev))
    with pytest.raises(grpc.RpcError) as e:
        kv.Range(rpc_pb2.RangeRequest(key=PODS, range_end=prefix_end(PODS), revision=rev - 1))
    assert e.value.details() == "etcdserver: mvcc: required revision has been compacted"


def _events_of(received: list[Received], watch_id: int) -> list[kv_pb2.Event]:
    return [e for r in received if r.resp.watch_id == watch_id and not r.resp.created for e in r.resp.events]


def _check_pod_events(received: list[Received], pods_id: int, list_rev: int, listed: list[kv_pb2.KeyValue],
                      writes: list[Write], sentinel: int,
                      final: list[kv_pb2.KeyValue]) -> list[kv_pb2.Event]:
    events = [e for e in _events_of(received, pods_id) if e.kv.mod_revision <= sentinel]
    revs = [e.kv.mod_revision for e in events]
    dups = sorted(r for r, n in Counter(revs).items() if n > 1)
    assert not dups, f"pod events duplicated at revisions {dups[:10]}"
    assert revs == sorted(revs), "pod events out of revision order"
    assert not revs or revs[0] > list_rev, f"the watch from {list_rev + 1} delivered revision {revs[0]}"
    expected = {w.rev: w for w in writes if w.rev > list_rev}
    missing = sorted(set(expected) - set(revs))
    extra = sorted(set(revs) - set(expected) - {sentinel})
    assert not missing, f"{len(missing)} acknowledged pod writes never arrived as events: {missing[:10]}"
    assert not extra, f"pod events at revisions no writer wrote: {extra[:10]}"

    state = {kv.key: kv for kv in listed}
    for e in events:
        w = expected.get(e.kv.mod_revision)
        if w is not None:
            assert (e.type, e.kv.key, e.kv.value) == (w.kind, w.key, w.value), (
                f"event at {e.kv.mod_revision} is {e.type} {e.kv.key!r}, the write was {w.kind} {w.key!r}")
        before = state.get(e.kv.key)
        if e.type == kv_pb2.Event.PUT:
            if before is None:
                assert not e.HasField("prev_kv"), f"a create carries prev_kv: {e}"
                assert e.kv.version == 1 and e.kv.create_revision == e.kv.mod_revision, e
            else:
                assert e.prev_kv == before, f"wrong prev_kv for {e.kv.key!r}@{e.kv.mod_revision}"
                assert e.kv.version == before.version + 1 and e.kv.create_revision == before.create_revision
            state[e.kv.key] = e.kv
        else:
            assert before is not None, f"DELETE of a key that does not exist: {e}"
            assert e.prev_kv == before, f"wrong prev_kv for the delete of {e.kv.key!r}@{e.kv.mod_revision}"
            assert e.kv == kv_pb2.KeyValue(key=e.kv.key, mod_revision=e.kv.mod_revision), e
            del state[e.kv.key]
    rebuilt = [state[k] for k in sorted(state)]
    assert rebuilt == list(final), (
        f"list + events rebuild {len(rebuilt)} pods, a Range at the last revision has {len(final)}")
    return events


def _check_counts(counts: list[tuple[int, int]], list_rev: int, listed: list[kv_pb2.KeyValue],
                  events: list[kv_pb2.Event]) -> None:
    """Every count_only answer must be the number of pods at its revision, which list + events give."""
    size, at = len(listed), list_rev
    sizes: list[tuple[int, int]] = [(at, size)]
    alive = {kv.key for kv in listed}
    for e in events:
        if e.type == kv_pb2.Event.PUT:
            alive.add(e.kv.key)
        else:
            alive.discard(e.kv.key)
        sizes.append((e.kv.mod_revision, len(alive)))
    checked = 0
    for rev, count in counts:
        if rev < list_rev or rev > sizes[-1][0]:
            continue
        want = next(n for r, n in reversed(sizes) if r <= rev)
        assert count == want, f"count_only at revision {rev} said {count}, there were {want} pods"
        checked += 1
    assert checked >= 5, f"only {checked} count_only answers fell inside the watched history"


def _check_progress(received: list[Received], watch_ids: set[int], strict: bool) -> tuple[int, int, int]:
    """Progress responses (no events, not created/canceled): replies to WatchProgressRequest carry
    watch_id -1, periodic notifications the watch's own id.

    Always (etcd 3.5.1 too): replies never go backwards among themselves; a notification never goes
    backwards nor behind an event of its own watch (it travels the same queue as the events).
    strict (fastetcd): additionally no progress response goes backwards or behind any event delivered
    before it, and no event arrives at or below a revision a progress response vouched for. etcd 3.5.1
    queues the reply apart from the events and breaks both (#15220).

    Returns (replies, notifications, events that arrived after a progress response vouched for them)."""
    max_event = {w: 0 for w in watch_ids}
    last = {w: 0 for w in [*watch_ids, -1]}
    last_any = 0
    replies = notifies = overtaken = 0
    vouched = {w: 0 for w in watch_ids}  # per watch: highest revision a progress response covered
    for r in received:
        resp = r.resp
        if resp.created or resp.canceled:
            continue
        if resp.events:
            first = min(e.kv.mod_revision for e in resp.events)
            if first <= vouched[resp.watch_id]:
                overtaken += 1
                if strict:
                    pytest.fail(f"an event at revision {first} arrived after a progress response for"
                                f" revision {vouched[resp.watch_id]} on watch {resp.watch_id}", pytrace=False)
            top = max(e.kv.mod_revision for e in resp.events)
            max_event[resp.watch_id] = max(max_event[resp.watch_id], top)
            continue
        wid, rev = resp.watch_id, resp.header.revision
        assert wid == -1 or wid in watch_ids, f"progress for an unknown watch: {resp}"
        assert rev >= last[wid], f"progress on watch {wid} went backwards: {last[wid]} then {rev}"
        last[wid] = rev
        if wid == -1:
            replies += 1
        else:
            notifies += 1
            assert rev >= max_event[wid], (
                f"notification at {rev} after watch {wid}'s event at {max_event[wid]}")
        if strict:
            assert rev >= last_any, f"progress went backwards: {last_any} then {rev}"
            newest = max(max_event.values())
            assert rev >= newest, f"progress at {rev} after an event at {newest} was delivered"
        last_any = max(last_any, rev)
        for w in (watch_ids if wid == -1 else [wid]):
            vouched[w] = max(vouched[w], rev)
    # A WatchProgressRequest every 100 ms for several seconds.
    assert replies >= 20, f"only {replies} replies (watch_id -1) to WatchProgressRequests"
    assert notifies >= 1, "no periodic progress notification while the watches were idle"
    return replies, notifies, overtaken


def _check_expiry(received: list[Received], events_id: int, event_keys: list[EventKey],
                  kv: rpc_pb2_grpc.KVStub, lease: rpc_pb2_grpc.LeaseStub) -> None:
    assert len(event_keys) >= 10, f"only {len(event_keys)} Event keys written"
    arrivals = {}
    for r in received:
        if r.resp.watch_id != events_id:
            continue
        for e in r.resp.events:
            arrivals.setdefault((e.type, e.kv.key), (r.at, e))
    delete_revs: dict[int, set[int]] = {}
    for ek in event_keys:
        put = arrivals.get((kv_pb2.Event.PUT, ek.key))
        gone = arrivals.get((kv_pb2.Event.DELETE, ek.key))
        assert put is not None, f"no PUT event for {ek.key!r}"
        assert put[1].kv.lease == ek.lease and put[1].kv.value == ek.value, put[1]
        assert gone is not None, f"{ek.key!r} (lease {ek.lease:x}, TTL {EVENT_TTL_S}s) never expired"
        at, e = gone
        assert at >= ek.granted_at + EVENT_TTL_S - EARLY_TOLERANCE_S, (
            f"{ek.key!r} deleted {at - ek.granted_at:.2f}s after its {EVENT_TTL_S}s lease was granted")
        assert at <= ek.granted_at + EVENT_TTL_S + EXPIRY_SLACK_S, (
            f"{ek.key!r} deleted only {at - ek.granted_at:.2f}s after its lease was granted")
        assert e.prev_kv == put[1].kv, f"expiry DELETE of {ek.key!r} carries prev_kv {e.prev_kv}"
        delete_revs.setdefault(ek.lease, set()).add(e.kv.mod_revision)
    split = {hex(lid): sorted(revs) for lid, revs in delete_revs.items() if len(revs) != 1}
    assert not split, f"an expired lease's keys were deleted over several revisions: {split}"
    left = kv.Range(rpc_pb2.RangeRequest(key=EVENTS, range_end=prefix_end(EVENTS)))
    assert left.count == 0, f"Event keys outlived their leases: {[k.key for k in left.kvs]}"
    alive = {ls.ID for ls in lease.LeaseLeases(rpc_pb2.LeaseLeasesRequest()).leases}
    for lease_id in delete_revs:
        assert lease_id not in alive, f"expired lease {lease_id:x} still listed"
        ttl = lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease_id, keys=True))
        assert ttl.TTL == -1 and not ttl.keys, f"expired lease {lease_id:x}: {ttl}"
