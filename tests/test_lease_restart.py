"""Leases survive a restart (clean SIGTERM and kill -9) on the same data dir without being shortened, and
then expire by the server's own clock: all keys of one lease go in ONE revision, seen as DELETE events by
a watch opened before the expiry.

etcd's guarantee: a lease never expires earlier than its remaining TTL at shutdown (etcd itself renews
leases to their full TTL, or to a checkpointed remaining TTL, when it starts). This test holds the
server to the weaker form that also allows counting the downtime against the lease:
    remaining TTL after the restart >= remaining TTL before the shutdown - downtime - TOLERANCE_S.

fastetcd is the subject; `--subject=etcd` runs the same checks against etcd (fsync on) to validate them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from servers import ServerFactory

from fastetcd.proto import kv_pb2, rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import ServerProcess, kv_stub

PREFIX = b"leased/"
PREFIX_END = b"leased0"
# One lease per TTL; the shortest must outlive a restart on a busy 2-core machine (2-3 s under load).
TTLS = (7, 8, 10)
KEYS_PER_LEASE = 3
UNLEASED_KEY = PREFIX + b"no-lease"
AGE_BEFORE_SHUTDOWN_S = 1.0  # let the leases visibly age, so a restart that resets them is no accident
# TTLs are whole seconds, and the clocks of client and server sample at different moments.
TOLERANCE_S = 1.0
# The server checks for expired leases periodically (etcd: every 500 ms) and then revokes them.
EXPIRY_SLACK_S = 3.0
SIGTERM_TIMEOUT_S = 15.0


@dataclass
class Lease:
    ttl: int
    id: int = 0
    keys: list[bytes] = field(default_factory=list)
    remaining_at_shutdown: int = 0
    remaining_after_restart: int = 0
    checked_after_restart: float = 0.0  # monotonic time of that LeaseTimeToLive


def _stop(server: ServerProcess, how: str) -> None:
    if how == "sigterm":
        try:
            server.stop(timeout=SIGTERM_TIMEOUT_S, escalate=False)
        except TimeoutError as e:
            pytest.fail(str(e))
    server.kill()  # the SIGKILL case; after a clean exit it only reaps and closes the log


def _requests(create: rpc_pb2.WatchRequest, close: threading.Event) -> Iterator[rpc_pb2.WatchRequest]:
    yield create
    close.wait()


def _collect_deletes(responses: Iterator[rpc_pb2.WatchResponse], expected: int,
                     out: list[tuple[int, int, bytes, float]], errors: list[str],
                     created: threading.Event) -> None:
    try:
        for resp in responses:
            if resp.created:
                created.set()
                continue
            if resp.canceled:
                errors.append(f"watch canceled: {resp.cancel_reason!r}")
                return
            now = time.monotonic()
            out.extend((ev.kv.mod_revision, ev.type, ev.kv.key, now) for ev in resp.events)
            if len(out) >= expected:
                return
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.CANCELLED:
            errors.append(f"{e.code().name}: {e.details()}")


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_leases_survive_restart_then_expire_atomically(
    server_factory: ServerFactory, subject_kind: str, how: str
) -> None:
    kwargs = {"fsync": True} if subject_kind == "etcd" else {}
    server = server_factory(subject_kind, "leases", **kwargs)
    leases = [Lease(ttl) for ttl in TTLS]
    with grpc.insecure_channel(server.endpoint) as channel:
        kv, lease_stub = kv_stub(channel), rpc_pb2_grpc.LeaseStub(channel)
        for n, lease in enumerate(leases):
            lease.id = lease_stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=lease.ttl), timeout=10).ID
            assert lease.id > 0
            for k in range(KEYS_PER_LEASE):
                key = PREFIX + f"{n}/{k}".encode()
                kv.Put(rpc_pb2.PutRequest(key=key, value=b"v" + key, lease=lease.id), timeout=10)
                lease.keys.append(key)
        kv.Put(rpc_pb2.PutRequest(key=UNLEASED_KEY, value=b"stays"), timeout=10)
        time.sleep(AGE_BEFORE_SHUTDOWN_S)
        for lease in leases:
            ttl = lease_stub.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease.id), timeout=10)
            assert 0 < ttl.TTL <= lease.ttl
            lease.remaining_at_shutdown = ttl.TTL
        head_before = kv.Range(rpc_pb2.RangeRequest(key=b"x"), timeout=10).header.revision
    t_down = time.monotonic()
    _stop(server, how)

    server = server_factory(subject_kind, "leases", **kwargs)  # same data dir, new port
    downtime = time.monotonic() - t_down
    with grpc.insecure_channel(server.endpoint) as channel:
        kv, lease_stub = kv_stub(channel), rpc_pb2_grpc.LeaseStub(channel)
        got = kv.Range(rpc_pb2.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=10)
        # No lease may have expired during the restart: its remaining TTL exceeded the downtime.
        short = [lease.id for lease in leases if lease.remaining_at_shutdown - TOLERANCE_S <= downtime]
        assert not short, f"restart took {downtime:.1f}s, too long for the test's TTLs {TTLS}"
        assert got.header.revision == head_before, "the restart itself changed the revision"
        want = {key: lease.id for lease in leases for key in lease.keys} | {UNLEASED_KEY: 0}
        assert {kv_.key: kv_.lease for kv_ in got.kvs} == want, "keys or their leases lost in the restart"

        for lease in leases:
            ttl = lease_stub.LeaseTimeToLive(
                rpc_pb2.LeaseTimeToLiveRequest(ID=lease.id, keys=True), timeout=10)
            lease.checked_after_restart = time.monotonic()
            elapsed = lease.checked_after_restart - t_down
            assert ttl.ID == lease.id and ttl.grantedTTL == lease.ttl, f"lease {lease.id}: {ttl}"
            assert sorted(ttl.keys) == sorted(lease.keys), f"lease {lease.id} lost its keys: {ttl.keys}"
            assert ttl.TTL <= lease.ttl, f"lease {lease.id}: TTL {ttl.TTL} beyond granted {lease.ttl}"
            assert ttl.TTL >= lease.remaining_at_shutdown - elapsed - TOLERANCE_S, (
                f"lease {lease.id} (TTL {lease.ttl}) had {lease.remaining_at_shutdown}s left at shutdown but "
                f"only {ttl.TTL}s {elapsed:.1f}s later: the restart shortened it"
            )
            lease.remaining_after_restart = ttl.TTL
        ttls = ", ".join(f"{ls.remaining_at_shutdown}→{ls.remaining_after_restart}s" for ls in leases)
        print(f"\n[{server.kind} {how}] down {downtime:.1f}s; remaining TTL before → after restart: {ttls}")

        # Watch from the current revision, opened before any of the leases can expire.
        head = got.header.revision
        create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
            key=PREFIX, range_end=PREFIX_END, start_revision=head + 1))
        close, created = threading.Event(), threading.Event()
        events: list[tuple[int, int, bytes, float]] = []
        errors: list[str] = []
        leased_keys = sum(len(lease.keys) for lease in leases)
        responses = rpc_pb2_grpc.WatchStub(channel).Watch(_requests(create, close))
        reader = threading.Thread(target=_collect_deletes,
                                  args=(responses, leased_keys, events, errors, created), daemon=True)
        reader.start()
        try:
            assert created.wait(10), "watch not created"
            deadline = max(lease.checked_after_restart + lease.remaining_after_restart for lease in leases)
            reader.join(timeout=max(0.0, deadline + EXPIRY_SLACK_S - time.monotonic()))
        finally:
            close.set()
            responses.cancel()
            reader.join(timeout=10)
        assert not errors, errors
        assert len(events) == leased_keys, (
            f"{len(events)} of {leased_keys} DELETE events within {EXPIRY_SLACK_S}s after the leases' TTLs "
            f"ran out: {[(rev, key) for rev, _, key, _ in events]}"
        )

        by_key = {key: (rev, typ, t) for rev, typ, key, t in events}
        assert len(by_key) == leased_keys, f"repeated events: {events}"
        revisions = []
        for lease in leases:
            seen = [by_key.get(key) for key in lease.keys]
            assert all(s is not None and s[1] == kv_pb2.Event.DELETE for s in seen), (
                f"lease {lease.id}: expected a DELETE for each of {lease.keys}, got {seen}")
            revs = {s[0] for s in seen if s is not None}
            assert len(revs) == 1, f"lease {lease.id}'s keys were deleted in several revisions {sorted(revs)}"
            rev = revs.pop()
            revisions.append(rev)
            # The server answered TTL n after the restart, so it must not expire the lease before then.
            expired_by = max(s[2] for s in seen if s is not None)
            promised = lease.checked_after_restart + lease.remaining_after_restart
            assert expired_by >= promised - TOLERANCE_S, (
                f"lease {lease.id} expired {promised - expired_by:.1f}s before the end of the "
                f"{lease.remaining_after_restart}s TTL the server reported after the restart"
            )
            before = kv.Range(rpc_pb2.RangeRequest(key=PREFIX, range_end=PREFIX_END, revision=rev - 1),
                              timeout=10)
            assert set(lease.keys) <= {kv_.key for kv_ in before.kvs}, (
                f"lease {lease.id}: not all its keys were present at revision {rev - 1}")
        # One revision per lease, each right after the last: nothing else was written.
        assert sorted(revisions) == list(range(head + 1, head + 1 + len(leases))), revisions

        after = kv.Range(rpc_pb2.RangeRequest(key=PREFIX, range_end=PREFIX_END), timeout=10)
        assert [(kv_.key, kv_.value) for kv_ in after.kvs] == [(UNLEASED_KEY, b"stays")]
        assert after.header.revision == head + len(leases)
        for lease in leases:
            ttl = lease_stub.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=lease.id), timeout=10)
            assert ttl.TTL == -1, f"lease {lease.id} still known after expiry: {ttl}"
