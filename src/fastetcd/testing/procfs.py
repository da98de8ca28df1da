"""What /proc says about a server process and its descendants (Linux): memory, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path


def process_memory(pid: int, field: str = "VmRSS") -> int:
    """A memory field of ``/proc/<pid>/status`` (``VmRSS``, ``RssAnon``, ``VmHWM``, …) in bytes.

    Raises RuntimeError if the process has no such field (OSError if it is gone).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant of it (a server and whatever it spawned)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
            children.setdefault(int(raw[raw.rindex(")") + 2 :].split()[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def tree_memory(root: int, field: str = "VmRSS") -> int:
    """:func:`process_memory` summed over ``root``'s process tree (processes that vanish count 0)."""
    total = 0
    for pid in tree_pids(root):
        try:
            total += process_memory(pid, field)
        except (OSError, RuntimeError):
            pass
    return total
