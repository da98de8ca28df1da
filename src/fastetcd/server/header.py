"""The ResponseHeader every etcd answer carries."""

from __future__ import annotations

import hashlib

from fastetcd.proto import rpc_pb2 as pb
from fastetcd.server._wire import encode_header

# A single-member cluster that has elected itself once: etcd 3.5 reports term 2 after its first start.
RAFT_TERM = 2


def member_id_for(name: str, advertise_urls: list[str]) -> int:
    """A stable member id, like etcd's hash of the member's identity (never 0)."""
    digest = hashlib.sha1((name + "|" + ",".join(sorted(advertise_urls))).encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1


class Header:
    def __init__(self, cluster_id: int, member_id: int, raft_term: int = RAFT_TERM) -> None:
        self.cluster_id = cluster_id
        self.member_id = member_id
        self.raft_term = raft_term

    def set_term(self, term: int) -> None:
        """A new leadership term (replicated clusters): every answer from now on carries it."""
        self.raft_term = term

    def encode(self, revision: int) -> bytes:
        return encode_header(self.cluster_id, self.member_id, revision, self.raft_term)

    def fill(self, h: pb.ResponseHeader, revision: int = 0) -> None:
        """etcd's header.fill: ids and term always, the revision only where the apply left none."""
        h.cluster_id = self.cluster_id
        h.member_id = self.member_id
        h.raft_term = self.raft_term
        if h.revision == 0:
            h.revision = revision
