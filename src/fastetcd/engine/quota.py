"""etcd's backend quota: what a write is estimated to cost, and whether it still fits.

The estimate is etcd's (server/etcdserver/quota.go), not the real size of the write: the same request
fills the same quota on both servers, so an operator's ``--quota-backend-bytes`` means what it means for
etcd. A request that costs nothing (a delete, a read-only txn) always passes.
"""

from __future__ import annotations

from fastetcd.proto import rpc_pb2 as pb

KV_OVERHEAD = 256  # etcd's estimate of a key's metadata
LEASE_OVERHEAD = 64  # etcd's estimate of a lease


def put_cost(r: pb.PutRequest) -> int:
    return KV_OVERHEAD + len(r.key) + len(r.value)


def txn_cost(r: pb.TxnRequest) -> int:
    """The dearer branch's puts (etcd does not look into nested txns)."""
    return max(_puts_cost(r.success), _puts_cost(r.failure))


def _puts_cost(ops) -> int:
    cost = 0
    for op in ops:
        if op.HasField("request_put"):
            p = op.request_put
            cost += KV_OVERHEAD + len(p.key) + len(p.value)
    return cost


def fits(db_size: int, cost: int, quota: int) -> bool:
    """etcd's backendQuota.Available (quota 0: no quota)."""
    return cost == 0 or not quota or db_size + cost < quota
