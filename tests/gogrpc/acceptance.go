package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	_ "google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

type raw struct{}

func (raw) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(d []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte{}, d...)
	return nil
}
func (raw) Name() string { return "proto" }

const svc = "/intrinsic_proto.vmpoolleaseapi.v1.VMPoolLeaseService/"

func ts(t time.Time) []byte {
	var b []byte
	b = protowire.AppendTag(b, 1, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(t.Unix()))
	b = protowire.AppendTag(b, 2, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(t.Nanosecond()))
	return b
}
func str(b []byte, n protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, n, protowire.BytesType)
	return protowire.AppendString(b, s)
}
func msg(b []byte, n protowire.Number, m []byte) []byte {
	b = protowire.AppendTag(b, n, protowire.BytesType)
	return protowire.AppendBytes(b, m)
}

// parse: each field's last occurrence (what protobuf keeps of a scalar).
func parse(b []byte) map[protowire.Number][]byte {
	out := map[protowire.Number][]byte{}
	for n, vs := range parseAll(b) {
		out[n] = vs[len(vs)-1]
	}
	return out
}

func varint(b []byte) int64 {
	if b == nil {
		return 0
	}
	v, _ := protowire.ConsumeVarint(b)
	return int64(v)
}
func parseTs(b []byte) time.Time { f := parse(b); return time.Unix(varint(f[1]), varint(f[2])).UTC() }

type lease struct {
	instance, pool, zone string
	expires              time.Time
}

func parseLease(resp []byte) (*lease, error) {
	f := parse(resp)
	lb, ok := f[1]
	if !ok {
		return nil, fmt.Errorf("OK answer without a lease")
	}
	l := parse(lb)
	return &lease{string(l[1]), string(l[2]), string(l[4]), parseTs(l[3])}, nil
}

var fails int

func check(ok bool, format string, a ...interface{}) {
	if ok {
		fmt.Printf("PASS "+format+"\n", a...)
	} else {
		fails++
		fmt.Printf("FAIL "+format+"\n", a...)
	}
}

func call(ctx context.Context, cc *grpc.ClientConn, method string, req []byte, opts ...grpc.CallOption) ([]byte, error) {
	var resp []byte
	err := cc.Invoke(ctx, method, &req, &resp, append(opts, grpc.ForceCodec(raw{}))...)
	return resp, err
}

