// Package storetest is the conformance suite every store.Store runs
// (StoreSuite), the kill -9 durability test (CrashTest) and the nonce
// benchmark (BenchmarkUseNonce). It is imported by tests only and must
// never be linked into the broker.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// StoreSuite runs the conformance tests against stores made by open.
// Every subtest calls open for a fresh, empty store and closes it.
func StoreSuite(t *testing.T, open func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"WorkloadRoundTrip", testWorkloadRoundTrip},
		{"WorkloadZeroCreated", testWorkloadZeroCreated},
		{"WorkloadExists", testWorkloadExists},
		{"WorkloadUpdate", testWorkloadUpdate},
		{"WorkloadDelete", testWorkloadDelete},
		{"WorkloadsList", testWorkloadsList},
		{"NotFound", testNotFound},
		{"InvalidText", testInvalidText},
		{"Resources", testResources},
		{"ResourcePaths", testResourcePaths},
		{"SwapPassphrase", testSwapPassphrase},
		{"SwapResource", testSwapResource},
		{"Policies", testPolicies},
		{"Nonce", testNonce},
		{"NonceExpiredReuse", testNonceExpiredReuse},
		{"NonceConcurrentSame", testNonceConcurrentSame},
		{"NonceConcurrentDistinct", testNonceConcurrentDistinct},
		{"NoncePrune", testNoncePrune},
		{"ConcurrentAdd", testConcurrentAdd},
		{"ConcurrentAddSameID", testConcurrentAddSameID},
		{"ContextCanceled", testContextCanceled},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			tc.fn(t, s)
		})
	}
}

// sampleWorkload is a workload whose every field is set, with maps and
// values that a careless encoding would lose: an empty list, a nil
// list, values with quotes, unicode and JSON-looking text.
func sampleWorkload(id string) store.Workload {
	return store.Workload{
		ID:               id,
		Tee:              "snp",
		SealedPassphrase: []byte{0, 1, 2, 0xff, 0, 'x'},
		References: map[string][]string{
			"snp.measurement": {"aa11", "bb22"},
			"snp.policy":      {`{"debug":false}`},
			"empty":           {},
			"nil":             nil,
			"ünïcode ✓":       {"€", ""},
		},
		Policy:    "package policy\n\ndefault allow := false\n",
		CPUs:      3,
		MemoryMiB: 1536,
		Created:   time.Date(2026, 11, 2, 10, 11, 12, 123456000, time.FixedZone("CET", 3600)),
	}
}

// checkWorkload fails t unless got is want as a store returns it:
// every field exact (References with nil and empty lists told apart),
// Created the same instant to the microsecond, in UTC.
func checkWorkload(t *testing.T, got, want store.Workload) {
	t.Helper()
	if got.ID != want.ID || got.Tee != want.Tee || got.Policy != want.Policy ||
		got.CPUs != want.CPUs || got.MemoryMiB != want.MemoryMiB {
		t.Errorf("workload %s: scalar fields\n got %+v\nwant %+v", want.ID, got, want)
	}
	if !bytes.Equal(got.SealedPassphrase, want.SealedPassphrase) {
		t.Errorf("workload %s: SealedPassphrase = %x, want %x", want.ID, got.SealedPassphrase, want.SealedPassphrase)
	}
	if !reflect.DeepEqual(got.References, want.References) {
		t.Errorf("workload %s: References\n got %#v\nwant %#v", want.ID, got.References, want.References)
	}
	wantCreated := want.Created.Truncate(time.Microsecond)
	if !got.Created.Equal(wantCreated) {
		t.Errorf("workload %s: Created = %s, want %s", want.ID, got.Created, wantCreated)
	}
	if got.Created.Location() != time.UTC {
		t.Errorf("workload %s: Created in %s, want UTC", want.ID, got.Created.Location())
	}
}

