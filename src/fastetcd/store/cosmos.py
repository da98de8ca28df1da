"""The Azure Cosmos DB store: the log, snapshots and compaction in one Cosmos (NoSQL API) container.

Layout (partition key path ``/pk``; every item is a JSON document):

``log-<s>``  one logical partition per log segment ``s``. A log item holds one append's entries,
             ``{"id": <first index, 20 digits>, "first", "last", "d": base64(part 0)}`` where the payload is
             the entries length-prefixed (u32 LE) and concatenated; a payload too big for one item is split
             into parts and parts 1..k go to chunk items ``{"id": "x<first>-<t>-<n>", "x": first, "t", "n",
             "d"}`` written *before* the batch (the log item then carries ``"chunks": k, "t": t``). ``t`` is
             random per attempt, so a fenced writer's late chunk writes can never overwrite the chunks of a
             committed item. The partition's ``head`` item ``{"last", "writer"}`` is the fencing token.
``meta``     ``snapshot`` ``{"index", "spk", "chunks", "seg", "bytes", "prev"}`` and ``compact`` ``{"rev"}``.
``snap-<index>-<t>``  the snapshot's chunk items ``{"id": "c<n>", "n", "d"}``.

Segments. An append goes to the segment of its *first* index (``first // segment_size``), all of it, so one
append is always one transactional batch in one partition: the head first (replace under ``If-Match`` of the
etag this writer last saw, or create when the append opens a new segment), then the log item. An append that
starts at ``L + 1`` therefore always lands in segment ``seg(L + 1)``, which is what open follows to find the
end of the log, and what a new writer claims.

Fencing. On open a writer reads the log up to ``L`` and claims the head of ``seg(L + 1)``: it overwrites
it (no If-Match, or a writer appending back to back would always win the race), or creates it (409: read on
and retry). From then on every batch of the previous writer in that segment fails its ``If-Match`` (412) and
one that opens the next segment fails to create that head (409): both are ``Fenced``. The claimer then reads
what landed before its claim; if that moved the tail into another segment it claims that one too, and it
finally sets the head's ``last`` under ``If-Match``. Before opening a new segment a writer reads its old
head back, so a writer that slept through a cleanup (which deletes old segments, heads included) cannot
recreate a deleted segment. Snapshot pointer and compaction revision are written under ``If-Match`` and
only ever move forward, whoever writes them.

Followers. ``open(writer=False)`` reads like a writer's open and claims nothing; ``tail`` reads on from where
the last read ended (one query per segment touched; the segment's head comes with it, so an empty answer is
proven: a head not past the follower means nothing new, no head means a segment not begun or one a cleanup
dropped, which the snapshot pointer tells apart: ``Behind``). ``claim`` is open's claim from the follower's
position, then open's cleanup; ``release`` forgets the head, so appends raise ``Fenced`` before any request.

Unknown outcomes. azure.cosmos.aio resends a write whose connection dropped, so a batch that landed can come
back as 412/409 from its own retry, and a lost answer as a connection error. Both are settled by reading the
head back: our writer id with ``last`` >= the batch's last means it landed; our id with the previous
``last`` means it did not, and the head is then rewritten under ``If-Match`` so that a copy of the batch still
in flight can never land later (the failure is then certain: ``StoreError``); another writer's id is
``Fenced``. Only when the head cannot be read at all is the outcome ``Uncertain`` (and the store refuses
further appends until reopened).

Throttling: the SDK waits out 429s with the server's retry-after (``retry_throttle_total`` /
``retry_throttle_backoff_max`` in ``client_kwargs``); when it gives up the store raises ``Throttled``.

Request budget: an append is one batch request (plus one write per extra 1.35 MB part); open, snapshots and
compaction are rare. ``size()`` is an in-memory estimate (snapshot plus log payload bytes after it).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import aiohttp
    from azure.core import MatchConditions
    from azure.core.exceptions import AzureError, HttpResponseError
    from azure.cosmos import PartitionKey
    from azure.cosmos.aio import CosmosClient
    from azure.cosmos.exceptions import CosmosBatchOperationError
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the Cosmos DB store needs azure-cosmos and aiohttp (pip install 'fastetcd[cosmos]'): {e}"
    ) from e

from fastetcd import metrics
from fastetcd.store.base import (
    Behind,
    DurableCallback,
    Fenced,
    Recovered,
    StoreError,
    Throttled,
    Uncertain,
    check_append,
)

_log = logging.getLogger(__name__)

SEGMENT_SIZE = 100_000
GATHER_WINDOW = 0.004
# Raw bytes per item part: base64 makes 1.8 MB of it, under Cosmos's 2 MB item and batch-request limits
# with room for the head operation and the JSON around it.
PART_BYTES = 1_350_000
MAX_BATCH_OPS = 100
PART_WRITE_CONCURRENCY = 4
HEAD = "head"
META_PK = "meta"

# Only what the store filters on is indexed (id is always indexed); real Cosmos refuses filters on
# excluded paths, so a new query must add its path here.
INDEXING_POLICY: dict[str, Any] = {
    "indexingMode": "consistent",
    "automatic": True,
    "includedPaths": [{"path": "/pk/?"}, {"path": "/first/?"}, {"path": "/last/?"}, {"path": "/x/?"}],
    "excludedPaths": [{"path": "/*"}],
}

_U32 = struct.Struct("<I")
_SETTLE_ATTEMPTS = 6
_OPEN_ATTEMPTS = 8
_CAS_ATTEMPTS = 8
_RETRY_DELAY = 0.05
# Rounds of read, create-if-missing, read again for the container at open (see _ensure_container).
_CREATE_ATTEMPTS = 5
# Seconds between a follower's reads of the snapshot pointer (its size() and memory follow snapshots).
_META_REFRESH = 10.0
# Failures after which the request may or may not have been carried out.
_AMBIGUOUS_STATUS = frozenset({408, 449, 500, 502, 503, 504})


class _Inconsistent(StoreError):
    """What open read does not fit together (a gap, a missing chunk); possibly a concurrent cleanup."""


def _status(e: BaseException) -> int | None:
    return getattr(e, "status_code", None) if isinstance(e, HttpResponseError) else None


def _is_ambiguous(e: BaseException) -> bool:
    """The request may have been carried out (lost answer, timeout, server error)."""
    if isinstance(e, HttpResponseError):
        status = _status(e)
        return status is None or status in _AMBIGUOUS_STATUS
    return isinstance(e, AzureError | OSError | TimeoutError | aiohttp.ClientError)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _split(data: bytes) -> list[bytes]:
    return [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)] or [b""]


def _log_pk(segment: int) -> str:
    return f"log-{segment}"


def _part_key(item: dict[str, Any]) -> tuple[int, str]:
    return item["x"], item["t"]


@dataclass
class _Loaded:
    """What open read from the container, and where its read of the log stopped."""

    snapshot_index: int = 0
    snapshot: bytes | None = None
    snapshot_spk: str | None = None
    snapshot_prev: str | None = None
    snapshot_segment: int = 0
    compact_rev: int = -1
    entries: list[tuple[int, bytes]] = field(default_factory=list)
    segment_starts: dict[int, int] = field(default_factory=dict)
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)  # (last index, payload bytes)
    # The log cursor: the segment read last and the next index expected.
    segment: int = 0
    expected: int = 1
    started: bool = False  # found a live item (the first may start before the snapshot; later ones can't)
    parts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # pk -> id -> part item
    used: set[tuple[int, str]] = field(default_factory=set)  # (x, t) of parts that live items reference
    head: dict[str, Any] | None = None  # the head of `segment` as the last query saw it (None: absent)

    @property
    def last(self) -> int:
        return self.expected - 1

    def hand_over(self) -> list[tuple[int, bytes]]:
        """Take the entries read so far, and forget what the cursor no longer needs to read on.

        Parts at or below the cursor are decided: referenced ones go; orphans keep only their ids (for the
        cleanup after a claim) so a follower holds no payload between reads.
        """
        entries, self.entries, self.batch_sizes = self.entries, [], []
        for parts in self.parts.values():
            for pid, it in list(parts.items()):
                if it["x"] <= self.last:
                    if _part_key(it) in self.used:
                        del parts[pid]
                    else:
                        parts[pid] = {"x": it["x"], "t": it["t"]}
        self.used.clear()
        return entries


class CosmosStore:
    """``store.base.Store`` on an Azure Cosmos DB container (see the module docstring for the layout).

    ``gather_window``: a batch is a Cosmos round trip (a few ms on a real account), so the engine may wait
    this long for more requests to join one when several are in flight (T9: requests per write).

    ``key`` is the account key; empty means Entra ID via ``azure.identity.aio.DefaultAzureCredential``.
    ``writer_id`` names this writer in the head items (default: host, pid and a random suffix).
    ``client_kwargs`` go to ``azure.cosmos.aio.CosmosClient`` (timeouts, retry settings, proxies...).
    """

    def __init__(
        self,
        endpoint: str,
        key: str,
        database: str,
        container: str,
        *,
        verify_tls: bool = True,
        writer_id: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        segment_size: int = SEGMENT_SIZE,
        gather_window: float = GATHER_WINDOW,
    ) -> None:
        if segment_size < 1:
            raise ValueError("segment_size must be positive")
        self.gather_window = gather_window
        self.endpoint = endpoint
        self.database = database
        self.container_name = container
        self.writer_id = writer_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._key = key
        self._verify_tls = verify_tls
        self._client_kwargs = dict(client_kwargs or {})
        self._segment_size = segment_size
        self._client: Any = None
        self._credential: Any = None
        self._container: Any = None
        self._reset_state()

    @property
    def container(self) -> Any:
        """The open ``azure.cosmos.aio`` container client, for what shares the container (leadership)."""
        if self._container is None:
            raise StoreError(f"{self!r} is not open")
        return self._container

    def __repr__(self) -> str:  # never shows the key
        return (
            f"CosmosStore({self.endpoint!r}, database={self.database!r}, container={self.container_name!r},"
            f" writer={self.writer_id!r})"
        )

    def _reset_state(self) -> None:
        self._last = 0  # newest committed log index (or the snapshot index)
        self._head_segment = -1  # the segment whose head this writer holds
        self._head_etag: str | None = None
        self._segment_starts: dict[int, int] = {}  # segment -> first index stored in it
        self._meta: dict[str, tuple[dict[str, Any] | None, str | None]] = {}  # id -> (doc, etag)
        self._snapshot_index = 0
        self._snapshot_bytes = 0
        self._batch_sizes: deque[tuple[int, int]] = deque()
        self._log_bytes = 0
        self._fenced: str | None = None
        self._broken: str | None = None
        self._snapshot_lock = asyncio.Lock()
        self._writer = False  # holds a head: opened as writer or claimed, and not released since
        # Where tail reads on: positioned after the last entry open, tail, claim or append handed over.
        self._cursor: _Loaded | None = None
        self._meta_read_at = 0.0  # time.monotonic() of the last read of the meta partition

    # ----------------------------------------------------------------- life cycle

    async def open(self, *, writer: bool = True) -> Recovered:
        if self._client is not None:
            raise StoreError(f"{self!r} is already open")
        self._reset_state()
        self._client = self._make_client()
        try:
            await self._ensure_container()
            loaded = await self._load_and_claim(claim=writer)
        except BaseException:
            await self._close_client()
            raise
        if writer:
            await self._collect_after_open(loaded)
        _log.info(
            "opened Cosmos DB store",
            extra={
                "endpoint": self.endpoint,
                "database": self.database,
                "container": self.container_name,
                "writer": self.writer_id if writer else None,
                "snapshot-index": loaded.snapshot_index,
                "compact-revision": loaded.compact_rev,
                "log-entries": len(loaded.entries),
                "last-index": loaded.last,
            },
        )
        recovered = Recovered(
            snapshot_index=loaded.snapshot_index,
            snapshot=loaded.snapshot,
            compact_rev=loaded.compact_rev,
            entries=loaded.entries,
        )
        loaded.snapshot = None  # the cursor lives on; the snapshot's bytes need not
        loaded.hand_over()
        return recovered

    async def close(self) -> None:
        async with self._snapshot_lock:  # let a snapshot in progress finish its requests
            await self._close_client()

    def _make_client(self) -> Any:
        credential: Any = self._key
        if not self._key:
            try:
                from azure.identity.aio import DefaultAzureCredential
            except ImportError:
                raise StoreError(
                    "no Cosmos DB key given and azure-identity is not installed for Entra ID sign-in"
                    " (pip install azure-identity, or pass the account key)"
                ) from None
            credential = self._credential = DefaultAzureCredential()
        kwargs: dict[str, Any] = {
            "connection_verify": self._verify_tls,
            # Compact JSON: fewer bytes per batch, and sizes close to what the item limits count.
            "enable_compact_utf8_item_writes": True,
            **self._client_kwargs,
        }
        return CosmosClient(self.endpoint, credential, **kwargs)

    async def _close_client(self) -> None:
        client, self._client, self._container = self._client, None, None
        credential, self._credential = self._credential, None
        if client is not None:
            await client.close()
        if credential is not None:
            await credential.close()

    async def _ensure_container(self) -> None:
        db = self._client.get_database_client(self.database)
        container = db.get_container_client(self.container_name)
        where = f"Cosmos DB container {self.database}/{self.container_name} at {self.endpoint}"
        try:
            attempt = 0
            while True:
                # Reading first: with Entra ID (data-plane RBAC) creating is not allowed, reading is.
                try:
                    props = await container.read()
                    break
                except HttpResponseError as e:
                    attempt += 1
                    if _status(e) != 404 or attempt > _CREATE_ATTEMPTS:
                        raise
                # Nodes of one cluster starting together race to create the database and the container,
                # each step on its own: a node that lost the race for the database (409) must still see
                # the container created, by itself or by the winner, before it reads again.
                for create in (
                    lambda: self._client.create_database_if_not_exists(id=self.database),
                    lambda: db.create_container_if_not_exists(
                        id=self.container_name, partition_key=PartitionKey(path="/pk"),
                        indexing_policy=INDEXING_POLICY,
                    ),
                ):
                    try:
                        await create()
                    except HttpResponseError as e:
                        if _status(e) != 409:
                            raise
                if attempt > 1:
                    await asyncio.sleep(_RETRY_DELAY * attempt)  # the winner's creation still under way
        except HttpResponseError as e:
            if _status(e) == 403:
                raise StoreError(f"{where}: not allowed ({e.reason}); create it beforehand") from e
            raise StoreError(f"{where}: {self._describe(e)}") from e
        except (AzureError, OSError, aiohttp.ClientError) as e:
            raise StoreError(f"{where}: {self._describe(e)}") from e
        paths = props.get("partitionKey", {}).get("paths")
        if paths != ["/pk"]:
            raise StoreError(f"{where} has partition key {paths}, fastetcd needs ['/pk']")
        self._container = container

    # ----------------------------------------------------------------- open: read, claim, tidy

    async def _load_and_claim(self, *, claim: bool) -> _Loaded:
        delay = _RETRY_DELAY
        problem = "another writer kept appending or claiming"
        for _ in range(_OPEN_ATTEMPTS):
            try:
                loaded = await self._load()
                if not claim or await self._claim_tail(loaded):
                    self._adopt(loaded, writer=claim)
                    return loaded
            except _Inconsistent as e:
                # A concurrent snapshot cleanup may have removed what the pointer we read referenced.
                problem = str(e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise StoreError(f"opening Cosmos DB store {self.database}/{self.container_name} failed: {problem}")

    async def _claim_tail(self, loaded: _Loaded) -> bool:
        """Become the writer: hold the head of the segment the next append goes to, knowing the tail.

        The claim overwrites the head without If-Match: with If-Match a writer appending back to back
        would change the etag between our read and our write every time. From the moment it lands, every
        batch of the previous writer in that segment fails its If-Match; what landed before it is read
        next. Only if that read moved the tail into another segment is that segment claimed in turn.
        """
        for _ in range(_OPEN_ATTEMPTS):
            claimed_last = loaded.last
            segment = await self._claim(claimed_last)
            await self._load_log(loaded)
            if segment is None or self._segment(loaded.last + 1) != segment:
                continue
            if loaded.last == claimed_last:
                return True
            # Batches landed between our read and the claim: the head must say where the log ends.
            pk = _log_pk(segment)
            doc = {"id": HEAD, "pk": pk, "last": loaded.last, "writer": self.writer_id}
            try:
                res = await self._container.replace_item(
                    HEAD, doc, etag=self._head_etag, match_condition=MatchConditions.IfNotModified
                )
            except Exception as e:  # noqa: BLE001 - sorted below
                if not (_status(e) in (404, 409, 412) or _is_ambiguous(e)):
                    raise self._error(f"claiming the head of {pk}", e) from e
                continue  # another claim came after ours (or the outcome is unknown): claim again
            self._head_etag = res["_etag"]
            return True
        return False

    async def _claim(self, last: int) -> int | None:
        """Write our head in segment seg(last + 1); its segment, or None if that failed harmlessly."""
        segment = self._segment(last + 1)
        pk = _log_pk(segment)
        doc = {"id": HEAD, "pk": pk, "last": last, "writer": self.writer_id}
        head = await self._read_item(pk, HEAD)
        try:
            if head is None:
                res = await self._container.create_item(doc)
            else:
                res = await self._container.replace_item(HEAD, doc)
        except Exception as e:  # noqa: BLE001 - sorted below
            if _status(e) in (404, 409, 412) or _is_ambiguous(e):
                return None  # created or deleted meanwhile, or outcome unknown: read the tail, try again
            raise self._error(f"claiming the head of {pk}", e) from e
        self._head_segment, self._head_etag = segment, res["_etag"]
        return segment

    def _adopt(self, loaded: _Loaded, *, writer: bool) -> None:
        self._segment_starts = loaded.segment_starts
        self._snapshot_index = loaded.snapshot_index
        self._snapshot_bytes = len(loaded.snapshot or b"")
        self._batch_sizes = deque()
        self._log_bytes = 0
        self._advance(loaded)
        self._writer = writer

    def _advance(self, cursor: _Loaded) -> None:
        """Take what ``cursor`` read as committed and stored: it becomes the store's tail cursor."""
        self._cursor = cursor
        self._last = cursor.last
        self._batch_sizes.extend(cursor.batch_sizes)
        self._log_bytes += sum(n for _, n in cursor.batch_sizes)

    async def _read_meta(self) -> dict[str, dict[str, Any]]:
        """The meta partition's items by id; remembers the snapshot pointer and compaction for CAS writes."""
        meta = {it["id"]: it for it in await self._query(META_PK, "SELECT * FROM c WHERE c.pk = @pk")}
        for item_id in ("snapshot", "compact"):
            doc = meta.get(item_id)
            self._meta[item_id] = (doc, doc["_etag"] if doc else None)
        self._meta_read_at = time.monotonic()
        snap = meta.get("snapshot")
        if snap is not None and int(snap["index"]) > self._snapshot_index:
            # Another writer's snapshot: size() counts from it, as the writer's own does.
            self._snapshot_index, self._snapshot_bytes = int(snap["index"]), int(snap["bytes"])
            while self._batch_sizes and self._batch_sizes[0][0] <= self._snapshot_index:
                self._log_bytes -= self._batch_sizes.popleft()[1]
        return meta

    async def _load(self) -> _Loaded:
        out = _Loaded()
        meta = await self._read_meta()
        if "compact" in meta:
            out.compact_rev = int(meta["compact"]["rev"])
        snap = meta.get("snapshot")
        if snap is not None:
            out.snapshot_index = int(snap["index"])
            out.snapshot_spk = snap["spk"]
            out.snapshot_prev = snap.get("prev")
            out.snapshot_segment = int(snap["seg"])
            out.snapshot = await self._load_snapshot(snap)
        else:
            out.snapshot_segment = self._segment(1)
        out.segment = out.snapshot_segment
        out.expected = out.snapshot_index + 1
        await self._load_log(out)
        return out

    async def _load_snapshot(self, snap: dict[str, Any]) -> bytes:
        items = await self._query(snap["spk"], "SELECT * FROM c WHERE c.pk = @pk")
        items.sort(key=lambda it: it["n"])
        if [it["n"] for it in items] != list(range(int(snap["chunks"]))):
            raise _Inconsistent(
                f"snapshot at index {snap['index']} is incomplete ({len(items)} of {snap['chunks']} chunks)"
            )
        data = b"".join(_unb64(it["d"]) for it in items)
        if len(data) != int(snap["bytes"]):
            raise _Inconsistent(
                f"snapshot at index {snap['index']} has {len(data)} bytes, not {snap['bytes']}"
            )
        return data

    async def _load_log(self, out: _Loaded) -> None:
        """Read log items from the cursor on; again later, it reads only what was appended since."""
        segment = out.segment
        while True:
            pk = _log_pk(segment)
            # Parts of the first live item may have x <= the snapshot index; once past it, only parts of
            # items after the cursor are new (which keeps the re-read after a claim from fetching again).
            # The head comes along for tail: it tells a segment not begun from one a cleanup emptied.
            items = await self._query(
                pk,
                "SELECT * FROM c WHERE c.pk = @pk AND (c.last > @i OR c.x > @j OR c.id = @head)",
                i=out.last,
                j=out.last if out.started else -1,
                head=HEAD,
            )
            out.head = next((it for it in items if it["id"] == HEAD), None)
            parts = out.parts.setdefault(pk, {})
            parts.update((it["id"], it) for it in items if "x" in it)
            by_key = {(it["x"], it["t"], it["n"]): it for it in parts.values()}
            found = False
            for it in sorted((it for it in items if "first" in it), key=lambda it: it["first"]):
                first, last = int(it["first"]), int(it["last"])
                expected = out.expected
                if first != expected if out.started else not first <= expected <= last:
                    raise _Inconsistent(
                        f"log is not contiguous in {pk}: expected index {expected}, found {first}..{last}"
                        f" (snapshot at {out.snapshot_index})"
                    )
                payload = _unb64(it["d"])
                if it.get("chunks"):
                    pieces = [payload]
                    for n in range(1, int(it["chunks"]) + 1):
                        part = by_key.get((first, it["t"], n))
                        if part is None:
                            raise _Inconsistent(f"log item {first}..{last} in {pk} is missing chunk {n}")
                        pieces.append(_unb64(part["d"]))
                    payload = b"".join(pieces)
                    out.used.add((first, it["t"]))
                entries = _unpack(payload, first, last, pk)
                out.entries.extend(e for e in entries if e[0] >= expected)
                out.segment_starts.setdefault(segment, first)
                out.batch_sizes.append((last, len(payload)))
                out.expected = last + 1
                found = out.started = True
            # The append after index L goes to seg(L + 1): follow it until a segment adds nothing. The
            # cursor moves first, so a failed query of the next segment leaves it where reading goes on.
            nxt = self._segment(out.expected)
            if not found or nxt == segment:
                return
            segment = out.segment = nxt

    async def _collect_after_open(self, loaded: _Loaded) -> None:
        """Remove what crashes and fenced writers left behind; only safe once the head is ours."""
        base = loaded.snapshot_index
        try:
            for pk, parts in loaded.parts.items():
                # Parts past the snapshot that no committed item references: failed or fenced appends.
                # (Older ones are _collect_log's.)
                orphans = [
                    i for i, it in parts.items() if it["x"] > base and _part_key(it) not in loaded.used
                ]
                await self._delete_ids(pk, orphans)
            if loaded.snapshot_prev and loaded.snapshot_prev != loaded.snapshot_spk:
                await self._drop_partition(loaded.snapshot_prev)
            if base:
                await self._collect_log(base, loaded.snapshot_segment)
        except (StoreError, AzureError, OSError) as e:
            _log.warning("Cosmos DB cleanup after open failed", extra={"error": self._describe(e)})

    # ----------------------------------------------------------------- follower: tail, claim, release

    async def tail(self, after: int) -> list[tuple[int, bytes]]:
        if self._container is None:
            raise StoreError(f"{self!r} is not open")
        if time.monotonic() - self._meta_read_at > _META_REFRESH:
            await self._read_meta()  # keeps size() counting from the newest snapshot, as on the writer
        cursor = self._cursor_at(after)
        self._cursor = None  # until this read has been handed over whole
        try:
            await self._load_log(cursor)
        except _Inconsistent as e:
            await self._raise_if_behind(after)
            raise StoreError(f"Cosmos DB store is inconsistent: {e}") from e
        except StoreError:
            if not cursor.entries:
                self._cursor = cursor  # nothing consumed: the next tail reads on from the same place
                raise
            # A later segment's query failed: what the earlier ones read is committed all the same.
        if cursor.last == after:
            head = cursor.head
            # The head's `last` moves with every batch in its segment, so a head that has not passed
            # `after` proves nothing was appended since. Without a head the segment is either not begun
            # (nothing appended) or dropped by a cleanup after a snapshot, which the pointer tells.
            if head is None or int(head["last"]) > after:
                await self._raise_if_behind(after)
                if head is not None:
                    raise StoreError(
                        f"Cosmos DB store is inconsistent: the head of {_log_pk(cursor.segment)} says index"
                        f" {head['last']} but no log item after {after} is there"
                    )
        self._advance(cursor)
        return cursor.hand_over()

    async def claim(self, after: int) -> list[tuple[int, bytes]]:
        if self._container is None:
            raise StoreError(f"{self!r} is not open")
        cursor = self._cursor_at(after)
        self._cursor = None
        self._writer = False
        delay = _RETRY_DELAY
        for _ in range(_OPEN_ATTEMPTS):
            try:
                claimed = await self._claim_tail(cursor)
            except _Inconsistent as e:
                await self._raise_if_behind(after)
                raise StoreError(f"Cosmos DB store is inconsistent: {e}") from e
            if claimed:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        else:
            raise StoreError(
                f"claiming Cosmos DB store {self.database}/{self.container_name} failed:"
                " another writer kept appending or claiming"
            )
        # Read after the claim: a snapshot past what the claim found means the log we read on from had been
        # cleaned up (our head then sits in a dropped segment and fences nobody), so we may not write.
        await self._raise_if_behind(cursor.last)
        # What we read while claiming is all committed: earlier uncertainty and fencing are settled by it.
        self._fenced = self._broken = None
        self._writer = True
        snap, _ = self._meta.get("snapshot", (None, None))
        if snap is not None:  # the cleanup starts from the newest snapshot, as open's does
            cursor.snapshot_index, cursor.snapshot_spk = int(snap["index"]), snap["spk"]
            cursor.snapshot_prev, cursor.snapshot_segment = snap.get("prev"), int(snap["seg"])
        await self._collect_after_open(cursor)
        self._advance(cursor)
        _log.info("claimed Cosmos DB store", extra={"writer": self.writer_id, "last-index": cursor.last})
        return cursor.hand_over()

    async def release(self) -> None:
        # Forgetting the etag is enough: every later append is refused before it reaches Cosmos.
        self._writer = False
        self._head_etag = None
        self._head_segment = -1

    def _cursor_at(self, after: int) -> _Loaded:
        """The tail cursor if it stands at ``after``, else a new one there."""
        cursor = self._cursor
        if cursor is not None and cursor.last == after:
            return cursor
        # Not where the last read ended (unusual): start in the segment known to hold after + 1 and accept
        # an item that begins before it.
        return _Loaded(
            snapshot_index=self._snapshot_index,
            segment=self._segment_holding(after + 1),
            expected=after + 1,
            segment_starts=self._segment_starts,
        )

    async def _raise_if_behind(self, after: int) -> None:
        """Raise Behind if a snapshot newer than ``after`` exists, whose cleanup explains what is missing."""
        snap = (await self._read_meta()).get("snapshot")
        if snap is not None and int(snap["index"]) > after:
            raise Behind(
                f"log index {after + 1} is gone from Cosmos DB store {self.database}/{self.container_name}:"
                f" a snapshot at index {snap['index']} replaced it"
            )

    # ----------------------------------------------------------------- append

    def append_nowait(self, entries: list[tuple[int, bytes]], on_durable: DurableCallback) -> bool:
        return False  # every append is a network round trip: the coroutine's cost is nothing beside it

    async def append(self, entries: list[tuple[int, bytes]]) -> None:
        if not entries:
            return
        self._check_usable()
        check_append(entries, self._last)
        first, last = entries[0][0], entries[-1][0]
        payload = b"".join(b for _, data in entries for b in (_U32.pack(len(data)), data))
        segment = self._segment(first)
        pk = _log_pk(segment)
        creating = segment != self._head_segment
        if creating:
            await self._check_own_head()
        parts = _split(payload)
        item: dict[str, Any] = {
            "id": f"{first:020d}",
            "pk": pk,
            "first": first,
            "last": last,
            "d": _b64(parts[0]),
        }
        if len(parts) > 1:
            token = secrets.token_hex(4)
            item["chunks"], item["t"] = len(parts) - 1, token
            await self._write_parts(pk, first, token, parts[1:])
        head = {"id": HEAD, "pk": pk, "last": last, "writer": self.writer_id}
        # The head goes first, so its 412/409 is the error reported when another writer took over.
        head_op: tuple[Any, ...] = (
            ("create", (head,)) if creating else ("replace", (HEAD, head), {"if_match_etag": self._head_etag})
        )
        t0 = time.perf_counter()
        try:
            results = await self._container.execute_item_batch(
                [head_op, ("create", (item,))], partition_key=pk
            )
        except asyncio.CancelledError:
            self._broken = f"append of {first}..{last} was cancelled with its outcome unknown"
            raise
        except Exception as e:
            await self._after_failed_batch(e, pk, segment, creating, first, last)
        else:
            self._head_etag = results[0]["eTag"]
            self._head_segment = segment
            metrics.BACKEND_COMMIT.observe(time.perf_counter() - t0)
            self._count_request_units()
        self._last = last
        self._segment_starts.setdefault(segment, first)
        self._batch_sizes.append((last, len(payload)))
        self._log_bytes += len(payload)
        if self._cursor is not None:
            # An append is one whole item, so the next one starts in seg(last + 1): tail reads on from there.
            self._cursor.expected, self._cursor.started = last + 1, True
            self._cursor.segment = self._segment(last + 1)

    async def _check_own_head(self) -> None:
        """Before opening a new segment: is the head we hold still ours?"""
        pk = _log_pk(self._head_segment)
        head = await self._read_item(pk, HEAD)
        if head is None or head.get("writer") != self.writer_id:
            raise self._fence(head, pk)
        if int(head["last"]) != self._last:
            self._broken = f"head of {pk} says index {head['last']}, this writer committed {self._last}"
            raise StoreError(f"Cosmos DB store is inconsistent: {self._broken}")
        self._head_etag = head["_etag"]

    async def _write_parts(self, pk: str, first: int, token: str, parts: Sequence[bytes]) -> None:
        async def write(n: int, data: bytes) -> None:
            doc = {"id": f"x{first}-{token}-{n}", "pk": pk, "x": first, "t": token, "n": n, "d": _b64(data)}
            try:
                await self._container.upsert_item(doc, no_response=True)
            except (AzureError, OSError, aiohttp.ClientError) as e:
                # Nothing references the parts until the batch commits: the append certainly failed.
                raise self._error(f"writing part {n} of log item {first} in {pk}", e) from e

        await _bounded(
            [lambda n=n, data=data: write(n, data) for n, data in enumerate(parts, start=1)],
            PART_WRITE_CONCURRENCY,
        )

    async def _after_failed_batch(
        self, e: Exception, pk: str, segment: int, creating: bool, first: int, last: int
    ) -> None:
        """Return if the batch landed after all; raise what the engine must know otherwise."""
        status = _status(e)
        where = f"append of {first}..{last} to {pk}"
        if status == 429:
            # Cosmos rejected it. Only a resend of an earlier, dropped attempt could have landed: look once.
            try:
                head = await self._read_item(pk, HEAD)
            except StoreError:
                head = None
            if head is not None and head.get("writer") == self.writer_id and int(head["last"]) >= last:
                self._head_segment, self._head_etag = segment, head["_etag"]
                return
            raise Throttled(f"{where}: request rate too large (429) after the SDK's retries") from e
        if status in (409, 412) or (status == 404 and isinstance(e, CosmosBatchOperationError)):
            await self._settle(pk, segment, creating, first, last, e)
            return
        if status is not None and not _is_ambiguous(e):
            raise StoreError(f"{where} failed: {self._describe(e)}") from e
        if _is_ambiguous(e):
            await self._settle(pk, segment, creating, first, last, e)
            return
        self._broken = f"{where} failed unexpectedly: {e!r}"
        raise StoreError(self._broken) from e

    async def _settle(
        self, pk: str, segment: int, creating: bool, first: int, last: int, cause: BaseException
    ) -> None:
        """Find out from the head whether the batch landed; make sure a copy in flight never does."""
        where = f"append of {first}..{last} to {pk}"
        delay = _RETRY_DELAY
        for _ in range(_SETTLE_ATTEMPTS):
            try:
                try:
                    head = await self._container.read_item(HEAD, partition_key=pk)
                except HttpResponseError as e:
                    if _status(e) != 404:
                        raise
                    head = None
                mine = {"id": HEAD, "pk": pk, "last": self._last, "writer": self.writer_id}
                if head is None:
                    if not creating:
                        raise self._fence(None, pk)
                    # Not there, so the batch (which creates it) did not land; creating it ourselves makes
                    # sure it never will.
                    res = await self._container.create_item(mine)
                    self._head_segment, self._head_etag = segment, res["_etag"]
                    raise StoreError(f"{where} failed: {self._describe(cause)}") from cause
                if head.get("writer") != self.writer_id:
                    raise self._fence(head, pk)
                if int(head["last"]) >= last:
                    self._head_segment, self._head_etag = segment, head["_etag"]
                    return
                if int(head["last"]) != self._last:
                    self._broken = (
                        f"head of {pk} says index {head['last']}, this writer committed {self._last}"
                    )
                    raise StoreError(f"Cosmos DB store is inconsistent: {self._broken}")
                # Not landed yet: moving the head's etag on makes a copy still in flight fail its If-Match.
                res = await self._container.replace_item(
                    HEAD, mine, etag=head["_etag"], match_condition=MatchConditions.IfNotModified
                )
                self._head_segment, self._head_etag = segment, res["_etag"]
                raise StoreError(f"{where} failed: {self._describe(cause)}") from cause
            except (StoreError, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - every SDK/transport failure means "look again"
                if not (_status(e) in (404, 409, 412, 429) or _is_ambiguous(e)):
                    self._broken = f"{where}: outcome unknown, reading it back failed: {self._describe(e)}"
                    raise Uncertain(self._broken) from e
            await asyncio.sleep(delay)
            delay *= 2
        self._broken = f"{where}: outcome unknown ({self._describe(cause)}); the head could not be read back"
        raise Uncertain(self._broken) from cause

    def _fence(self, head: dict[str, Any] | None, pk: str) -> Fenced:
        if head is None:
            self._fenced = f"the head of {pk} is gone: another writer moved on and cleaned up"
        else:
            self._fenced = (
                f"another writer ({head.get('writer')}) took over the Cosmos DB store"
                f" {self.database}/{self.container_name} (its head of {pk} is at index {head.get('last')})"
            )
        _log.error("fenced", extra={"writer": self.writer_id, "reason": self._fenced})
        return Fenced(self._fenced)

    def _check_usable(self) -> None:
        if self._fenced is not None:
            raise Fenced(self._fenced)
        if self._broken is not None:
            raise StoreError(f"Cosmos DB store failed earlier ({self._broken}); reopen to recover")
        if self._container is None:
            raise StoreError(f"{self!r} is not open")
        if not self._writer:
            raise Fenced(f"{self!r} is not the writer (opened as a follower, or released): claim first")

    # ----------------------------------------------------------------- compaction and snapshots

    async def compact(self, rev: int) -> None:
        self._check_usable()

        def body(cur: dict[str, Any] | None) -> dict[str, Any] | None:
            if cur is not None and int(cur["rev"]) >= rev:
                return None  # compaction only moves forward
            return {"id": "compact", "pk": META_PK, "rev": rev}

        await self._cas_meta("compact", body)

    async def save_snapshot(self, index: int, chunks: Iterable[bytes]) -> None:
        # Joined before the first await: the engine may hand a view of live state.
        data = b"".join(chunks)
        self._check_usable()
        if index > self._last:
            raise StoreError(f"snapshot at index {index} is ahead of the stored log ({self._last})")
        if index < self._snapshot_index:
            raise StoreError(
                f"snapshot at index {index} is older than the stored one ({self._snapshot_index})"
            )
        async with self._snapshot_lock:
            if self._container is None:
                raise StoreError(f"{self!r} is not open")
            spk = f"snap-{index}-{secrets.token_hex(4)}"
            log_segment = self._segment_holding(index + 1)
            parts = _split(data)

            async def write(n: int, part: bytes) -> None:
                try:
                    await self._container.upsert_item(
                        {"id": f"c{n}", "pk": spk, "n": n, "d": _b64(part)}, no_response=True
                    )
                except (AzureError, OSError, aiohttp.ClientError) as e:
                    raise self._error(f"writing chunk {n} of the snapshot at index {index}", e) from e

            try:
                await _bounded(
                    [lambda n=n, part=part: write(n, part) for n, part in enumerate(parts)],
                    PART_WRITE_CONCURRENCY,
                )
            except StoreError:
                await self._forget_partition(spk)
                raise
            replaced: list[str | None] = [None]

            def body(cur: dict[str, Any] | None) -> dict[str, Any] | None:
                if cur is not None and int(cur["index"]) >= index:
                    return None  # a newer (or equal) snapshot is already the one to start from
                replaced[0] = cur["spk"] if cur is not None else None
                return {
                    "id": "snapshot",
                    "pk": META_PK,
                    "index": index,
                    "spk": spk,
                    "chunks": len(parts),
                    "seg": log_segment,
                    "bytes": len(data),
                    "prev": replaced[0],
                }

            try:
                written = await self._cas_meta("snapshot", body)
            except StoreError:
                await self._forget_partition(spk)
                raise
            if not written:
                await self._forget_partition(spk)
                return
            self._snapshot_index, self._snapshot_bytes = index, len(data)
            while self._batch_sizes and self._batch_sizes[0][0] <= index:
                self._log_bytes -= self._batch_sizes.popleft()[1]
            # Only now, with the new pointer durable, may what it makes unnecessary go.
            try:
                if replaced[0] is not None:
                    await self._drop_partition(replaced[0])
                await self._collect_log(index, log_segment)
            except (StoreError, AzureError, OSError) as e:
                _log.warning(
                    "Cosmos DB cleanup after snapshot failed",
                    extra={"index": index, "error": self._describe(e)},
                )

    async def _cas_meta(
        self, item_id: str, make: Callable[[dict[str, Any] | None], dict[str, Any] | None]
    ) -> bool:
        """Write ``make(current)`` over meta item ``item_id`` under If-Match; False if ``make`` declines."""
        for _ in range(_CAS_ATTEMPTS):
            cur, etag = self._meta.get(item_id, (None, None))
            body = make(cur)
            if body is None:
                return False
            try:
                if etag is None:
                    res = await self._container.create_item(body)
                else:
                    res = await self._container.replace_item(
                        item_id, body, etag=etag, match_condition=MatchConditions.IfNotModified
                    )
            except Exception as e:  # noqa: BLE001 - sorted below
                if _status(e) == 429:
                    raise Throttled(f"writing {item_id}: request rate too large (429)") from e
                if not (_status(e) in (404, 409, 412) or _is_ambiguous(e)):
                    raise self._error(f"writing {item_id}", e) from e
            else:
                self._meta[item_id] = (res, res["_etag"])
                return True
            # Someone else wrote it, or our own resent request did: look at what is there now.
            now = await self._read_item(META_PK, item_id)
            self._meta[item_id] = (now, now["_etag"] if now else None)
            if now is not None and all(now.get(k) == v for k, v in body.items()):
                return True
        raise StoreError(f"writing {item_id}: the item kept changing under this writer")

    # ----------------------------------------------------------------- garbage collection

    def _segment(self, index: int) -> int:
        return index // self._segment_size

    def _segment_holding(self, index: int) -> int:
        """The segment that holds (or, right after the tail, will hold) log ``index``."""
        if index > self._last:
            return self._segment(index)
        holding = [s for s, start in self._segment_starts.items() if start <= index]
        return max(holding) if holding else self._segment(index)

    async def _collect_log(self, index: int, log_segment: int) -> None:
        """Delete log items that only hold entries <= ``index`` (the snapshot covers them)."""
        # Never the segment whose head we hold: it is the fence for our next append.
        keep_from = min(log_segment, self._head_segment)
        await self._drop_segments_below(keep_from)
        for segment in range(keep_from, log_segment + 1):
            pk = _log_pk(segment)
            rows = await self._query(
                pk,
                "SELECT c.id, c.first, c.last, c.x, c.t FROM c WHERE c.pk = @pk AND c.id != @head"
                " AND (c.first <= @i OR IS_DEFINED(c.x))",
                i=index,
                head=HEAD,
            )
            live = {(r["first"], r.get("t")) for r in rows if "first" in r and r["last"] > index}
            doomed = [r["id"] for r in rows if "first" in r and r["last"] <= index]
            # Parts of items beyond `index` may belong to an append in flight: only older ones go.
            doomed += [r["id"] for r in rows if "x" in r and r["x"] <= index and _part_key(r) not in live]
            await self._delete_ids(pk, doomed)
        # Starts of emptied segments may stay: _segment_holding only asks about indexes after `index`.
        for segment in [s for s in self._segment_starts if s < keep_from]:
            del self._segment_starts[segment]

    async def _drop_segments_below(self, segment: int) -> None:
        """Delete whole segments below ``segment``; they exist as a run ending at ``segment - 1``."""
        found = []
        s = segment - 1
        # Probing heads downwards and deleting upwards (head last) keeps the leftovers a contiguous run
        # even if this is interrupted.
        while s >= 0 and await self._read_item(_log_pk(s), HEAD) is not None:
            found.append(s)
            s -= 1
        for s in reversed(found):
            await self._drop_partition(_log_pk(s), head_last=True)

    async def _drop_partition(self, pk: str, *, head_last: bool = False) -> None:
        ids = [r["id"] for r in await self._query(pk, "SELECT c.id FROM c WHERE c.pk = @pk")]
        if head_last and HEAD in ids:
            ids.remove(HEAD)
            await self._delete_ids(pk, ids)
            await self._delete_ids(pk, [HEAD])
        else:
            await self._delete_ids(pk, ids)

    async def _forget_partition(self, pk: str) -> None:
        try:
            await self._drop_partition(pk)
        except (StoreError, AzureError, OSError) as e:
            _log.warning("Cosmos DB cleanup failed", extra={"partition": pk, "error": self._describe(e)})

    async def _delete_ids(self, pk: str, ids: list[str]) -> None:
        for i in range(0, len(ids), MAX_BATCH_OPS):
            group = ids[i : i + MAX_BATCH_OPS]
            try:
                await self._container.execute_item_batch([("delete", (x,)) for x in group], partition_key=pk)
                continue
            except (AzureError, OSError, aiohttp.ClientError):
                pass  # e.g. one of them is gone already (the batch is all-or-nothing): one by one
            for x in group:
                try:
                    await self._container.delete_item(x, partition_key=pk)
                except HttpResponseError as e:
                    if _status(e) != 404:
                        raise self._error(f"deleting {x} in {pk}", e) from e

    # ----------------------------------------------------------------- reads and errors

    def size(self) -> int:
        return self._snapshot_bytes + self._log_bytes

    def size_in_use(self) -> int:
        return self.size()  # dropped items free their space in Cosmos at once: nothing to give back

    async def defragment(self) -> None:
        """Nothing to do: Cosmos reclaims deleted items' space itself."""

    async def _query(self, pk: str, sql: str, **params: Any) -> list[dict[str, Any]]:
        # `c.pk = @pk` in every WHERE: harmless for Cosmos, required by some emulators.
        parameters = [{"name": "@pk", "value": pk}] + [
            {"name": f"@{k}", "value": v} for k, v in params.items()
        ]
        try:
            return [
                it async for it in self._container.query_items(sql, parameters=parameters, partition_key=pk)
            ]
        except (AzureError, OSError, aiohttp.ClientError) as e:
            raise self._error(f"querying {pk}", e) from e

    async def _read_item(self, pk: str, item_id: str) -> dict[str, Any] | None:
        try:
            return await self._container.read_item(item_id, partition_key=pk)
        except HttpResponseError as e:
            if _status(e) == 404:
                return None
            raise self._error(f"reading {item_id} in {pk}", e) from e
        except (AzureError, OSError, aiohttp.ClientError) as e:
            raise self._error(f"reading {item_id} in {pk}", e) from e

    def _count_request_units(self) -> None:
        headers = getattr(getattr(self._container, "client_connection", None), "last_response_headers", None)
        try:
            metrics.COSMOS_REQUEST_UNITS.inc(float((headers or {}).get("x-ms-request-charge", 0)))
        except (TypeError, ValueError):
            pass  # a header we cannot read costs us a sample, not an append

    def _error(self, what: str, e: BaseException) -> StoreError:
        if _status(e) == 429:
            return Throttled(f"{what}: request rate too large (429) after the SDK's retries")
        return StoreError(f"{what}: {self._describe(e)}")

    @staticmethod
    def _describe(e: BaseException) -> str:
        status = _status(e)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{status} {text}" if status is not None else f"{type(e).__name__}: {text}"


def _unpack(payload: bytes, first: int, last: int, pk: str) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos, end, index = 0, len(payload), first
    while pos < end:
        if pos + 4 > end:
            raise _Inconsistent(f"log item {first}..{last} in {pk} is truncated")
        (n,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + n > end:
            raise _Inconsistent(f"log item {first}..{last} in {pk} is truncated")
        out.append((index, payload[pos : pos + n]))
        pos += n
        index += 1
    if index != last + 1:
        raise _Inconsistent(f"log item {first}..{last} in {pk} holds {index - first} entries")
    return out


async def _bounded(jobs: list[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``jobs`` with at most ``limit`` at a time; the first failure is raised after all have ended."""
    sem = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with sem:
            await job()

    results = await asyncio.gather(*(run(j) for j in jobs), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
