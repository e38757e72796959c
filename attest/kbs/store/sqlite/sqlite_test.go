package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/storetest"
)

func openTemp(t *testing.T) *Store {
	t.Helper()
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "kbs.db"))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s
}

func openTarget(ctx context.Context, path string) (store.Store, error) { return Open(ctx, path) }

func TestStoreSuite(t *testing.T) {
	storetest.StoreSuite(t, func(t *testing.T) store.Store { return openTemp(t) })
}

func TestCrash(t *testing.T) {
	storetest.CrashTest(t, func(t *testing.T) string {
		return filepath.Join(t.TempDir(), "crash.db")
	}, func(ctx context.Context, path string) (store.Store, error) {
		s, err := Open(ctx, path)
		if err != nil {
			return nil, err
		}
		// After the kill the file must also pass SQLite's own check.
		if err := integrityCheck(ctx, s); err != nil {
			_ = s.Close()
			return nil, err
		}
		return s, nil
	})
}

func integrityCheck(ctx context.Context, s *Store) error {
	var res string
	if err := s.r.QueryRowContext(ctx, `PRAGMA integrity_check`).Scan(&res); err != nil {
		return fmt.Errorf("integrity_check: %w", err)
	}
	if res != "ok" {
		return fmt.Errorf("integrity_check: %s", res)
	}
	return nil
}

func BenchmarkUseNonce(b *testing.B) {
	s, err := Open(context.Background(), filepath.Join(b.TempDir(), "bench.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	storetest.BenchUseNonce(b, s)
}

func TestFileModes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kbs.db")
	s, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// Write so the WAL exists.
	if err := s.UseNonce(context.Background(), "n", time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("stat: %v", err)
		}
		if mode := fi.Mode().Perm(); mode != 0o600 {
			t.Errorf("%s: mode %o, want 0600", filepath.Base(p), mode)
		}
	}
}

func TestPragmas(t *testing.T) {
	s := openTemp(t)
	defer s.Close()
	ctx := context.Background()
	for _, c := range []struct {
		db     *sql.DB
		pragma string
		want   string
	}{
		{s.w, "journal_mode", "wal"},
		{s.r, "journal_mode", "wal"},
		{s.w, "synchronous", "1"}, // NORMAL between durable writes
		{s.w, "foreign_keys", "1"},
		{s.r, "foreign_keys", "1"},
		{s.w, "busy_timeout", fmt.Sprint(busyTimeout.Milliseconds())},
		{s.r, "query_only", "1"},
		{s.w, "query_only", "0"},
	} {
		var got string
		if err := c.db.QueryRowContext(ctx, "PRAGMA "+c.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", c.pragma, err)
		}
		if got != c.want {
			pool := "writer"
			if c.db == s.r {
				pool = "reader"
			}
			t.Errorf("%s PRAGMA %s = %s, want %s", pool, c.pragma, got, c.want)
		}
	}
	// A durable write puts synchronous back to NORMAL afterwards.
	if err := s.SetPolicy(ctx, "p", "package p"); err != nil {
		t.Fatal(err)
	}
	var sync string
	if err := s.w.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&sync); err != nil || sync != "1" {
		t.Errorf("synchronous after a durable write = %q, %v; want 1 (NORMAL)", sync, err)
	}
	// Readers cannot write, whatever a bug might send them.
	if _, err := s.r.ExecContext(ctx, `INSERT INTO nonces (nonce, expires) VALUES ('x', 1)`); err == nil {
		t.Error("insert through the read pool succeeded")
	}
}

func TestReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	w := store.Workload{ID: "w", Tee: "sample", SealedPassphrase: []byte("p"), CPUs: 1}
	if err := s.AddWorkload(ctx, w); err != nil {
		t.Fatal(err)
	}
	if err := s.UseNonce(ctx, "n", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(ctx, path)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	defer s.Close()
	if _, err := s.Workload(ctx, "w"); err != nil {
		t.Errorf("workload after reopen: %v", err)
	}
	if err := s.UseNonce(ctx, "n", time.Now().Add(time.Hour)); !errors.Is(err, store.ErrReplay) {
		t.Errorf("nonce after reopen: err = %v, want ErrReplay", err)
	}
	var version, rows int
	if err := s.r.QueryRowContext(ctx, `SELECT MAX(version), COUNT(*) FROM schema_version`).Scan(&version, &rows); err != nil {
		t.Fatal(err)
	}
	if version != SchemaVersion() || rows != 1 {
		t.Errorf("schema_version: version %d in %d rows, want %d in 1", version, rows, SchemaVersion())
	}
}

