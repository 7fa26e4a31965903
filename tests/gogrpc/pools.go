package main

// The pool API as `inctl vm pool ...` and `inctl vm lease --runtime` call it.

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

const poolSvc = "/intrinsic_proto.vmpoolapi.v1.VMPoolService/"

// parseAll keeps every occurrence of each field (repeated fields).
func parseAll(b []byte) map[protowire.Number][][]byte {
	out := map[protowire.Number][][]byte{}
	for len(b) > 0 {
		n, t, l := protowire.ConsumeTag(b)
		b = b[l:]
		switch t {
		case protowire.BytesType:
			v, l := protowire.ConsumeBytes(b)
			out[n] = append(out[n], v)
			b = b[l:]
		case protowire.VarintType:
			v, l := protowire.ConsumeVarint(b)
			out[n] = append(out[n], protowire.AppendVarint(nil, v))
			b = b[l:]
		default:
			panic("unexpected wire type")
		}
	}
	return out
}

type spec struct{ runtime, os, hw, tier string }
type pool struct {
	name, current, desired string
	spec                   spec
	reconciling            bool
}

func encSpec(s spec) []byte {
	var b []byte
	b = str(b, 1, s.runtime)
	b = str(b, 2, s.os)
	b = str(b, 3, s.hw)
	return str(b, 4, s.tier)
}

func parsePool(b []byte) pool {
	f := parse(b)
	s := parse(f[6])
	return pool{string(f[1]), string(f[3]), string(f[4]),
		spec{string(s[1]), string(s[2]), string(s[3]), string(s[4])}, varint(f[7]) != 0}
}

func listPools(ctx context.Context, cc *grpc.ClientConn) ([]pool, error) {
	r, err := call(ctx, cc, poolSvc+"ListPools", nil)
	if err != nil {
		return nil, err
	}
	var out []pool
	for _, p := range parseAll(r)[1] {
		out = append(out, parsePool(p))
	}
	return out, nil
}

func findPool(ctx context.Context, cc *grpc.ClientConn, name string) (*pool, error) {
	ps, err := listPools(ctx, cc)
	if err != nil {
		return nil, err
	}
	for i := range ps {
		if ps[i].name == name {
			return &ps[i], nil
		}
	}
	return nil, nil
}

