package main

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"sort"
	"strings"

	"github.com/anishathalye/porcupine"
)

// The sequential specification: etcd's KV store over a small key set, as one object. Its state is every
// key's value, create_revision, mod_revision and version plus the store's revision; every operation is
// checked against it with its header revision. See main.go for why the model is not partitioned by key.

type keyState struct {
	present bool
	value   string
	create  int64
	mod     int64
	version int64
}

type kvState struct {
	rev  int64
	keys []keyState // indexed like History.Keys; never mutated once built (porcupine states are values)
}

func initialState(h *History) *kvState {
	s := &kvState{rev: h.Initial.Revision, keys: make([]keyState, len(h.Keys))}
	index := map[string]int{}
	for i, k := range h.Keys {
		index[k] = i
	}
	for _, kv := range h.Initial.KVs {
		s.keys[index[kv.Key]] = keyState{true, kv.Value, kv.Create, kv.Mod, kv.Version}
	}
	return s
}

// withPut is s after a Put of value on key k at revision s.rev+1 (etcd: create_revision is kept and the
// version counts up while the key exists; a Put on an absent key starts both afresh).
func (s *kvState) withPut(k int, value string) *kvState {
	next := &kvState{rev: s.rev + 1, keys: append([]keyState(nil), s.keys...)}
	old := s.keys[k]
	if old.present {
		next.keys[k] = keyState{true, value, old.create, next.rev, old.version + 1}
	} else {
		next.keys[k] = keyState{true, value, next.rev, next.rev, 1}
	}
	return next
}

func (s *kvState) withDelete(k int) *kvState {
	next := &kvState{rev: s.rev + 1, keys: append([]keyState(nil), s.keys...)}
	next.keys[k] = keyState{}
	return next
}

func (s *kvState) kvs(keys []string, k int) []KV {
	var out []KV
	for i, ks := range s.keys {
		if ks.present && (k < 0 || i == k) {
			out = append(out, KV{keys[i], ks.value, ks.create, ks.mod, ks.version})
		}
	}
	return out
}

// apply runs op on s as etcd would: the next state and the answer etcd gives. Header revisions: a write
// that changes something answers the new revision; everything else (reads, a delete of an absent key, a
// Txn whose compare failed) answers the current one.
func apply(keys []string, s *kvState, op *Op) (*kvState, Output) {
	switch op.Kind {
	case "put":
		return s.withPut(op.key, op.Value), Output{Revision: s.rev + 1}
	case "range":
		return s, Output{Revision: s.rev, KVs: s.kvs(keys, op.key)}
	case "range_all":
		return s, Output{Revision: s.rev, KVs: s.kvs(keys, -1)}
	case "delete":
		if s.keys[op.key].present {
			return s.withDelete(op.key), Output{Revision: s.rev + 1, Deleted: 1}
		}
		return s, Output{Revision: s.rev}
	case "cas_mod", "cas_value":
		ks := s.keys[op.key]
		var holds bool
		if op.Kind == "cas_mod" {
			holds = ks.mod == op.ExpectMod // an absent key compares as mod_revision 0
		} else {
			// etcd's applyCompare: a value compare on a key that does not exist is always false.
			holds = ks.present && ks.value == op.ExpectValue
		}
		if holds {
			return s.withPut(op.key, op.Value), Output{Revision: s.rev + 1, Succeeded: true}
		}
		return s, Output{Revision: s.rev, KVs: s.kvs(keys, op.key)}
	}
	panic("unknown kind " + op.Kind)
}

func sameKVs(a, b []KV) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// answers reports whether got is the answer etcd gives when it expects exp.
func answers(op *Op, exp Output, got *Output) bool {
	if got.Revision != exp.Revision {
		return false
	}
	switch op.Kind {
	case "range", "range_all":
		return sameKVs(exp.KVs, got.KVs)
	case "delete":
		return got.Deleted == exp.Deleted
	case "cas_mod", "cas_value":
		return got.Succeeded == exp.Succeeded && (exp.Succeeded || sameKVs(exp.KVs, got.KVs))
	}
	return true
}

