"""``fastetcd snapshot restore FILE --data-dir DIR``: a new data dir from a snapshot, as etcd's restore.

The snapshot's state becomes the new store's snapshot at the same log index, so the restored server
starts at the snapshot's revision with the same keys, versions, leases and compaction revision, and its
log continues from there.
"""

from __future__ import annotations

import asyncio
import os
import struct

from fastetcd.engine.snapshot_file import SnapshotFile, SnapshotFileError
from fastetcd.store.base import StoreError
from fastetcd.store.embedded import EmbeddedStore

BOLT_MAGIC = 0xED0CDAED  # the first field of a bolt meta page, after the 16-byte page header


class RestoreError(Exception):
    """The restore did not happen; the message is one line for the operator."""


def check_new_data_dir(data_dir: str) -> None:
    """A restore (or an import) only creates a data dir: ``data_dir`` must not exist, or be empty."""
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or os.listdir(data_dir)):
        raise RestoreError(f"data-dir {data_dir!r} exists")  # etcd refuses to overwrite one too


def restore(snapshot_path: str, data_dir: str) -> SnapshotFile:
    check_new_data_dir(data_dir)
    try:
        with open(snapshot_path, "rb") as f:
            snap = SnapshotFile.decode(f.read())
    except OSError as e:
        raise RestoreError(f"cannot read {snapshot_path}: {e.strerror or e}") from None
    except SnapshotFileError as e:
        if _is_bolt(snapshot_path):
            raise RestoreError(
                f"{snapshot_path} is an etcd snapshot; import it with: fastetcd import {snapshot_path} "
                f"--data-dir {data_dir}"
            ) from None
        raise RestoreError(f"{snapshot_path}: {e}") from None
    install(data_dir, snap.index, snap.state, snap.compact_rev)
    return snap


def _is_bolt(path: str) -> bool:
    """Whether ``path`` starts with a bolt meta page (etcd's backend, as ``etcdctl snapshot save`` of an
    etcd writes it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return False
    return len(head) == 24 and struct.unpack_from("<I", head, 16)[0] == BOLT_MAGIC


def install(data_dir: str, index: int, state: bytes, compact_rev: int) -> None:
    """Create the embedded store at ``data_dir`` holding ``state`` as its snapshot at log index ``index``."""
    try:
        asyncio.run(_install(data_dir, index, state, compact_rev))
    except StoreError as e:
        raise RestoreError(str(e)) from None


async def _install(data_dir: str, index: int, state: bytes, compact_rev: int) -> None:
    store = EmbeddedStore(data_dir)
    await store.open()
    try:
        await store.install_snapshot(index, state, compact_rev)
    finally:
        await store.close()
