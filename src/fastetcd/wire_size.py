"""Protobuf wire sizes, for the limits etcd checks against encoded sizes."""

from __future__ import annotations


def varint_len(n: int) -> int:
    """Bytes of ``n`` (>= 0) as a protobuf varint: 1 below 128, 2 below 16384, ..."""
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size
