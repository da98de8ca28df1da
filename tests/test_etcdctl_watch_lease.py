"""etcdctl 3.5.1's watch and lease commands as a black box: the same command sequence against fastetcd and
real etcd must give the same stdout, stderr and exit codes.

Normalized on top of test_etcdctl_compat's rules (header ids, client log lines, endpoint):
- lease ids, which each server chooses itself: every id is named <L0>, <L1>, … in order of first
  appearance in that server's output (hex in text, decimal in JSON / fields output), and commands refer to
  a lease by that name ({L0} in the arguments is replaced with the server's own hex id);
- remaining TTLs, which depend on timing: masked once both servers' values agree within 2 s;
- the keys attached to a lease, which etcd lists in Go map order: sorted.

Watches run in the background while the writes happen; each write is acknowledged before the next, and
the output is taken once a final marker write has shown up in every watch (then the watch is stopped), so
complete output is compared, not a timing sample. Events of different watches never share a process, so
their interleaving (Go map order in etcd) does not matter, except in `watch -i`, whose watches are kept on
disjoint keys and fed one step at a time.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from etcdctl_compare import Comparison, Outcome, json_line, normalize

from fastetcd.testing import etcdctl_command, etcdctl_env, run_etcdctl

TTL_TOLERANCE_S = 2
WATCH_START_S = 1.0  # etcdctl needs well under this to connect and create its watch
MARKER_TIMEOUT_S = 15.0

_HEX_ID = re.compile(r"(?<![0-9A-Za-z])[0-9a-f]{16}(?![0-9A-Za-z])")
_REMAINING = re.compile(r"remaining\((-?\d+)s\)")
_ATTACHED = re.compile(r"attached keys\(\[([^\]]*)\]\)")
_ARG_LEASE = re.compile(r"\{L(\d+)\}")
_FIELDS_ID = re.compile(r'^"(ClusterID|MemberID|RaftTerm)" : \d+$')
_FIELDS_LEASE = re.compile(r'^"Lease" : (\d+)$')
_LEASE_FIELDS = ("ID", "id", "lease")


class ServerView:
    """One server as etcdctl sees it, with the names given to the lease ids it chose."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.names: dict[int, str] = {}
        self.ids: dict[int, int] = {}  # name number -> id

    def name(self, lease_id: int) -> str:
        if lease_id not in self.names:
            self.ids[len(self.names)] = lease_id
            self.names[lease_id] = f"<L{len(self.names)}>"
        return self.names[lease_id]

    def sub(self, text: str) -> str:
        """{Ln} in a command's arguments or input -> this server's id for <Ln>, in hex."""
        return _ARG_LEASE.sub(lambda m: f"{self.ids[int(m.group(1))]:x}", text)

    def args(self, args: Sequence[str]) -> list[str]:
        return [self.sub(a) for a in args]

    def normalize(self, text: str) -> tuple[str, list[int]]:
        """(normalized text, the remaining TTLs that were masked, in order)."""
        ttls: list[int] = []
        lines = []
        for line in normalize(text, self.endpoint).split("\n"):
            doc = json_line(line)
            if doc is not None:
                lines.append(json.dumps(self._json(doc, ttls)))
                continue
            if _FIELDS_ID.match(line):
                line = line.rsplit(":", 1)[0] + ": <id>"
            elif m := _FIELDS_LEASE.match(line):
                line = f'"Lease" : {self._id_or_zero(int(m.group(1)))}'
            line = _HEX_ID.sub(lambda m: self.name(int(m.group(0), 16)), line)

            def remaining(m: re.Match[str]) -> str:
                ttls.append(int(m.group(1)))
                return "remaining(<ttl>)"

            line = _REMAINING.sub(remaining, line)
            line = _ATTACHED.sub(lambda m: f"attached keys([{' '.join(sorted(m.group(1).split()))}])", line)
            lines.append(line)
        return "\n".join(lines), ttls

    def _id_or_zero(self, value: int) -> str:
        return self.name(value) if value else "0"

    def _json(self, value: object, ttls: list[int]) -> object:
        if isinstance(value, list):
            return [self._json(v, ttls) for v in value]
        if not isinstance(value, dict):
            return value
        out = {}
        for k, v in value.items():
            if k in _LEASE_FIELDS and isinstance(v, int) and not isinstance(v, bool):
                out[k] = self._id_or_zero(v)
            elif k == "ttl" and "granted-ttl" in value and isinstance(v, int) and v >= 0:
                ttls.append(v)
                out[k] = "<ttl>"
            elif k == "keys" and isinstance(v, list):
                out[k] = sorted(v)
            else:
                out[k] = self._json(v, ttls)
        return out


