package main

// Watch streams read without the protobuf runtime. Decoding every WatchResponse into etcd's generated
// structs cost the driver ≈ 1.55 µs of CPU per event, as much as either server spends sending it, so on a
// 2-core machine the driver, not the server, set the fan-out ceiling. Here a stream's messages stay raw
// bytes and only the fields the measurement needs are read in place: watch_id, created, canceled,
// cancel_reason, and per event the kv's mod_revision and the first 8 bytes of its value.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"google.golang.org/grpc"
)

type rawMsg struct{ b []byte }

// rawCodec passes rawMsg bytes through and marshals the generated request types with their own Marshal.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	switch m := v.(type) {
	case *rawMsg:
		return m.b, nil
	case interface{ Marshal() ([]byte, error) }:
		return m.Marshal()
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data []byte, v any) error {
	m, ok := v.(*rawMsg)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	m.b = data
	return nil
}

func (rawCodec) Name() string { return "proto" }

var watchStreamDesc = grpc.StreamDesc{StreamName: "Watch", ServerStreams: true, ClientStreams: true}

func openRawWatch(ctx context.Context, cc *grpc.ClientConn) (grpc.ClientStream, error) {
	return cc.NewStream(ctx, &watchStreamDesc, "/etcdserverpb.Watch/Watch", grpc.ForceCodec(rawCodec{}))
}

// watchEvent is what one event's kv contributes to the measurement.
type watchEvent struct {
	modRevision int64
	value8      []byte // the first (up to) 8 bytes of the value
}

// watchResp is the part of a WatchResponse the driver reads; events reuses its backing array.
type watchResp struct {
	watchID  int64
	created  bool
	canceled bool
	reason   string
	events   []watchEvent
}

var errTruncated = errors.New("truncated protobuf")

// field reads one field's key at b[i:]: its number, wire type, and for length-delimited fields the bytes;
// varint fields return their value. It returns the index after the field.
func field(b []byte, i int) (num int, wire int, v uint64, data []byte, next int, err error) {
	key, n := binary.Uvarint(b[i:])
	if n <= 0 {
		return 0, 0, 0, nil, 0, errTruncated
	}
	i += n
	num, wire = int(key>>3), int(key&7)
	switch wire {
	case 0:
		v, n = binary.Uvarint(b[i:])
		if n <= 0 {
			return 0, 0, 0, nil, 0, errTruncated
		}
		return num, wire, v, nil, i + n, nil
	case 2:
		l, n := binary.Uvarint(b[i:])
		if n <= 0 || uint64(len(b)-i-n) < l {
			return 0, 0, 0, nil, 0, errTruncated
		}
		i += n
		return num, wire, 0, b[i : i+int(l)], i + int(l), nil
	case 1:
		if len(b)-i < 8 {
			return 0, 0, 0, nil, 0, errTruncated
		}
		return num, wire, binary.LittleEndian.Uint64(b[i:]), nil, i + 8, nil
	case 5:
		if len(b)-i < 4 {
			return 0, 0, 0, nil, 0, errTruncated
		}
		return num, wire, uint64(binary.LittleEndian.Uint32(b[i:])), nil, i + 4, nil
	}
	return 0, 0, 0, nil, 0, fmt.Errorf("unsupported wire type %d", wire)
}

// parseWatchResponse fills r from b (etcdserverpb.WatchResponse: watch_id 2, created 3, canceled 4,
// cancel_reason 6, events 11; Event.kv 2; KeyValue.mod_revision 3, value 5).
func parseWatchResponse(b []byte, r *watchResp) error {
	*r = watchResp{events: r.events[:0]}
	for i := 0; i < len(b); {
		num, _, v, data, next, err := field(b, i)
		if err != nil {
			return err
		}
		i = next
		switch num {
		case 2:
			r.watchID = int64(v)
		case 3:
			r.created = v != 0
		case 4:
			r.canceled = v != 0
		case 6:
			r.reason = string(data)
		case 11:
			ev, err := parseEvent(data)
			if err != nil {
				return err
			}
			r.events = append(r.events, ev)
		}
	}
	return nil
}

func parseEvent(b []byte) (watchEvent, error) {
	var ev watchEvent
	for i := 0; i < len(b); {
		num, _, _, data, next, err := field(b, i)
		if err != nil {
			return ev, err
		}
		i = next
		if num != 2 { // kv; type and prev_kv are not measured
			continue
		}
		for j := 0; j < len(data); {
			kn, _, kv, kd, knext, err := field(data, j)
			if err != nil {
				return ev, err
			}
			j = knext
			switch kn {
			case 3:
				ev.modRevision = int64(kv)
			case 5:
				ev.value8 = kd[:min(8, len(kd))]
			}
		}
	}
	return ev, nil
}
