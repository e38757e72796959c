package sqlite

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/storetest"
)

// The broker's store (OpenExclusive) keeps nonces in memory; it must
// pass the same conformance suite as the durable one.
func TestStoreSuiteExclusive(t *testing.T) {
	storetest.StoreSuite(t, func(t *testing.T) store.Store {
		s, err := OpenExclusive(context.Background(), filepath.Join(t.TempDir(), "kbs.db"))
		if err != nil {
			t.Fatalf("OpenExclusive: %v", err)
		}
		return s
	})
}

// TestExclusiveLock: a second broker on the same file is refused with
// the reason; the lock goes with Close; every open has a new epoch; a
// nonce spent before a reopen is forgotten (which is why the broker
// checks the epoch), while Open's durable nonces are not affected.
func TestExclusiveLock(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	a, err := OpenExclusive(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	e1, ok := a.NonceEpoch()
	if !ok || e1 == 0 {
		t.Fatalf("NonceEpoch of an exclusive store = %d, %v; want nonzero, true", e1, ok)
	}
	if _, err := OpenExclusive(ctx, path); err == nil || !strings.Contains(err.Error(), "another broker is serving from it") {
		t.Fatalf("second OpenExclusive: %v, want a refusal naming the other broker", err)
	}
	// Tools may still share the file without the lock.
	shared, err := Open(ctx, path)
	if err != nil {
		t.Fatalf("Open beside an exclusive store: %v", err)
	}
	if _, ok := shared.NonceEpoch(); ok {
		t.Fatal("a store opened with Open claims an in-memory nonce epoch")
	}
	shared.Close()

	exp := time.Now().Add(time.Minute)
	if err := a.UseNonce(ctx, "n", exp); err != nil {
		t.Fatal(err)
	}
	if err := a.UseNonce(ctx, "n", exp); !errors.Is(err, store.ErrReplay) {
		t.Fatalf("replay: %v, want ErrReplay", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := OpenExclusive(ctx, path)
	if err != nil {
		t.Fatalf("OpenExclusive after Close: %v", err)
	}
	defer b.Close()
	e2, _ := b.NonceEpoch()
	if e2 == e1 || e2 == 0 {
		t.Fatalf("epoch after reopen = %d, before %d: want a new nonzero one", e2, e1)
	}
	// Forgotten: the broker's epoch check, not the store, refuses it now.
	if err := b.UseNonce(ctx, "n", exp); err != nil {
		t.Fatalf("UseNonce after reopen: %v", err)
	}
	// Nothing reached the nonces table.
	var n int
	if err := b.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM nonces`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("%d nonces written to the table by an exclusive store", n)
	}
}

// Serving sees a broker's lock without taking it from anyone or making
// a file.
func TestServing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kbs.db")
	if on, err := Serving(path); err != nil || on {
		t.Fatalf("before any open: serving %v, %v", on, err)
	}
	if _, err := os.Stat(path + ".lock"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Serving made the lock file: %v", err)
	}
	s, err := OpenExclusive(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if on, err := Serving(path); err != nil || !on {
		t.Errorf("while a broker holds it: serving %v, %v", on, err)
	}
	// Looking did not take the lock from the broker.
	if _, err := OpenExclusive(context.Background(), path); err == nil {
		t.Error("a second exclusive open succeeded after Serving looked")
	}
	s.Close()
	if on, err := Serving(path); err != nil || on {
		t.Errorf("after the broker closed: serving %v, %v", on, err)
	}
}
