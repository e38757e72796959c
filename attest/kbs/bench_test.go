package kbs

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/sample"
)

// BenchmarkHandshake runs whole key releases (auth, attest, resource:
// three HTTP round trips, evidence made and checked, a token signed and
// verified, a nonce spent in the store, the passphrase sealed to the
// TEE key and opened) from 64 concurrent guests over loopback TCP, and
// reports throughput and latency percentiles. The guests run in the
// same process, so their share of the CPU (evidence, key generation,
// decryption) counts against the broker's numbers.
//
//	go test -run XXX -bench Handshake ./attest/kbs/
func BenchmarkHandshake(b *testing.B) {
	b.Run("sample/sqlite", func(b *testing.B) {
		br := newBroker(b, benchOpts)
		br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeSample, Passphrase: passphrase})
		runHandshakes(b, br, func(int) attest.Attester { return sample.NewAttester() })
	})
	b.Run("snp/sqlite", func(b *testing.B) {
		f := newSNPFixture(b)
		br := newBroker(b, benchOpts, func(o *Options) { o.Verifiers = []attest.Verifier{f.verifier} })
		br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeSNP, Passphrase: passphrase,
			References: map[string][]string{"measurement": {snpMeasurement()}}})
		// One fake device per guest: the fake is not safe for concurrent
		// use.
		runHandshakes(b, br, func(int) attest.Attester { return f.attester(b, nil) })
	})
	b.Run("sample/postgres", func(b *testing.B) {
		br := newBrokerOn(b, openPostgres(b), newKeys(b), benchOpts)
		br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeSample, Passphrase: passphrase})
		runHandshakes(b, br, func(int) attest.Attester { return sample.NewAttester() })
	})
	b.Run("snp/postgres", func(b *testing.B) {
		f := newSNPFixture(b)
		br := newBrokerOn(b, openPostgres(b), newKeys(b), benchOpts, func(o *Options) { o.Verifiers = []attest.Verifier{f.verifier} })
		br.addWorkload(WorkloadSpec{ID: "bench", Tee: attest.TeeSNP, Passphrase: passphrase,
			References: map[string][]string{"measurement": {snpMeasurement()}}})
		runHandshakes(b, br, func(int) attest.Attester { return f.attester(b, nil) })
	})
}

// benchOpts leaves out what a benchmark should not measure: the test
// log buffer.
func benchOpts(o *Options) { o.Logger = nil }

const benchClients = 64

func runHandshakes(b *testing.B, br *broker, attester func(i int) attest.Attester) {
	tr := &http.Transport{MaxIdleConns: benchClients, MaxIdleConnsPerHost: benchClients, IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	clients := make([]*attest.Client, benchClients)
	for i := range clients {
		clients[i] = &attest.Client{BaseURL: br.ts.URL, HTTP: hc, Attester: attester(i)}
	}
	ctx := context.Background()
	// Warm up connections and caches outside the timing.
	for _, c := range clients[:4] {
		if _, err := c.Resource(ctx, PassphrasePath("bench")); err != nil {
			b.Fatal(err)
		}
	}

	var next atomic.Int64
	lat := make([]time.Duration, b.N)
	var (
		mu       sync.Mutex
		firstErr error
	)
	var wg sync.WaitGroup
	cpu0 := cpuTime()
	b.ResetTimer()
	start := time.Now()
	for _, c := range clients {
		wg.Add(1)
		go func(c *attest.Client) {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				t0 := time.Now()
				got, err := c.Resource(ctx, PassphrasePath("bench"))
				lat[i] = time.Since(t0)
				if err == nil && string(got) != passphrase {
					err = errors.New("released the wrong passphrase")
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					return
				}
			}
		}(c)
	}
	wg.Wait()
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "handshakes/s")
	b.ReportMetric(pct(0.50), "p50_ms")
	b.ReportMetric(pct(0.99), "p99_ms")
	// CPU per handshake, guests included, is what throughput on an idle
	// machine follows from (cores / cpu): it does not move with load
	// from other processes the way wall-clock numbers do.
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu_us/handshake")
	b.ReportMetric(0, "ns/op") // wall time per op says little with 64 in flight
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