func testWorkloadRoundTrip(t *testing.T, s store.Store) {
	ctx := context.Background()
	w := sampleWorkload("wl-1")
	if err := s.AddWorkload(ctx, w); err != nil {
		t.Fatalf("AddWorkload: %v", err)
	}
	got, err := s.Workload(ctx, w.ID)
	if err != nil {
		t.Fatalf("Workload: %v", err)
	}
	checkWorkload(t, got, w)

	// Nil and empty maps and passphrases come back as they went in
	// (the passphrase may come back nil or empty: both are empty).
	bare := store.Workload{ID: "wl-bare", Tee: "sample", Created: w.Created}
	if err := s.AddWorkload(ctx, bare); err != nil {
		t.Fatalf("AddWorkload(bare): %v", err)
	}
	gotBare, err := s.Workload(ctx, bare.ID)
	if err != nil {
		t.Fatalf("Workload(bare): %v", err)
	}
	checkWorkload(t, gotBare, bare)
	emptyRefs := store.Workload{ID: "wl-empty", Tee: "sample", References: map[string][]string{}, Created: w.Created}
	if err := s.AddWorkload(ctx, emptyRefs); err != nil {
		t.Fatalf("AddWorkload(empty refs): %v", err)
	}
	gotEmpty, err := s.Workload(ctx, emptyRefs.ID)
	if err != nil {
		t.Fatalf("Workload(empty refs): %v", err)
	}
	checkWorkload(t, gotEmpty, emptyRefs)

	// The caller's slices are not aliased by the store.
	w.SealedPassphrase[0] = 0x42
	got2, err := s.Workload(ctx, w.ID)
	if err != nil {
		t.Fatalf("Workload again: %v", err)
	}
	if got2.SealedPassphrase[0] != 0 {
		t.Errorf("stored passphrase changed with the caller's slice: %x", got2.SealedPassphrase)
	}
}

func testWorkloadZeroCreated(t *testing.T, s store.Store) {
	ctx := context.Background()
	w := sampleWorkload("wl-now")
	w.Created = time.Time{}
	before := time.Now().Add(-time.Second)
	if err := s.AddWorkload(ctx, w); err != nil {
		t.Fatalf("AddWorkload: %v", err)
	}
	after := time.Now().Add(time.Second)
	got, err := s.Workload(ctx, w.ID)
	if err != nil {
		t.Fatalf("Workload: %v", err)
	}
	if got.Created.Before(before) || got.Created.After(after) {
		t.Errorf("zero Created stored as %s, want the time of AddWorkload (%s..%s)", got.Created, before, after)
	}
}

func testWorkloadExists(t *testing.T, s store.Store) {
	ctx := context.Background()
	orig := sampleWorkload("wl-dup")
	if err := s.AddWorkload(ctx, orig); err != nil {
		t.Fatalf("AddWorkload: %v", err)
	}
	other := sampleWorkload("wl-dup")
	other.Tee = "tdx"
	other.SealedPassphrase = []byte("other")
	other.References = map[string][]string{"x": {"y"}}
	other.Created = orig.Created.Add(time.Hour)
	err := s.AddWorkload(ctx, other)
	if !errors.Is(err, store.ErrExists) {
		t.Fatalf("AddWorkload on an existing id: err = %v, want ErrExists", err)
	}
	if !strings.Contains(err.Error(), "wl-dup") {
		t.Errorf("error %q does not name the workload", err)
	}
	got, err := s.Workload(ctx, orig.ID)
	if err != nil {
		t.Fatalf("Workload: %v", err)
	}
	checkWorkload(t, got, orig)
}