class LeasePair(Comparison):
    """Runs every command on both servers (see Comparison), each with its own names for lease ids."""

    def __init__(self, subject: str, oracle: str) -> None:
        super().__init__()
        self.views = (ServerView(subject), ServerView(oracle))

    @property
    def subject(self) -> ServerView:
        return self.views[0]

    @property
    def oracle(self) -> ServerView:
        return self.views[1]

    def _one(self, view: ServerView, args: Sequence[str], stdin: str | None) -> tuple[int, str, str]:
        return run_etcdctl(view.endpoint, view.args(args), stdin=None if stdin is None else view.sub(stdin))

    def run(self, *args: str, stdin: str | None = None, expect_rc: int | None = None) -> Outcome:
        self.count += 1
        got_f = self.pool.submit(self._one, self.subject, args, stdin)
        want_raw = self._one(self.oracle, args, stdin)
        got_raw = got_f.result()
        # Normalized in a fixed order so both servers name their leases in the same sequence.
        got, want = self.compare(" ".join(args), [got_raw, want_raw], stdin)
        if expect_rc is not None:
            assert want.rc == expect_rc, f"oracle gave an unexpected exit code for {args}:\n{want.show()}"
        return want

    def compare(self, what: str, raw: list[tuple[int, str, str]], stdin: str | None = None
                ) -> tuple[Outcome, Outcome]:
        outs: list[Outcome] = []
        ttls: list[list[int]] = []
        for view, (rc, out, err) in zip(self.views, raw, strict=True):
            n_out, t_out = view.normalize(out)
            n_err, t_err = view.normalize(err)
            outs.append(Outcome(rc, n_out, n_err))
            ttls.append(t_out + t_err)
        got, want = outs
        cmd = f"etcdctl {what}" + (f"  <<< {stdin!r}" if stdin is not None else "")
        if got != want:
            self.differs(cmd, got, want)
        elif len(ttls[0]) != len(ttls[1]) or any(abs(a - b) > TTL_TOLERANCE_S
                                                   for a, b in zip(*ttls, strict=True)):
            self.mismatches.append(f"$ {cmd}\nremaining TTLs differ: fastetcd {ttls[0]}, etcd {ttls[1]}")
        return got, want



