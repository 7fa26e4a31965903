package main

// The benchmark's grpc-go load mode (tests/bench/versus.py runs it):
//
//	acc ADDRESS --load ping|lease CONCURRENCY DURATION WARMUP POOL [CONNECTIONS]
//
// CONCURRENCY workers share CONNECTIONS (default 8) connections round-robin and
// loop Ping, or Lease then Return of the leased instance, for WARMUP+DURATION.
// Only calls that start after the warm-up and end inside the window count. It
// prints one JSON object: per kind (ping, lease, return, cycle = Lease+Return)
// the count and latency percentiles, errors by kind and status, calls/s and its
// own CPU (getrusage) as % of one core.

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

const loadTag = "bench"

type window struct {
	start, end time.Time
	mu         sync.Mutex
	lat        map[string][]float64
	errors     map[string]int
}

func (w *window) record(kind string, t0, t1 time.Time) {
	if t0.Before(w.start) || t1.After(w.end) {
		return
	}
	w.mu.Lock()
	w.lat[kind] = append(w.lat[kind], t1.Sub(t0).Seconds())
	w.mu.Unlock()
}

func (w *window) fail(kind string, t0 time.Time, err error) {
	if t0.Before(w.start) || t0.After(w.end) {
		return
	}
	w.mu.Lock()
	w.errors[kind+":"+status.Code(err).String()]++
	w.mu.Unlock()
}

// percentiles: nearest rank, in milliseconds, as tests/bench/load.py computes them.
func percentiles(v []float64) map[string]interface{} {
	sort.Float64s(v)
	rank := func(q float64) float64 {
		i := int(math.Round(q*float64(len(v))+0.5)) - 1
		if i < 0 {
			i = 0
		}
		if i > len(v)-1 {
			i = len(v) - 1
		}
		return math.Round(v[i]*1e6) / 1e3
	}
	return map[string]interface{}{
		"p50_ms": rank(0.50), "p90_ms": rank(0.90), "p99_ms": rank(0.99),
		"max_ms": math.Round(v[len(v)-1]*1e6) / 1e3,
	}
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func loadWorker(ctx context.Context, cc *grpc.ClientConn, op, pool string, w *window) {
	req := str(str(nil, 1, pool), 3, loadTag)
	for time.Now().Before(w.end) {
		t0 := time.Now()
		if op == "ping" {
			_, err := call(ctx, cc, svc+"Ping", nil)
			if err != nil {
				w.fail("ping", t0, err)
				continue
			}
			w.record("ping", t0, time.Now())
			continue
		}
		r, err := call(ctx, cc, svc+"Lease", req)
		var l *lease
		if err == nil {
			l, err = parseLease(r)
		}
		if err != nil {
			w.fail("lease", t0, err)
			time.Sleep(5 * time.Millisecond) // the pool ran dry: do not spin on errors
			continue
		}
		t1 := time.Now()
		w.record("lease", t0, t1)
		_, err = call(ctx, cc, svc+"Return", str(str(nil, 1, l.instance), 3, loadTag))
		if err != nil {
			w.fail("return", t1, err)
			continue
		}
		t2 := time.Now()
		w.record("return", t1, t2)
		w.record("cycle", t0, t2)
	}
}

func runLoad(addr string, args []string) {
	if len(args) < 5 {
		fmt.Println("usage: acc ADDRESS --load ping|lease CONCURRENCY DURATION WARMUP POOL [CONNECTIONS]")
		os.Exit(2)
	}
	op, pool := args[0], args[4]
	concurrency, _ := strconv.Atoi(args[1])
	duration, _ := time.ParseDuration(args[2])
	warmup, _ := time.ParseDuration(args[3])
	conns := 8
	if len(args) > 5 {
		conns, _ = strconv.Atoi(args[5])
	}
	if conns > concurrency {
		conns = concurrency
	}
	ccs := make([]*grpc.ClientConn, conns)
	for i := range ccs {
		cc, err := grpc.Dial(addr, dialOptions(true)...)
		if err != nil {
			panic(err)
		}
		defer cc.Close()
		ccs[i] = cc
	}
	ctx := context.Background()
	now := time.Now()
	w := &window{start: now.Add(warmup), end: now.Add(warmup + duration),
		lat: map[string][]float64{}, errors: map[string]int{}}
	cpu0, wall0 := cpuSeconds(), time.Now()
	var wg sync.WaitGroup
	for i := 0; i < concurrency; i++ {
		wg.Add(1)
		go func(cc *grpc.ClientConn) {
			defer wg.Done()
			loadWorker(ctx, cc, op, pool, w)
		}(ccs[i%conns])
	}
	wg.Wait()
	out := map[string]interface{}{"errors": w.errors, "generator": "grpc-go"}
	total := 0
	for kind, v := range w.lat {
		entry := percentiles(v)
		entry["calls"] = len(v)
		entry["calls_per_s"] = math.Round(10*float64(len(v))/duration.Seconds()) / 10
		out[kind] = entry
		if kind != "cycle" {
			total += len(v)
		}
	}
	out["calls_per_s"] = math.Round(10*float64(total)/duration.Seconds()) / 10
	out["client_cpu_percent"] = math.Round(1000*(cpuSeconds()-cpu0)/time.Since(wall0).Seconds()) / 10
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
}