func testWorkloadUpdate(t *testing.T, s store.Store) {
	ctx := context.Background()
	orig := sampleWorkload("wl-up")
	if err := s.AddWorkload(ctx, orig); err != nil {
		t.Fatalf("AddWorkload: %v", err)
	}
	upd := store.Workload{
		ID:               orig.ID,
		Tee:              "tdx",
		SealedPassphrase: []byte("new passphrase"),
		References:       map[string][]string{"tdx.mrtd": {"cafe"}},
		Policy:           "",
		CPUs:             8,
		MemoryMiB:        4096,
		Created:          orig.Created.Add(72 * time.Hour), // ignored: Created keeps the registration time
	}
	if err := s.UpdateWorkload(ctx, upd); err != nil {
		t.Fatalf("UpdateWorkload: %v", err)
	}
	got, err := s.Workload(ctx, orig.ID)
	if err != nil {
		t.Fatalf("Workload: %v", err)
	}
	want := upd
	want.Created = orig.Created
	checkWorkload(t, got, want)

	// Updating one workload leaves the others alone.
	other := sampleWorkload("wl-other")
	if err := s.AddWorkload(ctx, other); err != nil {
		t.Fatalf("AddWorkload(other): %v", err)
	}
	upd.CPUs = 1
	if err := s.UpdateWorkload(ctx, upd); err != nil {
		t.Fatalf("UpdateWorkload again: %v", err)
	}
	gotOther, err := s.Workload(ctx, other.ID)
	if err != nil {
		t.Fatalf("Workload(other): %v", err)
	}
	checkWorkload(t, gotOther, other)
}

func testWorkloadDelete(t *testing.T, s store.Store) {
	ctx := context.Background()
	for _, id := range []string{"wl-a", "wl-b"} {
		if err := s.AddWorkload(ctx, sampleWorkload(id)); err != nil {
			t.Fatalf("AddWorkload(%s): %v", id, err)
		}
	}
	if err := s.DeleteWorkload(ctx, "wl-a"); err != nil {
		t.Fatalf("DeleteWorkload: %v", err)
	}
	if _, err := s.Workload(ctx, "wl-a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Workload after delete: err = %v, want ErrNotFound", err)
	}
	if err := s.DeleteWorkload(ctx, "wl-a"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("second DeleteWorkload: err = %v, want ErrNotFound", err)
	}
	if _, err := s.Workload(ctx, "wl-b"); err != nil {
		t.Errorf("Workload(wl-b) after deleting wl-a: %v", err)
	}
	// The id is free again.
	if err := s.AddWorkload(ctx, sampleWorkload("wl-a")); err != nil {
		t.Errorf("AddWorkload after delete: %v", err)
	}
}

func testWorkloadsList(t *testing.T, s store.Store) {
	ctx := context.Background()
	ws, err := s.Workloads(ctx)
	if err != nil {
		t.Fatalf("Workloads on an empty store: %v", err)
	}
	if len(ws) != 0 {
		t.Fatalf("Workloads on an empty store: %d entries", len(ws))
	}
	ids := []string{"c", "a", "b-2", "b-10", "Z"}
	want := map[string]store.Workload{}
	for i, id := range ids {
		w := sampleWorkload(id)
		w.CPUs = i + 1
		w.References = map[string][]string{"n": {fmt.Sprint(i)}}
		want[id] = w
		if err := s.AddWorkload(ctx, w); err != nil {
			t.Fatalf("AddWorkload(%s): %v", id, err)
		}
	}
	ws, err = s.Workloads(ctx)
	if err != nil {
		t.Fatalf("Workloads: %v", err)
	}
	var got []string
	for _, w := range ws {
		got = append(got, w.ID)
		checkWorkload(t, w, want[w.ID])
	}
	sorted := append([]string(nil), ids...)
	sort.Strings(sorted)
	if !reflect.DeepEqual(got, sorted) {
		t.Errorf("Workloads ids = %q, want %q (sorted by id)", got, sorted)
	}
}

