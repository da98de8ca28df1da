package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"
)

// The history file the Python recorder (tests/linearizability/recorder.py) writes. Keys and values are
// strings (the recorder only uses ASCII); times are monotonic nanoseconds of the recording process.

// KV is one mvccpb.KeyValue as a client saw it.
type KV struct {
	Key     string `json:"key"`
	Value   string `json:"value"`
	Create  int64  `json:"create"`
	Mod     int64  `json:"mod"`
	Version int64  `json:"version"`
}

// Output is what an operation answered: the header revision, and what its kind answers besides.
type Output struct {
	Revision  int64 `json:"revision"`
	Succeeded bool  `json:"succeeded"` // cas_*: the Txn's compare held
	Deleted   int64 `json:"deleted"`   // delete
	KVs       []KV  `json:"kvs"`       // range, range_all, and a cas_* whose compare failed (its Else Range)
}

// Op is one client operation. Kinds:
//
//	put        Put(key, value)
//	range      Range(key), linearizable unless serializable is set
//	range_all  Range over the whole key set (one prefix Range), linearizable unless serializable is set
//	delete     DeleteRange(key)
//	cas_mod    Txn(If mod_revision(key) == expect_mod Then Put(key, value) Else Range(key))
//	cas_value  Txn(If value(key) == expect_value Then Put(key, value) Else Range(key))
//
// Return and Out are null when the outcome is unknown (an error or a timeout): the operation may have
// taken effect at any time after Call, or never.
type Op struct {
	ID           int     `json:"id"`
	Client       int     `json:"client"`
	Endpoint     string  `json:"endpoint"`
	Kind         string  `json:"kind"`
	Key          string  `json:"key"`
	Value        string  `json:"value"`
	ExpectMod    int64   `json:"expect_mod"`
	ExpectValue  string  `json:"expect_value"`
	Serializable bool    `json:"serializable"`
	Call         int64   `json:"call"`
	Return       *int64  `json:"return"`
	Error        string  `json:"error"`
	Out          *Output `json:"out"`

	key     int  // index into History.Keys; -1 for range_all
	patched bool // an unknown write whose outcome the preprocessing inferred from a read (see resolve)
}

// Initial is the state before the first operation was invoked (read by the recorder while no client ran).
type Initial struct {
	Revision int64 `json:"revision"`
	KVs      []KV  `json:"kvs"`
}

// History is the whole recorded file.
type History struct {
	Keys    []string `json:"keys"`
	Initial Initial  `json:"initial"`
	Ops     []*Op    `json:"ops"`
}

func (o *Op) unknown() bool { return o.Out == nil }

func (o *Op) isWrite() bool {
	switch o.Kind {
	case "put", "delete", "cas_mod", "cas_value":
		return true
	}
	return false
}

// writesValue: the kinds whose Put writes o.Value (values are unique per operation, so a read's value
// names the operation that wrote it).
func (o *Op) writesValue() bool {
	return o.Kind == "put" || o.Kind == "cas_mod" || o.Kind == "cas_value"
}

// bumps reports whether a known operation created a revision (a write that changed something).
func (o *Op) bumps() bool {
	if o.Out == nil {
		return false
	}
	switch o.Kind {
	case "put":
		return true
	case "cas_mod", "cas_value":
		return o.Out.Succeeded
	case "delete":
		return o.Out.Deleted > 0
	}
	return false
}

// ret is the response time; an unknown outcome never returned (porcupine: an infinite return time).
func (o *Op) ret() int64 {
	if o.Return == nil {
		return math.MaxInt64
	}
	return *o.Return
}

func loadHistory(path string) (*History, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var h History
	if err := json.Unmarshal(data, &h); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &h, h.validate()
}

func (h *History) validate() error {
	index := map[string]int{}
	for _, op := range h.Ops {
		if op.Kind != "range_all" {
			if _, ok := index[op.Key]; !ok {
				index[op.Key] = -1
			}
		}
	}
	for _, kv := range h.Initial.KVs {
		index[kv.Key] = -1
	}
	for _, k := range h.Keys {
		index[k] = -1
	}
	// The key set is what range_all covers; keys only ops name are added (sorted, so runs are stable).
	keys := make([]string, 0, len(index))
	for k := range index {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		index[k] = i
	}
	h.Keys = keys
	values := map[string]int{}
	for _, kv := range h.Initial.KVs {
		values[kv.Value] = -1
	}
	for _, op := range h.Ops {
		switch op.Kind {
		case "put", "range", "range_all", "delete", "cas_mod", "cas_value":
		default:
			return fmt.Errorf("op %d: unknown kind %q", op.ID, op.Kind)
		}
		op.key = -1
		if op.Kind != "range_all" {
			op.key = index[op.Key]
		}
		if (op.Return == nil) != (op.Out == nil) {
			return fmt.Errorf("op %d: return and out must both be set (ok) or both null (unknown)", op.ID)
		}
		if op.Return != nil && *op.Return < op.Call {
			return fmt.Errorf("op %d: returned before it was invoked", op.ID)
		}
		if op.Out != nil {
			// A Range answers in key order; the model compares key sets, not the order.
			kvs := op.Out.KVs
			sort.Slice(kvs, func(i, j int) bool { return kvs[i].Key < kvs[j].Key })
		}
		if op.Serializable && op.isWrite() {
			return fmt.Errorf("op %d: only reads can be serializable", op.ID)
		}
		if op.writesValue() {
			if prev, dup := values[op.Value]; dup {
				return fmt.Errorf("op %d: value %q is not unique (also op %d); the model names writes by value",
					op.ID, op.Value, prev)
			}
			values[op.Value] = op.ID
		}
	}
	return nil
}