class BackgroundCtl:
    """The same long-running etcdctl command (a watch) on both servers, output collected in files."""

    def __init__(self, pair: LeasePair, tmp: Path, label: str, args: Sequence[str],
                 interactive: bool = False) -> None:
        self.pair = pair
        self.label = label
        self.args = list(args)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.paths: list[tuple[Path, Path]] = []
        for i, view in enumerate(pair.views):
            out, err = tmp / f"{label}.{i}.out", tmp / f"{label}.{i}.err"
            self.paths.append((out, err))
            with open(out, "wb") as fo, open(err, "wb") as fe:
                self.procs.append(subprocess.Popen(
                    [*etcdctl_command(view.endpoint), *view.args(args)],  # TLS flags under --tls
                    stdin=subprocess.PIPE if interactive else subprocess.DEVNULL, stdout=fo, stderr=fe,
                    env=etcdctl_env(), start_new_session=True))

    def outputs(self) -> list[bytes]:
        return [out.read_bytes() + err.read_bytes() for out, err in self.paths]

    def wait_for(self, marker: bytes, timeout: float = MARKER_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(marker in o for o in self.outputs()):
                return True
            time.sleep(0.05)
        return False

    def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Until neither output has changed for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        last, since = self.outputs(), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet:
            time.sleep(0.05)
            now = self.outputs()
            if now != last:
                last, since = now, time.monotonic()

    def feed(self, line: str) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(line.encode() + b"\n")
            p.stdin.flush()

    def stop(self) -> None:
        """Interactive: end its input (etcdctl then exits by itself); otherwise SIGTERM. Then compare."""
        for p in self.procs:
            if p.stdin is not None:
                p.stdin.close()
            elif p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        raw = [(p.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"))
               for p, (out, err) in zip(self.procs, self.paths, strict=True)]
        self.pair.count += 1
        self.pair.compare(" ".join(self.args) + f"  (in the background: {self.label})", raw)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


@pytest.fixture
def pair(fastetcd_endpoint: str, etcd_endpoint: str) -> Iterator[LeasePair]:
    with LeasePair(fastetcd_endpoint, etcd_endpoint) as p:
        yield p


@pytest.fixture
def background(pair: LeasePair, tmp_path: Path) -> Iterator[list[BackgroundCtl]]:
    """Start with BackgroundCtl(...) and append here: whatever is left running is killed at teardown."""
    started: list[BackgroundCtl] = []
    try:
        yield started
    finally:
        for b in started:
            b.kill()


def _start(background: list[BackgroundCtl], pair: LeasePair, tmp: Path, label: str, *args: str,
           interactive: bool = False) -> BackgroundCtl:
    b = BackgroundCtl(pair, tmp, label, args, interactive=interactive)
    background.append(b)
    return b


def _stop_all(watches: list[BackgroundCtl], marker: bytes) -> None:
    missing = [w.label for w in watches if not w.wait_for(marker)]
    for w in watches:
        w.stop()
    assert not missing, f"the final write never reached the watches {missing} on both servers"


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_watch_in_background(pair: LeasePair, background: list[BackgroundCtl], tmp_path: Path) -> None:
    p = pair
    p.run("put", "w/1", "a", expect_rc=0)  # revision 2
    p.run("put", "w/2", "b", expect_rc=0)
    p.run("put", "x/1", "outside", expect_rc=0)
    exec_echo = 'echo "[$ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_REVISION $ETCD_WATCH_KEY $ETCD_WATCH_VALUE]"'
    specs = {
        "single": ["watch", "w/1"],
        "prefix": ["watch", "w/", "--prefix"],
        "prefix_prev": ["watch", "w/", "--prefix", "--prev-kv"],
        "range": ["watch", "w/1", "w/3"],
        "all": ["watch", "--prefix", ""],
        "replay": ["watch", "--rev=2", "w/", "--prefix", "--prev-kv"],
        "replay_all": ["watch", "--rev=1", "--prefix", ""],
        "json": ["watch", "w/", "--prefix", "--prev-kv", "-w", "json"],
        "fields": ["watch", "w/1", "-w", "fields"],
        "exec": ["watch", "w/1", "--", "sh", "-c", exec_echo],
    }
    watches = [_start(background, p, tmp_path, label, *args) for label, args in specs.items()]
    # The replays print at once: proof that etcdctl is connected; live watches get a moment more.
    assert watches[5].wait_for(b"w/2"), "replay watch printed nothing"
    time.sleep(WATCH_START_S)
    p.run("put", "w/1", "b", expect_rc=0)
    p.run("put", "w/3", "c")
    p.run("put", "w/1", "with space")
    p.run("del", "w/2", expect_rc=0)
    p.run("del", "w/nothing")
    p.run("txn", "-i", stdin="\nput w/4 t4\ndel w/1\nput x/2 out\n\n\n", expect_rc=0)
    p.run("put", "w/1", "")
    p.run("del", "w/", "--prefix", "--prev-kv")
    p.run("put", "w/1", "END")
    _stop_all([w for w in watches if w.label != "json"], b"END")
    _stop_all([w for w in watches if w.label == "json"], _b64("END"))
    p.check()


def test_watch_compacted_and_replay(pair: LeasePair, background: list[BackgroundCtl], tmp_path: Path) -> None:
    p = pair
    for i in range(6):
        p.run("put", "c/1", f"v{i}", expect_rc=0)  # revisions 2..7
    p.run("put", "c/2", "other", expect_rc=0)  # 8
    p.run("compaction", "5", expect_rc=0)
    # Below the compaction: the watch is canceled and etcdctl exits by itself.
    p.run("watch", "--rev=4", "c/1", expect_rc=5)
    p.run("watch", "--rev=1", "c/", "--prefix", "-w", "json", expect_rc=5)
    p.run("watch", "--rev=2", "c/1", "--prev-kv", "-w", "fields", expect_rc=5)
    # At and after the compaction: replay. etcd looks prev_kv up at mod_revision - 1, which for the event at
    # the compaction revision itself is compacted away, so that event has none.
    watches = [
        _start(background, p, tmp_path, "at_compaction", "watch", "--rev=5", "c/1", "--prev-kv"),
        _start(background, p, tmp_path, "after", "watch", "--rev=6", "c/", "--prefix", "--prev-kv"),
        _start(background, p, tmp_path, "future", "watch", "--rev=11", "c/", "--prefix"),
    ]
    assert watches[0].wait_for(b"v5"), "replay from the compaction revision printed nothing"
    time.sleep(WATCH_START_S)
    p.run("put", "c/2", "r9")  # 9: before the future watch's start
    p.run("del", "c/2")  # 10
    p.run("put", "c/1", "r11")  # 11
    p.run("put", "c/1", "END")
    _stop_all(watches, b"END")
    p.run("compaction", "--physical", "11", expect_rc=0)
    p.run("watch", "--rev=10", "c/1", expect_rc=5)
    p.check()


def test_watch_interactive(pair: LeasePair, background: list[BackgroundCtl], tmp_path: Path) -> None:
    p = pair
    p.run("put", "i/old", "before", expect_rc=0)  # revision 2
    p.run("compaction", "2", expect_rc=0)
    w = _start(background, p, tmp_path, "interactive", "watch", "-i", interactive=True)
    # Each watch on its own keys; one step at a time, so the output order is that of the steps.
    for line in [
        "watch i/a",
        "watch i/p/ --prefix --prev-kv",
        "watch --rev=1 i/c",  # below the compaction
        "bogus i/a",
        "watch",
        "",
        "watch i/r1 i/r3",
        "watch --progress-notify i/n",
        # Last: the client creates watches one after another, so its replay shows all the others exist.
        "watch --rev=2 i/old",
    ]:
        w.feed(line)
        w.settle()
    assert w.wait_for(b"before"), "the replaying watch printed nothing"
    for args in [
        ("put", "i/a", "1"),
        ("put", "i/p/x", "1"),
        ("put", "i/p/x", "2"),
        ("put", "i/r2", "in range"),
        ("put", "i/r3", "outside range"),
        ("put", "i/old", "after"),
        ("del", "i/p/x"),
        ("put", "i/n", "notified"),
    ]:
        p.run(*args)
        w.settle()
    # A WatchProgressRequest: the reply (watch_id -1) goes to every watch of the stream.
    w.feed("progress")
    w.settle()
    p.run("put", "i/a", "END")
    assert w.wait_for(b"END")
    w.stop()  # closing stdin ends etcdctl with an input error, the same on both
    p.check()


def test_lease_commands(pair: LeasePair, background: list[BackgroundCtl], tmp_path: Path) -> None:
    p = pair
    # From revision 2 (the first write): nothing is missed however long etcdctl takes to start.
    watch = _start(background, p, tmp_path, "lease_keys", "watch", "--rev=2", "lk/", "--prefix", "--prev-kv")
    p.run("lease", "grant", "600", expect_rc=0)  # <L0>
    p.run("lease", "grant", "900", "-w", "json", expect_rc=0)  # <L1>
    p.run("lease", "grant", "300", expect_rc=0)  # <L2>: expires first, so `lease list` shows it first
    p.run("lease", "list")
    p.run("lease", "list", "-w", "json")
    p.run("put", "--lease={L0}", "lk/1", "v1", expect_rc=0)
    p.run("put", "--lease={L0}", "lk/2", "v2", expect_rc=0)
    p.run("put", "--lease={L1}", "lk/3", "v3", expect_rc=0)
    p.run("put", "--lease={L1}", "lk/4", "v4", "--prev-kv", "-w", "json", expect_rc=0)
    p.run("txn", "-i", stdin="\nput lk/5 v5 --lease={L0}\n\n\n")
    p.run("get", "lk/", "--prefix", "-w", "json")
    p.run("lease", "timetolive", "{L0}", expect_rc=0)
    p.run("lease", "timetolive", "{L0}", "--keys")
    p.run("lease", "timetolive", "{L0}", "--keys", "-w", "json")
    p.run("lease", "timetolive", "{L2}", "--keys")
    p.run("lease", "timetolive", "{L2}", "--keys", "-w", "json")
    p.run("lease", "keep-alive", "--once", "{L2}", expect_rc=0)
    p.run("lease", "keep-alive", "--once", "{L1}", "-w", "json", expect_rc=0)
    p.run("put", "lk/3", "detached")  # a put without --lease detaches the key
    p.run("put", "lk/4", "kept", "--ignore-lease")
    p.run("lease", "timetolive", "{L1}", "--keys")
    p.run("get", "lk/3", "-w", "json")
    p.run("get", "lk/4", "-w", "json")
    p.run("lease", "revoke", "{L0}", expect_rc=0)
    p.run("get", "lk/", "--prefix")  # lk/1, lk/2 and lk/5 went with the lease
    p.run("lease", "timetolive", "{L0}")
    p.run("lease", "timetolive", "{L0}", "--keys", "-w", "json")
    p.run("lease", "list")
    # A revoked or never granted lease.
    p.run("lease", "revoke", "{L0}", expect_rc=1)
    p.run("lease", "keep-alive", "--once", "{L0}")
    p.run("put", "--lease={L0}", "lk/9", "x", expect_rc=1)
    p.run("txn", "-i", stdin="\nput lk/9 v --lease=1234\n\n\n")
    p.run("lease", "revoke", "1234", expect_rc=1)
    p.run("lease", "timetolive", "1234", expect_rc=0)
    p.run("lease", "timetolive", "1234", "-w", "json")
    p.run("lease", "keep-alive", "--once", "1234")
    # Bad arguments and out-of-range TTLs.
    p.run("lease", "revoke", "zz")
    p.run("lease", "timetolive", "zz")
    p.run("lease", "grant")
    p.run("lease", "grant", "abc")
    p.run("lease", "grant", "9999999999999", expect_rc=1)
    p.run("lease", "revoke", "{L1}", expect_rc=0)  # takes lk/4 with it
    p.run("lease", "revoke", "{L2}", "-w", "json", expect_rc=0)  # no keys: no new revision
    p.run("lease", "list", "-w", "json")
    p.run("get", "", "--prefix", "-w", "json")
    p.run("put", "lk/end", "END")
    _stop_all([watch], b"END")
    p.check()


def test_lease_expiry(pair: LeasePair, background: list[BackgroundCtl], tmp_path: Path) -> None:
    """The server expires leases itself: their keys go in one revision; TTLs below the minimum are raised.
    One short lease has keys: etcd revokes leases that expire together in concurrent goroutines, so the
    order of two such revocations would be chance."""
    p = pair
    watch = _start(background, p, tmp_path, "expiry", "watch", "--rev=2", "e/", "--prefix", "--prev-kv")
    p.run("lease", "grant", "600", expect_rc=0)  # <L0> outlives the test
    p.run("lease", "grant", "1", expect_rc=0)  # <L1>: raised to etcd's minimum TTL (2 s here)
    p.run("lease", "grant", "0", expect_rc=0)  # <L2>: likewise, and no keys
    puts = "put e/1 one --lease={L1}\nput e/2 two --lease={L1}\nput e/3 three --lease={L0}\n"
    p.run("txn", "-i", stdin=f"\n{puts}\n\n", expect_rc=0)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = [run_etcdctl(v.endpoint, ["lease", "list"])[1].count("\n") for v in p.views]
        if left == [2, 2]:  # "found 1 leases" and <L0>
            break
        time.sleep(0.25)
    p.run("get", "e/", "--prefix", "-w", "json")
    p.run("lease", "timetolive", "{L1}", "--keys")
    p.run("lease", "timetolive", "{L2}", "-w", "json")
    p.run("lease", "list")
    p.run("lease", "keep-alive", "--once", "{L1}")
    p.run("put", "e/end", "END")
    _stop_all([watch], b"END")
    p.check()


def test_view_normalization_keeps_differences() -> None:
    """Lease names follow first appearance; masked TTLs are still checked; real differences survive."""
    a, b = ServerView("127.0.0.1:1"), ServerView("127.0.0.1:2")
    ta, _ = a.normalize("lease 390da2168b9ab906 granted with TTL(60s)\nlease 390da2168b9ab908 granted")
    tb, _ = b.normalize("lease 694d7d5a1f5c5e04 granted with TTL(60s)\nlease 694d7d5a1f5c5e00 granted")
    assert ta == tb == "lease <L0> granted with TTL(60s)\nlease <L1> granted"
    assert a.args(["put", "--lease={L1}", "k"]) == ["put", "--lease=390da2168b9ab908", "k"]
    ja, tta = a.normalize('{"id":4111120252574284038,"ttl":28,"granted-ttl":60,"keys":["azI=","azE="]}')
    assert json.loads(ja) == {"id": "<L0>", "ttl": "<ttl>", "granted-ttl": 60, "keys": ["azE=", "azI="]}
    assert tta == [28]
    text, ttls = b.normalize("lease 694d7d5a1f5c5e04 granted with TTL(60s), remaining(57s), "
                             "attached keys([k2 k1])")
    assert text == "lease <L0> granted with TTL(60s), remaining(<ttl>), attached keys([k1 k2])"
    assert ttls == [57]
    assert a.normalize("lease 390da2168b9ab906 granted with TTL(60s)")[0] != \
        b.normalize("lease 694d7d5a1f5c5e04 granted with TTL(30s)")[0]
