// Command lincheck decides whether a history of etcd KV operations, recorded by concurrent clients
// (tests/linearizability/recorder.py), is linearizable, using porcupine
// (github.com/anishathalye/porcupine).
//
//	lincheck [-timeout 2m] [-html out.html] [-report out.json] history.json
//
// Exit status: 0 linearizable, 1 not (with a short explanation), 2 bad input, 3 undecided (porcupine
// timed out). -html writes porcupine's visualization; -report a JSON summary the tests read.
//
// # The model
//
// The sequential specification is etcd's KV store over the history's key set, as ONE object: the state
// is every key's (value, create_revision, mod_revision, version) and the store's revision. Operations:
// Put, Range of one key, Range of the whole key set, DeleteRange of one key, and Txn compare-and-swap
// (If mod_revision == m, or If value == v, Then Put Else Range). Every answer is checked with its header
// revision: a write that changes something answers exactly the previous revision + 1 (etcd's revisions
// are gapless), anything else answers the current revision, and a Range shows the state at that
// revision. So a read is pinned between the writes that made revision H and H+1, and a read that reports
// a fresh revision with old data is caught as surely as one that reports its old revision.
//
// Why not partitioned by key (porcupine's P-compositionality): the revision counter is shared by all
// keys, so per-key histories are not independent, and a per-key model would lose exactly the cross-key
// checks that matter here (a read's header revision against writes to other keys, snapshot atomicity
// of a multi-key Range). Partitioning is also unnecessary: because every known operation answers a
// revision that fixes its place among the writes, porcupine's search is nearly linear in the history
// (thousands of operations check in well under a second), except around writes of unknown outcome,
// which prepare.go resolves where the rest of the history decides them.
//
// Unknown outcomes (an error or a timeout): the operation has an infinite return time and porcupine may
// linearize it anywhere after its call; a write is then either applied once or not at all (the model is
// nondeterministic for it). Serializable reads are not linearizable in general (a cluster member answers
// them from local state); they are kept out of porcupine's history and get the weaker snapshot check in
// serializable.go.
//
// Besides porcupine, direct checks (prepare.go) name the operations behind the commonest violations:
// revisions that go back in real time, two writes with one revision, a read of a value nobody wrote or
// with a mod_revision its write did not get. A history fails if any check fails.
//
// # Limits
//
//   - Only the operations above; no leases, watches, compaction or multi-op transactions, and a range_all
//     must cover exactly the key set (the recorder's prefix), so a foreign key in it is a violation.
//   - Values must be unique per write: the preprocessing names a write by the value a read saw.
//   - Real time is the recorder's clock: an operation's interval is from just before the client sent it
//     to just after it got the answer, so it contains the server's true interval; that makes the check
//     more lenient (a little concurrency that was not there), never wrong.
//   - Linearizability is NP-hard in general; with many unresolved unknown writes porcupine may time out
//     (exit 3). The recorder keeps those few (a client whose write failed reads until the server answers).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/anishathalye/porcupine"
)

// Report is what -report writes.
type Report struct {
	Result        string   `json:"result"`    // "linearizable", "not linearizable", "undecided"
	Porcupine     string   `json:"porcupine"` // "Ok", "Illegal", "Unknown"
	Ops           int      `json:"ops"`
	Checked       int      `json:"checked"`
	Serializable  int      `json:"serializable"`
	DroppedReads  int      `json:"dropped_unknown_reads"`
	DroppedWrites int      `json:"dropped_unknown_writes"`
	Patched       int      `json:"patched_unknown_writes"`
	KeptUnknown   int      `json:"kept_unknown_writes"`
	Gaps          []int64  `json:"revision_gaps"`
	Violations    []string `json:"violations"`
	SerialIssues  []string `json:"serializable_violations"`
	Explanation   []string `json:"explanation"`
	Seconds       float64  `json:"seconds"`
}

func main() {
	timeout := flag.Duration("timeout", 2*time.Minute, "give up (exit 3) after this long")
	html := flag.String("html", "", "write porcupine's visualization of the history to this file")
	reportPath := flag.String("report", "", "write a JSON summary to this file")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: lincheck [-timeout d] [-html file] [-report file] history.json")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	h, err := loadHistory(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "lincheck:", err)
		os.Exit(2)
	}
	rep := check(h, *timeout, *html)
	if *reportPath != "" {
		data, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(*reportPath, data, 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "lincheck:", err)
			os.Exit(2)
		}
	}
	printReport(rep)
	switch rep.Result {
	case "linearizable":
		os.Exit(0)
	case "undecided":
		os.Exit(3)
	}
	os.Exit(1)
}

