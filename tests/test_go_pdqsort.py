"""engine/go_pdqsort.py sorts exactly as Go's sort.Sort (the Go that builds etcd 3.7) does, ties included.

Go's sort.Sort is not stable, so the order of equal elements is the algorithm's own; etcd 3.7 sorts
RangeStream chunks with it (a sort target other than KEY). The same inputs (ascending, descending, runs of
ties, random with few distinct values, long enough to reach pdqsort's ninther, pattern breaking and heap sort)
are sorted by a Go program and by go_pdqsort; the permutations must be identical.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

from fastetcd.engine.go_pdqsort import go_pdqsort

GO_PROGRAM = """package main

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

type item struct{ k, idx int }
type byK []item

func (s byK) Len() int           { return len(s) }
func (s byK) Less(i, j int) bool { return s[i].k < s[j].k }
func (s byK) Swap(i, j int)      { s[i], s[j] = s[j], s[i] }

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		fields := strings.Fields(in.Text())
		s := make(byK, len(fields))
		for i, f := range fields {
			k, _ := strconv.Atoi(f)
			s[i] = item{k, i}
		}
		sort.Sort(s)
		for i, it := range s {
			if i > 0 {
				out.WriteByte(' ')
			}
			fmt.Fprint(out, it.idx)
		}
		out.WriteByte('\\n')
	}
}
"""


def cases() -> list[list[int]]:
    rng = random.Random(7)
    out: list[list[int]] = [[], [1], [2, 1]]
    for n in (5, 11, 12, 13, 21, 41, 49, 50, 51, 81, 161, 321, 700, 2000):
        out.append(list(range(n)))
        out.append(list(range(n, 0, -1)))
        out.append([i // 3 for i in range(n)])
        out.append([(n - i) // 4 for i in range(n)])
        out.append([1] * n)
        for distinct in (2, 5, n):
            out.append([rng.randrange(distinct) for _ in range(n)])
        out.append([i % 7 for i in range(n)])  # sawtooth: unbalanced partitions, pattern breaking
        out.append([0 if i % 2 else i for i in range(n)])
    return out


def test_go_pdqsort_matches_go(tmp_path: Path) -> None:
    go = shutil.which("go")
    assert go, "Go is needed (it builds the etcd 3.7 reference too: ci/build_etcd37.sh)"
    (tmp_path / "main.go").write_text(GO_PROGRAM)
    env = dict(os.environ, GOTOOLCHAIN="local", GOFLAGS="", GO111MODULE="on")
    subprocess.run([go, "build", "-o", str(tmp_path / "gosort"), str(tmp_path / "main.go")], env=env,
                   check=True, cwd=tmp_path, capture_output=True)  # fmt: skip
    inputs = cases()
    text = "".join(" ".join(map(str, c)) + "\n" for c in inputs)
    got = subprocess.run([str(tmp_path / "gosort")], input=text, capture_output=True, text=True, check=True)
    want = [[int(x) for x in line.split()] for line in got.stdout.splitlines()]
    assert len(want) == len(inputs)
    for keys, perm in zip(inputs, want, strict=True):
        items = [(k, i) for i, k in enumerate(keys)]
        go_pdqsort(items, lambda a, b: a[0] < b[0])
        assert [i for _, i in items] == perm, f"differs from Go for {len(keys)} keys {keys[:20]}..."
