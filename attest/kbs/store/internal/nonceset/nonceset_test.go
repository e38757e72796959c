package nonceset

import (
	"fmt"
	"testing"
	"time"
)

func TestUse(t *testing.T) {
	s := New()
	now := time.Unix(1_000_000, 0)
	exp := now.Add(5 * time.Minute)
	if !s.Use("a", exp, now) {
		t.Fatal("fresh nonce refused")
	}
	if s.Use("a", exp, now) {
		t.Fatal("spent nonce accepted")
	}
	if !s.Use("A", exp, now) {
		t.Fatal("nonces must compare exactly: A refused after a")
	}
	// Expired entries are taken over.
	if !s.Use("a", exp.Add(time.Minute), exp) {
		t.Fatal("expired entry not taken over")
	}
	if s.Use("a", exp.Add(time.Minute), exp) {
		t.Fatal("taken-over entry accepted twice")
	}
}

// TestGenerations: a nonce stays spent until its expiry however the
// generations rotate, and memory is given back once entries expired.
func TestGenerations(t *testing.T) {
	s := New()
	t0 := time.Unix(1_000_000, 0)
	ttl := 5 * time.Minute
	// One nonce per 10 s for 20 minutes, each checked for replay at
	// every later step until it expires.
	type entry struct {
		nonce string
		exp   time.Time
	}
	var live []entry
	for i := range 120 {
		now := t0.Add(time.Duration(i) * 10 * time.Second)
		n := fmt.Sprintf("n%d", i)
		if !s.Use(n, now.Add(ttl), now) {
			t.Fatalf("step %d: fresh nonce refused", i)
		}
		kept := live[:0]
		for _, e := range live {
			if now.Before(e.exp) {
				if s.Use(e.nonce, e.exp, now) {
					t.Fatalf("step %d: %s accepted again before its expiry", i, e.nonce)
				}
				kept = append(kept, e)
			}
		}
		live = append(kept, entry{n, now.Add(ttl)})
	}
	// 5 min of sessions plus at most one generation's worth.
	if l := s.Len(); l > int((ttl+rotateEvery)/(10*time.Second))+1 {
		t.Fatalf("%d entries held for %d live nonces: expired generations are not dropped", l, len(live))
	}
}

func TestPrune(t *testing.T) {
	s := New()
	now := time.Unix(1_000_000, 0)
	for i := range 10 {
		s.Use(fmt.Sprint(i), now.Add(time.Duration(i+1)*time.Second), now)
	}
	if n := s.Prune(now.Add(5 * time.Second)); n != 5 {
		t.Fatalf("Prune = %d, want 5", n)
	}
	if s.Len() != 5 {
		t.Fatalf("Len = %d after prune, want 5", s.Len())
	}
}

func BenchmarkUse(b *testing.B) {
	s := New()
	now := time.Now()
	i := 0
	for b.Loop() {
		i++
		s.Use(fmt.Sprintf("bm9uY2Ugbm9uY2Ugbm9uY2Ugbm9uY2Ugbm9uY2Ugbm9u%08d", i), now.Add(time.Minute), now)
	}
}
