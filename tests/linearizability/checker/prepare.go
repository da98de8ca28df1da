package main

import (
	"fmt"
	"sort"
)

// Preparing a recorded history for porcupine: what to do with operations whose outcome is unknown, and
// the direct checks that explain the commonest violations in one line.
//
// Unknown outcomes are the expensive part of linearizability checking: porcupine must consider an
// unknown write both applied and not, at every point after its call. A kill -9 leaves up to one per
// client, and tried all together that is a power set of states. Because every write that changes the
// store takes the next revision, and every value is unique, most unknowns are decided by the rest of the
// history, and deciding them beforehand is exact:
//
//   - an unknown read is dropped: a read changes nothing, so it constrains nothing;
//   - an unknown write whose value some read saw (with its mod_revision m) took effect, at revision m:
//     its output is set to that (its return time stays infinite), and the model still checks it;
//   - the revisions in (initial, highest revision any operation answered] that no known write produced
//     ("gaps") must each be some unknown write's; if there are none, every remaining unknown write either
//     changed nothing or took effect after everything observed, so it is dropped. Otherwise only the
//     unknown writes invoked before an operation that saw the highest gap returned can have made a gap;
//     those stay (nondeterministic in the model), the rest are dropped.
//
// Either way the verdict stays sound: fixing an unknown outcome or dropping an unknown operation can only
// remove linearizations, never add one, so an accepted history is linearizable as recorded.

type prepared struct {
	checked       []*Op // what porcupine checks: known linearizable operations, patched and kept unknown writes
	serializable  []*Op // known serializable reads: the weaker check (checkSerializable)
	droppedReads  int
	droppedWrites int
	patched       int
	keptUnknown   int
	gaps          []int64
	bumps         map[int64]*Op // revision → the write that made it (known and patched writes)
	maxRev        int64
	violations    []string // of the linearizable operations (porcupine must reject them too)
	serialIssues  []string // what serializable reads saw (the weaker check's)
}

const maxViolations = 8

func addViolation(list *[]string, format string, args ...interface{}) {
	if len(*list) < maxViolations {
		*list = append(*list, fmt.Sprintf(format, args...))
	} else if len(*list) == maxViolations {
		*list = append(*list, "… (more)")
	}
}

func (p *prepared) violate(format string, args ...interface{}) {
	addViolation(&p.violations, format, args...)
}

