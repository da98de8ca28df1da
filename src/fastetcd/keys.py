"""Key-range helpers with etcd's conventions (used by the server's recipes and by the test harness)."""

from __future__ import annotations


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``GetPrefixRangeEnd``: the range end that selects every key starting with ``prefix``.

    The prefix with its last byte below 0xff incremented and everything after it dropped; ``b"\\0"``
    (every key from ``prefix`` on) when there is no such byte.

    >>> prefix_end(b"a/"), prefix_end(b"a\\xff"), prefix_end(b"\\xff")
    (b'a0', b'b', b'\\x00')
    """
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\x00"
