package main

import (
	"fmt"
	"sort"
)

// Serializable reads are answered from a member's local state without a quorum round, so in a cluster
// they may be stale and are not linearizable; on a single member they happen to be. They get a weaker
// check, snapshot consistency, that holds for every member of a correct cluster:
//
//   - the read shows each key exactly as the write order (revisions) has it at the read's own header
//     revision H: the last write to the key at or below H, by the known writes; a key where a revision
//     gap (an unknown write) falls between that write and H is not judged;
//   - nothing from the future: the write that made H, and the writes of the values shown, were invoked
//     before the read returned;
//   - one client's serializable reads never go back in revision (a client stays on one endpoint, and a
//     member's applied revision only grows, across restarts too as no acknowledged write is lost).
//
// How stale a serializable read may be is not bounded.

type keyWrite struct {
	rev int64
	op  *Op
}

func checkSerializable(h *History, p *prepared) []string {
	out := append([]string(nil), p.serialIssues...)
	violate := func(format string, args ...interface{}) { addViolation(&out, format, args...) }
	// Known writes per key, in revision order.
	perKey := make([][]keyWrite, len(h.Keys))
	for rev, op := range p.bumps {
		perKey[op.key] = append(perKey[op.key], keyWrite{rev, op})
	}
	for _, ws := range perKey {
		sort.Slice(ws, func(i, j int) bool { return ws[i].rev < ws[j].rev })
	}
	gapIn := func(lo, hi int64) bool { // a gap g with lo < g <= hi
		i := sort.Search(len(p.gaps), func(i int) bool { return p.gaps[i] > lo })
		return i < len(p.gaps) && p.gaps[i] <= hi
	}
	init := initialState(h)

	lastRev := map[int]*Op{} // client → its previous serializable read
	reads := append([]*Op(nil), p.serializable...)
	sort.Slice(reads, func(i, j int) bool { return reads[i].Call < reads[j].Call })
	for _, r := range reads {
		H := r.Out.Revision
		if prev := lastRev[r.Client]; prev != nil && prev.Out.Revision > H {
			violate("serializable reads of one client went back in revision: %s after %s",
				describeOp(r, r.Out), describeOp(prev, prev.Out))
		}
		lastRev[r.Client] = r
		if w := p.bumps[H]; w != nil && w.Call > r.ret() {
			violate("%s is at revision %d, made by %s, which was invoked after the read returned",
				describeOp(r, r.Out), H, describeOp(w, w.Out))
		}
		got := map[string]KV{}
		for _, kv := range r.Out.KVs {
			got[kv.Key] = kv
		}
		for k, key := range h.Keys {
			if r.Kind == "range" && k != r.key {
				continue
			}
			ws := perKey[k]
			i := sort.Search(len(ws), func(i int) bool { return ws[i].rev > H }) - 1
			base := h.Initial.Revision
			if i >= 0 {
				base = ws[i].rev
			}
			if gapIn(base, H) {
				continue
			}
			var want keyState
			switch {
			case i < 0:
				want = init.keys[k]
			case ws[i].op.Kind == "delete":
			default:
				want = keyState{present: true, value: ws[i].op.Value, mod: ws[i].rev}
			}
			kv, present := got[key]
			if present != want.present || (present && (kv.Value != want.value || kv.Mod != want.mod)) {
				shown := "∅"
				if present {
					shown = fmt.Sprintf("%s@%d", kv.Value, kv.Mod)
				}
				expected := "∅"
				if want.present {
					expected = fmt.Sprintf("%s@%d", want.value, want.mod)
				}
				violate("%s shows %s=%s, but at revision %d the writes have it %s",
					describeOp(r, r.Out), shortKey(key), shown, H, expected)
			}
		}
	}
	return out
}