func testNotFound(t *testing.T, s store.Store) {
	ctx := context.Background()
	checks := []struct {
		name string
		call func() error
	}{
		{"Workload", func() error { _, err := s.Workload(ctx, "missing"); return err }},
		{"UpdateWorkload", func() error { return s.UpdateWorkload(ctx, sampleWorkload("missing")) }},
		{"DeleteWorkload", func() error { return s.DeleteWorkload(ctx, "missing") }},
		{"Resource", func() error { _, err := s.Resource(ctx, "repo/type/missing"); return err }},
		{"DeleteResource", func() error { return s.DeleteResource(ctx, "repo/type/missing") }},
		{"Policy", func() error { _, err := s.Policy(ctx, "missing"); return err }},
	}
	for _, c := range checks {
		err := c.call()
		if !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s of a missing key: err = %v, want ErrNotFound", c.name, err)
			continue
		}
		if !strings.Contains(err.Error(), "missing") {
			t.Errorf("%s: error %q does not name the key", c.name, err)
		}
	}
	// UpdateWorkload of a missing workload creates nothing.
	if _, err := s.Workload(ctx, "missing"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("UpdateWorkload of a missing id created it: %v", err)
	}
}

func testInvalidText(t *testing.T, s store.Store) {
	ctx := context.Background()
	future := time.Now().Add(time.Minute)
	bad := []string{"", "nul\x00byte", "bad utf8 \xff"}
	for _, v := range bad {
		w := sampleWorkload(v)
		if err := s.AddWorkload(ctx, w); err == nil {
			t.Errorf("AddWorkload(id %q) succeeded, want an error", v)
		}
		w = sampleWorkload("wl-ok")
		w.References = map[string][]string{"c": {v}}
		if v != "" { // an empty reference value is allowed
			if err := s.AddWorkload(ctx, w); err == nil {
				t.Errorf("AddWorkload(reference value %q) succeeded, want an error", v)
			}
		}
		if err := s.SetResource(ctx, v, []byte("x")); err == nil {
			t.Errorf("SetResource(%q) succeeded, want an error", v)
		}
		if err := s.SetPolicy(ctx, v, "package p"); err == nil {
			t.Errorf("SetPolicy(name %q) succeeded, want an error", v)
		}
		if err := s.SetPolicy(ctx, "p", v); err == nil {
			t.Errorf("SetPolicy(rego %q) succeeded, want an error", v)
		}
		if err := s.UseNonce(ctx, v, future); err == nil {
			t.Errorf("UseNonce(%q) succeeded, want an error", v)
		}
	}
	ws, err := s.Workloads(ctx)
	if err != nil {
		t.Fatalf("Workloads: %v", err)
	}
	if len(ws) != 0 {
		t.Errorf("refused workloads were stored: %d", len(ws))
	}
}

func testResources(t *testing.T, s store.Store) {
	ctx := context.Background()
	big := bytes.Repeat([]byte{0, 1, 2, 0xfe}, 1<<18) // 1 MiB with NULs
	steps := []struct {
		path string
		data []byte
	}{
		{"default/key/one", []byte("sealed-1")},
		{"default/key/two", big},
		{"default/key/one", []byte("sealed-1b")}, // overwrite
		{"other/cert/ünï", []byte{}},
	}
	want := map[string][]byte{}
	for _, st := range steps {
		if err := s.SetResource(ctx, st.path, st.data); err != nil {
			t.Fatalf("SetResource(%s): %v", st.path, err)
		}
		want[st.path] = st.data
		for p, w := range want {
			got, err := s.Resource(ctx, p)
			if err != nil {
				t.Fatalf("Resource(%s): %v", p, err)
			}
			if !bytes.Equal(got, w) {
				t.Fatalf("Resource(%s) = %d bytes, want %d (content differs)", p, len(got), len(w))
			}
		}
	}
	if err := s.DeleteResource(ctx, "default/key/one"); err != nil {
		t.Fatalf("DeleteResource: %v", err)
	}
	if _, err := s.Resource(ctx, "default/key/one"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("Resource after delete: err = %v, want ErrNotFound", err)
	}
	if got, err := s.Resource(ctx, "default/key/two"); err != nil || !bytes.Equal(got, big) {
		t.Errorf("Resource(default/key/two) after deleting another: %d bytes, %v", len(got), err)
	}
}

