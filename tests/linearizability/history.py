"""A history of etcd KV operations: what each client invoked, when, and what it got back.

The JSON form is the input of the Go checker (tests/linearizability/checker, see its main.go for the
model). Keys and values are ASCII strings; times are ``time.monotonic_ns()`` of the recording process,
taken just before a request is sent and just after its answer arrived, so a recorded interval contains
the server's true one. An operation whose outcome is unknown (an error or a timeout) has neither a
return time nor an output: it may have taken effect at any time after its call, or never.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("put", "range", "range_all", "delete", "cas_mod", "cas_value")
WRITE_KINDS = frozenset({"put", "delete", "cas_mod", "cas_value"})


@dataclass
class KV:
    key: str
    value: str
    create: int
    mod: int
    version: int


@dataclass
class Output:
    revision: int
    """The response header's revision."""
    succeeded: bool = False
    """cas_*: the Txn's compare held (its Put ran)."""
    deleted: int = 0
    kvs: list[KV] = field(default_factory=list)
    """range, range_all, and a cas_* whose compare failed (its Else branch is a Range of the key)."""


@dataclass
class Op:
    """One client operation; see the checker's history.go for the kinds."""

    id: int
    client: int
    endpoint: str
    kind: str
    key: str = ""
    value: str = ""
    expect_mod: int = 0
    expect_value: str = ""
    serializable: bool = False
    call: int = 0
    ret: int | None = None
    error: str = ""
    out: Output | None = None

    @property
    def unknown(self) -> bool:
        return self.out is None

    @property
    def is_write(self) -> bool:
        return self.kind in WRITE_KINDS

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["return"] = d.pop("ret")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        d = dict(d)
        d["ret"] = d.pop("return")
        out = d.pop("out")
        op = cls(**d)
        if out is not None:
            op.out = Output(out["revision"], out.get("succeeded", False), out.get("deleted", 0),
                            [KV(**kv) for kv in out.get("kvs") or []])
        return op


@dataclass
class History:
    keys: list[str]
    """The key set; a range_all covers exactly these (the recorder's prefix holds nothing else)."""
    initial_revision: int
    initial_kvs: list[KV] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "initial": {"revision": self.initial_revision, "kvs": [asdict(kv) for kv in self.initial_kvs]},
            "ops": [op.to_json() for op in self.ops],
        }

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> History:
        d = json.loads(path.read_text())
        return cls(d["keys"], d["initial"]["revision"], [KV(**kv) for kv in d["initial"]["kvs"]],
                   [Op.from_json(op) for op in d["ops"]])

    def copy(self) -> History:
        return copy.deepcopy(self)

    def next_id(self) -> int:
        return max((op.id for op in self.ops), default=-1) + 1

    def stats(self) -> Counter[str]:
        """Counts by kind and outcome, e.g. ``put:ok``, ``range:unknown``, ``cas_mod:succeeded``,
        ``range:serializable``, ``delete:deleted`` (for the tests' sanity checks and messages)."""
        c: Counter[str] = Counter()
        for op in self.ops:
            c[f"{op.kind}:{'unknown' if op.out is None else 'ok'}"] += 1
            if op.out is None:
                continue
            if op.serializable:
                c[f"{op.kind}:serializable"] += 1
            if op.kind.startswith("cas_"):
                c[f"{op.kind}:{'succeeded' if op.out.succeeded else 'failed'}"] += 1
            if op.kind == "delete" and op.out.deleted:
                c["delete:deleted"] += 1
        return c
