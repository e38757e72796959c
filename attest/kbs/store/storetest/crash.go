package storetest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// envCrashTarget carries the store's target (a path or URL) to the
// child process CrashTest starts; its presence makes the test binary
// the writer rather than the judge.
const envCrashTarget = "CWRUN_STORETEST_CRASH_TARGET"

const (
	// crashAcks is how many acknowledged writes the parent waits for
	// before it kills the child.
	crashAcks = 200
	// crashWriters is how many goroutines of the child write at once;
	// as many again spend nonces.
	crashWriters = 8
	// crashChildLimit stops a child whose parent never kills it.
	crashChildLimit = 60 * time.Second
)

// OpenFunc opens the store named by target (a path or URL).
type OpenFunc func(ctx context.Context, target string) (store.Store, error)

// CrashTest checks that an acknowledged AddWorkload or UseNonce
// survives a kill -9 of the writing process. It re-runs the test
// binary, restricted to the calling test, with the target in the
// environment: in that child CrashTest opens the store, adds workloads
// and spends nonces from several goroutines as fast as it can, printing
// each ID only after the call returned nil. The parent kills the child
// with SIGKILL once it has seen crashAcks acknowledgements of each
// kind, mid-burst, reopens the store and checks that every acknowledged
// workload is there and intact, that every acknowledged nonce is spent
// (a replay), and that the store still lists and writes.
//
// newTarget makes a fresh target in the parent (for example a path in
// t.TempDir or a new PostgreSQL database); the child never calls it.
// Call CrashTest first thing in its test: in the child nothing before
// it may depend on the parent's state. Skipped with -short.
func CrashTest(t *testing.T, newTarget func(t *testing.T) string, open OpenFunc) {
	if target := os.Getenv(envCrashTarget); target != "" {
		crashChild(t, target, open)
		return
	}
	if testing.Short() {
		t.Skip("kill -9 test skipped in -short mode")
	}
	target := newTarget(t)

	// The store must exist before the child starts so that the parent
	// knows the open works; the child then opens it again.
	s, err := open(context.Background(), target)
	if err != nil {
		t.Fatalf("open %s: %v", target, err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("close %s: %v", target, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*crashChildLimit)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run="+runPattern(t.Name()), "-test.count=1", "-test.v=false")
	cmd.Env = append(os.Environ(), envCrashTarget+"="+target)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child %s: %v", os.Args[0], err)
	}
	acked := map[string]bool{}
	var ackedNonces []string
	killed := false
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if n, ok := strings.CutPrefix(sc.Text(), "NONCE "); ok {
			ackedNonces = append(ackedNonces, n)
		} else if id, ok := strings.CutPrefix(sc.Text(), "ACK "); ok {
			acked[id] = true
		} else {
			continue // the test framework's own output
		}
		if len(acked) >= crashAcks && len(ackedNonces) >= crashAcks && !killed {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatalf("kill child: %v", err)
			}
			killed = true
		}
		// Keep reading: acknowledgements already in the pipe count.
	}
	werr := cmd.Wait()
	if !killed {
		t.Fatalf("child ended after %d acknowledgements, before it could be killed: %v\nstderr:\n%s", len(acked), werr, stderr.String())
	}
	var exitErr *exec.ExitError
	if !errors.As(werr, &exitErr) {
		t.Fatalf("child: %v, want death by SIGKILL", werr)
	}
	if ws, ok := exitErr.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want death by SIGKILL\nstderr:\n%s", werr, stderr.String())
	}
	t.Logf("child killed after %d acknowledged workloads and %d nonces", len(acked), len(ackedNonces))

	s, err = open(context.Background(), target)
	if err != nil {
		t.Fatalf("reopen %s after kill -9: %v", target, err)
	}
	defer func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	ws, err := s.Workloads(context.Background())
	if err != nil {
		t.Fatalf("list workloads after kill -9: %v", err)
	}
	listed := map[string]bool{}
	for _, w := range ws {
		listed[w.ID] = true
		// Unacknowledged writes may or may not have landed; either way
		// nothing is half-written.
		checkWorkload(t, w, crashWorkload(w.ID))
	}
	lost := 0
	for id := range acked {
		if !listed[id] {
			lost++
			if lost <= 10 {
				t.Errorf("acknowledged workload %s is missing after kill -9", id)
			}
			continue
		}
		w, err := s.Workload(context.Background(), id)
		if err != nil {
			t.Errorf("Workload(%s): %v", id, err)
			continue
		}
		checkWorkload(t, w, crashWorkload(id))
	}
	if lost > 0 {
		t.Fatalf("%d of %d acknowledged workloads lost", lost, len(acked))
	}
	t.Logf("%d acknowledged, %d stored", len(acked), len(ws))

	// Every acknowledged nonce is spent: using it again is a replay.
	var (
		lostNonces atomic.Int64
		nwg        sync.WaitGroup
		nexti      atomic.Int64
	)
	exp := time.Now().Add(time.Hour)
	for range crashWriters {
		nwg.Go(func() {
			for {
				i := int(nexti.Add(1) - 1)
				if i >= len(ackedNonces) {
					return
				}
				err := s.UseNonce(context.Background(), ackedNonces[i], exp)
				if !errors.Is(err, store.ErrReplay) {
					if lostNonces.Add(1) <= 10 {
						t.Errorf("acknowledged nonce %s: UseNonce after kill -9 = %v, want ErrReplay (the nonce was lost)", ackedNonces[i], err)
					}
				}
			}
		})
	}
	nwg.Wait()
	if n := lostNonces.Load(); n > 0 {
		t.Fatalf("%d of %d acknowledged nonces lost", n, len(ackedNonces))
	}

	// The store still takes writes, including the IDs the child was
	// writing when it died (unless they landed).
	if err := s.AddWorkload(context.Background(), crashWorkload("after-crash")); err != nil {
		t.Errorf("AddWorkload after kill -9: %v", err)
	}
	if err := s.UseNonce(context.Background(), "after-crash", time.Now().Add(time.Minute)); err != nil {
		t.Errorf("UseNonce after kill -9: %v", err)
	}
}