// waitFor polls like pool/wait.go (faster): until cond or the timeout.
func waitFor(d time.Duration, cond func() bool) bool {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if cond() {
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	return cond()
}

func leaseRetrying(ctx context.Context, cc *grpc.ClientConn, poolName, rid string) (*lease, error) {
	end := time.Now().Add(60 * time.Second)
	for {
		req := str(nil, 1, poolName)
		req = msg(req, 2, ts(time.Now().Add(30*time.Minute)))
		req = str(req, 3, "")
		req = str(req, 4, rid)
		r, err := call(ctx, cc, svc+"Lease", req)
		if err == nil {
			return parseLease(r)
		}
		c := status.Code(err)
		if c == codes.PermissionDenied || c == codes.Unauthenticated || time.Now().After(end) {
			return nil, err
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func runPools(cc *grpc.ClientConn) {
	ctx := context.Background()
	defaults := spec{"", "", "default", "ad_hoc_single"}

	r, err := call(ctx, cc, poolSvc+"ListTiers", nil)
	tiers := map[string]bool{}
	for _, t := range parseAll(r)[1] {
		tiers[string(parse(t)[1])] = true
	}
	check(err == nil && tiers["ad_hoc_single"], "ListTiers has ad_hoc_single: %v %v", tiers, err)
	r, err = call(ctx, cc, poolSvc+"ListHardwareTemplates", nil)
	hws := map[string]bool{}
	for _, t := range parseAll(r)[1] {
		hws[string(parse(t)[1])] = true
	}
	check(err == nil && hws["default"], "ListHardwareTemplates has default: %v %v", hws, err)

	// inctl vm pool create --pool P (tier and template defaults, versions empty)
	name := fmt.Sprintf("GoPool.%d", time.Now().UnixNano()%1000000)
	r, err = call(ctx, cc, poolSvc+"CreatePool", msg(str(nil, 1, name), 2, encSpec(defaults)))
	created := parsePool(r)
	check(err == nil && created.name == name && created.desired == "RUNNING" &&
		created.spec.runtime != "" && created.spec.os != "" && created.spec.tier == "ad_hoc_single",
		"CreatePool answers the resolved spec: %+v %v", created, err)
	_, err = call(ctx, cc, poolSvc+"CreatePool", msg(str(nil, 1, name), 2, encSpec(defaults)))
	check(status.Code(err) == codes.AlreadyExists, "CreatePool again -> %v", status.Code(err))
	_, err = call(ctx, cc, poolSvc+"CreatePool", msg(str(nil, 1, "bad name!"), 2, encSpec(defaults)))
	check(status.Code(err) == codes.InvalidArgument, "CreatePool bad name -> %v", status.Code(err))
	_, err = call(ctx, cc, poolSvc+"CreatePool", msg(str(nil, 1, name+"x"), 2, encSpec(spec{"", "", "default", "nosuchtier"})))
	check(status.Code(err) == codes.InvalidArgument, "CreatePool unknown tier -> %v", status.Code(err))

	// create --wait-timeout: RUNNING, not reconciling, same spec as CreatePool's
	ok := waitFor(60*time.Second, func() bool {
		p, _ := findPool(ctx, cc, name)
		return p != nil && p.current == "RUNNING" && !p.reconciling && p.spec == created.spec
	})
	check(ok, "create --wait-timeout: pool reaches RUNNING with the created spec")

	// update with no flags: a present but empty mask changes nothing
	upd := func(s spec, paths ...string) (pool, error) {
		var mask []byte
		for _, p := range paths {
			mask = str(mask, 1, p)
		}
		req := msg(str(nil, 1, name), 2, encSpec(s))
		req = protowire.AppendTag(req, 3, protowire.BytesType)
		req = protowire.AppendBytes(req, mask)
		r, err := call(ctx, cc, poolSvc+"UpdatePool", req)
		return parsePool(r), err
	}
	p, err := upd(spec{"intrinsic.platform.20200101.RC01", "", "default", "ad_hoc_single"})
	check(err == nil && p.name == name && p.spec == created.spec, "UpdatePool empty mask: unchanged full Pool %+v %v", p, err)
	p, err = upd(defaults, "spec.runtime")
	check(err == nil && p.name == name && p.spec.runtime == created.spec.runtime, "UpdatePool spec.runtime \"\" = current version: %+v %v", p, err)
	_, err = upd(defaults, "spec.bogus")
	check(status.Code(err) == codes.InvalidArgument, "UpdatePool unknown path -> %v", status.Code(err))
	ok = waitFor(60*time.Second, func() bool {
		p, err := upd(defaults, "spec.runtime")
		return err == nil && p.current == "RUNNING" && !p.reconciling
	})
	check(ok, "update --wait-timeout: repeating the update converges to RUNNING")

	// a lease from it, seen by ListLeases with its exact expiry
	rid := fmt.Sprintf("6f0c9a9e-1b2c-4d3e-8f40-%012x", time.Now().UnixNano()&0xffffffffffff)
	l, err := leaseRetrying(ctx, cc, name, rid)
	check(err == nil && l != nil && l.pool == name, "Lease from the API pool: %v %v", l, err)
	if l == nil {
		return
	}
	r, err = call(ctx, cc, poolSvc+"ListLeases", str(nil, 1, name))
	found := false
	for _, b := range parseAll(r)[1] {
		f := parse(b)
		if string(f[1]) == l.instance && string(f[2]) == name && parseTs(f[3]).Equal(l.expires) {
			found = true
		}
	}
	check(err == nil && found, "ListLeases shows the lease, expiry exact: %v", err)

	_, err = call(ctx, cc, poolSvc+"PausePool", str(nil, 1, name))
	check(err == nil, "PausePool: %v", err)
	_, err = call(ctx, cc, poolSvc+"PausePool", str(nil, 1, name))
	check(err == nil, "PausePool again (idempotent): %v", err)
	_, err = call(ctx, cc, svc+"Lease", str(nil, 1, name))
	check(status.Code(err) == codes.FailedPrecondition, "Lease on a paused pool -> %v", status.Code(err))
	_, err = call(ctx, cc, svc+"GetLease", str(nil, 1, l.instance))
	check(err == nil, "existing lease still there while paused: %v", err)
	ok = waitFor(30*time.Second, func() bool {
		p, _ := findPool(ctx, cc, name)
		return p != nil && p.current == "PAUSED" && p.desired == "PAUSED"
	})
	check(ok, "pool reaches PAUSED")
	_, err = call(ctx, cc, poolSvc+"ResumePool", str(nil, 1, name))
	check(err == nil, "ResumePool: %v", err)

	_, err = call(ctx, cc, poolSvc+"DeletePool", str(nil, 1, name))
	check(err == nil, "DeletePool: %v", err)
	_, err = call(ctx, cc, poolSvc+"ResumePool", str(nil, 1, name))
	check(status.Code(err) == codes.FailedPrecondition, "ResumePool on a deleting pool -> %v", status.Code(err))
	ereq := msg(str(nil, 1, l.instance), 2, ts(time.Now().Add(time.Hour)))
	ereq = str(ereq, 3, "")
	_, err = call(ctx, cc, svc+"ExtendTo", ereq)
	check(err == nil, "ExtendTo while the pool is DELETING: %v", err)
	_, err = call(ctx, cc, poolSvc+"StopLease", str(nil, 1, l.instance))
	check(err == nil, "StopLease: %v", err)
	_, err = call(ctx, cc, poolSvc+"StopLease", str(nil, 1, l.instance))
	check(status.Code(err) == codes.NotFound, "StopLease again -> %v", status.Code(err))
	ok = waitFor(60*time.Second, func() bool {
		p, err := findPool(ctx, cc, name)
		return err == nil && (p == nil || p.current == "DELETED")
	})
	check(ok, "delete --wait-timeout: the pool disappears")
	_, err = call(ctx, cc, poolSvc+"DeletePool", str(nil, 1, name))
	check(status.Code(err) == codes.NotFound, "DeletePool of a deleted pool -> %v", status.Code(err))
	_, err = call(ctx, cc, poolSvc+"StopPool", str(nil, 1, ""))
	check(status.Code(err) == codes.InvalidArgument, "StopPool with no name -> %v", status.Code(err))

	// inctl vm lease --runtime R: create, lease with one reservation, delete at once
	adhoc := fmt.Sprintf("adhoc-lease-Max-Müller-%d", time.Now().UnixNano()%1000000)
	r, err = call(ctx, cc, poolSvc+"CreatePool", msg(str(nil, 1, adhoc), 2,
		encSpec(spec{"intrinsic.platform.20261201.RC00", "", "default", "ad_hoc_single"})))
	ap := parsePool(r)
	check(err == nil && ap.name == adhoc, "ad-hoc CreatePool: %+v %v", ap, err)
	rid = fmt.Sprintf("7f0c9a9e-1b2c-4d3e-8f40-%012x", time.Now().UnixNano()&0xffffffffffff)
	al, err := leaseRetrying(ctx, cc, ap.name, rid)
	check(err == nil && al != nil, "ad-hoc Lease: %v %v", al, err)
	_, derr := call(ctx, cc, poolSvc+"DeletePool", str(nil, 1, ap.name))
	check(derr == nil, "ad-hoc DeletePool right after the lease: %v", derr)
	if al != nil {
		r, err = call(ctx, cc, svc+"GetLease", str(nil, 1, al.instance))
		check(err == nil, "ad-hoc lease kept while its pool is deleted: %v", err)
		_, err = call(ctx, cc, svc+"Return", str(str(nil, 1, al.instance), 3, ""))
		check(err == nil, "ad-hoc Return: %v", err)
	}
	ok = waitFor(60*time.Second, func() bool {
		p, err := findPool(ctx, cc, ap.name)
		return err == nil && p == nil
	})
	check(ok, "the ad-hoc pool is gone once its VM is")
}
