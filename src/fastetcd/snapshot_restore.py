"""``fastetcd snapshot restore FILE --data-dir DIR``: a new data dir from a snapshot, as etcd's restore.

The snapshot's state becomes the new store's snapshot at the same log index, so the restored server
starts at the snapshot's revision with the same keys, versions, leases and compaction revision, and its
log continues from there.
"""

from __future__ import annotations

import asyncio
import os

from fastetcd.engine.snapshot_file import SnapshotFile, SnapshotFileError
from fastetcd.store.base import StoreError
from fastetcd.store.embedded import EmbeddedStore


class RestoreError(Exception):
    """The restore did not happen; the message is one line for the operator."""


def restore(snapshot_path: str, data_dir: str) -> SnapshotFile:
    if os.path.exists(data_dir) and os.listdir(data_dir):
        raise RestoreError(f"data-dir {data_dir!r} exists")  # etcd refuses to overwrite one too
    try:
        with open(snapshot_path, "rb") as f:
            snap = SnapshotFile.decode(f.read())
    except OSError as e:
        raise RestoreError(f"cannot read {snapshot_path}: {e.strerror or e}") from None
    except SnapshotFileError as e:
        raise RestoreError(f"{snapshot_path}: {e}") from None
    try:
        asyncio.run(_install(data_dir, snap))
    except StoreError as e:
        raise RestoreError(str(e)) from None
    return snap


async def _install(data_dir: str, snap: SnapshotFile) -> None:
    store = EmbeddedStore(data_dir)
    await store.open()
    try:
        await store.install_snapshot(snap.index, snap.state, snap.compact_rev)
    finally:
        await store.close()