func testResourcePaths(t *testing.T, s store.Store) {
	ctx := context.Background()
	if got, err := s.ResourcePaths(ctx); err != nil || got == nil || len(got) != 0 {
		t.Fatalf("ResourcePaths of an empty store = %#v, %v; want an empty, non-nil list", got, err)
	}
	// Bytewise order, whatever the database's collation: "B" < "a" < "ü".
	for _, p := range []string{"ü/x/y", "a/key/two", "B/key/one", "a/key/one"} {
		if err := s.SetResource(ctx, p, []byte(p)); err != nil {
			t.Fatalf("SetResource(%s): %v", p, err)
		}
	}
	if err := s.DeleteResource(ctx, "a/key/two"); err != nil {
		t.Fatal(err)
	}
	got, err := s.ResourcePaths(ctx)
	want := []string{"B/key/one", "a/key/one", "ü/x/y"}
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("ResourcePaths = %q, %v; want %q", got, err, want)
	}
}

// testSwapPassphrase: the swap replaces the sealed passphrase only
// while it holds prev, touches no other field, and tells a missing
// workload from a changed one.
func testSwapPassphrase(t *testing.T, s store.Store) {
	ctx := context.Background()
	w := sampleWorkload("swap")
	if err := s.AddWorkload(ctx, w); err != nil {
		t.Fatal(err)
	}
	next := []byte{9, 0, 8, 0xff}
	if err := s.SwapPassphrase(ctx, "swap", []byte("not what it holds"), next); !errors.Is(err, store.ErrChanged) {
		t.Fatalf("SwapPassphrase with a stale prev: err = %v, want ErrChanged", err)
	}
	if got, _ := s.Workload(ctx, "swap"); !bytes.Equal(got.SealedPassphrase, w.SealedPassphrase) {
		t.Fatalf("a refused swap changed the passphrase to %x", got.SealedPassphrase)
	}
	if err := s.SwapPassphrase(ctx, "swap", w.SealedPassphrase, next); err != nil {
		t.Fatalf("SwapPassphrase: %v", err)
	}
	want := w
	want.SealedPassphrase = next
	got, err := s.Workload(ctx, "swap")
	if err != nil {
		t.Fatal(err)
	}
	checkWorkload(t, got, want)
	// The old blob no longer matches: a second swap from it is refused.
	if err := s.SwapPassphrase(ctx, "swap", w.SealedPassphrase, []byte("x")); !errors.Is(err, store.ErrChanged) {
		t.Errorf("second SwapPassphrase from the old blob: err = %v, want ErrChanged", err)
	}
	if err := s.SwapPassphrase(ctx, "gone", next, []byte("x")); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SwapPassphrase of a missing workload: err = %v, want ErrNotFound", err)
	}
}

func testSwapResource(t *testing.T, s store.Store) {
	ctx := context.Background()
	prev, next := []byte{0, 1, 2}, []byte{3, 0, 4, 5}
	if err := s.SetResource(ctx, "r/t/one", prev); err != nil {
		t.Fatal(err)
	}
	if err := s.SetResource(ctx, "r/t/two", prev); err != nil {
		t.Fatal(err)
	}
	if err := s.SwapResource(ctx, "r/t/one", []byte{0, 1}, next); !errors.Is(err, store.ErrChanged) {
		t.Fatalf("SwapResource with a stale prev: err = %v, want ErrChanged", err)
	}
	if err := s.SwapResource(ctx, "r/t/one", prev, next); err != nil {
		t.Fatalf("SwapResource: %v", err)
	}
	for p, want := range map[string][]byte{"r/t/one": next, "r/t/two": prev} {
		if got, err := s.Resource(ctx, p); err != nil || !bytes.Equal(got, want) {
			t.Errorf("Resource(%s) after the swap = %x, %v; want %x", p, got, err, want)
		}
	}
	if err := s.SwapResource(ctx, "r/t/gone", prev, next); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SwapResource of a missing path: err = %v, want ErrNotFound", err)
	}
}

