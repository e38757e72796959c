package sqlite

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// BenchmarkHandshakeStore does a handshake's store work, one at a time:
// spend a nonce, read the workload. Every nonce commit changes the WAL,
// so the read after it starts with a cold page cache; nonce alone
// includes the hand-off to the group committer.
func BenchmarkHandshakeStore(b *testing.B) {
	s, err := Open(context.Background(), b.TempDir()+"/kbs.db")
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	w := store.Workload{ID: "w", Tee: "sample", SealedPassphrase: []byte("x"), References: map[string][]string{"a": {"b"}}}
	if err := s.AddWorkload(ctx, w); err != nil {
		b.Fatal(err)
	}
	exp := time.Now().Add(time.Hour)
	prefix := fmt.Sprint(time.Now().UnixNano()) // fresh nonces across -count runs
	b.Run("nonce", func(b *testing.B) {
		i := 0
		for b.Loop() {
			i++
			if err := s.UseNonce(ctx, fmt.Sprint(prefix, "a", i), exp); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("nonce+read", func(b *testing.B) {
		i := 0
		for b.Loop() {
			i++
			if err := s.UseNonce(ctx, fmt.Sprint(prefix, "b", i), exp); err != nil {
				b.Fatal(err)
			}
			if _, err := s.Workload(ctx, "w"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("read", func(b *testing.B) {
		for b.Loop() {
			if _, err := s.Workload(ctx, "w"); err != nil {
				b.Fatal(err)
			}
		}
	})
}