func check(h *History, timeout time.Duration, html string) *Report {
	start := time.Now()
	p := prepare(h)
	rep := &Report{
		Ops: len(h.Ops), Checked: len(p.checked), Serializable: len(p.serializable),
		DroppedReads: p.droppedReads, DroppedWrites: p.droppedWrites, Patched: p.patched,
		KeptUnknown: p.keptUnknown, Gaps: p.gaps, Violations: p.violations,
	}
	rep.SerialIssues = checkSerializable(h, p)
	// Empty lists, not JSON nulls, in the report.
	for _, list := range []*[]string{&rep.Violations, &rep.SerialIssues, &rep.Explanation} {
		if *list == nil {
			*list = []string{}
		}
	}
	if rep.Gaps == nil {
		rep.Gaps = []int64{}
	}
	model := kvModel(h)
	ops := make([]porcupine.Operation, len(p.checked))
	for i, op := range p.checked {
		ops[i] = porcupine.Operation{ClientId: op.Client, Input: op, Call: op.Call, Output: op.Out, Return: op.ret()}
	}
	var res porcupine.CheckResult
	if html == "" {
		res = porcupine.CheckOperationsTimeout(model, ops, timeout)
	}
	if res == porcupine.Illegal || html != "" {
		// The verbose check keeps the longest partial linearizations: the explanation and the picture.
		var info porcupine.LinearizationInfo
		res, info = porcupine.CheckOperationsVerbose(model, ops, timeout)
		if res == porcupine.Illegal {
			rep.Explanation = explain(h, model, ops, info)
		}
		if html != "" {
			if err := porcupine.VisualizePath(model, info, html); err != nil {
				rep.Explanation = append(rep.Explanation, "writing the visualization failed: "+err.Error())
			}
		}
	}
	rep.Porcupine = string(res)
	switch {
	case res == porcupine.Illegal || len(rep.Violations) > 0 || len(rep.SerialIssues) > 0:
		rep.Result = "not linearizable"
		if res == porcupine.Ok && len(rep.Violations) > 0 {
			// The direct checks are necessary conditions of linearizability: porcupine accepting what
			// they reject is a bug in the checker itself.
			rep.Explanation = append(rep.Explanation, "CHECKER BUG: porcupine accepted what a direct check rejects")
		}
	case res == porcupine.Unknown:
		rep.Result = "undecided"
	default:
		rep.Result = "linearizable"
	}
	rep.Seconds = time.Since(start).Seconds()
	return rep
}

// explain describes where porcupine got stuck: the longest prefix it could linearize, the state there,
// and the operation that returned first among those it could not place next.
func explain(h *History, model porcupine.Model, ops []porcupine.Operation, info porcupine.LinearizationInfo) []string {
	var longest []porcupine.Operation
	for _, partition := range info.PartialLinearizationsOperations() {
		for _, lin := range partition {
			if len(lin) > len(longest) {
				longest = lin
			}
		}
	}
	state := model.Init()
	done := map[*Op]bool{}
	for _, op := range longest {
		_, state = model.Step(state, op.Input, op.Output)
		done[op.Input.(*Op)] = true
	}
	var pending []porcupine.Operation
	for _, op := range ops {
		if !done[op.Input.(*Op)] {
			pending = append(pending, op)
		}
	}
	sort.Slice(pending, func(i, j int) bool { return pending[i].Return < pending[j].Return })
	lines := []string{
		fmt.Sprintf("porcupine: at most %d of %d operations linearize; after them the store is %s",
			len(longest), len(ops), model.DescribeState(state)),
	}
	from := len(longest) - 3
	if from < 0 {
		from = 0
	}
	for _, op := range longest[from:] {
		lines = append(lines, "  … "+model.DescribeOperation(op.Input, op.Output))
	}
	if len(pending) > 0 {
		stuck := pending[0]
		lines = append(lines, "  ✗ "+model.DescribeOperation(stuck.Input, stuck.Output)+
			" (of the operations left, the first to return) cannot come next")
		if states, ok := state.([]interface{}); ok && len(states) > 0 {
			op := stuck.Input.(*Op)
			_, exp := apply(h.Keys, states[0].(*kvState), op)
			lines = append(lines, fmt.Sprintf("    (there etcd would answer %s)", describeOp(op, &exp)))
		}
	}
	return lines
}

func printReport(r *Report) {
	fmt.Printf("lincheck: %s (porcupine: %s) in %.2fs\n", r.Result, r.Porcupine, r.Seconds)
	fmt.Printf("  %d operations: %d checked by porcupine, %d serializable reads checked for snapshot consistency\n",
		r.Ops, r.Checked, r.Serializable)
	fmt.Printf("  unknown outcomes: %d reads dropped, %d writes inferred from reads, %d writes dropped, %d kept; revision gaps %v\n",
		r.DroppedReads, r.Patched, r.DroppedWrites, r.KeptUnknown, r.Gaps)
	for _, v := range r.Violations {
		fmt.Println("  violation:", v)
	}
	for _, v := range r.SerialIssues {
		fmt.Println("  serializable read:", v)
	}
	for _, l := range r.Explanation {
		fmt.Println("  " + l)
	}
}
