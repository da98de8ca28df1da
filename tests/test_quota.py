"""--quota-backend-bytes: past the quota, writes that grow the store fail with etcd's NOSPACE error while
reads and deletes keep working (the only way out, as with etcd)."""

from __future__ import annotations

import grpc
import pytest

from fastetcd.proto import rpc_pb2, rpc_pb2_grpc
from fastetcd.testing import start_fastetcd


def test_writes_past_the_quota_get_nospace_but_deletes_work(tmp_path) -> None:
    server = start_fastetcd(tmp_path / "fe", ["--quota-backend-bytes", "200000", "--store", "embedded"])
    try:
        with grpc.insecure_channel(server.endpoint) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            value = b"x" * 4096
            err = None
            for i in range(400):
                try:
                    kv.Put(rpc_pb2.PutRequest(key=b"q/%04d" % i, value=value), timeout=10)
                except grpc.RpcError as e:
                    err = e
                    break
            assert err is not None, "400 puts of 4 KiB never hit a 200 kB quota"
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.details() == "etcdserver: mvcc: database space exceeded"
            with pytest.raises(grpc.RpcError) as again:
                kv.Txn(rpc_pb2.TxnRequest(success=[rpc_pb2.RequestOp(
                    request_put=rpc_pb2.PutRequest(key=b"q/txn", value=b"v"))]), timeout=10)
            assert again.value.details() == "etcdserver: mvcc: database space exceeded"
            count = kv.Range(rpc_pb2.RangeRequest(key=b"q/", range_end=b"q0", count_only=True)).count
            assert count == i
            deleted = kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"q/", range_end=b"q0"), timeout=10)
            assert deleted.deleted == count
    finally:
        server.kill()