func testPolicies(t *testing.T, s store.Store) {
	ctx := context.Background()
	regoA := "package policy\n\ndefault allow := false\nallow if input.tee == \"snp\"\n"
	regoB := "package policy\n\ndefault allow := true # ✓\n"
	if err := s.SetPolicy(ctx, "resource", regoA); err != nil {
		t.Fatalf("SetPolicy: %v", err)
	}
	if err := s.SetPolicy(ctx, "other", regoB); err != nil {
		t.Fatalf("SetPolicy(other): %v", err)
	}
	for name, want := range map[string]string{"resource": regoA, "other": regoB} {
		got, err := s.Policy(ctx, name)
		if err != nil || got != want {
			t.Errorf("Policy(%s) = %q, %v; want %q", name, got, err, want)
		}
	}
	if err := s.SetPolicy(ctx, "resource", regoB); err != nil {
		t.Fatalf("SetPolicy overwrite: %v", err)
	}
	if got, err := s.Policy(ctx, "resource"); err != nil || got != regoB {
		t.Errorf("Policy after overwrite = %q, %v; want %q", got, err, regoB)
	}
}

func testNonce(t *testing.T, s store.Store) {
	ctx := context.Background()
	exp := time.Now().Add(5 * time.Minute)
	if err := s.UseNonce(ctx, "n1", exp); err != nil {
		t.Fatalf("first UseNonce: %v", err)
	}
	if err := s.UseNonce(ctx, "n1", exp); !errors.Is(err, store.ErrReplay) {
		t.Fatalf("second UseNonce: err = %v, want ErrReplay", err)
	}
	// A replay with a later expiry is still a replay.
	if err := s.UseNonce(ctx, "n1", exp.Add(time.Hour)); !errors.Is(err, store.ErrReplay) {
		t.Fatalf("UseNonce with a later expiry: err = %v, want ErrReplay", err)
	}
	if err := s.UseNonce(ctx, "n2", exp); err != nil {
		t.Fatalf("UseNonce of another nonce: %v", err)
	}
	// Nonces are compared exactly.
	if err := s.UseNonce(ctx, "N1", exp); err != nil {
		t.Fatalf("UseNonce(N1) after n1: %v (nonces are case-sensitive)", err)
	}
	if err := s.UseNonce(ctx, "n3", time.Now().Add(-time.Second)); err == nil || errors.Is(err, store.ErrReplay) {
		t.Fatalf("UseNonce with a past expiry: err = %v, want a refusal that is not ErrReplay", err)
	}
}

func testNonceExpiredReuse(t *testing.T, s store.Store) {
	ctx := context.Background()
	exp := time.Now().Add(time.Second)
	if err := s.UseNonce(ctx, "short", exp); err != nil {
		t.Fatalf("UseNonce: %v", err)
	}
	err := s.UseNonce(ctx, "short", time.Now().Add(time.Minute))
	if time.Now().Before(exp) && !errors.Is(err, store.ErrReplay) {
		t.Fatalf("UseNonce before expiry: err = %v, want ErrReplay", err)
	}
	time.Sleep(time.Until(exp) + 50*time.Millisecond)
	if err := s.UseNonce(ctx, "short", time.Now().Add(time.Minute)); err != nil {
		t.Fatalf("UseNonce after expiry: %v, want the expired entry reused", err)
	}
	// Reusing it recorded the new expiry: it is live again.
	if err := s.UseNonce(ctx, "short", time.Now().Add(time.Minute)); !errors.Is(err, store.ErrReplay) {
		t.Fatalf("UseNonce after reuse: err = %v, want ErrReplay", err)
	}
}

// run starts n goroutines running fn(i) together and waits for them.
func run(n int, fn func(i int)) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			fn(i)
		}()
	}
	close(start)
	wg.Wait()
}