// runPattern is a -test.run pattern matching exactly the test named
// name (subtests included: "/" separates the levels).
func runPattern(name string) string {
	parts := strings.Split(name, "/")
	for i, p := range parts {
		parts[i] = "^" + regexp.QuoteMeta(p) + "$"
	}
	return strings.Join(parts, "/")
}

// crashWorkload is the workload the child writes for id: every field
// derived from id, so the parent can check it without being told.
func crashWorkload(id string) store.Workload {
	sum := sha256.Sum256([]byte(id))
	return store.Workload{
		ID:               id,
		Tee:              "sample",
		SealedPassphrase: sum[:],
		References: map[string][]string{
			"sample.measurement": {hex.EncodeToString(sum[:])},
			"sample.svn":         {"1", "2"},
		},
		Policy:    "package policy # " + id,
		CPUs:      int(sum[0]%8) + 1,
		MemoryMiB: 256 * (int(sum[1]%8) + 1),
		Created:   time.Date(2026, 1, 2, 3, 4, 5, int(sum[2])*1000, time.UTC),
	}
}

// crashChild is the writer: it never returns normally while its
// parent is alive, as the parent kills it.
func crashChild(t *testing.T, target string, open OpenFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), crashChildLimit)
	defer cancel()
	s, err := open(ctx, target)
	if err != nil {
		t.Fatalf("child: open %s: %v", target, err)
	}
	var (
		mu   sync.Mutex // one line per write(2), never interleaved
		next atomic.Int64
		wg   sync.WaitGroup
	)
	for g := 0; g < crashWriters; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				id := fmt.Sprintf("crash-%06d", next.Add(1))
				if err := s.AddWorkload(ctx, crashWorkload(id)); err != nil {
					if ctx.Err() == nil {
						t.Errorf("child: AddWorkload(%s): %v", id, err)
					}
					return
				}
				mu.Lock()
				_, err := os.Stdout.WriteString("ACK " + id + "\n")
				mu.Unlock()
				if err != nil {
					return // the parent is gone
				}
			}
		}()
	}
	exp := time.Now().Add(time.Hour)
	var nextNonce atomic.Int64
	for g := 0; g < crashWriters; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				n := fmt.Sprintf("crash-nonce-%07d", nextNonce.Add(1))
				if err := s.UseNonce(ctx, n, exp); err != nil {
					if ctx.Err() == nil {
						t.Errorf("child: UseNonce(%s): %v", n, err)
					}
					return
				}
				mu.Lock()
				_, err := os.Stdout.WriteString("NONCE " + n + "\n")
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	_ = s.Close()
}
