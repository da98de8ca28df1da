"""``store.leadership.Leadership`` over the Cosmos DB container of a ``CosmosStore``.

Items (partition ``meta``, next to the snapshot pointer):

``leader``  ``{"member": {"id", "name", "urls"} | null, "term", "next", "nonce"}``. Every renewal, takeover,
            resignation and transfer replaces it under ``If-Match`` of the etag its writer last saw: a
            compare-and-swap on the version the writer knows. The first leader creates it (409: someone else
            was first). ``member`` null is a vacant record (after ``resign``); ``next`` names the member a
            ``transfer`` hands it to. ``nonce`` is random per write, so a writer recognises its own write when
            the SDK's resend of it comes back as 412.
``member-<16 hex id>``  ``{"member", "name", "urls", "heartbeat"}``, one per node, upserted every ``renew``
            seconds with a wall-clock heartbeat. Only ``members()`` reads them (a liveness display), so wall
            clocks are good enough there; nothing safety-related depends on them.

Member ids are written as 16 hex digits: etcd's ids are 64-bit, beyond what a JSON number carries exactly.

The timing is ``store.leadership``'s rule, kept like this: ``valid_until`` moves only on a successful write
of the record, by that write's send time; a candidate counts a lease from the arrival of the read that first
returned the version it will replace, and replaces exactly that version. No waiting for a record that is
vacated by another member, handed to this one, or still this member's own leadership (a renewal that landed
after it gave up on it): nobody else can be leading on those.

The store must be open (as writer or follower) before ``start`` and closed after ``close``: both use its
Cosmos client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from azure.core import MatchConditions

from fastetcd.store.base import StoreError
from fastetcd.store.cosmos import META_PK, CosmosStore, _is_ambiguous, _status
from fastetcd.store.leadership import Leader, Member, TimingRule

_log = logging.getLogger(__name__)

LEADER_ID = "leader"
MEMBER_PREFIX = "member-"
# A member whose heartbeat is older than this many leases is no longer listed by members().
MEMBER_EXPIRY_LEASES = 3


class _Taken(Exception):
    """Our compare-and-swap of the leader record lost: someone else wrote it since we last saw it."""


@dataclass
class _Seen:
    """The leader record as the newest read returned it, and since when this version has been seen."""

    doc: dict[str, Any] | None
    etag: str | None
    since: float  # time.monotonic() at which the read that first returned this version came back


def _hex(member_id: int) -> str:
    return f"{member_id:016x}"


def _member_doc(member: Member) -> dict[str, Any]:
    return {"id": _hex(member.id), "name": member.name, "urls": list(member.client_urls)}


def _member_of(doc: dict[str, Any]) -> Member:
    return Member(id=int(doc["id"], 16), name=doc["name"], client_urls=tuple(doc["urls"]))


class CosmosLeadership:
    """``Leadership`` for nodes sharing one Cosmos DB container (see the module docstring)."""

    def __init__(self, store: CosmosStore, member: Member, timing: TimingRule | None = None) -> None:
        self.timing = timing or TimingRule()
        self.lost = asyncio.Event()
        self.member = member
        self._store = store
        self._seen: _Seen | None = None
        self._observed = asyncio.Event()  # set after every read of the record; campaign waits on it
        self._leader: Leader | None = None
        self._members: dict[int, tuple[Member, float]] = {}  # id -> (member, wall-clock heartbeat)
        self._leading = False
        self._term = 0
        self._etag: str | None = None  # the record's version this leader wrote last
        self._nonce: str | None = None  # the nonce of this member's newest write, whatever its outcome
        self._valid_until = 0.0
        self.last_renewal_sent = 0.0  # send time of the newest successful renewal or takeover
        self._renewals_stopped = False
        self._tasks: list[asyncio.Task[None]] = []
        self._renew_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- protocol

    async def start(self) -> None:
        if self._tasks:
            return
        await self._heartbeat()
        await self._read()
        self._tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._heartbeat_loop())]

    async def campaign(self) -> int:
        await self.start()
        if self._leading:
            return self._term
        self.lost.clear()
        while True:
            seen = self._seen
            wait = self._may_take(seen) if seen is not None else None
            if seen is not None and wait is not None and wait <= 0:
                try:
                    return await self._take(seen)
                except _Taken:
                    pass  # someone else wrote first; _write's read-back observed their version
                except Exception as e:  # noqa: BLE001 - Cosmos unreachable: keep campaigning
                    _log.warning("taking the leader record failed", extra={"error": str(e)})
                    await asyncio.sleep(self.timing.poll)
                continue
            self._observed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._observed.wait(), wait)

    def valid_until(self) -> float:
        return self._valid_until if self._leading else 0.0

    def leader(self) -> Leader | None:
        """The leader the record names, or None: vacant, or unrenewed for a whole lease as far as this node
        can see (the leader is gone, or this node cannot reach Cosmos): etcd's "no leader"."""
        if self._leading:
            return self._leader
        seen = self._seen
        if seen is None or time.monotonic() - seen.since > self.timing.lease:
            return None
        return self._leader

    def members(self) -> list[Member]:
        cutoff = time.time() - MEMBER_EXPIRY_LEASES * self.timing.lease
        alive = {m.id: m for m, beat in self._members.values() if beat >= cutoff}
        alive[self.member.id] = self.member
        return [alive[i] for i in sorted(alive)]

    async def transfer(self, member_id: int) -> None:
        if member_id == self.member.id:
            return
        if member_id not in {m.id for m in self.members()}:
            raise ValueError(f"member {member_id:x} is not alive: leadership cannot go to it")
        await self._step_down(next_id=member_id)

    async def resign(self) -> None:
        await self._step_down(next_id=None)

    async def close(self) -> None:
        if self._leading:
            try:
                await self.resign()
            except Exception as e:  # noqa: BLE001 - others then wait out the lease instead
                _log.warning("resigning on close failed", extra={"error": str(e)})
        tasks, self._tasks = self._tasks, []
        if self._renew_task is not None:
            tasks.append(self._renew_task)
            self._renew_task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop_renewing(self) -> None:
        """Test hook: act as if cut off from Cosmos, sending no renewal from now on (``lost`` follows at
        ``valid_until``, as for any leader whose renewals fail)."""
        self._renewals_stopped = True

    # ----------------------------------------------------------------- campaign

    def _may_take(self, seen: _Seen) -> float:
        """Seconds until this member may write over the version ``seen``; <= 0: now."""
        doc = seen.doc
        me = _hex(self.member.id)
        mine = doc is not None and doc.get("nonce") == self._nonce
        if doc is None:
            return 0.0  # nobody has ever led
        member, nxt = doc.get("member"), doc.get("next")
        if member is not None and member["id"] == me and mine:
            return 0.0  # our own leadership (a renewal that landed after we gave up on it): nobody else's
        if member is None and not mine and (nxt is None or nxt == me):
            return 0.0  # vacated by another for anyone, or handed to us (the one who vacated lets others go)
        return seen.since + self.timing.lease - time.monotonic()

    async def _take(self, seen: _Seen) -> int:
        term = int(seen.doc["term"]) + 1 if seen.doc is not None else 1
        sent, res = await self._write(self._record(self.member, term, None), seen.etag)
        self._term, self._etag, self._leading = term, res["_etag"], True
        self._renewals_stopped = False
        self._valid_until = sent + self.timing.lease - self.timing.drift_margin
        self.last_renewal_sent = sent
        self._observe(res, time.monotonic())
        self._renew_task = asyncio.create_task(self._renew_loop())
        _log.info("became leader", extra={"member": _hex(self.member.id), "term": term})
        return term

    # ----------------------------------------------------------------- leading

    async def _renew_loop(self) -> None:
        timing = self.timing
        next_send = self.last_renewal_sent + timing.renew
        while self._leading:
            await asyncio.sleep(max(0.0, min(next_send, self._valid_until) - time.monotonic()))
            if not self._leading:
                return
            remaining = self._valid_until - time.monotonic()
            if remaining <= 0:
                self._lose("no renewal succeeded before the lease ran out")
                return
            if self._renewals_stopped:
                next_send = time.monotonic() + timing.poll
                continue
            try:
                # A renewal still out when the lease ends cannot help: the lease is lost either way.
                await asyncio.wait_for(self._renew(), remaining)
            except _Taken:
                self._lose("another member took the leader record")
                return
            except TimeoutError:
                self._lose("the renewal did not come back before the lease ran out")
                return
            except Exception as e:  # noqa: BLE001 - any failure: try again while the lease lasts
                _log.warning("leader renewal failed", extra={"error": str(e), "term": self._term})
                next_send = time.monotonic() + timing.poll
                continue
            next_send = self.last_renewal_sent + timing.renew

    async def _renew(self) -> None:
        sent, res = await self._write(self._record(self.member, self._term, None), self._etag)
        if not self._leading:
            return  # resigned meanwhile: the step-down's write decides
        self._etag = res["_etag"]
        self._valid_until = sent + self.timing.lease - self.timing.drift_margin
        self.last_renewal_sent = sent
        self._observe(res, time.monotonic())

    def _lose(self, why: str) -> None:
        _log.error(
            "leadership lost", extra={"member": _hex(self.member.id), "term": self._term, "reason": why}
        )
        self._leading = False
        self._valid_until = 0.0
        self.lost.set()

    async def _step_down(self, next_id: int | None) -> None:
        if not self._leading:
            return
        # Stop acting as leader before the write that lets the next one in (store.leadership's rule).
        self._valid_until = 0.0
        self._leading = False
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.gather(self._renew_task, return_exceptions=True)
            self._renew_task = None
        nxt = _hex(next_id) if next_id is not None else None
        etag = self._etag
        for _ in range(3):
            try:
                _, res = await self._write(self._record(None, self._term, nxt), etag)
                self._observe(res, time.monotonic())
                return
            except _Taken:
                # A renewal cancelled on its way may have landed after all: then the record is still ours.
                seen = self._seen
                doc = seen.doc if seen is not None else None
                member = doc.get("member") if doc is not None else None
                if seen is None or member is None or member["id"] != _hex(self.member.id):
                    return  # someone else took it already: nothing to hand over
                if int(doc["term"]) != self._term:
                    return
                etag = seen.etag

    # ----------------------------------------------------------------- the record

    def _record(self, member: Member | None, term: int, nxt: str | None) -> dict[str, Any]:
        self._nonce = secrets.token_hex(8)
        return {
            "id": LEADER_ID,
            "pk": META_PK,
            "member": _member_doc(member) if member is not None else None,
            "term": term,
            "next": nxt,
            "nonce": self._nonce,
        }

    async def _write(self, doc: dict[str, Any], etag: str | None) -> tuple[float, dict[str, Any]]:
        """Create (``etag`` None) or replace under If-Match; (send time, item written). Raises ``_Taken``."""
        container = self._store.container
        sent = time.monotonic()
        try:
            if etag is None:
                return sent, await container.create_item(doc)
            return sent, await container.replace_item(
                LEADER_ID, doc, etag=etag, match_condition=MatchConditions.IfNotModified
            )
        except Exception as e:  # noqa: BLE001 - sorted below
            if not (_status(e) in (404, 409, 412) or _is_ambiguous(e)):
                raise StoreError(f"writing the leader record: {e}") from e
            cause = e
        # The SDK resends a write whose answer was lost, so a write that landed can come back as 412/409:
        # the nonce tells whether the record holds our write.
        now = await self._read()
        if now is not None and now.get("nonce") == doc["nonce"]:
            return sent, now
        if _status(cause) in (404, 409, 412):
            raise _Taken(str(cause)) from cause
        raise StoreError(f"writing the leader record: {cause}") from cause

    async def _read(self) -> dict[str, Any] | None:
        container = self._store.container
        try:
            doc = await container.read_item(LEADER_ID, partition_key=META_PK)
        except Exception as e:  # noqa: BLE001 - sorted below
            if _status(e) != 404:
                raise StoreError(f"reading the leader record: {e}") from e
            doc = None
        self._observe(doc, time.monotonic())
        return doc

    def _observe(self, doc: dict[str, Any] | None, arrived: float) -> None:
        etag = doc["_etag"] if doc is not None else None
        if self._seen is None or self._seen.etag != etag:
            self._seen = _Seen(doc, etag, arrived)
        member = doc.get("member") if doc is not None else None
        self._leader = Leader(_member_of(member), int(doc["term"])) if member is not None else None
        self._observed.set()

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.poll)
            if self._leading:
                continue  # renewals observe the record
            try:
                await self._read()
            except Exception as e:  # noqa: BLE001 - the loop outlives any failure
                _log.warning("reading the leader record failed", extra={"error": str(e)})

    # ----------------------------------------------------------------- membership

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timing.renew)
            try:
                await self._heartbeat()
            except Exception as e:  # noqa: BLE001 - the loop outlives any failure
                _log.warning("member heartbeat failed", extra={"error": str(e)})

    async def _heartbeat(self) -> None:
        container = self._store.container
        doc = {
            "id": MEMBER_PREFIX + _hex(self.member.id),
            "pk": META_PK,
            "member": _hex(self.member.id),
            "name": self.member.name,
            "urls": list(self.member.client_urls),
            "heartbeat": time.time(),
        }
        await container.upsert_item(doc, no_response=True)
        rows = [
            it
            async for it in container.query_items(
                "SELECT * FROM c WHERE c.pk = @pk AND STARTSWITH(c.id, @prefix)",
                parameters=[{"name": "@pk", "value": META_PK}, {"name": "@prefix", "value": MEMBER_PREFIX}],
                partition_key=META_PK,
            )
        ]
        self._members = {
            int(r["member"], 16): (
                Member(int(r["member"], 16), r["name"], tuple(r["urls"])),
                float(r["heartbeat"]),
            )
            for r in rows
        }
