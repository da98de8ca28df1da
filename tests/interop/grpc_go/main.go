// Command interop runs the interoperability scenario (tests/interop/scenario.py describes the steps and
// judges the result) on grpc-go with etcd's own generated API stubs (go.etcd.io/etcd/api/v3, as clientv3
// uses them), and prints one JSON object on stdout.
//
//	interop '<params json>'
//
// v3lock's stubs live in etcd's server module, far too heavy to pull in for one call, so Lock goes through
// grpc-go with hand-encoded messages (a pass-through codec) instead.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Params mirrors scenario.py's Params.
type Params struct {
	Endpoint      string  `json:"endpoint"`
	MetricsURL    string  `json:"metrics_url"`
	Prefix        string  `json:"prefix"`
	Events        int     `json:"events"`
	TxnOps        int     `json:"txn_ops"`
	ValuePad      int     `json:"value_pad"`
	TooLargeValue int     `json:"too_large_value"`
	OverGRPCValue int     `json:"over_grpc_value"`
	DeadlineMs    int     `json:"deadline_ms"`
	SettleS       float64 `json:"settle_s"`
	Concurrent    int     `json:"concurrent"`
	Repeats       int     `json:"oversize_repeats"`
	BigValues     int     `json:"big_values"`
	BigValue      int     `json:"big_value"`
}

type obj = map[string]any

const callTimeout = 30 * time.Second // calls that must not hang (not the ones that test deadlines)

var watchGauges = []string{"etcd_debugging_mvcc_watch_stream_total", "etcd_debugging_mvcc_watcher_total"}

// The canonical upper-case names other stacks print (codes.Code's String is CamelCase).
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED", codes.OutOfRange: "OUT_OF_RANGE",
	codes.Unimplemented: "UNIMPLEMENTED", codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE",
	codes.DataLoss: "DATA_LOSS", codes.Unauthenticated: "UNAUTHENTICATED",
}

func statusOf(err error) obj {
	if err == nil {
		return obj{"code": "OK", "message": ""}
	}
	s := status.Convert(err)
	return obj{"code": codeNames[s.Code()], "message": s.Message()}
}

func prefixEnd(prefix []byte) []byte {
	end := append([]byte(nil), prefix...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0}
}

func kvOut(kv *mvccpb.KeyValue) obj {
	return obj{"key": string(kv.Key), "value": string(kv.Value), "create_revision": kv.CreateRevision,
		"mod_revision": kv.ModRevision, "version": kv.Version}
}

func kvsOut(kvs []*mvccpb.KeyValue) []obj {
	out := []obj{}
	for _, kv := range kvs {
		out = append(out, kvOut(kv))
	}
	return out
}

func ctxTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

var gaugeLine = map[string]*regexp.Regexp{}