// kvModel is porcupine's model of the store. It is nondeterministic only for writes whose outcome is
// unknown: such a write either never happened or happened once, at whatever point porcupine linearizes
// it (its return time is infinite, so anywhere after its call).
func kvModel(h *History) porcupine.Model {
	keys := h.Keys
	init := initialState(h)
	nm := porcupine.NondeterministicModel{
		Init: func() []interface{} { return []interface{}{init} },
		Step: func(state, input, output interface{}) []interface{} {
			s := state.(*kvState)
			op := input.(*Op)
			got, _ := output.(*Output)
			next, exp := apply(keys, s, op)
			if got == nil {
				if next == s {
					return []interface{}{s}
				}
				return []interface{}{s, next}
			}
			if answers(op, exp, got) {
				return []interface{}{next}
			}
			return nil
		},
		Equal: func(a, b interface{}) bool {
			x, y := a.(*kvState), b.(*kvState)
			if x == y {
				return true
			}
			if x.rev != y.rev {
				return false
			}
			for i := range x.keys {
				if x.keys[i] != y.keys[i] {
					return false
				}
			}
			return true
		},
		Hash: func(state interface{}) uint64 {
			// The revision and every key's mod_revision identify a state of a correct history; the
			// values go in too, as Equal compares them.
			s := state.(*kvState)
			f := fnv.New64a()
			var buf [8]byte
			binary.LittleEndian.PutUint64(buf[:], uint64(s.rev))
			f.Write(buf[:])
			for _, ks := range s.keys {
				binary.LittleEndian.PutUint64(buf[:], uint64(ks.mod))
				f.Write(buf[:])
				f.Write([]byte(ks.value))
			}
			return f.Sum64()
		},
		DescribeOperation: func(input, output interface{}) string {
			out, _ := output.(*Output)
			return describeOp(input.(*Op), out)
		},
		DescribeState: func(state interface{}) string {
			return describeState(keys, state.(*kvState))
		},
	}
	return nm.ToModel()
}

// shortKey drops the recorder's prefix (everything up to the last '/') so descriptions stay readable.
func shortKey(k string) string {
	if i := strings.LastIndexByte(k, '/'); i >= 0 && i < len(k)-1 {
		return k[i+1:]
	}
	return k
}

func describeKVs(kvs []KV) string {
	if len(kvs) == 0 {
		return "∅"
	}
	parts := make([]string, len(kvs))
	for i, kv := range kvs {
		parts[i] = fmt.Sprintf("%s=%s@%d(c%d,v%d)", shortKey(kv.Key), kv.Value, kv.Mod, kv.Create, kv.Version)
	}
	return strings.Join(parts, " ")
}

func describeOp(op *Op, out *Output) string {
	var call string
	switch op.Kind {
	case "put":
		call = fmt.Sprintf("put(%s, %s)", shortKey(op.Key), op.Value)
	case "range", "range_all":
		what := shortKey(op.Key)
		if op.Kind == "range_all" {
			what = "*"
		}
		mode := ""
		if op.Serializable {
			mode = ", serializable"
		}
		call = fmt.Sprintf("range(%s%s)", what, mode)
	case "delete":
		call = fmt.Sprintf("delete(%s)", shortKey(op.Key))
	case "cas_mod":
		call = fmt.Sprintf("cas(%s, mod==%d, %s)", shortKey(op.Key), op.ExpectMod, op.Value)
	case "cas_value":
		call = fmt.Sprintf("cas(%s, value==%s, %s)", shortKey(op.Key), op.ExpectValue, op.Value)
	}
	if out == nil {
		return fmt.Sprintf("#%d c%d %s → ? (%s)", op.ID, op.Client, call, op.Error)
	}
	var res string
	switch op.Kind {
	case "put":
		res = "ok"
	case "range", "range_all":
		res = describeKVs(out.KVs)
	case "delete":
		res = fmt.Sprintf("deleted %d", out.Deleted)
	default:
		if out.Succeeded {
			res = "ok"
		} else {
			res = "failed, " + describeKVs(out.KVs)
		}
	}
	if op.patched {
		res += " [outcome inferred from a read]"
	}
	return fmt.Sprintf("#%d c%d %s → %s @rev %d", op.ID, op.Client, call, res, out.Revision)
}

func describeState(keys []string, s *kvState) string {
	kvs := s.kvs(keys, -1)
	sort.Slice(kvs, func(i, j int) bool { return kvs[i].Key < kvs[j].Key })
	return fmt.Sprintf("rev %d: %s", s.rev, describeKVs(kvs))
}
