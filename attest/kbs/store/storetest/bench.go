package storetest

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// BenchConcurrency is how many goroutines BenchUseNonce runs at once:
// the broker's design load of concurrent handshakes.
const BenchConcurrency = 64

// BenchUseNonce measures UseNonce of fresh nonces from
// BenchConcurrency goroutines, one nonce per handshake as the broker
// does. ns/op is wall time per nonce across all goroutines; the
// nonces/s metric is its inverse, to compare with the broker's target
// of 3000 handshakes/s on 2 cores.
func BenchUseNonce(b *testing.B, s store.Store) {
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	var next atomic.Int64
	prefix := fmt.Sprintf("bench-%d-", time.Now().UnixNano()) // fresh across -count runs
	b.SetParallelism((BenchConcurrency + runtime.GOMAXPROCS(0) - 1) / runtime.GOMAXPROCS(0))
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := s.UseNonce(ctx, fmt.Sprint(prefix, next.Add(1)), exp); err != nil {
				b.Errorf("UseNonce: %v", err)
				return
			}
		}
	})
	b.StopTimer()
	if sec := b.Elapsed().Seconds(); sec > 0 {
		b.ReportMetric(float64(b.N)/sec, "nonces/s")
	}
}