func gauges(p *Params) ([]float64, error) {
	resp, err := http.Get(p.MetricsURL + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := make([]float64, len(watchGauges))
	for i, name := range watchGauges {
		re, ok := gaugeLine[name]
		if !ok {
			re = regexp.MustCompile(`(?m)^` + name + ` (\S+)$`)
			gaugeLine[name] = re
		}
		m := re.FindSubmatch(body)
		if m == nil {
			return nil, fmt.Errorf("%s missing from %s/metrics", name, p.MetricsURL)
		}
		if out[i], err = strconv.ParseFloat(string(m[1]), 64); err != nil {
			return nil, err
		}
	}
	return out, nil
}

func gaugesBackTo(p *Params, base []float64) ([]float64, error) {
	until := time.Now().Add(time.Duration(p.SettleS * float64(time.Second)))
	for {
		now, err := gauges(p)
		if err != nil {
			return nil, err
		}
		same := true
		for i := range now {
			same = same && now[i] == base[i]
		}
		if same || time.Now().After(until) {
			return now, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type clients struct {
	conn  *grpc.ClientConn
	kv    pb.KVClient
	watch pb.WatchClient
	lease pb.LeaseClient
}

func unary(p *Params, c *clients) (obj, error) {
	ctx, cancel := ctxTimeout(callTimeout)
	defer cancel()
	pre := p.Prefix + "unary/"
	a, b := []byte(pre+"a"), []byte(pre+"b")
	out := obj{}
	put, err := c.kv.Put(ctx, &pb.PutRequest{Key: a, Value: []byte("1")})
	if err != nil {
		return nil, err
	}
	out["put"] = obj{"revision": put.Header.Revision}
	if put, err = c.kv.Put(ctx, &pb.PutRequest{Key: a, Value: []byte("2"), PrevKv: true}); err != nil {
		return nil, err
	}
	out["put_prev"] = obj{"revision": put.Header.Revision, "prev_value": string(put.PrevKv.Value)}
	rng, err := c.kv.Range(ctx, &pb.RangeRequest{Key: a})
	if err != nil {
		return nil, err
	}
	out["range"] = obj{"revision": rng.Header.Revision, "count": rng.Count, "kvs": kvsOut(rng.Kvs)}
	txns := []struct {
		name, want       string
		success, failure []*pb.RequestOp
	}{
		{"txn_success", "2", []*pb.RequestOp{
			{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: b, Value: []byte("3")}}},
			{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: a}}},
		}, nil},
		{"txn_failure", "x", nil, []*pb.RequestOp{
			{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: b}}},
		}},
	}
	for _, t := range txns {
		cmp := &pb.Compare{Result: pb.Compare_EQUAL, Target: pb.Compare_VALUE, Key: a,
			TargetUnion: &pb.Compare_Value{Value: []byte(t.want)}}
		r, err := c.kv.Txn(ctx, &pb.TxnRequest{Compare: []*pb.Compare{cmp}, Success: t.success, Failure: t.failure})
		if err != nil {
			return nil, err
		}
		kinds := []string{}
		ranges := []obj{}
		for _, op := range r.Responses {
			switch x := op.Response.(type) {
			case *pb.ResponseOp_ResponsePut:
				kinds = append(kinds, "response_put")
			case *pb.ResponseOp_ResponseRange:
				kinds = append(kinds, "response_range")
				ranges = append(ranges, kvsOut(x.ResponseRange.Kvs)...)
			default:
				kinds = append(kinds, fmt.Sprintf("%T", x))
			}
		}
		out[t.name] = obj{"revision": r.Header.Revision, "succeeded": r.Succeeded, "responses": kinds,
			"range_kvs": ranges}
	}
	del, err := c.kv.DeleteRange(ctx, &pb.DeleteRangeRequest{Key: []byte(pre), RangeEnd: prefixEnd([]byte(pre)),
		PrevKv: true})
	if err != nil {
		return nil, err
	}
	prevKeys := []string{}
	for _, kv := range del.PrevKvs {
		prevKeys = append(prevKeys, string(kv.Key))
	}
	out["delete"] = obj{"revision": del.Header.Revision, "deleted": del.Deleted, "prev_keys": prevKeys}
	if rng, err = c.kv.Range(ctx, &pb.RangeRequest{Key: []byte(pre), RangeEnd: prefixEnd([]byte(pre)),
		CountOnly: true}); err != nil {
		return nil, err
	}
	out["range_after_delete"] = obj{"revision": rng.Header.Revision, "count": rng.Count}
	_, err = c.kv.Range(ctx, &pb.RangeRequest{Key: []byte{}})
	out["empty_key"] = statusOf(err)
	revs := make([]int64, p.Concurrent)
	errs := make(chan error, p.Concurrent)
	for i := range revs {
		go func(i int) {
			r, err := c.kv.Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprintf("%sc/%d", pre, i)), Value: []byte("c")})
			if err == nil {
				revs[i] = r.Header.Revision
			}
			errs <- err
		}(i)
	}
	for range revs {
		if err := <-errs; err != nil {
			return nil, err
		}
	}
	sort.Slice(revs, func(i, j int) bool { return revs[i] < revs[j] })
	out["concurrent_revisions"] = revs
	return out, nil
}

