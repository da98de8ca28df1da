"""Leadership among processes sharing one embedded data dir (``store.leadership.Leadership``).

On one machine the kernel settles what a lease settles across machines: leadership is an exclusive
``flock`` on ``DATA_DIR/leader.lock``. The holder leads until it lets go or dies (the kernel drops the
lock with the process), and nobody can take it meanwhile, so ``valid_until`` is +inf while it is held and
the lease length of the timing rule is moot; ``poll`` is how often a candidate tries the lock and
``renew`` how often each member refreshes its heartbeat.

Files beside the lock:

* ``leader.json``: ``{"term": 7, "id": …, "name": …, "client_urls": […]}``, written by each new leader
  through a rename (readers see the old file or the new one, never half of one) with term = previous + 1.
  Example: the leader of term 7 dies; the member whose poll takes the lock next reads term 7 and writes
  term 8 with itself, before it claims the store.
* ``members/<id>.json``: one per member, rewritten every ``renew`` seconds; a member is alive while its
  file is younger than 3 × ``lease``, and removed by ``close``.
* ``transfer.json``: ``{"to": id, "until": epoch seconds}``, written by ``transfer`` just before the
  leader lets go: until then, the other candidates leave the lock to ``to``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import time
from typing import Any

from fastetcd.store.leadership import Leader, Member, TimingRule
from fastetcd.tasks import cancel_and_wait

LEADER_LOCK = "leader.lock"
LEADER_FILE = "leader.json"
TRANSFER_FILE = "transfer.json"
MEMBERS_DIR = "members"
# A member whose heartbeat file is older than this many leases is no longer listed.
ALIVE_LEASES = 3

log = logging.getLogger(__name__)


def _write_atomically(path: str, doc: dict[str, Any], *, durable: bool = True) -> None:
    tmp = f"{path}.{os.getpid()}.{id(doc)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    # The rename itself must survive a crash too, or a new leader could reuse the old term after one.
    dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _member(doc: dict[str, Any]) -> Member:
    return Member(int(doc["id"]), str(doc["name"]), tuple(doc["client_urls"]))


def _member_doc(m: Member) -> dict[str, Any]:
    return {"id": m.id, "name": m.name, "client_urls": list(m.client_urls)}


class EmbeddedLeadership:
    """``Leadership`` over a data dir shared by processes of one machine."""

    def __init__(self, data_dir: str, member: Member, timing: TimingRule | None = None) -> None:
        self.data_dir = data_dir
        self.member = member
        self.timing = timing or TimingRule()
        self.lost = asyncio.Event()
        self._lock_fd: int | None = None
        self._term = 0
        self._leader: Leader | None = None
        self._members: list[Member] = []
        self._observer: asyncio.Task | None = None
        # After resigning, this node leaves the lock alone for a while, so another candidate gets it.
        self._hold_off_until = 0.0
        self._members_dir = os.path.join(data_dir, MEMBERS_DIR)
        self._member_file = os.path.join(self._members_dir, f"{member.id:016x}.json")

    # ------------------------------------------------------------------ Leadership protocol

    async def start(self) -> None:
        os.makedirs(self._members_dir, mode=0o700, exist_ok=True)
        self._members, self._leader = await asyncio.to_thread(self._refresh, True)
        self._observer = asyncio.create_task(self._observe(), name="fastetcd-leadership-observer")

    async def campaign(self) -> int:
        while True:
            if self._lock_fd is not None:
                return self._term
            if time.monotonic() >= self._hold_off_until and self._may_try():
                term = await asyncio.to_thread(self._try_lead)
                if term:
                    self.lost.clear()
                    log.info("became leader", extra={"term": term, "member": self.member.name})
                    return term
            await asyncio.sleep(self.timing.poll)

    def valid_until(self) -> float:
        return math.inf if self._lock_fd is not None else 0.0

    def leader(self) -> Leader | None:
        if self._lock_fd is not None:
            return Leader(self.member, self._term)
        return self._leader

    def members(self) -> list[Member]:
        return list(self._members)

    async def transfer(self, member_id: int) -> None:
        if self._lock_fd is None:
            raise ValueError("this member does not lead")
        if member_id == self.member.id:
            return
        if member_id not in {m.id for m in self._read_members()}:
            raise ValueError(f"member {member_id:x} is not alive")
        until = time.time() + self.timing.lease
        await asyncio.to_thread(
            _write_atomically, os.path.join(self.data_dir, TRANSFER_FILE), {"to": member_id, "until": until}
        )
        await self.resign()

    async def resign(self) -> None:
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        self.lost.set()  # the caller stopped acting as leader already; anyone still listening must too
        os.close(fd)  # closing the only descriptor drops the flock: the next candidate may take it now
        self._hold_off_until = time.monotonic() + 2 * self.timing.poll
        log.info("resigned leadership", extra={"term": self._term, "member": self.member.name})

    async def close(self) -> None:
        await cancel_and_wait(self._observer)
        self._observer = None
        await self.resign()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._member_file)

    # ------------------------------------------------------------------ internals

    @property
    def term(self) -> int:
        return self._term

    def _may_try(self) -> bool:
        """False while a transfer to another live member is under way."""
        doc = _read(os.path.join(self.data_dir, TRANSFER_FILE))
        if doc is None or doc.get("to") == self.member.id or time.time() >= doc.get("until", 0):
            return True
        return doc["to"] not in {m.id for m in self._members}

    def _try_lead(self) -> int:
        """Take the leader lock if free, then publish the new term; 0 if someone else holds it."""
        fd = os.open(os.path.join(self.data_dir, LEADER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return 0
        try:
            path = os.path.join(self.data_dir, LEADER_FILE)
            prev = _read(path)
            term = (int(prev["term"]) if prev else 0) + 1
            _write_atomically(path, {"term": term, **_member_doc(self.member)})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.data_dir, TRANSFER_FILE))
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        self._term = term
        self._leader = Leader(self.member, term)
        return term

    def _heartbeat(self) -> None:
        # A heartbeat lost in a crash costs nothing: the member is gone then anyway.
        _write_atomically(self._member_file, _member_doc(self.member), durable=False)

    def _read_members(self) -> list[Member]:
        horizon = time.time() - ALIVE_LEASES * self.timing.lease
        out = []
        for name in os.listdir(self._members_dir):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self._members_dir, name)
            try:
                if os.stat(path).st_mtime < horizon:
                    continue
                doc = _read(path)
            except (FileNotFoundError, ValueError):
                continue  # gone or being replaced meanwhile: the next round sees it
            if doc is not None:
                out.append(_member(doc))
        return sorted(out, key=lambda m: m.id)

    def _read_leader(self) -> Leader | None:
        doc = _read(os.path.join(self.data_dir, LEADER_FILE))
        if doc is None:
            return None
        return Leader(_member(doc), int(doc["term"]))

    def _refresh(self, beat: bool) -> tuple[list[Member], Leader | None]:
        if beat:
            self._heartbeat()
        members = self._read_members()
        leader = self._read_leader()
        # leader.json outlives a leader that died: one whose heartbeat stopped leads nothing.
        if leader is not None and leader.member.id not in {m.id for m in members}:
            leader = None
        return members, leader

    async def _observe(self) -> None:
        next_beat = time.monotonic() + self.timing.renew
        while True:
            beat = time.monotonic() >= next_beat
            if beat:
                next_beat += self.timing.renew
            try:
                members, leader = await asyncio.to_thread(self._refresh, beat)
            except (OSError, ValueError, KeyError) as e:
                log.warning("reading leadership files failed", extra={"error": str(e)})
            else:
                self._members = members
                if self._lock_fd is None:
                    self._leader = leader
            await asyncio.sleep(self.timing.poll)