func TestNewerSchemaRefused(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	s, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.w.ExecContext(ctx, `UPDATE schema_version SET version = ?`, SchemaVersion()+1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(ctx, path)
	if err == nil || !strings.Contains(err.Error(), "upgrade cwrun") {
		t.Fatalf("Open of a newer schema: err = %v, want one saying to upgrade cwrun", err)
	}
}

func TestOpenErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not a database ", 100)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		path, want string
	}{
		{"", "give the path"},
		{":memory:", "in-memory"},
		{"file:x.db?mode=memory", "not supported"},
		{filepath.Join(dir, "missing", "kbs.db"), "does its directory exist"},
		{garbage, garbage},
	} {
		s, err := Open(context.Background(), c.path)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded, want an error", c.path)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("Open(%q): %v, want it to mention %q", c.path, err, c.want)
		}
	}
}

// TestWriterQueueHonoursContext: with the writer held, a write waits
// in the pool's queue and gives up when its context does, rather than
// waiting for the lock or failing with SQLITE_BUSY.
func TestWriterQueueHonoursContext(t *testing.T) {
	s := openTemp(t)
	defer s.Close()
	conn, err := s.w.Conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = s.UseNonce(ctx, "n", time.Now().Add(time.Minute))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("UseNonce with the writer held: err = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("UseNonce gave up after %s, want about 100ms", d)
	}
	// Reads go on while the writer is held.
	if _, err := s.Workloads(context.Background()); err != nil {
		t.Errorf("Workloads with the writer held: %v", err)
	}
	conn.Close()
	if err := s.UseNonce(context.Background(), "n", time.Now().Add(time.Minute)); err != nil {
		t.Errorf("UseNonce after release: %v", err)
	}
}

// TestTwoStoresShareFile: two Stores on one file (a broker and an
// admin command) write at once; busy_timeout and IMMEDIATE
// transactions keep both from SQLITE_BUSY.
func TestTwoStoresShareFile(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	a, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for i, s := range []*Store{a, b, a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				if err := s.UseNonce(ctx, fmt.Sprintf("n-%d-%d", i, j), time.Now().Add(time.Minute)); err != nil {
					errs <- err
				}
				if j%10 == 0 {
					w := store.Workload{ID: fmt.Sprintf("w-%d-%d", i, j), Tee: "sample"}
					if err := s.AddWorkload(ctx, w); err != nil {
						errs <- err
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("write from two stores on one file: %v", err)
	}
	ws, err := b.Workloads(ctx)
	if err != nil || len(ws) != 20 {
		t.Errorf("Workloads = %d, %v; want 20", len(ws), err)
	}
}

func TestBackgroundPrune(t *testing.T) {
	s := openTemp(t)
	defer s.Close()
	ctx := context.Background()
	clock := time.Now()
	var mu sync.Mutex
	s.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	// pruneEvery nonces that expire within a second...
	for i := 0; i < pruneEvery-1; i++ {
		if err := s.UseNonce(ctx, fmt.Sprint("old-", i), clock.Add(time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	// ...then the clock moves past them and one more insert triggers a prune.
	mu.Lock()
	clock = clock.Add(time.Minute)
	mu.Unlock()
	if err := s.UseNonce(ctx, "new", clock.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		var n int
		if err := s.r.QueryRowContext(ctx, `SELECT COUNT(*) FROM nonces`).Scan(&n); err != nil {
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

// TestUseNonceAfterClose: the group committer is gone after Close, and
// UseNonce says so rather than hanging.
func TestUseNonceAfterClose(t *testing.T) {
	s := openTemp(t)
	if err := s.UseNonce(context.Background(), "before", time.Now().Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.UseNonce(context.Background(), "after", time.Now().Add(time.Minute)) }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "closed") {
			t.Errorf("UseNonce after Close = %v, want a closed-store error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("UseNonce after Close hangs")
	}
}

// TestGroupCommitBatches: concurrent inserts share commits, and each
// caller still learns its own outcome (one replay among duplicates).
func TestGroupCommitBatches(t *testing.T) {
	s := openTemp(t)
	defer s.Close()
	ctx := context.Background()
	exp := time.Now().Add(time.Minute)
	const n = 500
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		ok      = map[string]int{}
		replays = map[string]int{}
	)
	for i := range n {
		wg.Go(func() {
			nonce := fmt.Sprintf("g-%d", i/2) // every nonce twice
			err := s.UseNonce(ctx, nonce, exp)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok[nonce]++
			case errors.Is(err, store.ErrReplay):
				replays[nonce]++
			default:
				t.Errorf("UseNonce(%s): %v", nonce, err)
			}
		})
	}
	wg.Wait()
	for i := range n / 2 {
		nonce := fmt.Sprintf("g-%d", i)
		if ok[nonce] != 1 || replays[nonce] != 1 {
			t.Errorf("nonce %s used twice at once: %d accepted, %d replays; want 1 and 1", nonce, ok[nonce], replays[nonce])
		}
	}
}