func createReq(key, end []byte, rev int64) *pb.WatchRequest {
	return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
		Key: key, RangeEnd: end, StartRevision: rev}}}
}

func readEvents(w pb.Watch_WatchClient, n int) (obj, int, error) {
	events := [][]any{}
	responses := [][]int64{}
	for len(events) < n {
		resp, err := w.Recv()
		if err != nil {
			return nil, len(events), fmt.Errorf("watch ended after %d of %d events: %w", len(events), n, err)
		}
		for _, ev := range resp.Events {
			kv := ev.Kv
			events = append(events, []any{ev.Type.String(), string(kv.Key), string(kv.Value), kv.CreateRevision,
				kv.ModRevision, kv.Version})
		}
		if len(resp.Events) > 0 {
			responses = append(responses, []int64{resp.Header.Revision, int64(len(resp.Events))})
		}
	}
	return obj{"events": events, "responses": responses}, len(events), nil
}

func watch(p *Params, c *clients) (obj, error) {
	pre := []byte(p.Prefix + "watch/")
	end := prefixEnd(pre)
	base, err := gauges(p)
	if err != nil {
		return nil, err
	}
	out := obj{"gauges_base": base}

	liveCtx, liveCancel := context.WithCancel(context.Background())
	defer liveCancel()
	live, err := c.watch.Watch(liveCtx)
	if err != nil {
		return nil, err
	}
	if err = live.Send(createReq(pre, end, 0)); err != nil {
		return nil, err
	}
	first, err := live.Recv()
	if err != nil {
		return nil, err
	}
	if !first.Created {
		return nil, errors.New(`the first watch response is not "created"`)
	}
	revs := []int64{}
	for j := 0; j < p.Events/p.TxnOps; j++ {
		ops := []*pb.RequestOp{}
		for i := j * p.TxnOps; i < (j+1)*p.TxnOps; i++ {
			key := fmt.Sprintf("%swatch/%05d", p.Prefix, i)
			value := fmt.Sprintf("v%d-%s", i, strings.Repeat("x", p.ValuePad))
			ops = append(ops, &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{
				Key: []byte(key), Value: []byte(value)}}})
		}
		ctx, cancel := ctxTimeout(callTimeout)
		r, err := c.kv.Txn(ctx, &pb.TxnRequest{Success: ops})
		cancel()
		if err != nil {
			return nil, err
		}
		revs = append(revs, r.Header.Revision)
	}
	out["txn_revisions"] = revs
	if out["live"], _, err = readEvents(live, p.Events); err != nil {
		return nil, err
	}
	cancelReq := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{
		CancelRequest: &pb.WatchCancelRequest{WatchId: first.WatchId}}}
	if err = live.Send(cancelReq); err != nil {
		return nil, err
	}
	for {
		resp, err := live.Recv()
		if err != nil {
			return nil, err
		}
		if resp.Canceled {
			out["cancel_request"] = obj{"canceled": true, "same_watch_id": resp.WatchId == first.WatchId}
			break
		}
	}
	liveCancel()

	histCtx, histCancel := context.WithCancel(context.Background())
	hist, err := c.watch.Watch(histCtx)
	if err == nil {
		err = hist.Send(createReq(pre, end, revs[0]))
	}
	if err == nil {
		out["history"], _, err = readEvents(hist, p.Events)
	}
	histCancel()
	if err != nil {
		return nil, err
	}

	midCtx, midCancel := context.WithCancel(context.Background())
	mid, err := c.watch.Watch(midCtx)
	if err == nil {
		err = mid.Send(createReq(pre, end, revs[0]))
	}
	var got int
	if err == nil {
		_, got, err = readEvents(mid, 1)
	}
	midCancel()
	if err != nil {
		return nil, err
	}
	for err == nil {
		_, err = mid.Recv()
	}
	out["midstream"] = obj{"events_before_cancel": got, "code": statusOf(err)["code"]}
	if out["gauges_after"], err = gaugesBackTo(p, base); err != nil {
		return nil, err
	}
	ctx, cancel := ctxTimeout(callTimeout)
	defer cancel()
	r, err := c.kv.Range(ctx, &pb.RangeRequest{Key: pre, RangeEnd: end, CountOnly: true})
	if err != nil {
		return nil, err
	}
	out["served_after"] = obj{"count": r.Count}
	return out, nil
}