func testNonceConcurrentSame(t *testing.T, s store.Store) {
	ctx := context.Background()
	for round := 0; round < 3; round++ {
		nonce := fmt.Sprintf("same-%d", round)
		exp := time.Now().Add(time.Minute)
		var ok, replay atomic.Int32
		errs := make(chan error, 64)
		run(64, func(int) {
			err := s.UseNonce(ctx, nonce, exp)
			switch {
			case err == nil:
				ok.Add(1)
			case errors.Is(err, store.ErrReplay):
				replay.Add(1)
			default:
				errs <- err
			}
		})
		close(errs)
		for err := range errs {
			t.Errorf("UseNonce: %v (want nil or ErrReplay)", err)
		}
		if ok.Load() != 1 || replay.Load() != 63 {
			t.Fatalf("round %d: 64 concurrent UseNonce: %d succeeded, %d replays; want 1 and 63", round, ok.Load(), replay.Load())
		}
	}
}

func testNonceConcurrentDistinct(t *testing.T, s store.Store) {
	ctx := context.Background()
	exp := time.Now().Add(time.Minute)
	const goroutines, each = 64, 20
	errs := make(chan error, goroutines*each)
	run(goroutines, func(g int) {
		for i := 0; i < each; i++ {
			if err := s.UseNonce(ctx, fmt.Sprintf("d-%d-%d", g, i), exp); err != nil {
				errs <- err
			}
		}
	})
	close(errs)
	for err := range errs {
		t.Errorf("UseNonce of a fresh nonce: %v", err)
	}
	// All of them are recorded.
	for g := 0; g < goroutines; g += 7 {
		if err := s.UseNonce(ctx, fmt.Sprintf("d-%d-%d", g, each-1), exp); !errors.Is(err, store.ErrReplay) {
			t.Errorf("replay of d-%d-%d: err = %v, want ErrReplay", g, each-1, err)
		}
	}
}

func testNoncePrune(t *testing.T, s store.Store) {
	p, ok := s.(store.Pruner)
	if !ok {
		t.Skip("store has no PruneNonces")
	}
	ctx := context.Background()
	now := time.Now()
	for i := 0; i < 30; i++ {
		// The clock passed to PruneNonces decides, not the wall clock:
		// these expire 30s from now, long after a slow insert loop.
		exp := now.Add(time.Hour)
		if i%3 == 0 {
			exp = now.Add(30 * time.Second)
		}
		if err := s.UseNonce(ctx, fmt.Sprintf("p-%d", i), exp); err != nil {
			t.Fatalf("UseNonce: %v", err)
		}
	}
	n, err := p.PruneNonces(ctx, now.Add(time.Minute))
	if err != nil {
		t.Fatalf("PruneNonces: %v", err)
	}
	if n != 10 {
		t.Errorf("PruneNonces deleted %d, want the 10 expired ones", n)
	}
	n, err = p.PruneNonces(ctx, now.Add(time.Minute))
	if err != nil || n != 0 {
		t.Errorf("second PruneNonces = %d, %v; want 0, nil", n, err)
	}
	// The live nonces are still used.
	for i := 1; i < 30; i += 3 {
		if err := s.UseNonce(ctx, fmt.Sprintf("p-%d", i), now.Add(time.Hour)); !errors.Is(err, store.ErrReplay) {
			t.Errorf("live nonce p-%d after prune: err = %v, want ErrReplay", i, err)
		}
	}
}

func testConcurrentAdd(t *testing.T, s store.Store) {
	ctx := context.Background()
	const total, goroutines = 200, 32
	errs := make(chan error, total)
	run(goroutines, func(g int) {
		for i := g; i < total; i += goroutines {
			if err := s.AddWorkload(ctx, sampleWorkload(fmt.Sprintf("c-%03d", i))); err != nil {
				errs <- err
			}
		}
	})
	close(errs)
	for err := range errs {
		t.Errorf("AddWorkload: %v", err)
	}
	ws, err := s.Workloads(ctx)
	if err != nil {
		t.Fatalf("Workloads: %v", err)
	}
	if len(ws) != total {
		t.Fatalf("Workloads: %d, want %d", len(ws), total)
	}
	for i, w := range ws {
		checkWorkload(t, w, sampleWorkload(fmt.Sprintf("c-%03d", i)))
	}
}

