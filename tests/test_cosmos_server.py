"""The Cosmos DB test server behaves like Azure Cosmos DB for what fastetcd's Cosmos store relies on.

Every test drives the real azure-cosmos SDK against tests/cosmos_server/server.js (one server per module,
a container per test; the first test uses the public `cosmos_server` fixture). All of these but the patch
test fail against the stock @vercel/cosmosdb-server, which is what server.js corrects.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import time
import uuid
from datetime import UTC, datetime

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import ServiceResponseError
from azure.cosmos import PartitionKey, exceptions
from cosmos_fixture import (  # noqa: F401  (fixtures)
    CosmosServer,
    cosmos_fixture,
    cosmos_server_fixture,
    module_cosmos_server,
    start_cosmos_server,
)


def _container(server: CosmosServer, **kwargs):
    client = server.client()
    db = client.create_database_if_not_exists("fastetcd")
    return db.create_container(f"c-{uuid.uuid4().hex[:8]}", PartitionKey(path="/pk"), **kwargs)


def _ids(items) -> list[str]:
    return [item["id"] for item in items]


def _feed(container, **kwargs) -> tuple[list[dict], str]:
    """Drain a change feed; returns the items and the continuation to resume from."""
    pager = container.query_items_change_feed(**kwargs).by_page()
    items: list[dict] = []
    for page in pager:
        items.extend(page)
    # The SDK leaves pager.continuation_token unset when the last poll found nothing new (the server's
    # 304 ends the iteration first); the continuation is then in the last response's etag header.
    token = pager.continuation_token or container.client_connection.last_response_headers["etag"]
    assert token
    return items, token


def _absent(container, item_id: str, pk: str) -> bool:
    try:
        container.read_item(item_id, partition_key=pk)
    except exceptions.CosmosResourceNotFoundError:
        return True
    return False


# ---- basics ------------------------------------------------------------------------------------------


def test_database_container_and_item_round_trip(cosmos_server: CosmosServer) -> None:
    assert cosmos_server.endpoint.startswith("http://127.0.0.1:")
    client = cosmos_server.client()
    db = client.create_database("fastetcd")
    container = db.create_container("log", PartitionKey(path="/pk"))
    assert container.read()["partitionKey"]["paths"] == ["/pk"]

    created = container.create_item({"id": "k1", "pk": "seg-0", "v": "aGVsbG8="})
    headers = container.client_connection.last_response_headers
    assert float(headers["x-ms-request-charge"]) > 0
    assert headers["etag"] == created["_etag"]
    assert created["_etag"].startswith('"')  # quoted, as real Cosmos etags are
    got = container.read_item("k1", partition_key="seg-0")
    assert got["v"] == "aGVsbG8=" and got["_etag"] == created["_etag"] and got["_ts"] > 0
    assert float(container.client_connection.last_response_headers["x-ms-request-charge"]) > 0
    with pytest.raises(exceptions.CosmosResourceExistsError):
        container.create_item({"id": "k1", "pk": "seg-0"})
    # no_response=True (Prefer: return=minimal): no body, but the etag still comes back in the headers.
    assert container.upsert_item({"id": "k2", "pk": "seg-0"}, no_response=True) == {}
    etag = container.client_connection.last_response_headers["etag"]
    assert container.read_item("k2", partition_key="seg-0")["_etag"] == etag
    # The same id in another logical partition is another item.
    container.create_item({"id": "k1", "pk": "seg-1", "v": "other"})
    assert container.read_item("k1", partition_key="seg-0")["v"] == "aGVsbG8="


def test_keep_alive_one_connection_for_many_requests(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    cosmos.reset_stats()
    for i in range(30):
        container.upsert_item({"id": f"k{i}", "pk": "p"})
        container.read_item(f"k{i}", partition_key="p")
    stats = cosmos.stats()
    assert stats["by_kind"] == {"write": 30, "read": 30}
    assert stats["connections_opened"] == 1  # the SDK's pooled connection, counted again after the reset

    conn = http.client.HTTPConnection("127.0.0.1", cosmos.port, timeout=5)
    conn.request("GET", "/")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert (resp.getheader("connection") or "keep-alive").lower() == "keep-alive"
    # The advertised endpoints are the ones the client connected to (so endpoint discovery keeps HTTP).
    conn.request("GET", "/")
    account = json.loads(conn.getresponse().read())
    conn.close()
    assert {loc["databaseAccountEndpoint"] for loc in account["writableLocations"]} == {cosmos.endpoint}


def test_point_read_of_missing_item_is_404(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "present", "pk": "a"})
    with pytest.raises(exceptions.CosmosResourceNotFoundError) as err:
        container.read_item("absent", partition_key="a")
    assert err.value.status_code == 404
    # Present, but in another logical partition.
    with pytest.raises(exceptions.CosmosResourceNotFoundError):
        container.read_item("present", partition_key="b")
    with pytest.raises(exceptions.CosmosResourceNotFoundError):
        container.delete_item("absent", partition_key="a")
    with pytest.raises(exceptions.CosmosResourceNotFoundError):
        container.replace_item("absent", {"id": "absent", "pk": "a"})


# ---- transactional batch -----------------------------------------------------------------------------


def test_batch_every_operation_kind(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    head = container.create_item({"id": "head", "pk": "seg", "rev": 1})
    container.create_item({"id": "old", "pk": "seg"})
    container.create_item({"id": "counter", "pk": "seg", "n": 1})
    results = container.execute_item_batch(
        [
            ("create", ({"id": "r2", "pk": "seg", "v": "x"},)),
            ("upsert", ({"id": "r3", "pk": "seg", "v": "y"},)),
            ("replace", ("head", {"id": "head", "pk": "seg", "rev": 3}), {"if_match_etag": head["_etag"]}),
            ("read", ("r2",)),
            ("delete", ("old",)),
            ("patch", ("counter", [{"op": "incr", "path": "/n", "value": 5}])),
        ],
        partition_key="seg",
    )
    assert [r["statusCode"] for r in results] == [201, 201, 200, 200, 204, 200]
    assert results[3]["resourceBody"]["v"] == "x"
    assert results[2]["eTag"] != head["_etag"]
    assert container.read_item("head", partition_key="seg")["rev"] == 3
    assert container.read_item("r3", partition_key="seg")["v"] == "y"
    assert container.read_item("counter", partition_key="seg")["n"] == 6
    assert _absent(container, "old", "seg")


def test_batch_is_atomic_on_conflict(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "r1", "pk": "seg", "v": "original"})
    _, cont = _feed(container, start_time="Beginning")
    with pytest.raises(exceptions.CosmosBatchOperationError) as err:
        container.execute_item_batch(
            [
                ("create", ({"id": "r0", "pk": "seg"},)),
                ("upsert", ({"id": "r1", "pk": "seg", "v": "changed"},)),
                ("create", ({"id": "r1", "pk": "seg"},)),  # 409: r1 exists
                ("create", ({"id": "r9", "pk": "seg"},)),
            ],
            partition_key="seg",
        )
    assert err.value.error_index == 2
    assert err.value.status_code == 409
    assert [r["statusCode"] for r in err.value.operation_responses] == [424, 424, 409, 424]
    # Nothing of the batch was applied: not the create before the failure, not the upsert.
    assert _absent(container, "r0", "seg") and _absent(container, "r9", "seg")
    assert container.read_item("r1", partition_key="seg")["v"] == "original"
    assert _feed(container, continuation=cont)[0] == []


def test_batch_is_atomic_on_stale_etag(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    head = container.create_item({"id": "head", "pk": "seg", "rev": 1})
    container.replace_item("head", {"id": "head", "pk": "seg", "rev": 2})  # another writer moved on
    with pytest.raises(exceptions.CosmosBatchOperationError) as err:
        container.execute_item_batch(
            [
                ("create", ({"id": "rev-2", "pk": "seg"},)),
                (
                    "replace",
                    ("head", {"id": "head", "pk": "seg", "rev": 3}),
                    {"if_match_etag": head["_etag"]},
                ),
            ],
            partition_key="seg",
        )
    assert err.value.status_code == 412 and err.value.error_index == 1
    assert [r["statusCode"] for r in err.value.operation_responses] == [424, 412]
    assert _absent(container, "rev-2", "seg")
    assert container.read_item("head", partition_key="seg")["rev"] == 2


def test_batch_and_item_limits(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    with pytest.raises(exceptions.CosmosHttpResponseError) as err:
        container.execute_item_batch(
            [("create", ({"id": f"r{i}", "pk": "seg"},)) for i in range(101)], partition_key="seg"
        )
    assert err.value.status_code == 400
    results = container.execute_item_batch(
        [("create", ({"id": f"r{i}", "pk": "seg"},)) for i in range(100)], partition_key="seg"
    )
    assert len(results) == 100

    # 2 MB per item and per batch request.
    near_limit = "x" * (2 * 1024 * 1024 - 200)
    container.create_item({"id": "big", "pk": "seg", "v": near_limit})
    with pytest.raises(exceptions.CosmosHttpResponseError) as err:
        container.create_item({"id": "huge", "pk": "seg", "v": near_limit + "x" * 400})
    assert err.value.status_code == 413
    half = "y" * (1024 * 1024)
    with pytest.raises(exceptions.CosmosHttpResponseError) as err:
        container.execute_item_batch(
            [("create", ({"id": f"h{i}", "pk": "seg", "v": half},)) for i in range(3)], partition_key="seg"
        )
    assert err.value.status_code == 413
    assert _absent(container, "h0", "seg")


def test_batch_partition_key_comes_from_the_header(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    # An item whose partition key differs from the batch's fails the whole batch.
    with pytest.raises(exceptions.CosmosBatchOperationError) as err:
        container.execute_item_batch(
            [("create", ({"id": "a", "pk": "seg-1"},)), ("create", ({"id": "b", "pk": "seg-2"},))],
            partition_key="seg-1",
        )
    assert err.value.status_code == 400
    assert _absent(container, "a", "seg-1")
    # read/delete carry only an id: the partition comes from the header.
    container.create_item({"id": "x", "pk": "seg-2", "v": 2})
    container.create_item({"id": "x", "pk": "seg-1", "v": 1})
    results = container.execute_item_batch([("read", ("x",)), ("delete", ("x",))], partition_key="seg-2")
    assert results[0]["resourceBody"]["v"] == 2
    assert _absent(container, "x", "seg-2")
    assert container.read_item("x", partition_key="seg-1")["v"] == 1


# ---- etags -------------------------------------------------------------------------------------------


def test_if_match_on_replace_upsert_delete_patch(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    v1 = container.create_item({"id": "leader", "pk": "meta", "owner": "n1"})
    v2 = container.replace_item(
        "leader",
        {"id": "leader", "pk": "meta", "owner": "n2"},
        etag=v1["_etag"],
        match_condition=MatchConditions.IfNotModified,
    )
    stale = v1["_etag"]
    cases = [
        lambda: container.replace_item(
            "leader",
            {"id": "leader", "pk": "meta", "owner": "n3"},
            etag=stale,
            match_condition=MatchConditions.IfNotModified,
        ),
        lambda: container.upsert_item(
            {"id": "leader", "pk": "meta", "owner": "n3"},
            etag=stale,
            match_condition=MatchConditions.IfNotModified,
        ),
        lambda: container.delete_item(
            "leader", partition_key="meta", etag=stale, match_condition=MatchConditions.IfNotModified
        ),
        lambda: container.patch_item(
            "leader",
            "meta",
            [{"op": "set", "path": "/owner", "value": "n3"}],
            etag=stale,
            match_condition=MatchConditions.IfNotModified,
        ),
    ]
    for case in cases:
        with pytest.raises(exceptions.CosmosAccessConditionFailedError) as err:
            case()
        assert err.value.status_code == 412
    assert container.read_item("leader", partition_key="meta")["owner"] == "n2"
    v3 = container.upsert_item(
        {"id": "leader", "pk": "meta", "owner": "n3"},
        etag=v2["_etag"],
        match_condition=MatchConditions.IfNotModified,
    )
    container.delete_item(
        "leader", partition_key="meta", etag=v3["_etag"], match_condition=MatchConditions.IfNotModified
    )
    assert _absent(container, "leader", "meta")


def test_patch_operations_and_filter_predicate(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "p", "pk": "a", "n": 1, "tags": ["x"], "gone": True})
    out = container.patch_item(
        "p",
        "a",
        [
            {"op": "incr", "path": "/n", "value": 2},
            {"op": "set", "path": "/s", "value": "new"},
            {"op": "add", "path": "/tags/-", "value": "y"},
            {"op": "remove", "path": "/gone"},
        ],
    )
    assert out["n"] == 3 and out["s"] == "new" and out["tags"] == ["x", "y"] and "gone" not in out
    with pytest.raises(exceptions.CosmosAccessConditionFailedError):
        container.patch_item(
            "p", "a", [{"op": "set", "path": "/n", "value": 0}], filter_predicate="from c where c.n = 1"
        )
    container.patch_item(
        "p", "a", [{"op": "set", "path": "/n", "value": 0}], filter_predicate="from c where c.n = 3"
    )
    assert container.read_item("p", partition_key="a")["n"] == 0


# ---- queries -----------------------------------------------------------------------------------------


def test_query_is_scoped_to_the_partition_key_argument(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    for i in range(7):
        container.create_item({"id": f"r{i}", "pk": "seg-a", "rev": i})
    for i in range(3):
        container.create_item({"id": f"r{i}", "pk": "seg-b", "rev": 100 + i})
    # No `c.pk = @pk` in the WHERE: the partition_key argument alone scopes the query.
    rows = list(container.query_items("SELECT * FROM c ORDER BY c.rev DESC", partition_key="seg-b"))
    assert [r["rev"] for r in rows] == [102, 101, 100]
    rows = list(
        container.query_items(
            "SELECT c.id, c.rev FROM c WHERE c.rev > @after ORDER BY c.rev",
            partition_key="seg-a",
            parameters=[{"name": "@after", "value": 3}],
        )
    )
    assert rows == [{"id": "r4", "rev": 4}, {"id": "r5", "rev": 5}, {"id": "r6", "rev": 6}]
    assert list(container.query_items("SELECT VALUE MAX(c.rev) FROM c", partition_key="seg-a")) == [6]
    assert list(container.query_items("SELECT VALUE COUNT(1) FROM c", partition_key="seg-b")) == [3]
    assert list(container.query_items("SELECT VALUE MAX(c.rev) FROM c", partition_key="seg-none")) == []
    top = container.query_items("SELECT TOP 2 VALUE c.rev FROM c ORDER BY c.rev DESC", partition_key="seg-a")
    assert list(top) == [6, 5]
    # Across partitions (one physical partition here): complete answers.
    assert list(
        container.query_items("SELECT VALUE MAX(c.rev) FROM c", enable_cross_partition_query=True)
    ) == [102]
    assert list(container.query_items("SELECT VALUE COUNT(1) FROM c", enable_cross_partition_query=True)) == [
        10
    ]


def test_query_paging_with_continuation(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    for i in range(10):
        container.create_item({"id": f"r{i}", "pk": "seg", "rev": i})
    container.create_item({"id": "other", "pk": "seg-x", "rev": 5})
    query = "SELECT * FROM c WHERE c.rev >= 2 ORDER BY c.rev"
    pager = container.query_items(query, partition_key="seg", max_item_count=3).by_page()
    first = list(next(pager))
    token = pager.continuation_token
    assert [r["rev"] for r in first] == [2, 3, 4] and token
    # A new iterator resumes from the token (as a restarted replica would).
    rest: list[dict] = []
    for page in container.query_items(query, partition_key="seg", max_item_count=3).by_page(token):
        rest.extend(page)
    assert [r["rev"] for r in rest] == [5, 6, 7, 8, 9]


# ---- change feed -------------------------------------------------------------------------------------


def test_change_feed_is_incremental_latest_version_in_modification_order(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    for i in range(4):
        container.create_item({"id": f"r{i}", "pk": "seg", "v": 0})
    items, cont = _feed(container, start_time="Beginning")
    assert _ids(items) == ["r0", "r1", "r2", "r3"]
    assert all("_lsn" in item for item in items)
    # Nothing new: no items, and the continuation still works afterwards.
    again, cont2 = _feed(container, continuation=cont)
    assert again == []

    container.upsert_item({"id": "r1", "pk": "seg", "v": 1})
    container.upsert_item({"id": "r0", "pk": "seg", "v": 1})
    container.upsert_item({"id": "r1", "pk": "seg", "v": 2})  # r1 twice: shown once, latest, last
    container.delete_item("r2", partition_key="seg")  # deletes are not in the latest-version feed
    container.create_item({"id": "r4", "pk": "seg", "v": 0})
    items, cont3 = _feed(container, continuation=cont2)
    assert [(i["id"], i["v"]) for i in items] == [("r0", 1), ("r1", 2), ("r4", 0)]
    assert _feed(container, continuation=cont3)[0] == []
    # From the beginning: each live item once, in order of its latest change.
    assert _ids(_feed(container, start_time="Beginning")[0]) == ["r3", "r0", "r1", "r4"]


def test_change_feed_by_partition_key_and_range(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "a1", "pk": "seg-a"})
    container.create_item({"id": "b1", "pk": "seg-b"})
    container.create_item({"id": "a2", "pk": "seg-a"})
    # By partition key the SDK sends an effective-partition-key range; the server must hash like Cosmos.
    items, cont_a = _feed(container, start_time="Beginning", partition_key="seg-a")
    assert _ids(items) == ["a1", "a2"]
    with pytest.warns(DeprecationWarning):  # partition_key_range_id: the SDK's v1 change feed path
        items, cont_r = _feed(container, start_time="Beginning", partition_key_range_id="0")
    assert _ids(items) == ["a1", "b1", "a2"]
    (whole,) = list(container.read_feed_ranges())  # one physical partition
    items, cont_f = _feed(container, start_time="Beginning", feed_range=whole)
    assert _ids(items) == ["a1", "b1", "a2"]
    container.create_item({"id": "b2", "pk": "seg-b"})
    container.upsert_item({"id": "a1", "pk": "seg-a", "v": 1})
    assert _ids(_feed(container, continuation=cont_a)[0]) == ["a1"]
    assert _ids(_feed(container, continuation=cont_r)[0]) == ["b2", "a1"]
    assert _ids(_feed(container, continuation=cont_f)[0]) == ["b2", "a1"]
    # "Now": only what changes after the first read.
    now_items, cont_now = _feed(container, start_time="Now")
    assert now_items == []
    container.create_item({"id": "a3", "pk": "seg-a"})
    assert _ids(_feed(container, continuation=cont_now)[0]) == ["a3"]


def test_change_feed_from_a_point_in_time(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "before", "pk": "seg"})
    time.sleep(1.1)  # Cosmos compares start times at the resolution of _ts: seconds
    start = datetime.now(UTC)
    container.create_item({"id": "after", "pk": "seg"})
    assert _ids(_feed(container, start_time=start)[0]) == ["after"]


def test_change_feed_pages_never_split_a_batch(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.execute_item_batch(
        [("create", ({"id": f"t1-{i}", "pk": "seg"},)) for i in range(5)], partition_key="seg"
    )
    container.execute_item_batch(
        [("create", ({"id": f"t2-{i}", "pk": "seg"},)) for i in range(5)], partition_key="seg"
    )
    pager = container.query_items_change_feed(start_time="Beginning", max_item_count=3).by_page()
    sizes = [len(list(page)) for page in pager]
    assert sizes[:2] == [5, 5] and sum(sizes) == 10


def test_change_feed_async_client(cosmos: CosmosServer) -> None:
    async def run() -> None:
        async with cosmos.async_client() as client:
            db = await client.create_database_if_not_exists("fastetcd")
            container = await db.create_container(f"c-{uuid.uuid4().hex[:8]}", PartitionKey(path="/pk"))
            await container.execute_item_batch(
                [("create", ({"id": f"r{i}", "pk": "seg"},)) for i in range(3)], partition_key="seg"
            )
            pager = container.query_items_change_feed(start_time="Beginning", partition_key="seg").by_page()
            seen = [item["id"] async for page in pager async for item in page]
            assert seen == ["r0", "r1", "r2"]
            token = pager.continuation_token
            await container.upsert_item({"id": "r1", "pk": "seg", "v": 1})
            pager = container.query_items_change_feed(continuation=token).by_page()
            assert [item["id"] async for page in pager async for item in page] == ["r1"]

    asyncio.run(run())


# ---- TTL ---------------------------------------------------------------------------------------------


def test_ttl_expires_items(cosmos: CosmosServer) -> None:
    with_default = _container(cosmos, default_ttl=1)
    per_item = _container(cosmos, default_ttl=-1)
    ttl_off = _container(cosmos)
    with_default.create_item({"id": "lease", "pk": "meta"})
    with_default.create_item({"id": "forever", "pk": "meta", "ttl": -1})
    per_item.create_item({"id": "lease", "pk": "meta", "ttl": 1})
    per_item.create_item({"id": "keep", "pk": "meta"})
    ttl_off.create_item({"id": "lease", "pk": "meta", "ttl": 1})  # item ttl ignored with TTL off
    assert not _absent(with_default, "lease", "meta")
    time.sleep(1.3)
    assert _absent(with_default, "lease", "meta") and _absent(per_item, "lease", "meta")
    assert not _absent(with_default, "forever", "meta") and not _absent(per_item, "keep", "meta")
    assert not _absent(ttl_off, "lease", "meta")
    assert _ids(with_default.query_items("SELECT * FROM c", partition_key="meta")) == ["forever"]
    assert _ids(_feed(per_item, start_time="Beginning")[0]) == ["keep"]
    # Expired means gone: the id can be created again (a new leader item).
    with_default.create_item({"id": "lease", "pk": "meta"})


def test_container_replace_keeps_items_and_can_turn_ttl_on(cosmos: CosmosServer) -> None:
    db = cosmos.client().create_database_if_not_exists("fastetcd")
    container = db.create_container(f"c-{uuid.uuid4().hex[:8]}", PartitionKey(path="/pk"))
    container.create_item({"id": "old", "pk": "p"})
    container.create_item({"id": "kept", "pk": "p", "ttl": -1})
    db.replace_container(container, PartitionKey(path="/pk"), default_ttl=1)
    assert container.read()["defaultTtl"] == 1
    assert not _absent(container, "old", "p")  # a container replace keeps the data
    time.sleep(1.3)
    assert _absent(container, "old", "p") and not _absent(container, "kept", "p")


def test_ttl_renewal_by_replace_extends_life(cosmos: CosmosServer) -> None:
    container = _container(cosmos, default_ttl=-1)
    item = container.create_item({"id": "leader", "pk": "meta", "ttl": 1})
    for _ in range(3):
        time.sleep(0.5)
        item = container.replace_item(
            "leader",
            {"id": "leader", "pk": "meta", "ttl": 1},
            etag=item["_etag"],
            match_condition=MatchConditions.IfNotModified,
        )
    time.sleep(0.5)
    assert not _absent(container, "leader", "meta")
    time.sleep(0.8)
    assert _absent(container, "leader", "meta")


# ---- fault injection and statistics ------------------------------------------------------------------


def test_429_with_retry_after_is_retried_by_the_sdk(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    cosmos.reset_stats()
    cosmos.fault("429", count=2, retry_after_ms=200, kind="batch")
    start = time.monotonic()
    container.execute_item_batch([("create", ({"id": "r1", "pk": "seg"},))], partition_key="seg")
    elapsed = time.monotonic() - start
    assert elapsed >= 0.4  # the SDK waited the server's retry-after, twice
    stats = cosmos.stats()
    assert stats["by_kind"]["batch"] == 3
    assert stats["by_status"]["429"] == 2 and stats["by_status"]["200"] == 1
    assert cosmos.fault_rules()[0]["remaining"] == 0
    assert not _absent(container, "r1", "seg")


def test_429_beyond_the_retry_budget_raises(cosmos: CosmosServer) -> None:
    client = cosmos.client(retry_throttle_total=2)
    db = client.create_database_if_not_exists("fastetcd")
    container = db.create_container(f"c-{uuid.uuid4().hex[:8]}", PartitionKey(path="/pk"))
    cosmos.fault("429", retry_after_ms=10, kind="write")
    with pytest.raises(exceptions.CosmosHttpResponseError) as err:
        container.create_item({"id": "r1", "pk": "seg"})
    assert err.value.status_code == 429
    # Reads were not throttled (the rule is for writes only), and the write did not happen.
    assert _absent(container, "r1", "seg")
    cosmos.clear_faults()
    container.create_item({"id": "r1", "pk": "seg"})


def test_delay_fault(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "r", "pk": "p"})
    cosmos.fault("delay", ms=400, count=1, kind="read")
    start = time.monotonic()
    container.read_item("r", partition_key="p")
    assert time.monotonic() - start >= 0.4
    start = time.monotonic()
    container.read_item("r", partition_key="p")
    assert time.monotonic() - start < 0.3


def test_dropped_connection(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    container.create_item({"id": "r", "pk": "p", "v": 0})
    # A read is idempotent: the SDK retries it on a new connection.
    cosmos.reset_stats()
    cosmos.fault("drop", count=1, kind="read")
    assert container.read_item("r", partition_key="p")["v"] == 0
    assert cosmos.stats()["by_kind"]["read"] == 2
    # A write is not retried: the caller sees an error and cannot know the outcome.
    cosmos.fault("drop", count=1, kind="batch")
    with pytest.raises(ServiceResponseError):
        container.execute_item_batch([("upsert", ({"id": "r", "pk": "p", "v": 1},))], partition_key="p")
    assert container.read_item("r", partition_key="p")["v"] == 0  # "drop": not applied
    cosmos.fault("drop_after", count=1, kind="batch")
    with pytest.raises(ServiceResponseError):
        container.execute_item_batch([("upsert", ({"id": "r", "pk": "p", "v": 2},))], partition_key="p")
    assert container.read_item("r", partition_key="p")["v"] == 2  # "drop_after": applied, answer lost


def test_status_fault_and_probability(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    cosmos.fault("status", status=500, count=1, kind="write")
    with pytest.raises(exceptions.CosmosHttpResponseError) as err:
        container.create_item({"id": "r", "pk": "p"})
    assert err.value.status_code == 500
    assert _absent(container, "r", "p")
    # The SDK retries a 503 on its own (here on the same, single endpoint).
    cosmos.reset_stats()
    cosmos.fault("status", status=503, count=1, kind="write")
    container.create_item({"id": "r", "pk": "p"})
    assert cosmos.stats()["by_status"] == {"503": 1, "201": 1}
    container.delete_item("r", partition_key="p")
    cosmos.fault("429", probability=0.0, kind="all")
    container.create_item({"id": "r", "pk": "p"})
    assert cosmos.fault_rules()[0]["injected"] == 0


def test_stats_count_requests_by_kind(cosmos: CosmosServer) -> None:
    container = _container(cosmos)
    cosmos.reset_stats()
    for i in range(3):
        container.create_item({"id": f"r{i}", "pk": "p"})
    container.read_item("r0", partition_key="p")
    container.read_item("r1", partition_key="p")
    container.execute_item_batch(
        [("create", ({"id": f"b{i}", "pk": "p"},)) for i in range(5)], partition_key="p"
    )
    list(container.query_items("SELECT * FROM c", partition_key="p"))
    stats = cosmos.stats()
    assert stats["by_kind"] == {"write": 3, "read": 2, "batch": 1, "query": 1}
    assert stats["total"] == 7 and stats["batch_operations"] == 5
    assert cosmos.reset_stats()["total"] == 7
    assert cosmos.stats()["total"] == 0


# ---- modes and lifecycle -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_mode_with_verification_off(tmp_path) -> None:
    server = start_cosmos_server(tmp_path, tls=True)
    try:
        assert server.endpoint.startswith("https://127.0.0.1:")
        client = server.client()
        container = client.create_database("fastetcd").create_container("c", PartitionKey(path="/pk"))
        server.reset_stats()
        for i in range(20):
            container.create_item({"id": f"r{i}", "pk": "p"})
        assert container.read_item("r0", partition_key="p")["id"] == "r0"
        # Keep-alive: not one TLS handshake per request (the SDK's background account refresh may take
        # a second pooled connection).
        assert server.stats()["connections_opened"] <= 2
    finally:
        server.stop()


def test_stop_kills_the_server_by_pid(tmp_path) -> None:
    server = start_cosmos_server(tmp_path)
    pid = server.pid
    server.stop()
    assert not server.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