// rawCodec passes hand-encoded messages through; named "proto" so the request is plain application/grpc.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

// lock calls v3lockpb.Lock/Lock (LockRequest{name = 1, lease = 2}) and returns LockResponse.key (field 2).
func lock(ctx context.Context, conn *grpc.ClientConn, name []byte, lease int64) ([]byte, error) {
	req := protowire.AppendTag(nil, 1, protowire.BytesType)
	req = protowire.AppendBytes(req, name)
	req = protowire.AppendTag(req, 2, protowire.VarintType)
	req = protowire.AppendVarint(req, uint64(lease))
	var resp []byte
	if err := conn.Invoke(ctx, "/v3lockpb.Lock/Lock", &req, &resp, grpc.ForceCodec(rawCodec{})); err != nil {
		return nil, err
	}
	for len(resp) > 0 {
		num, typ, n := protowire.ConsumeTag(resp)
		if n < 0 {
			return nil, protowire.ParseError(n)
		}
		resp = resp[n:]
		if num == 2 && typ == protowire.BytesType {
			key, m := protowire.ConsumeBytes(resp)
			if m < 0 {
				return nil, protowire.ParseError(m)
			}
			return key, nil
		}
		m := protowire.ConsumeFieldValue(num, typ, resp)
		if m < 0 {
			return nil, protowire.ParseError(m)
		}
		resp = resp[m:]
	}
	return []byte{}, nil
}

func timed(fn func() error) obj {
	t0 := time.Now()
	out := statusOf(fn())
	out["elapsed_ms"] = time.Since(t0).Milliseconds()
	return out
}

func deadline(p *Params, c *clients) (obj, error) {
	name := []byte(p.Prefix + "deadline/lock")
	waiters := []byte(p.Prefix + "deadline/lock/")
	dl := time.Duration(p.DeadlineMs) * time.Millisecond
	base, err := gauges(p)
	if err != nil {
		return nil, err
	}
	out := obj{"gauges_base": base}
	ctx, cancel := ctxTimeout(callTimeout)
	defer cancel()
	var leases [2]int64
	for i := range leases {
		g, err := c.lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: 60})
		if err != nil {
			return nil, err
		}
		leases[i] = g.ID
	}
	key, err := lock(ctx, c.conn, name, leases[0])
	if err != nil {
		return nil, err
	}
	out["lock_key"] = string(key)
	out["lock_deadline"] = timed(func() error {
		lctx, lcancel := ctxTimeout(dl)
		defer lcancel()
		_, err := lock(lctx, c.conn, name, leases[1])
		return err
	})
	lockKeys := func() (int64, error) {
		r, err := c.kv.Range(ctx, &pb.RangeRequest{Key: waiters, RangeEnd: prefixEnd(waiters), CountOnly: true})
		if err != nil {
			return 0, err
		}
		return r.Count, nil
	}
	until := time.Now().Add(time.Duration(p.SettleS * float64(time.Second)))
	for {
		n, err := lockKeys()
		if err != nil {
			return nil, err
		}
		if n == 1 || time.Now().After(until) {
			out["lock_keys_after"] = n
			break
		}
		time.Sleep(50 * time.Millisecond)
	}

	created := false
	got := timed(func() error {
		wctx, wcancel := ctxTimeout(dl)
		defer wcancel()
		w, err := c.watch.Watch(wctx)
		if err != nil {
			return err
		}
		if err = w.Send(createReq(name, nil, 0)); err != nil {
			return err
		}
		for {
			resp, err := w.Recv()
			if err != nil {
				return err
			}
			created = created || resp.Created
		}
	})
	got["created"] = created
	out["watch_deadline"] = got
	if out["gauges_after"], err = gaugesBackTo(p, base); err != nil {
		return nil, err
	}
	for _, id := range leases {
		if _, err := c.lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: id}); err != nil {
			return nil, err
		}
	}
	n, err := lockKeys()
	if err != nil {
		return nil, err
	}
	out["served_after"] = obj{"count": n}
	return out, nil
}

