"""etcdctl 3.5.1 as a black box: the same command sequence against fastetcd and against real etcd must
give byte-identical stdout, stderr and exit codes, once normalized (etcdctl_compare.normalize).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
from etcdctl_compare import Comparison, Outcome, normalize

from fastetcd.testing import run_etcdctl


def ctl(endpoint: str, args: Sequence[str], stdin: str | None = None) -> Outcome:
    rc, out, err = run_etcdctl(endpoint, args, stdin=stdin)
    return Outcome(rc, normalize(out, endpoint), normalize(err, endpoint))


class Pair(Comparison):
    """Runs every command on both servers (see Comparison)."""

    def __init__(self, subject: str, oracle: str) -> None:
        super().__init__()
        self.subject = subject
        self.oracle = oracle

    def run(self, *args: str, stdin: str | None = None, expect_rc: int | None = None) -> Outcome:
        self.count += 1
        got_f = self.pool.submit(ctl, self.subject, args, stdin)
        want = ctl(self.oracle, args, stdin)
        got = got_f.result()
        cmd = "etcdctl " + " ".join(repr(a) if (not a or " " in a) else a for a in args)
        if stdin is not None:
            cmd += f"  <<< {stdin!r}"
        if got != want:
            self.differs(cmd, got, want)
        # Guards the scenario itself: a command that does not do what the test means proves nothing.
        if expect_rc is not None:
            assert want.rc == expect_rc, f"oracle gave an unexpected exit code for {cmd}:\n{want.show()}"
        return want



@pytest.fixture
def pair(fastetcd_endpoint: str, etcd_endpoint: str) -> Iterator[Pair]:
    with Pair(fastetcd_endpoint, etcd_endpoint) as p:
        yield p


SORT_TARGETS = ("KEY", "VERSION", "CREATE", "MODIFY", "VALUE")


def _seed_keys(p: Pair) -> None:
    # Values out of key order and keys written several times, so every sort target gives its own order.
    writes = [
        ("a/1", "zz"), ("a/2", "mm"), ("a/3", "aa"), ("b/1", "x"), ("a/2", "nn"),
        ("a/4", ""), ("a/2", "bb"), ("a/5", "q q"), ("b/2", "y"), ("a/1", "cc"), ("c", "top"),
    ]
    for key, value in writes:
        p.run("put", key, value, expect_rc=0)


def test_put_get_variants(pair: Pair) -> None:
    p = pair
    _seed_keys(p)
    p.run("put", "a/3", "again", "--prev-kv")
    p.run("put", "a/3", "json", "--prev-kv", "-w", "json")
    p.run("put", "a/9", "fresh", "-w", "json")
    p.run("get", "a/1", expect_rc=0)
    p.run("get", "missing")
    p.run("get", "a/1", "-w", "json")
    p.run("get", "missing", "-w", "json")
    p.run("get", "a/", "--prefix")
    p.run("get", "a/", "--prefix", "-w", "json")
    p.run("get", "--prefix", "")
    p.run("get", "a/3", "--from-key")
    p.run("get", "--from-key", "")
    p.run("get", "a/2", "a/5")
    p.run("get", "a/5", "a/2")
    p.run("get", "a/", "--prefix", "--limit", "2")
    p.run("get", "a/", "--prefix", "--limit", "2", "-w", "json")
    p.run("get", "a/", "--prefix", "--limit", "100")
    for target in SORT_TARGETS:
        for order in ("ASCEND", "DESCEND"):
            p.run("get", "a/", "--prefix", f"--sort-by={target}", f"--order={order}")
            p.run("get", "--from-key", "a/2", f"--sort-by={target}", f"--order={order}", "--limit", "3")
        p.run("get", "a/", "--prefix", f"--sort-by={target}", "-w", "json")
        p.run("get", "a/", "--prefix", f"--sort-by={target}", "--limit", "2")
    p.run("get", "a/", "--prefix", "--order=DESCEND")
    p.run("get", "a/", "--prefix", "--order=DESCEND", "--limit", "2", "-w", "json")
    for rev in ("1", "2", "4", "7", "12"):
        p.run("get", "a/", "--prefix", f"--rev={rev}")
        p.run("get", "a/2", f"--rev={rev}", "-w", "json")
    p.run("get", "a/", "--prefix", "--keys-only")
    p.run("get", "a/", "--prefix", "--keys-only", "-w", "json")
    p.run("get", "a/", "--prefix", "--count-only")
    p.run("get", "a/", "--prefix", "--count-only", "-w", "json")
    p.run("get", "a/", "--prefix", "--count-only", "--limit", "1", "-w", "json")
    p.run("get", "a/", "--prefix", "--print-value-only")
    p.run("get", "a/", "--prefix", "--print-value-only", "--keys-only")
    p.run("get", "a/", "--prefix", "--consistency=s", "-w", "json")
    p.run("get", "a/1", "--rev=1000", expect_rc=1)
    p.run("get", "", expect_rc=1)
    p.run("get", "a/", "--prefix", "--limit", "-1")
    p.run("put", "", "v", expect_rc=1)
    p.run("put", "k", "v", "--lease=1234", expect_rc=1)
    p.run("put", "k", "v", "--lease=zz")
    p.run("put", "a/1", "--ignore-value")
    p.run("put", "a/1", "x", "--ignore-value")
    p.run("put", "nokey", "--ignore-value")
    p.run("put", "a/1", "y", "--ignore-lease")
    p.run("put", "nokey", "y", "--ignore-lease")
    p.run("get", "", "--prefix", "-w", "json")
    p.check()


def test_del_variants(pair: Pair) -> None:
    p = pair
    _seed_keys(p)
    p.run("del", "a/1", expect_rc=0)
    p.run("del", "a/1")
    p.run("del", "missing", "-w", "json")
    p.run("del", "a/2", "--prev-kv")
    p.run("del", "a/3", "--prev-kv", "-w", "json")
    p.run("del", "a/", "--prefix", "--prev-kv")
    p.run("get", "", "--prefix", "-w", "json")
    p.run("put", "a/1", "back")
    p.run("put", "a/7", "seven")
    p.run("del", "a/", "--prefix", "-w", "json")
    p.run("del", "b/1", "b/3", "--prev-kv")
    p.run("put", "d/1", "1")
    p.run("put", "d/2", "2")
    p.run("del", "b", "--from-key", "--prev-kv")
    p.run("get", "", "--from-key", "-w", "json")
    p.run("del", "", expect_rc=1)
    p.run("del", "", "--prefix")
    p.run("get", "a/", "--prefix", "--rev=5")
    p.run("get", "", "--prefix", "--rev=12", "-w", "json")
    p.check()


TXN_SCRIPTS = [
    # (compares, success ops, failure ops)
    (['value("a/1") = "cc"', 'version("a/2") > "2"'], ["put t/1 s1", "get a/1"], ["del a/1"]),
    (['value("a/1") = "nope"'], ["put t/1 s2"], ["put t/2 f1", "get a/ --prefix", "del b/1 --prev-kv"]),
    (['create("a/3") = "4"', 'mod("a/2") < "100"'], ["get a/ --prefix --limit=2"], ["put t/3 f"]),
    (['mod("a/2") != "7"'], ["put t/4 m"], ["put t/4 n"]),
    (['version("nothere") = "0"', 'create("nothere") = "0"'], ["put nothere now", "get nothere"], []),
    (['value("a/5") > "q"', 'value("a/5") < "r"'], ["del a/5 --prev-kv"], ["get a/5"]),
    (['version("a/2") = "3"'], ["get a/2 --rev=2"], ["get a/2"]),
    (['mod("a/4") > "1"'], ["put t/5 dup", "put t/5 dup2"], []),
    ([], ["get t/ --prefix --count-only"], []),
    ([], [], []),
]


def _txn_stdin(compares: list[str], success: list[str], failure: list[str]) -> str:
    # etcdctl's interactive txn reads three blocks, each ended by an empty line.
    blocks = [compares, success, failure]
    return "".join("".join(line + "\n" for line in block) + "\n" for block in blocks)


@pytest.mark.parametrize("writer", ["simple", "json"])
def test_txn_interactive(pair: Pair, writer: str) -> None:
    p = pair
    _seed_keys(p)
    for compares, success, failure in TXN_SCRIPTS:
        p.run("txn", "-i", "-w", writer, stdin=_txn_stdin(compares, success, failure))
    p.run("get", "", "--prefix", "-w", "json")
    p.check()


def test_compaction_and_revision_errors(pair: Pair) -> None:
    p = pair
    _seed_keys(p)  # revisions 2..12
    p.run("compaction", "5", expect_rc=0)
    p.run("get", "a/", "--prefix", "--rev=4", expect_rc=1)
    p.run("get", "a/", "--prefix", "--rev=5", expect_rc=0)
    p.run("get", "a/2", "--rev=6", "-w", "json")
    p.run("compaction", "5", expect_rc=1)
    p.run("compaction", "3", expect_rc=1)
    p.run("compaction", "99", expect_rc=1)
    p.run("get", "a/1", "--rev=99", expect_rc=1)
    p.run("get", "a/1", "--rev=13", expect_rc=1)
    p.run("get", "a/1", "--rev=12", expect_rc=0)
    p.run("del", "a/2")
    p.run("compaction", "--physical", "13", expect_rc=0)
    p.run("get", "a/", "--prefix", "--rev=12", expect_rc=1)
    p.run("get", "a/", "--prefix", "--rev=13", "-w", "json")
    p.run("get", "", "--prefix", "-w", "json")
    p.run("txn", "-i", stdin=_txn_stdin([], ["get a/1 --rev=3"], []))
    p.run("txn", "-i", stdin=_txn_stdin([], ["get a/1 --rev=50"], []))
    p.run("txn", "-i", stdin=_txn_stdin(['mod("a/1") = "0"'], ["get a/1 --rev=3"], ["get a/1 --rev=13"]))
    p.run("put", "after", "compaction", expect_rc=0)
    p.run("get", "after", "-w", "json")
    p.run("compaction", "0")
    p.check()


def test_normalize_masks_only_what_differs() -> None:
    """The normalization must not hide real differences: values and revisions survive it."""
    a = '{"header":{"cluster_id":1,"member_id":2,"revision":3,"raft_term":4},"count":1}'
    b = '{"header":{"cluster_id":9,"member_id":8,"revision":3,"raft_term":7},"count":1}'
    c = '{"header":{"cluster_id":9,"member_id":8,"revision":4,"raft_term":7},"count":1}'
    assert normalize(a, "x") == normalize(b, "x")
    assert normalize(a, "x") != normalize(c, "x")
    log = ('{"level":"warn","ts":"T","logger":"etcd-client","caller":"c","msg":"m",'
           '"target":"etcd-endpoints://0xc000/127.0.0.1:1","attempt":0,"error":"rpc error: code = X"}')
    masked = json.loads(normalize(log, "127.0.0.1:1"))
    assert "ts" not in masked and "target" not in masked
    assert masked["error"] == "rpc error: code = X"
