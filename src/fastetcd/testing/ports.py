"""Loopback ports."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago.

    The kernel picks it, so parallel runs do not clash; a server started on it right away gets it in
    practice (nothing else on the machine asks the kernel for that same port in between).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