func oversize(p *Params, c *clients) (obj, error) {
	ctx, cancel := ctxTimeout(callTimeout)
	defer cancel()
	pre := p.Prefix + "oversize/"
	out := obj{}
	puts := []struct {
		name string
		size int
		key  string
	}{{"too_large", p.TooLargeValue, "big"}, {"over_grpc", p.OverGRPCValue, "huge"}}
	for _, put := range puts {
		value := []byte(strings.Repeat("x", put.size))
		got := []obj{}
		for i := 0; i < p.Repeats; i++ {
			_, err := c.kv.Put(ctx, &pb.PutRequest{Key: []byte(pre + put.key), Value: value})
			got = append(got, statusOf(err))
		}
		out[put.name] = got
	}
	out["watch_over_grpc"] = statusOf(func() error {
		w, err := c.watch.Watch(ctx)
		if err != nil {
			return err
		}
		if err = w.Send(createReq([]byte(strings.Repeat("x", p.OverGRPCValue)), nil, 0)); err != nil {
			return err
		}
		if err = w.CloseSend(); err != nil {
			return err
		}
		for {
			if _, err = w.Recv(); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
		}
	}())
	for i := 0; i < p.BigValues; i++ {
		value := []byte(strings.Repeat("x", p.BigValue))
		if _, err := c.kv.Put(ctx, &pb.PutRequest{Key: []byte(fmt.Sprintf("%sr/%d", pre, i)), Value: value}); err != nil {
			return nil, err
		}
	}
	big := []byte(pre + "r/")
	_, err := c.kv.Range(ctx, &pb.RangeRequest{Key: big, RangeEnd: prefixEnd(big)})
	out["response_over_client_limit"] = obj{"code": statusOf(err)["code"]}
	r, err := c.kv.Range(ctx, &pb.RangeRequest{Key: []byte(pre), RangeEnd: prefixEnd([]byte(pre)), CountOnly: true})
	if err != nil {
		return nil, err
	}
	out["served_after"] = obj{"count": r.Count}
	return out, nil
}

func run(p *Params) (obj, error) {
	ctx, cancel := ctxTimeout(10 * time.Second)
	defer cancel()
	// grpc-go's default send limit is unlimited already (math.MaxInt32); the oversize step relies on it.
	conn, err := grpc.DialContext(ctx, p.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(), grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(math.MaxInt32)))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", p.Endpoint, err)
	}
	defer conn.Close()
	c := &clients{conn: conn, kv: pb.NewKVClient(conn), watch: pb.NewWatchClient(conn), lease: pb.NewLeaseClient(conn)}
	out := obj{"client": "grpc-go " + grpc.Version}
	steps := []struct {
		name string
		fn   func(*Params, *clients) (obj, error)
	}{{"unary", unary}, {"watch", watch}, {"deadline", deadline}, {"oversize", oversize}}
	for _, step := range steps {
		res, err := step.fn(p, c)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", step.name, err)
		}
		out[step.name] = res
	}
	return out, nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: interop '<params json>'")
		os.Exit(2)
	}
	var p Params
	if err := json.Unmarshal([]byte(os.Args[1]), &p); err != nil {
		fmt.Fprintln(os.Stderr, "interop: params:", err)
		os.Exit(2)
	}
	out, err := run(&p)
	if err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
}
