package main

// WatchLeases (server streaming) as a grpc-go client sees it.

import (
	"context"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const watchMethod = "/vmpool.admin.v1.VMPoolExtensionService/WatchLeases"

// Event types (admin.proto LeaseEventType).
const (
	evLeased    = 1
	evExtended  = 2
	evExpiring  = 3
	evReturned  = 5
	evHeartbeat = 13
)

type event struct {
	cursor, instance string
	kind             int64
	expires          time.Time
}

func watchReq(after string, pool string, lead int64) []byte {
	b := str(nil, 1, after)
	b = str(b, 3, pool)
	b = protowire.AppendTag(b, 7, protowire.VarintType)
	return protowire.AppendVarint(b, uint64(lead))
}

// openWatch starts a stream; events arrive on the channel, the final error after it closes.
func openWatch(ctx context.Context, cc *grpc.ClientConn, req []byte) (<-chan event, <-chan error) {
	events := make(chan event, 1000)
	done := make(chan error, 1)
	go func() {
		defer close(events)
		s, err := cc.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, watchMethod, grpc.ForceCodec(raw{}))
		if err == nil {
			err = s.SendMsg(&req)
		}
		if err == nil {
			err = s.CloseSend()
		}
		for err == nil {
			var m []byte
			if err = s.RecvMsg(&m); err != nil {
				break
			}
			f := parse(m)
			e := event{cursor: string(f[1]), kind: varint(f[3]), instance: string(f[4])}
			if f[8] != nil {
				e.expires = parseTs(f[8])
			}
			events <- e
		}
		done <- err
	}()
	return events, done
}

// next: the next event of one of “kinds“ (others skipped), or false after 20 s.
func next(events <-chan event, kinds ...int64) (event, bool) {
	timeout := time.After(20 * time.Second)
	for {
		select {
		case e, ok := <-events:
			if !ok {
				return event{}, false
			}
			for _, k := range kinds {
				if e.kind == k {
					return e, true
				}
			}
		case <-timeout:
			return event{}, false
		}
	}
}

func runWatch(cc *grpc.ClientConn, pool string) {
	ctx, cancel := context.WithCancel(context.Background())
	events, done := openWatch(ctx, cc, watchReq("", pool, 3600))
	first, ok := next(events, evHeartbeat)
	check(ok && first.cursor != "", "WatchLeases starts with a HEARTBEAT carrying a cursor")

	want := time.Now().Add(20 * time.Minute).Add(123456789 * time.Nanosecond)
	req := str(nil, 1, pool)
	req = msg(req, 2, ts(want))
	req = str(req, 3, "")
	r, err := call(context.Background(), cc, svc+"Lease", req)
	var l *lease
	if err == nil {
		l, err = parseLease(r)
	}
	check(err == nil, "Lease: %v", err)
	if l == nil {
		return
	}
	leased, ok := next(events, evLeased)
	check(ok && leased.instance == l.instance && leased.expires.Equal(want),
		"LEASED event: instance %s, expiry to the nanosecond %s", leased.instance, leased.expires.Format(time.RFC3339Nano))
	exp, ok := next(events, evExpiring)
	check(ok && exp.instance == l.instance, "EXPIRING within the lead time (1 h)")
	to := time.Now().Add(40 * time.Minute).Add(987654321 * time.Nanosecond)
	ereq := str(nil, 1, l.instance)
	ereq = msg(ereq, 2, ts(to))
	ereq = str(ereq, 3, "")
	_, err = call(context.Background(), cc, svc+"ExtendTo", ereq)
	ext, ok := next(events, evExtended)
	check(err == nil && ok && ext.expires.Equal(to), "EXTENDED event with the new expiry")
	_, err = call(context.Background(), cc, svc+"Return", str(str(nil, 1, l.instance), 2, ""))
	ret, ok := next(events, evReturned)
	check(err == nil && ok && ret.instance == l.instance, "RETURNED event")

	cancel()
	err = <-done
	check(status.Code(err) == codes.Canceled, "cancelling the stream -> %v", status.Code(err))

	// Resume after the LEASED event: the rest, once, in order.
	ctx2, cancel2 := context.WithCancel(context.Background())
	again, _ := openWatch(ctx2, cc, watchReq(leased.cursor, pool, -1))
	var kinds []int64
	for len(kinds) < 2 {
		e, ok := next(again, evLeased, evExtended, evReturned)
		if !ok {
			break
		}
		kinds = append(kinds, e.kind)
	}
	check(len(kinds) == 2 && kinds[0] == evExtended && kinds[1] == evReturned, "resumed after a cursor: %v", kinds)
	cancel2()

	dctx, dcancel := context.WithTimeout(context.Background(), time.Second)
	_, ddone := openWatch(dctx, cc, watchReq("", pool, -1))
	err = <-ddone
	dcancel()
	check(status.Code(err) == codes.DeadlineExceeded, "a deadline ends the stream -> %v", status.Code(err))

	_, bdone := openWatch(context.Background(), cc, watchReq("not a cursor", pool, -1))
	err = <-bdone
	st, _ := status.FromError(err)
	check(st.Code() == codes.InvalidArgument && strings.HasPrefix(st.Message(), "after:"),
		"a bad cursor -> %v %q", st.Code(), st.Message())
}
