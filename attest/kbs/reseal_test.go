package kbs

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/sample"
)

// rotated returns k with fresh cookie and at-rest keys, and the option
// that keeps k's as the previous ones: a broker restarted on a rotated
// secrets key file.
func rotated(t *testing.T, k keys) (keys, brokerOpt) {
	nk := k
	nk.cookie, nk.atRest = randBytes(t, 32), randBytes(t, 32)
	return nk, func(o *Options) {
		o.PreviousCookieKeys = [][]byte{k.cookie}
		o.PreviousAtRestKeys = [][]byte{k.atRest}
	}
}

func release(b *broker, id string) (string, error) {
	c := &attest.Client{BaseURL: b.ts.URL, HTTP: b.ts.Client(), Attester: sample.NewAttester()}
	got, err := c.Resource(context.Background(), PassphrasePath(id))
	return string(got), err
}

// A rotation end to end at the broker: the rotated broker opens what the
// old key sealed, seals new records under the new key, and Reseal
// moves the rest, after which the new key alone opens everything and
// the old key nothing.
func TestResealAfterRotation(t *testing.T) {
	ctx := context.Background()
	old := newBroker(t)
	old.addWorkload(WorkloadSpec{ID: "w1", Tee: attest.TeeSample, Passphrase: passphrase})
	if err := old.admin.SetResource(ctx, "r/k/one", []byte("res-1")); err != nil {
		t.Fatal(err)
	}
	ss, err := old.srv.sealSession(session{Tee: "sample", Nonce: "n", Expires: time.Now().Add(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}

	nk, prev := rotated(t, old.keys)
	rot := newBrokerOn(t, old.store, nk, prev)
	if got, err := release(rot, "w1"); err != nil || got != passphrase {
		t.Fatalf("the rotated broker releases %q, %v; want the passphrase the old key sealed", got, err)
	}
	if _, err := rot.srv.openSession(ss); err != nil {
		t.Errorf("a session the old key sealed (begun on a replica not yet rotated): %v", err)
	}
	rot.addWorkload(WorkloadSpec{ID: "w2", Tee: attest.TeeSample, Passphrase: "second"})

	onlyNew := newBrokerOn(t, old.store, nk)
	if _, err := release(onlyNew, "w1"); err == nil {
		t.Fatal("a broker with the new key alone released a passphrase only the old key sealed, before the reseal")
	}

	// CheckSealed counts, and changes nothing.
	chk, err := rot.srv.CheckSealed(ctx)
	if err != nil || chk.Previous != 2 || chk.Current != 1 || chk.Resealed != 0 || !chk.Done() {
		t.Fatalf("CheckSealed = %+v, %v; want 2 under the previous key, 1 current", chk, err)
	}
	if chk, _ := rot.srv.CheckSealed(ctx); chk.Previous != 2 {
		t.Fatalf("CheckSealed changed the store: %+v", chk)
	}
	rep, err := rot.admin.Reseal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := ResealReport{KeyID: AtRestKeyID(nk.atRest), Resealed: 2, Current: 1}
	if rep.KeyID != want.KeyID || rep.Resealed != want.Resealed || rep.Current != want.Current || !rep.Done() {
		t.Fatalf("Reseal = %+v, want %+v", rep, want)
	}
	if rep.KeyID == AtRestKeyID(old.keys.atRest) {
		t.Fatal("the key id does not tell the keys apart")
	}
	if !strings.Contains(rot.logs.String(), `"resealed":2`) {
		t.Errorf("the reseal is not logged:\n%s", rot.logs)
	}
	if rep, err := rot.admin.Reseal(ctx); err != nil || rep.Resealed != 0 || rep.Current != 3 {
		t.Errorf("a second Reseal = %+v, %v; want all 3 current", rep, err)
	}

	// onlyNew read w1 before the reseal; a replica keeps such a copy
	// for workloadTTL (a real one holds the previous key meanwhile).
	onlyNew.srv.forgetWorkloads()
	for id, want := range map[string]string{"w1": passphrase, "w2": "second"} {
		if got, err := release(onlyNew, id); err != nil || got != want {
			t.Errorf("after the reseal, the new key alone releases %s: %q, %v", id, got, err)
		}
	}
	if got, err := onlyNew.admin.Resource(ctx, "r/k/one"); err != nil || string(got) != "res-1" {
		t.Errorf("after the reseal, the new key alone reads the resource: %q, %v", got, err)
	}
	// The old key opens nothing any more: a leaked copy of it is useless
	// against the store from now on.
	old.srv.forgetWorkloads()
	if _, err := release(old, "w1"); err == nil {
		t.Error("the old key still opens w1 after the reseal")
	}
	if _, err := old.admin.Resource(ctx, "r/k/one"); err == nil {
		t.Error("the old key still opens the resource after the reseal")
	}
}

// A record no key opens is named in the report and left alone; the
// others are still moved.
func TestResealUnopened(t *testing.T) {
	ctx := context.Background()
	old := newBroker(t)
	old.addWorkload(WorkloadSpec{ID: "a", Tee: attest.TeeSample, Passphrase: passphrase})
	stranger := newBrokerOn(t, old.store, newKeys(t))
	stranger.addWorkload(WorkloadSpec{ID: "b", Tee: attest.TeeSample, Passphrase: "foreign"})
	before, _ := old.store.Workload(ctx, "b")

	nk, prev := rotated(t, old.keys)
	rot := newBrokerOn(t, old.store, nk, prev)
	rep, err := rot.admin.Reseal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Done() || len(rep.Unopened) != 1 || rep.Unopened[0] != "workload b" || rep.Resealed != 1 {
		t.Fatalf("Reseal = %+v; want a resealed, b unopened", rep)
	}
	if after, _ := old.store.Workload(ctx, "b"); string(after.SealedPassphrase) != string(before.SealedPassphrase) {
		t.Error("the unopened record was changed")
	}
	if !strings.Contains(rot.logs.String(), `"level":"ERROR","msg":"records re-sealed`) {
		t.Errorf("an incomplete reseal is not logged as an error:\n%s", rot.logs)
	}
}

// swapRace runs fn before the first swap of a passphrase: an admin's
// replace landing between the reseal's read and its swap.
type swapRace struct {
	store.Store
	once sync.Once
	fn   func()
}

func (s *swapRace) SwapPassphrase(ctx context.Context, id string, prev, next []byte) error {
	s.once.Do(s.fn)
	return s.Store.SwapPassphrase(ctx, id, prev, next)
}

// A passphrase replaced while the reseal runs keeps its new value: the
// swap sees the change, reads the record again and finds it current.
func TestResealKeepsConcurrentReplace(t *testing.T) {
	ctx := context.Background()
	old := newBroker(t)
	old.addWorkload(WorkloadSpec{ID: "w", Tee: attest.TeeSample, Passphrase: passphrase})
	nk, prev := rotated(t, old.keys)
	race := &swapRace{Store: old.store}
	rot := newBrokerOn(t, race, nk, prev)
	race.fn = func() {
		if _, err := rot.admin.ReplaceWorkload(ctx, WorkloadSpec{ID: "w", Tee: attest.TeeSample, Passphrase: "replaced"}); err != nil {
			t.Error(err)
		}
	}
	rep, err := rot.srv.Reseal(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Resealed != 0 || rep.Current != 1 || !rep.Done() {
		t.Errorf("Reseal = %+v; want the replaced record found current", rep)
	}
	if got, err := release(newBrokerOn(t, old.store, nk), "w"); err != nil || got != "replaced" {
		t.Errorf("after a reseal racing a replace, the passphrase is %q, %v; want the replacement", got, err)
	}
}

// A replace that keeps the passphrase stores it under the current key:
// a blob only an earlier key opens must not come back after a reseal.
func TestReplaceKeepsPassphraseUnderCurrentKey(t *testing.T) {
	ctx := context.Background()
	old := newBroker(t)
	old.addWorkload(WorkloadSpec{ID: "w", Tee: attest.TeeSample, Passphrase: passphrase})
	nk, prev := rotated(t, old.keys)
	rot := newBrokerOn(t, old.store, nk, prev)
	if _, err := rot.admin.ReplaceWorkload(ctx, WorkloadSpec{ID: "w", Tee: attest.TeeSample, CPUs: 2}); err != nil {
		t.Fatal(err)
	}
	if got, err := release(newBrokerOn(t, old.store, nk), "w"); err != nil || got != passphrase {
		t.Errorf("after a replace keeping the passphrase, the new key alone releases %q, %v", got, err)
	}
}

// The admin routes added for rotation and listing refuse a caller
// without an admin token, and answer one with it.
func TestResealAndResourceListNeedAdmin(t *testing.T) {
	ctx := context.Background()
	b := newBroker(t)
	for _, c := range []struct{ method, path string }{
		{http.MethodPost, "/kbs/v0/admin/reseal"},
		{http.MethodGet, "/kbs/v0/admin/resources"},
	} {
		req, _ := http.NewRequest(c.method, b.ts.URL+c.path, nil)
		resp, err := b.ts.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s %s without an admin token: %d, want 401", c.method, c.path, resp.StatusCode)
		}
	}
	if paths, err := b.admin.ResourcePaths(ctx); err != nil || len(paths) != 0 {
		t.Errorf("ResourcePaths of an empty broker = %q, %v", paths, err)
	}
	b.admin.SetResource(ctx, "r/t/b", []byte("secret-b"))
	b.admin.SetResource(ctx, "r/t/a", []byte("secret-a"))
	if paths, err := b.admin.ResourcePaths(ctx); err != nil || strings.Join(paths, ",") != "r/t/a,r/t/b" {
		t.Errorf("ResourcePaths = %q, %v", paths, err)
	}
}