func testConcurrentAddSameID(t *testing.T, s store.Store) {
	ctx := context.Background()
	var ok, exists atomic.Int32
	errs := make(chan error, 16)
	var winner atomic.Int32
	run(16, func(g int) {
		w := sampleWorkload("same")
		w.CPUs = g + 1
		err := s.AddWorkload(ctx, w)
		switch {
		case err == nil:
			ok.Add(1)
			winner.Store(int32(g + 1))
		case errors.Is(err, store.ErrExists):
			exists.Add(1)
		default:
			errs <- err
		}
	})
	close(errs)
	for err := range errs {
		t.Errorf("AddWorkload: %v", err)
	}
	if ok.Load() != 1 || exists.Load() != 15 {
		t.Fatalf("16 concurrent AddWorkload of one id: %d succeeded, %d ErrExists; want 1 and 15", ok.Load(), exists.Load())
	}
	got, err := s.Workload(ctx, "same")
	if err != nil {
		t.Fatalf("Workload: %v", err)
	}
	if int32(got.CPUs) != winner.Load() {
		t.Errorf("stored CPUs = %d, want the winner's %d", got.CPUs, winner.Load())
	}
}

func testContextCanceled(t *testing.T, s store.Store) {
	bg := context.Background()
	if err := s.AddWorkload(bg, sampleWorkload("present")); err != nil {
		t.Fatalf("AddWorkload: %v", err)
	}
	if err := s.SetResource(bg, "r/t/present", []byte("x")); err != nil {
		t.Fatalf("SetResource: %v", err)
	}
	ctx, cancel := context.WithCancel(bg)
	cancel()
	exp := time.Now().Add(time.Minute)
	calls := []struct {
		name string
		call func() error
	}{
		{"AddWorkload", func() error { return s.AddWorkload(ctx, sampleWorkload("new")) }},
		{"UpdateWorkload", func() error {
			w := sampleWorkload("present")
			w.CPUs = 99
			return s.UpdateWorkload(ctx, w)
		}},
		{"Workload", func() error { _, err := s.Workload(ctx, "present"); return err }},
		{"Workloads", func() error { _, err := s.Workloads(ctx); return err }},
		{"DeleteWorkload", func() error { return s.DeleteWorkload(ctx, "present") }},
		{"SetResource", func() error { return s.SetResource(ctx, "r/t/new", []byte("y")) }},
		{"Resource", func() error { _, err := s.Resource(ctx, "r/t/present"); return err }},
		{"DeleteResource", func() error { return s.DeleteResource(ctx, "r/t/present") }},
		{"SetPolicy", func() error { return s.SetPolicy(ctx, "new", "package p") }},
		{"Policy", func() error { _, err := s.Policy(ctx, "resource"); return err }},
		{"UseNonce", func() error { return s.UseNonce(ctx, "cancelled", exp) }},
	}
	for _, c := range calls {
		if err := c.call(); !errors.Is(err, context.Canceled) {
			t.Errorf("%s with a cancelled context: err = %v, want one wrapping context.Canceled", c.name, err)
		}
	}
	// Nothing the cancelled calls would have written was written.
	if _, err := s.Workload(bg, "new"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("cancelled AddWorkload left a workload: %v", err)
	}
	if w, err := s.Workload(bg, "present"); err != nil || w.CPUs == 99 {
		t.Errorf("cancelled Update/DeleteWorkload changed the workload: %+v, %v", w, err)
	}
	if _, err := s.Resource(bg, "r/t/present"); err != nil {
		t.Errorf("cancelled DeleteResource removed the resource: %v", err)
	}
	if err := s.UseNonce(bg, "cancelled", exp); err != nil {
		t.Errorf("cancelled UseNonce recorded the nonce: %v", err)
	}
	// The store still works after the cancelled calls.
	if err := s.AddWorkload(bg, sampleWorkload("after")); err != nil {
		t.Errorf("AddWorkload after cancelled calls: %v", err)
	}
}
