"""What the Cluster and Maintenance services report about the cluster: members, leader, term.

A single node is its own leader in term 2 (what etcd 3.5 reports after a lone member's first election);
a node of a replicated cluster reports what its ``Replica`` observes in the shared store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastetcd import errors
from fastetcd.server.header import RAFT_TERM
from fastetcd.store.leadership import Member

if TYPE_CHECKING:
    from fastetcd.engine.replica import Replica

log = logging.getLogger(__name__)

# etcdctl prints a member's peer URLs; a node of fastetcd has no peer port, members meet in the store.
BAD_LEADER_TRANSFEREE = errors.EtcdError("FAILED_PRECONDITION", "etcdserver: bad leader transferee")


@dataclass
class SingleMember:
    member: Member

    def leader_id(self) -> int:
        return self.member.id

    def term(self) -> int:
        return RAFT_TERM

    def members(self) -> list[Member]:
        return [self.member]

    async def move_leader(self, target: int) -> None:
        # The only member is the leader already: moving leadership to it is done; anyone else is unknown.
        if target != self.member.id:
            raise BAD_LEADER_TRANSFEREE


@dataclass
class ReplicaView:
    replica: Replica

    def leader_id(self) -> int:
        leader = self.replica.leader()
        return leader.member.id if leader is not None else 0

    def term(self) -> int:
        return self.replica.term

    def members(self) -> list[Member]:
        return self.replica.leadership.members()

    async def move_leader(self, target: int) -> None:
        # Reached only on the leader (a follower forwards MoveLeader); etcd refuses unknown members.
        if target == self.replica.sm.member_id:
            return
        if target not in {m.id for m in self.members()}:
            raise BAD_LEADER_TRANSFEREE
        log.info("moving leadership",
                 extra={"from": f"{self.replica.sm.member_id:016x}", "to": f"{target:016x}"})
        await self.replica.transfer(target, self.replica.leadership.timing.lease)


ClusterView = SingleMember | ReplicaView