func main() {
	if len(os.Args) < 3 {
		fmt.Println("usage: acc ADDRESS POOL [KEEPALIVE] | acc ADDRESS --pools | acc ADDRESS --watch POOL | acc ADDRESS --load ...")
		os.Exit(2)
	}
	addr := os.Args[1]
	pool := os.Args[2]
	if pool == "--load" {
		runLoad(addr, os.Args[3:])
		return
	}
	keep := grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true})
	cc, err := grpc.Dial(addr, append(dialOptions(true), keep)...)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	if pool == "--watch" {
		runWatch(cc, os.Args[3])
		fmt.Printf("%d failures\n", fails)
		if fails > 0 {
			os.Exit(1)
		}
		return
	}
	if pool == "--pools" {
		runPools(cc)
		fmt.Printf("%d failures\n", fails)
		if fails > 0 {
			os.Exit(1)
		}
		return
	}

	if os.Getenv("ACC_TOKEN") != "" {
		anon, err := grpc.Dial(addr, dialOptions(false)...)
		if err != nil {
			panic(err)
		}
		_, err = call(ctx, anon, svc+"Lease", str(nil, 1, pool))
		check(status.Code(err) == codes.Unauthenticated, "Lease over TLS without a token -> %v", status.Code(err))
		anon.Close()
	}

	r, err := call(ctx, cc, svc+"Ping", nil)
	check(err == nil && len(parse(r)[1]) > 0, "Ping: %v", err)

	_, err = call(ctx, cc, svc+"Nope", nil)
	check(status.Code(err) == codes.Unimplemented, "unknown method -> %v", status.Code(err))
	_, err = call(ctx, cc, "/no.Such/Thing", nil)
	check(status.Code(err) == codes.Unimplemented, "unknown service -> %v", status.Code(err))

	hc := grpc_health_v1.NewHealthClient(cc)
	h, err := hc.Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	check(err == nil && h.Status == grpc_health_v1.HealthCheckResponse_SERVING, "health: %v %v", h, err)

	// Lease as today's inctl: empty tag, expiry with nanos, reservation id.
	want := time.Now().Add(10 * time.Minute).Add(123456789 * time.Nanosecond)
	rid := fmt.Sprintf("5f0c9a9e-1b2c-4d3e-8f40-%012x", time.Now().UnixNano()&0xffffffffffff)
	req := str(nil, 1, pool)
	req = msg(req, 2, ts(want))
	req = str(req, 3, "")
	req = str(req, 4, rid)
	ctxd, cancel := context.WithTimeout(ctx, 20*time.Minute)
	r, err = call(ctxd, cc, svc+"Lease", req, grpc.UseCompressor("gzip"))
	cancel()
	check(err == nil, "Lease (gzip, empty tag): %v", err)
	var l *lease
	if err == nil {
		l, err = parseLease(r)
		check(err == nil, "Lease carries lease: %v", err)
	}
	if l == nil {
		fmt.Println("no lease; stopping")
		os.Exit(1)
	}
	check(l.expires.Equal(want), "Lease expiry exact: got %s want %s", l.expires.Format(time.RFC3339Nano), want.Format(time.RFC3339Nano))
	// retry with same reservation returns same lease
	r, err = call(ctx, cc, svc+"Lease", req)
	l2, _ := parseLease(r)
	check(err == nil && l2 != nil && l2.instance == l.instance, "Lease retry same reservation -> same lease")

	to := time.Now().Add(time.Hour).Add(987654321 * time.Nanosecond)
	ereq := str(nil, 1, l.instance)
	ereq = msg(ereq, 2, ts(to))
	ereq = str(ereq, 3, "")
	r, err = call(ctx, cc, svc+"ExtendTo", ereq)
	el, perr := parseLease(r)
	check(err == nil && perr == nil && el.expires.Equal(to), "ExtendTo exact (expire-in): %v %v", err, el)

	r, err = call(ctx, cc, svc+"GetLease", str(nil, 1, l.instance))
	gl, perr := parseLease(r)
	check(err == nil && perr == nil && gl.expires.Equal(to), "GetLease exact: %v %v", err, gl)

	// wrong tag
	_, err = call(ctx, cc, svc+"Return", str(str(nil, 1, l.instance), 3, "inctl"))
	check(status.Code(err) == codes.PermissionDenied, "Return with other tag -> %v", status.Code(err))

	// 200 concurrent streams
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad := 0
	for i := 0; i < 200; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, e := call(ctx, cc, svc+"Pools", nil)
			if e != nil {
				mu.Lock()
				bad++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	check(bad == 0, "200 concurrent Pools: %d failed", bad)

	// bad inputs
	_, err = call(ctx, cc, svc+"Lease", str(str(nil, 1, pool), 4, "not-a-uuid"))
	check(status.Code(err) == codes.InvalidArgument, "bad reservation id -> %v %v", status.Code(err), err)
	_, err = call(ctx, cc, svc+"Lease", str(nil, 1, "nosuchpool"))
	check(status.Code(err) == codes.NotFound, "unknown pool -> %v", status.Code(err))
	_, err = call(ctx, cc, svc+"Lease", []byte{0x0a, 0x50, 0x41})
	check(status.Code(err) == codes.InvalidArgument, "truncated bytes -> %v", status.Code(err))

	_, err = call(ctx, cc, svc+"Return", str(nil, 1, l.instance))
	check(err == nil, "Return: %v", err)
	_, err = call(ctx, cc, svc+"Return", str(nil, 1, l.instance))
	check(status.Code(err) == codes.NotFound, "second Return -> %v", status.Code(err))

	if len(os.Args) > 3 {
		// keepalive: stay idle with keepalive pings for a while, then call again
		d, _ := time.ParseDuration(os.Args[3])
		time.Sleep(d)
		_, err = call(ctx, cc, svc+"Ping", nil)
		check(err == nil, "Ping after %s of keepalive: %v", d, err)
	}
	fmt.Printf("%d failures\n", fails)
	if fails > 0 {
		os.Exit(1)
	}
}