func prepare(h *History) *prepared {
	p := &prepared{bumps: map[int64]*Op{}}
	byValue := map[string]*Op{}
	initial := map[string]KV{}
	for _, kv := range h.Initial.KVs {
		initial[kv.Value] = kv
	}
	for _, op := range h.Ops {
		if op.writesValue() {
			byValue[op.Value] = op
		}
	}

	// Reads name the writes whose values they saw: patch the unknown ones, check the known ones.
	for _, r := range h.Ops {
		if r.Out == nil {
			continue
		}
		violate := p.violate
		if r.Serializable {
			violate = func(format string, args ...interface{}) { addViolation(&p.serialIssues, format, args...) }
		}
		for _, kv := range r.Out.KVs {
			if ini, ok := initial[kv.Value]; ok && ini.Key == kv.Key {
				continue
			}
			w := byValue[kv.Value]
			switch {
			case w == nil:
				violate("%s saw %s=%s, a value no operation wrote", describeOp(r, r.Out), shortKey(kv.Key), kv.Value)
			case w.Key != kv.Key:
				violate("%s saw the value %s under key %s, but it was written to %s",
					describeOp(r, r.Out), kv.Value, shortKey(kv.Key), shortKey(w.Key))
			case w.Call > r.ret():
				violate("%s saw %s, which %s wrote only after that read returned",
					describeOp(r, r.Out), kv.Value, describeOp(w, w.Out))
			case w.Out == nil:
				w.Out = &Output{Revision: kv.Mod, Succeeded: true}
				w.patched = true
				p.patched++
			case w.patched && w.Out.Revision != kv.Mod:
				violate("the value %s was seen with mod_revision %d and with %d", kv.Value, w.Out.Revision, kv.Mod)
			case !w.bumps():
				violate("%s saw %s, the value of a compare-and-swap that failed: %s",
					describeOp(r, r.Out), kv.Value, describeOp(w, w.Out))
			case w.Out.Revision != kv.Mod:
				violate("%s saw %s with mod_revision %d, but its write answered revision %d: %s",
					describeOp(r, r.Out), kv.Value, kv.Mod, w.Out.Revision, describeOp(w, w.Out))
			}
		}
	}

	var unknownWrites []*Op
	for _, op := range h.Ops {
		switch {
		case op.Serializable && op.Out != nil:
			p.serializable = append(p.serializable, op)
		case op.Out == nil && !op.isWrite(), op.Serializable:
			p.droppedReads++
		case op.Out == nil:
			unknownWrites = append(unknownWrites, op)
		default:
			p.checked = append(p.checked, op)
		}
	}
	for _, op := range h.Ops {
		if op.Out == nil || op.Serializable {
			continue
		}
		if op.Out.Revision > p.maxRev {
			p.maxRev = op.Out.Revision
		}
		if op.bumps() {
			if other, dup := p.bumps[op.Out.Revision]; dup {
				p.violate("two writes made revision %d: %s and %s", op.Out.Revision,
					describeOp(other, other.Out), describeOp(op, op.Out))
			} else {
				p.bumps[op.Out.Revision] = op
			}
		}
	}
	// More gaps than unknown writes is a violation already; stopping there bounds the loop by the
	// history's size even if a server answered a wildly wrong revision.
	for rev := h.Initial.Revision + 1; rev <= p.maxRev && len(p.gaps) <= len(unknownWrites); rev++ {
		if p.bumps[rev] == nil {
			p.gaps = append(p.gaps, rev)
		}
	}
	if len(p.gaps) > len(unknownWrites) {
		p.violate("revisions up to %d answered, but no write made %s, and there are only %d writes of unknown outcome",
			p.maxRev, revList(p.gaps), len(unknownWrites))
		p.droppedWrites = len(unknownWrites)
	} else if len(p.gaps) > 0 {
		// An operation that answered revision >= g is linearized after the write that made g, so that
		// write was invoked before the operation returned.
		top := p.gaps[len(p.gaps)-1]
		bound := int64(-1)
		for _, op := range p.checked {
			if op.Return != nil && op.Out.Revision >= top && (bound < 0 || *op.Return < bound) {
				bound = *op.Return
			}
		}
		for _, u := range unknownWrites {
			if u.Call <= bound {
				p.checked = append(p.checked, u)
				p.keptUnknown++
			} else {
				p.droppedWrites++
			}
		}
		if p.keptUnknown < len(p.gaps) {
			p.violate("%d revisions no known write made (%s) but only %d writes of unknown outcome could have",
				len(p.gaps), revList(p.gaps), p.keptUnknown)
		}
	} else {
		p.droppedWrites = len(unknownWrites)
	}
	p.checkRealTime()
	return p
}

func revList(revs []int64) string {
	s := ""
	for i, r := range revs {
		if i == 6 {
			return s + ", …"
		}
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(r)
	}
	return s
}

// checkRealTime: revisions never go backwards in real time. If A returned before B was invoked, B is
// linearized after A, so B's revision is at least A's, and greater if B made a revision. Porcupine
// decides the same (and more); this names the two operations.
func (p *prepared) checkRealTime() {
	var done []*Op
	for _, op := range p.checked {
		if op.Return != nil {
			done = append(done, op)
		}
	}
	sort.Slice(done, func(i, j int) bool { return *done[i].Return < *done[j].Return })
	byCall := append([]*Op(nil), p.checked...)
	sort.Slice(byCall, func(i, j int) bool { return byCall[i].Call < byCall[j].Call })
	var top *Op
	next := 0
	for _, b := range byCall {
		for next < len(done) && *done[next].Return < b.Call {
			if top == nil || done[next].Out.Revision > top.Out.Revision {
				top = done[next]
			}
			next++
		}
		if top == nil || b.Out == nil {
			continue
		}
		if b.Out.Revision < top.Out.Revision || (b.bumps() && b.Out.Revision == top.Out.Revision) {
			p.violate("revision went back in real time: %s was invoked after %s returned",
				describeOp(b, b.Out), describeOp(top, top.Out))
		}
	}
}
