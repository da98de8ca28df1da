// Command loadgen drives the etcd v3 gRPC API for the workloads that etcd's own tools/benchmark does not
// measure the way bench/watch_bench.py needs (see bench/README.md):
//
//	loadgen watch-fanout  N prefix watchers on a few streams, an open-loop writer at a fixed put rate;
//	                      delivered events/s and put-ack → event-receipt latency (the put's sequence number
//	                      rides in its value), and per-watcher order/gap/duplicate checks.
//	loadgen lease-churn   C concurrent clients looping LeaseGrant → Put(lease) → LeaseRevoke.
//	loadgen put-latency   one client, one put at a time: latency percentiles to the microsecond (etcd's
//	                      benchmark tool prints them to the 100 µs, too coarse to compare two builds).
//
// It is written in Go so that the client is not the bottleneck being measured (a Python client decodes far
// fewer watch responses per second than either server sends). Output: one JSON object on stdout.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen watch-fanout|lease-churn|put-latency [flags]")
		os.Exit(2)
	}
	var out any
	var err error
	switch os.Args[1] {
	case "watch-fanout":
		out, err = watchFanout(os.Args[2:])
	case "lease-churn":
		out, err = leaseChurn(os.Args[2:])
	case "put-latency":
		out, err = putLatency(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", " ")
	_ = enc.Encode(out)
}

func dial(endpoint string) (*grpc.ClientConn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return grpc.DialContext(ctx, endpoint,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithBlock(),
		// etcd's clients accept responses of any size; a resyncing watcher may get a large batch.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
	)
}

func dialAll(endpoint string, n int) ([]*grpc.ClientConn, error) {
	conns := make([]*grpc.ClientConn, 0, n)
	for i := 0; i < n; i++ {
		c, err := dial(endpoint)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []*grpc.ClientConn) {
	for _, c := range conns {
		_ = c.Close()
	}
}

// Percentiles in microseconds of a sample (sorted in place). -1 stands for "never": with events that were
// not delivered by the end of the run, the upper percentiles fall among them.
type Percentiles struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_us"`
	P90 float64 `json:"p90_us"`
	P99 float64 `json:"p99_us"`
	Max float64 `json:"max_us"`
}

func percentiles(us []int32) Percentiles {
	return percentilesWithMissing(us, 0)
}

// percentilesWithMissing counts `missing` samples as infinitely late, so an undelivered event cannot make
// the latency look better than it was.
func percentilesWithMissing(us []int32, missing int64) Percentiles {
	n := int64(len(us)) + missing
	if n == 0 {
		return Percentiles{}
	}
	sort.Slice(us, func(i, j int) bool { return us[i] < us[j] })
	at := func(q float64) float64 {
		i := int64(math.Ceil(q*float64(n))) - 1
		if i < 0 {
			i = 0
		}
		if i >= int64(len(us)) {
			return -1
		}
		return float64(us[i])
	}
	return Percentiles{N: int(n), P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: at(1.0)}
}

func clampUs(ns int64) int32 {
	if ns < 0 {
		return 0
	}
	us := ns / 1000
	if us > math.MaxInt32 {
		return math.MaxInt32
	}
	return int32(us)
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

// ---------------------------------------------------------------------------------------------------
// watch fan-out

type FanoutResult struct {
	Watchers        int         `json:"watchers"`
	Streams         int         `json:"streams"`
	CreateSeconds   float64     `json:"create_seconds"`
	Puts            int         `json:"puts"`
	PutErrors       int         `json:"put_errors"`
	PutSeconds      float64     `json:"put_seconds"`
	PutRate         float64     `json:"put_rate"`
	PutLatency      Percentiles `json:"put_latency"`
	EventsExpected  int64       `json:"events_expected"`
	Events          int64       `json:"events"`
	DeliverSeconds  float64     `json:"deliver_seconds"`
	EventsPerSec    float64     `json:"events_per_sec"`
	DrainSeconds    float64     `json:"drain_seconds"`
	AckLatency      Percentiles `json:"ack_to_event_latency"`
	IssueLatency    Percentiles `json:"issue_to_event_latency"`
	BeforeAck       int64       `json:"events_before_ack"`
	OrderErrors     int64       `json:"order_errors"`
	MissingWatchers int         `json:"watchers_short_of_events"`
	Errors          []string    `json:"errors"`
}

type streamState struct {
	stream    grpc.ClientStream // raw messages: see rawwatch.go
	watcherOf map[int64]int     // watch id → global watcher index
	ackLat    []int32
	issueLat  []int32
	lastRev   []int64 // per local watcher
	count     []int64
}

func watchFanout(args []string) (*FanoutResult, error) {
	fs := flag.NewFlagSet("watch-fanout", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "gRPC endpoint host:port")
	streams := fs.Int("streams", 10, "watch streams")
	perStream := fs.Int("watch-per-stream", 100, "watchers per stream, all on the same prefix")
	conns := fs.Int("conns", 10, "gRPC connections the streams are spread over")
	prefix := fs.String("prefix", "/t4/", "watched prefix; puts go to keys under it")
	rate := fs.Float64("put-rate", 1000, "puts per second, open loop (0: as fast as the putters go)")
	seconds := fs.Float64("seconds", 5, "length of the put phase (puts = put-rate × seconds)")
	total := fs.Int("puts", 0, "number of puts instead of put-rate × seconds (required with put-rate 0)")
	putters := fs.Int("putters", 8, "concurrent put clients (bounds puts in flight)")
	valSize := fs.Int("val-size", 256, "value size in bytes (>= 8: the put's sequence number leads)")
	keySpace := fs.Int("key-space", 1000, "distinct keys the puts cycle over")
	drainTimeout := fs.Duration("drain-timeout", 20*time.Second, "wait this long after the last ack for events")
	_ = fs.Parse(args)
	if *valSize < 8 {
		return nil, errors.New("--val-size must be >= 8")
	}

	cs, err := dialAll(*endpoint, *conns)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	defer closeAll(cs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	nPuts := *total
	if nPuts <= 0 {
		if *rate <= 0 {
			return nil, errors.New("--put-rate 0 needs --puts")
		}
		nPuts = int(*rate * *seconds)
	}
	watchers := *streams * *perStream
	res := &FanoutResult{Watchers: watchers, Streams: *streams, Puts: nPuts, Errors: []string{}}
	var errMu sync.Mutex
	addErr := func(e string) {
		errMu.Lock()
		if len(res.Errors) < 10 {
			res.Errors = append(res.Errors, e)
		}
		errMu.Unlock()
	}

	// All offsets are nanoseconds since base on the monotonic clock; 0 means "not yet".
	base := time.Now()
	issuedAt := make([]atomic.Int64, nPuts)
	ackedAt := make([]atomic.Int64, nPuts)

	pfx := []byte(*prefix)
	end := prefixEnd(pfx)
	t0 := time.Now()
	sts := make([]*streamState, *streams)
	for s := range sts {
		st, err := openRawWatch(ctx, cs[s%len(cs)])
		if err != nil {
			return nil, fmt.Errorf("open watch stream: %w", err)
		}
		// Sized for every event up front: growing them was a tenth of the driver's CPU.
		ss := &streamState{stream: st, watcherOf: map[int64]int{}, lastRev: make([]int64, *perStream),
			count: make([]int64, *perStream), ackLat: make([]int32, 0, nPuts**perStream),
			issueLat: make([]int32, 0, nPuts**perStream)}
		for w := 0; w < *perStream; w++ {
			req := &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
				CreateRequest: &pb.WatchCreateRequest{Key: pfx, RangeEnd: end}}}
			if err := st.SendMsg(req); err != nil {
				return nil, fmt.Errorf("create watch: %w", err)
			}
		}
		var m rawMsg
		var r watchResp
		for w := 0; w < *perStream; w++ {
			if err := st.RecvMsg(&m); err != nil {
				return nil, fmt.Errorf("watch created response: %w", err)
			}
			if err := parseWatchResponse(m.b, &r); err != nil {
				return nil, fmt.Errorf("watch created response: %w", err)
			}
			if !r.created || r.canceled {
				return nil, fmt.Errorf("unexpected response while creating watches: %+v", r)
			}
			ss.watcherOf[r.watchID] = w
		}
		sts[s] = ss
	}
	res.CreateSeconds = time.Since(t0).Seconds()

	expected := int64(nPuts) * int64(watchers)
	res.EventsExpected = expected
	var received atomic.Int64
	var lastRecv atomic.Int64
	var beforeAck, orderErrs atomic.Int64
	allIn := make(chan struct{})
	var allOnce sync.Once
	var rwg sync.WaitGroup
	for _, ss := range sts {
		rwg.Add(1)
		go func(ss *streamState) {
			defer rwg.Done()
			var m rawMsg
			var r watchResp
			for {
				err := ss.stream.RecvMsg(&m)
				if err == nil {
					err = parseWatchResponse(m.b, &r)
				}
				if err != nil {
					if ctx.Err() == nil && !errors.Is(err, io.EOF) {
						addErr("watch recv: " + err.Error())
					}
					return
				}
				if r.canceled {
					addErr(fmt.Sprintf("watch %d canceled: %s", r.watchID, r.reason))
					continue
				}
				w, ok := ss.watcherOf[r.watchID]
				if !ok || len(r.events) == 0 {
					continue // progress notifications and the like
				}
				now := int64(time.Since(base))
				for _, ev := range r.events {
					if len(ev.value8) < 8 {
						orderErrs.Add(1)
						continue
					}
					seq := int(binary.BigEndian.Uint64(ev.value8))
					if seq < 0 || seq >= nPuts {
						orderErrs.Add(1)
						continue
					}
					// Revisions per watcher must strictly increase: a repeat or a step back is a
					// duplicate or reorder; a gap shows up as a short count at the end.
					if ev.modRevision <= ss.lastRev[w] {
						orderErrs.Add(1)
					}
					ss.lastRev[w] = ev.modRevision
					ss.count[w]++
					ack := ackedAt[seq].Load()
					if ack == 0 {
						beforeAck.Add(1) // the event outran the put's response: latency 0
						ss.ackLat = append(ss.ackLat, 0)
					} else {
						ss.ackLat = append(ss.ackLat, clampUs(now-ack))
					}
					ss.issueLat = append(ss.issueLat, clampUs(now-issuedAt[seq].Load()))
				}
				lastRecv.Store(now)
				if received.Add(int64(len(r.events))) >= expected {
					allOnce.Do(func() { close(allIn) })
				}
			}
		}(ss)
	}

	// Open-loop writer: put i is due at start + i/rate; putters take due puts from a queue.
	kv := make([]pb.KVClient, len(cs))
	for i, c := range cs {
		kv[i] = pb.NewKVClient(c)
	}
	due := make(chan int, *putters)
	var putErrs atomic.Int64
	putLat := make([][]int32, *putters)
	var pwg sync.WaitGroup
	for p := 0; p < *putters; p++ {
		pwg.Add(1)
		go func(p int) {
			defer pwg.Done()
			client := kv[p%len(kv)]
			val := make([]byte, *valSize)
			for i := range val[8:] {
				val[8+i] = 'v'
			}
			for seq := range due {
				key := []byte(fmt.Sprintf("%s%06d", *prefix, seq%*keySpace))
				binary.BigEndian.PutUint64(val, uint64(seq))
				issued := int64(time.Since(base))
				issuedAt[seq].Store(issued)
				_, err := client.Put(ctx, &pb.PutRequest{Key: key, Value: val})
				if err != nil {
					putErrs.Add(1)
					addErr("put: " + err.Error())
					continue
				}
				acked := int64(time.Since(base))
				ackedAt[seq].Store(acked)
				putLat[p] = append(putLat[p], clampUs(acked-issued))
			}
		}(p)
	}
	putStart := time.Now()
	for seq := 0; seq < nPuts; seq++ {
		if *rate > 0 {
			if d := time.Until(putStart.Add(time.Duration(float64(seq) / *rate * float64(time.Second)))); d > 0 {
				time.Sleep(d)
			}
		}
		due <- seq
	}
	close(due)
	pwg.Wait()
	putEnd := time.Now()
	res.PutSeconds = putEnd.Sub(putStart).Seconds()
	res.PutRate = float64(nPuts) / res.PutSeconds
	res.PutErrors = int(putErrs.Load())
	var allPut []int32
	for _, l := range putLat {
		allPut = append(allPut, l...)
	}
	res.PutLatency = percentiles(allPut)
	if res.PutErrors > 0 {
		expected = int64(nPuts-res.PutErrors) * int64(watchers)
		res.EventsExpected = expected
		if received.Load() >= expected {
			allOnce.Do(func() { close(allIn) })
		}
	}

	select {
	case <-allIn:
	case <-time.After(*drainTimeout):
		addErr(fmt.Sprintf("drain timeout: %d of %d events after %s", received.Load(), expected, *drainTimeout))
	}
	last := base.Add(time.Duration(lastRecv.Load()))
	res.DrainSeconds = math.Max(0, last.Sub(putEnd).Seconds())
	cancel()
	for _, ss := range sts {
		_ = ss.stream.CloseSend()
	}
	closeAll(cs)
	rwg.Wait()

	res.Events = received.Load()
	res.DeliverSeconds = last.Sub(putStart).Seconds()
	if res.DeliverSeconds > 0 {
		res.EventsPerSec = float64(res.Events) / res.DeliverSeconds
	}
	var ackLat, issueLat []int32
	for _, ss := range sts {
		ackLat = append(ackLat, ss.ackLat...)
		issueLat = append(issueLat, ss.issueLat...)
		for _, c := range ss.count {
			if c < int64(nPuts-res.PutErrors) {
				res.MissingWatchers++
			}
		}
	}
	undelivered := max(0, res.EventsExpected-res.Events)
	res.AckLatency = percentilesWithMissing(ackLat, undelivered)
	res.IssueLatency = percentilesWithMissing(issueLat, undelivered)
	res.BeforeAck = beforeAck.Load()
	res.OrderErrors = orderErrs.Load()
	return res, nil
}

// ---------------------------------------------------------------------------------------------------
// lease churn

type ChurnResult struct {
	Clients     int         `json:"clients"`
	Loops       int64       `json:"loops"`
	Seconds     float64     `json:"seconds"`
	LoopsPerSec float64     `json:"loops_per_sec"`
	RPCsPerSec  float64     `json:"rpcs_per_sec"`
	LoopLatency Percentiles `json:"loop_latency"`
	ErrorCount  int64       `json:"error_count"`
	Errors      []string    `json:"errors"`
}

func leaseChurn(args []string) (*ChurnResult, error) {
	// Like watchFanout, each workload declares its whole flag set itself: the flags they share (endpoint,
	// conns, seconds, val-size, prefix) have defaults and help of their own, and `loadgen <op> -h` shows
	// one list that reads whole. The similar shape of the two lists is intended.
	fs := flag.NewFlagSet("lease-churn", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "gRPC endpoint host:port")
	clients := fs.Int("clients", 16, "concurrent clients, each looping grant → put(lease) → revoke")
	conns := fs.Int("conns", 4, "gRPC connections the clients are spread over")
	seconds := fs.Float64("seconds", 5, "run length")
	ttl := fs.Int64("ttl", 60, "lease TTL (long: every lease is revoked, none expires)")
	valSize := fs.Int("val-size", 256, "value size in bytes")
	prefix := fs.String("prefix", "/churn/", "key prefix")
	_ = fs.Parse(args)

	cs, err := dialAll(*endpoint, *conns)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	defer closeAll(cs)
	res := &ChurnResult{Clients: *clients, Errors: []string{}}
	var errMu sync.Mutex
	var errCount atomic.Int64
	fail := func(what string, err error) {
		errCount.Add(1)
		errMu.Lock()
		if len(res.Errors) < 10 {
			res.Errors = append(res.Errors, what+": "+err.Error())
		}
		errMu.Unlock()
	}
	val := make([]byte, *valSize)
	for i := range val {
		val[i] = 'v'
	}
	ctx := context.Background()
	lats := make([][]int32, *clients)
	var loops atomic.Int64
	start := time.Now()
	deadline := start.Add(time.Duration(*seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for c := 0; c < *clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			conn := cs[c%len(cs)]
			lease, kv := pb.NewLeaseClient(conn), pb.NewKVClient(conn)
			for i := 0; time.Now().Before(deadline); i++ {
				t := time.Now()
				g, err := lease.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: *ttl})
				if err != nil {
					fail("grant", err)
					continue
				}
				key := []byte(fmt.Sprintf("%s%02d/%03d", *prefix, c, i%100))
				if _, err := kv.Put(ctx, &pb.PutRequest{Key: key, Value: val, Lease: g.ID}); err != nil {
					fail("put", err)
				}
				if _, err := lease.LeaseRevoke(ctx, &pb.LeaseRevokeRequest{ID: g.ID}); err != nil {
					fail("revoke", err)
					continue
				}
				lats[c] = append(lats[c], clampUs(int64(time.Since(t))))
				loops.Add(1)
			}
		}(c)
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.Loops = loops.Load()
	res.LoopsPerSec = float64(res.Loops) / res.Seconds
	res.RPCsPerSec = 3 * res.LoopsPerSec
	var all []int32
	for _, l := range lats {
		all = append(all, l...)
	}
	res.LoopLatency = percentiles(all)
	res.ErrorCount = errCount.Load()
	return res, nil
}

