package kbs

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
)

// newTestAdmission makes an admission with a fixed limit of n, that
// stays there until samples move it.
func newTestAdmission(n int, wait time.Duration) *admission {
	a := newAdmission(wait)
	a.floor, a.limit = float64(n), float64(n)
	return a
}

// waitIn starts enter(src) in a goroutine and returns where its slot
// (or error) arrives; it returns once the waiter is queued.
func waitIn(t *testing.T, a *admission, ctx context.Context, src string) chan error {
	t.Helper()
	_, before := a.state()
	out := make(chan error, 1)
	go func() {
		_, err := a.enter(ctx, src)
		out <- err
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, q := a.state(); q > before {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("enter(%s) never queued", src)
		}
	}
}

func admitted(t *testing.T, c chan error) bool {
	t.Helper()
	select {
	case err := <-c:
		if err != nil {
			t.Fatalf("enter: %v", err)
		}
		return true
	case <-time.After(20 * time.Millisecond):
		return false
	}
}

func TestAdmissionFIFO(t *testing.T) {
	ctx := context.Background()
	a := newTestAdmission(1, time.Minute)
	first, err := a.enter(ctx, "10.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	a.begun(first, "n1")
	b := waitIn(t, a, ctx, "10.0.0.1")
	c := waitIn(t, a, ctx, "10.0.0.1")
	if admitted(t, b) || admitted(t, c) {
		t.Fatal("admitted beyond the limit of 1")
	}
	a.done("n1", false) // a refusal: no sample, so the limit stays 1
	if !admitted(t, b) {
		t.Fatal("the oldest waiter was not admitted when the slot freed")
	}
	if admitted(t, c) {
		t.Fatal("the younger waiter was admitted too")
	}
}

// One address flooding /auth gets its share of turns, not all of them.
func TestAdmissionFairAcrossSources(t *testing.T) {
	ctx := context.Background()
	a := newTestAdmission(2, time.Minute)
	for i, n := range []string{"x0", "x1"} {
		sl, err := a.enter(ctx, "flood")
		if err != nil {
			t.Fatal(i, err)
		}
		a.begun(sl, n)
	}
	x2 := waitIn(t, a, ctx, "flood")
	x3 := waitIn(t, a, ctx, "flood")
	y0 := waitIn(t, a, ctx, "guest")
	a.done("x0", false)
	if !admitted(t, y0) {
		t.Fatal("the source holding no slot did not get the freed one")
	}
	if admitted(t, x2) || admitted(t, x3) {
		t.Fatal("the flooding source got a second turn before the other source")
	}
	a.done("x1", false)
	if !admitted(t, x2) || admitted(t, x3) {
		t.Fatal("within one source, turns are not in order")
	}
}

// A guest that took a challenge and vanished holds its slot only for
// its lease; the queue moves on without any other handshake ending.
func TestAdmissionLeaseFreesVanishedSlot(t *testing.T) {
	ctx := context.Background()
	a := newTestAdmission(1, time.Minute)
	sl, err := a.enter(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	a.begun(sl, "vanished")
	t0 := time.Now()
	next := waitIn(t, a, ctx, "b")
	select {
	case err := <-next:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the queue never moved past a vanished guest")
	}
	if d := time.Since(t0); d < admitDefaultLease/2 {
		t.Errorf("admitted after %s, before the lease (%s) ran out", d, admitDefaultLease)
	}
	// Its late completion is no sample for the limit.
	a.done("vanished", true)
	if l, _ := a.state(); l != 1 {
		t.Errorf("a late handshake moved the limit to %v", l)
	}
}

func TestAdmissionGivingUp(t *testing.T) {
	a := newTestAdmission(1, 30*time.Millisecond)
	if _, err := a.enter(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.enter(context.Background(), "b"); !errors.Is(err, errBusy) {
		t.Fatalf("after the longest wait: %v, want errBusy", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := waitIn(t, a, ctx, "c")
	cancel()
	if err := <-c; !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled wait answered %v", err)
	}
	if _, q := a.state(); q != 0 {
		t.Errorf("%d waiters left in the queue after both gave up", q)
	}
}

func TestAdmissionQueueFull(t *testing.T) {
	a := newTestAdmission(1, time.Minute)
	if _, err := a.enter(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	a.nWaiting = admitMaxQueue // as if that many waited
	a.mu.Unlock()
	if _, err := a.enter(context.Background(), "b"); !errors.Is(err, errQueueFull) {
		t.Fatalf("with a full queue: %v, want errQueueFull at once", err)
	}
}

func TestAdmissionLimitAdapts(t *testing.T) {
	a := newTestAdmission(4, time.Minute)
	now := time.Now()
	// Slow start: each on-time handshake adds one.
	for i := range 4 {
		a.sample(now.Add(time.Duration(i)*time.Millisecond), 10*time.Millisecond)
	}
	if l, _ := a.state(); l != 8 {
		t.Fatalf("after 4 on-time handshakes the limit is %v, want 8", l)
	}
	// A late one (over three times the fastest) cuts it by a tenth...
	now = now.Add(time.Second)
	a.sample(now, 40*time.Millisecond)
	if l, _ := a.state(); l < 7.19 || l > 7.21 {
		t.Fatalf("after a late handshake the limit is %v, want 7.2", l)
	}
	// ...once per fastest-handshake time, however many arrive.
	a.sample(now.Add(time.Millisecond), 40*time.Millisecond)
	if l, _ := a.state(); l < 7.19 || l > 7.21 {
		t.Fatalf("a second late handshake within 10 ms cut again: %v", l)
	}
	// Growth is slow after the first late one, and cuts stop at the floor.
	a.sample(now.Add(2*time.Millisecond), 10*time.Millisecond)
	if l, _ := a.state(); l < 7.3 || l > 7.4 {
		t.Fatalf("after slow start, one on-time handshake gave %v, want 7.2+1/7.2", l)
	}
	for i := range 50 {
		a.sample(now.Add(time.Duration(100+20*i)*time.Millisecond), time.Second)
	}
	if l, _ := a.state(); l != 4 {
		t.Fatalf("the limit went to %v, below or above its floor of 4", l)
	}
	if got := a.lease(now); got != 16*10*time.Millisecond {
		t.Errorf("lease %s, want 16 × the fastest (10 ms)", got)
	}
}

// The floor follows the rate: as many handshakes as completed in
// admitServiceTime lately, so cuts stop there, and a rate that rose
// lifts the limit to it.
func TestAdmissionFloorFollowsRate(t *testing.T) {
	a := newTestAdmission(4, time.Minute)
	now := time.Now()
	// 2,000 released handshakes a second: a floor of 20.
	for i := range 201 {
		a.rate.add(now.Add(time.Duration(i) * 500 * time.Microsecond))
	}
	if f := a.floorNow(); f < 19.9 || f > 20.1 {
		t.Fatalf("at 2,000 handshakes/s the floor is %v, want 20", f)
	}
	a.sample(now, 10*time.Millisecond) // the fastest: 1 s is late
	for i := range 50 {
		a.sample(now.Add(time.Duration(100+20*i)*time.Millisecond), time.Second)
	}
	if l, _ := a.state(); l < 19.9 || l > 20.1 {
		t.Fatalf("late handshakes cut the limit to %v, want the rate's floor of 20", l)
	}
	// Through finish, a window closing at a higher rate lifts the limit.
	b := newTestAdmission(4, time.Minute)
	start := time.Now()
	for b.rate.start.IsZero() || time.Since(start) < 2*admitRateWindow {
		sl := b.admit(time.Now(), "guest")
		b.mu.Lock()
		b.finish(sl, true)
		b.mu.Unlock()
	}
	if l, _ := b.state(); l <= 100 {
		t.Errorf("after a busy window the limit is %v, want it lifted to the rate's floor (%v)", l, b.floorNow())
	}
	// A quiet spell brings the floor back to its least.
	a.rate.add(now.Add(time.Minute))
	if f := a.floorNow(); f != 4 {
		t.Errorf("after a quiet minute the floor is %v, want 4", f)
	}
}

// Over HTTP: guests beyond the limit wait at /auth, and one that waits
// too long hears 503 with the reason; the queue shows in /metrics.
func TestAdmissionBusyAnswer(t *testing.T) {
	br := newBroker(t, func(o *Options) {
		o.Admission = true
		o.AdmitWait = 50 * time.Millisecond
	})
	br.srv.admit.floor, br.srv.admit.limit = 1, 1
	auth := func() *http.Response {
		t.Helper()
		resp, err := http.Post(br.ts.URL+"/kbs/v0/auth", "application/json",
			strings.NewReader(`{"version":"`+attest.ProtocolVersion+`","tee":"sample","extra-params":""}`))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		return resp
	}
	if r := auth(); r.StatusCode != http.StatusOK {
		t.Fatalf("first /auth: %s", r.Status)
	}
	r := auth()
	b, _ := io.ReadAll(r.Body)
	body := string(b)
	if r.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "broker busy") || !strings.Contains(body, "50ms") {
		t.Fatalf("second /auth while the first handshake holds the only slot: %s %s", r.Status, body)
	}
	// The queue is visible while a guest waits.
	var wg sync.WaitGroup
	br.srv.admit.maxWait = time.Second
	wg.Go(func() { auth() })
	for deadline := time.Now().Add(time.Second); ; time.Sleep(time.Millisecond) {
		if _, q := br.srv.admit.state(); q == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the waiting guest never showed in the queue")
		}
	}
	m := httptest.NewRecorder()
	br.srv.ServeHTTP(m, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if !strings.Contains(m.Body.String(), "cwrun_kbs_admission_queued 1") {
		t.Errorf("/metrics does not show the waiting guest:\n%s", grepLines(m.Body.String(), "admission"))
	}
	if !strings.Contains(m.Body.String(), `cwrun_kbs_handshakes_total{outcome="busy",tee="sample"} 1`) {
		t.Errorf("/metrics does not count the busy answer:\n%s", grepLines(m.Body.String(), "handshakes_total"))
	}
	wg.Wait()
}

func grepLines(s, sub string) string {
	var out []string
	for l := range strings.Lines(s) {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "")
}
