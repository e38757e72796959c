package postgres

import (
	"github.com/jackc/pgx/v5"

	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
	"github.com/cwrun/cwrun/attest/kbs/store/storetest"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func openFresh(t testing.TB) *Store {
	t.Helper()
	s, err := Open(context.Background(), pgtest.Shared(t))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func TestStoreSuite(t *testing.T) {
	storetest.StoreSuite(t, func(t *testing.T) store.Store { return openFresh(t) })
}

func TestCrash(t *testing.T) {
	storetest.CrashTest(t, func(t *testing.T) string { return pgtest.Shared(t) },
		func(ctx context.Context, url string) (store.Store, error) { return Open(ctx, url) })
}

func BenchmarkUseNonce(b *testing.B) {
	s := openFresh(b)
	defer s.Close()
	storetest.BenchUseNonce(b, s)
}

// TestConcurrentOpen: brokers starting together on an empty database
// all come up, and the schema is made once.
func TestConcurrentOpen(t *testing.T) {
	url := pgtest.Shared(t)
	ctx := context.Background()
	const n = 6
	stores := make([]*Store, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stores[i], errs[i] = Open(ctx, url)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("Open %d: %v", i, err)
			continue
		}
		defer stores[i].Close()
	}
	if t.Failed() {
		return
	}
	var version, rows int
	if err := stores[0].pool.QueryRow(ctx, `SELECT MAX(version), COUNT(*) FROM schema_version`).Scan(&version, &rows); err != nil {
		t.Fatal(err)
	}
	if version != SchemaVersion() || rows != 1 {
		t.Errorf("schema_version: version %d in %d rows, want %d in 1", version, rows, SchemaVersion())
	}
	// They share state: a nonce used through one is a replay through another.
	exp := time.Now().Add(time.Minute)
	if err := stores[1].UseNonce(ctx, "shared", exp); err != nil {
		t.Fatal(err)
	}
	if err := stores[2].UseNonce(ctx, "shared", exp); !errors.Is(err, store.ErrReplay) {
		t.Errorf("nonce through a second broker: err = %v, want ErrReplay", err)
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	url := pgtest.Shared(t)
	ctx := context.Background()
	s, err := Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.pool.Exec(ctx, `UPDATE schema_version SET version = $1`, SchemaVersion()+1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(ctx, url)
	if err == nil || !strings.Contains(err.Error(), "upgrade cwrun") {
		t.Fatalf("Open of a newer schema: err = %v, want one saying to upgrade cwrun", err)
	}
}

func TestOpenErrors(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, c := range []struct{ url, want, secret string }{
		{"postgres://u:hunter2@127.0.0.1:1/db?sslmode=disable&connect_timeout=2", "is the server up", "hunter2"},
		{"postgres://u:hunter2@127.0.0.1:5432/db?sslmode=bogus", "u:xxxxx@", "hunter2"},
	} {
		s, err := Open(ctx, c.url)
		if err == nil {
			s.Close()
			t.Errorf("Open(%s) succeeded", c.url)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("Open(%s): %v, want it to mention %q", c.url, err, c.want)
		}
		if strings.Contains(err.Error(), c.secret) {
			t.Errorf("Open error leaks the password: %v", err)
		}
	}
}

// TestBlockedNonceHonoursContext: a UseNonce waiting on another
// session's uncommitted insert of the same nonce gives up when its
// context does, and its statement stops on the server too rather than
// waiting on for the lock.
func TestBlockedNonceHonoursContext(t *testing.T) {
	s := openFresh(t)
	defer s.Close()
	ctx := context.Background()
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `INSERT INTO nonces (nonce, expires) VALUES ('held', now() + interval '1 minute')`); err != nil {
		t.Fatal(err)
	}
	tctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = s.UseNonce(tctx, "held", time.Now().Add(time.Minute))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("UseNonce blocked on a row lock: err = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("UseNonce gave up after %s, want about 200ms", d)
	}
	waiting := -1
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		if waiting == 0 {
			break
		}
	}
	if waiting != 0 {
		t.Errorf("%d statements still wait for the lock on the server after the caller gave up", waiting)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// The pool is still healthy.
	if err := s.UseNonce(ctx, "other", time.Now().Add(time.Minute)); err != nil {
		t.Errorf("UseNonce after a cancelled one: %v", err)
	}
	if err := s.UseNonce(ctx, "held", time.Now().Add(time.Minute)); !errors.Is(err, store.ErrReplay) {
		t.Errorf("UseNonce of the committed nonce: %v, want ErrReplay", err)
	}
}

func TestBackgroundPrune(t *testing.T) {
	s := openFresh(t)
	defer s.Close()
	ctx := context.Background()
	clock := time.Now()
	var mu sync.Mutex
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	for i := 0; i < pruneEvery-1; i++ {
		if err := s.UseNonce(ctx, fmt.Sprint("old-", i), clock.Add(time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	clock = clock.Add(time.Minute)
	mu.Unlock()
	if err := s.UseNonce(ctx, "new", clock.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := s.pool.QueryRow(ctx, `SELECT COUNT(*) FROM nonces`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d nonces left 10s after the triggering insert, want 1 (the live one)", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestNonceCommitMode: nonce inserts commit without waiting for the
// disk, everything else with the server's full durability.
func TestNonceCommitMode(t *testing.T) {
	s := openFresh(t)
	defer s.Close()
	ctx := context.Background()
	for _, c := range []struct {
		pool string
		q    interface {
			QueryRow(context.Context, string, ...any) pgx.Row
		}
		want string
	}{{"main", s.pool, "on"}, {"nonce", s.nonces, "off"}} {
		var got string
		if err := c.q.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != c.want {
			t.Errorf("%s pool: synchronous_commit = %s, want %s", c.pool, got, c.want)
		}
	}
}

// TestUseNonceDuringClose: UseNonce calls racing Close, and one after
// it, return (spent or refused as closed) instead of waiting for
// committers that are gone.
func TestUseNonceDuringClose(t *testing.T) {
	s := openFresh(t)
	ctx := context.Background()
	if err := s.UseNonce(ctx, "before", time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 64)
	for i := range 64 {
		go func() { done <- s.UseNonce(ctx, fmt.Sprint("racing-", i), time.Now().Add(time.Minute)) }()
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for range 64 {
		select {
		case err := <-done:
			if err != nil && !strings.Contains(err.Error(), "closed") {
				t.Errorf("UseNonce racing Close: %v, want nil or a closed-store error", err)
			}
		case <-timeout:
			t.Fatal("UseNonce racing Close hangs")
		}
	}
	err := s.UseNonce(ctx, "after", time.Now().Add(time.Minute))
	if err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("UseNonce after Close = %v, want a closed-store error", err)
	}
}

// SchemaOf reads the version without making or migrating anything, and
// names an unreachable server without its password.
func TestSchemaOf(t *testing.T) {
	url := pgtest.Shared(t)
	ctx := context.Background()
	if v, err := SchemaOf(ctx, url); err != nil || v != 0 {
		t.Fatalf("empty database: version %d, %v; want 0", v, err)
	}
	if v, err := SchemaOf(ctx, url); err != nil || v != 0 {
		t.Fatalf("looking made a schema: version %d, %v", v, err)
	}
	s, err := Open(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if v, err := SchemaOf(ctx, url); err != nil || v != SchemaVersion() {
		t.Errorf("after Open: version %d, %v; want %d", v, err, SchemaVersion())
	}
	_, err = SchemaOf(ctx, "postgres://kbs:hunter2@127.0.0.1:1/kbs?connect_timeout=5")
	if err == nil || strings.Contains(err.Error(), "hunter2") || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Errorf("unreachable server: %v", err)
	}
}