type putLatencyResult struct {
	Puts    int         `json:"puts"`
	Seconds float64     `json:"seconds"`
	Latency Percentiles `json:"latency"`
}

// putLatency sends -n puts of 8-byte keys (over 100,000) and -val-size-byte values, one at a time on one
// connection, after -warmup unmeasured ones: T6's request, timed per call.
func putLatency(args []string) (any, error) {
	fs := flag.NewFlagSet("put-latency", flag.ExitOnError)
	endpoint := fs.String("endpoint", "127.0.0.1:2379", "host:port")
	n := fs.Int("n", 5000, "measured puts")
	warmup := fs.Int("warmup", 500, "puts before measuring")
	valSize := fs.Int("val-size", 256, "value bytes")
	_ = fs.Parse(args)
	conn, err := dial(*endpoint)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	kv := pb.NewKVClient(conn)
	val := make([]byte, *valSize)
	key := make([]byte, 8)
	lat := make([]int32, 0, *n)
	start := time.Now()
	for i := 0; i < *warmup+*n; i++ {
		if i == *warmup {
			start = time.Now()
		}
		binary.BigEndian.PutUint64(key, uint64(i%100000))
		t := time.Now()
		if _, err := kv.Put(context.Background(), &pb.PutRequest{Key: key, Value: val}); err != nil {
			return nil, err
		}
		if i >= *warmup {
			lat = append(lat, int32(time.Since(t).Microseconds()))
		}
	}
	return putLatencyResult{Puts: *n, Seconds: time.Since(start).Seconds(), Latency: percentiles(lat)}, nil
}
