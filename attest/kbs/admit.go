package kbs

import (
	"context"
	"errors"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"
)

// admission lets handshakes begin in the order they asked for once the
// broker is saturated, so that a burst of guests (a shop's boxes coming
// back after a power cut) is served first come, first served instead of
// all at once.
//
// Why: a handshake is three requests with the guest's own work in
// between. When every guest is let in at once, each of those steps
// waits behind a random share of everyone else's, and the waits add up
// to a wide spread. Holding the surplus at /auth in a FIFO queue and
// letting fewer handshakes run at a time turns much of the spread into
// a queue position. Measured with 64 SNP guests on 2 cores
// (BenchmarkHandshake, three interleaved rounds): p99 at 1.75× the
// median with everyone let in, 1.4× with admission, for 5-15 % less
// throughput while saturated (the cores idle now and then with fewer
// handshakes in progress; short sample handshakes on PostgreSQL lose
// the most).
//
// How many run at once (the limit) adapts to what the broker measures:
// a handshake is "on time" when it took at most three times the fastest
// one seen lately (admission to the released resource). On-time
// completions raise the limit (by one each until the first late one,
// then slowly), late ones lower it by a tenth, never below a floor: as
// many handshakes as the broker completed in 10 ms lately
// (admitServiceTime), and at least eight per core. The floor keeps the
// time an admitted handshake shares the cores with the others about the
// same whatever a handshake costs: SNP handshakes (about 1,600/s here)
// run about 16 at a time, cheap sample ones (4,000/s) about 40, which
// keeps their store's group commits large. Measured with
// BenchmarkHandshake, three interleaved pairs: sample handshakes on
// PostgreSQL did 3,493-3,701/s with a fixed floor of 16 (smaller nonce
// batches, idle cores) and 4,179-4,453/s with the floor following the
// rate, about what they do without admission; SNP's p99 stayed where
// the fixed floor put it (48-51 against 45-51 ms on SQLite).
//
// A handshake stops counting against the limit once it is older than
// sixteen times the fastest (its lease, 20 ms to 10 s): a guest far
// away or slow to make evidence never holds a slot for long and is
// never refused for being slow, and one that asked for a challenge and
// vanished blocks nobody for long. Such late handshakes still teach
// the broker how fast handshakes are (a fleet that is all far away sets
// the pace), but not whether it is saturated.
//
// The queue must not become a cheap lever for a flood of bare /auth
// requests (each holds a slot for a lease): turns go to the waiting
// source (remote address) that holds the fewest slots, oldest first
// among equals, so one address gets its share and no more; guests behind
// one address (a launcher's relay, a NAT) queue among themselves in
// order.
//
// Handshakes are known by their session nonce; one that finishes on
// another replica simply ages out of this one's count.
type admission struct {
	floor   float64
	maxWait time.Duration

	mu       sync.Mutex
	limit    float64
	growing  bool
	active   int                  // admitted and within their lease
	activeBy map[string]int       // active, by source
	live     []*slot              // admitted within their lease, oldest first (finished ones leave lazily)
	late     []*slot              // past their lease, not finished, oldest first
	byNonce  map[string]*slot     // slots whose session exists, live or late
	waiting  map[string][]*waiter // by source, each FIFO
	nWaiting int
	seq      uint64 // orders waiters across sources
	fastest  windowMin
	rate     rateWindow // released handshakes per second, lately
	lastCut  time.Time
	timer    *time.Timer // wakes the queue when the oldest lease runs out
}

// A slot is one admitted handshake.
type slot struct {
	src   string
	nonce string
	at    time.Time
	late  bool // past its lease: no longer counted
	over  bool // finished
}

type waiter struct {
	src   string
	seq   uint64
	ready chan struct{}
	slot  *slot // set when admitted
}

// Admission's constants. The ceiling only bounds memory; so does
// admitMaxLate, how many late handshakes are remembered for their
// duration. The tolerance, lease factor and shortest lease were chosen
// with BenchmarkHandshake: a tighter tolerance or a shorter lease lost
// throughput or let the spread back in.
const (
	admitCeiling = 4096
	// admitFloorPerCore sets the lowest limit. Handshakes also wait
	// (on the guest, on PostgreSQL's commit), and fewer in progress
	// left the cores idle: at 2 per core, sample handshakes on
	// PostgreSQL lost a quarter of their throughput to admission, at 8
	// a seventh; a lower floor kept more of the spread away.
	admitFloorPerCore = 8
	// admitServiceTime sets the floor that follows the rate: as many
	// handshakes as complete in this time.
	admitServiceTime = 10 * time.Millisecond
	// admitRateWindow is how often the rate is measured.
	admitRateWindow   = 100 * time.Millisecond
	admitMaxQueue     = 4096 // waiting guests; more are answered 503 at once
	admitMaxLate      = 1 << 16
	admitTolerance    = 3
	admitLeaseFactor  = 16
	admitDefaultLease = 100 * time.Millisecond // before any handshake finished
	admitMinLease     = 20 * time.Millisecond
	admitMaxLease     = 10 * time.Second
	admitWindow       = 10 * time.Second // how long "lately" is for the fastest handshake
	// DefaultAdmitWait is how long /auth holds a guest in the queue
	// before it answers 503 (Options.AdmitWait).
	DefaultAdmitWait = 30 * time.Second
)

// errBusy is the queue's answer after maxWait; errQueueFull, when the
// queue is full.
var (
	errBusy      = errors.New("broker busy")
	errQueueFull = errors.New("broker busy: its queue of handshakes is full")
)

func newAdmission(maxWait time.Duration) *admission {
	floor := float64(admitFloorPerCore * runtime.GOMAXPROCS(0))
	return &admission{
		floor: floor, maxWait: maxWait, limit: floor, growing: true,
		activeBy: map[string]int{}, byNonce: map[string]*slot{}, waiting: map[string][]*waiter{},
	}
}

// source is what fairness counts by: the remote address without its
// port.
func source(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// enter waits for src's turn to begin a handshake. The slot it returns
// is named with begun once the session exists, or given back with
// abandon.
func (a *admission) enter(ctx context.Context, src string) (*slot, error) {
	a.mu.Lock()
	if a.nWaiting >= admitMaxQueue {
		// A flood of connections must not pile up for maxWait each.
		a.mu.Unlock()
		return nil, errQueueFull
	}
	a.seq++
	w := &waiter{src: src, seq: a.seq, ready: make(chan struct{})}
	a.waiting[src] = append(a.waiting[src], w)
	a.nWaiting++
	a.wake(time.Now())
	sl := w.slot
	a.mu.Unlock()
	if sl != nil {
		return sl, nil
	}

	t := time.NewTimer(a.maxWait)
	defer t.Stop()
	var err error
	select {
	case <-w.ready:
		return w.slot, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		err = errBusy
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if w.slot != nil {
		// Admitted while giving up: hand the turn on.
		a.finish(w.slot, false)
		return nil, err
	}
	q := a.waiting[src]
	for i, x := range q {
		if x == w {
			a.dequeue(src, i)
			break
		}
	}
	return nil, err
}

// begun names sl by its session's nonce.
func (a *admission) begun(sl *slot, nonce string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !sl.over {
		sl.nonce = nonce
		a.byNonce[nonce] = sl
	}
}

// abandon gives back a slot whose handshake never began.
func (a *admission) abandon(sl *slot) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.finish(sl, false)
}

// done ends the handshake of nonce; released says it ended with a
// resource sent (a sample for the limit), not a refusal.
func (a *admission) done(nonce string, released bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if sl, ok := a.byNonce[nonce]; ok {
		a.finish(sl, released)
	}
}

// state is the limit and the queue's length, for metrics and tests.
func (a *admission) state() (limit float64, queued int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.limit, a.nWaiting
}

func (a *admission) admit(now time.Time, src string) *slot {
	sl := &slot{src: src, at: now}
	a.live = append(a.live, sl)
	a.active++
	a.activeBy[src]++
	return sl
}

// uncount takes a live slot out of the limit's count.
func (a *admission) uncount(sl *slot) {
	a.active--
	if a.activeBy[sl.src]--; a.activeBy[sl.src] <= 0 {
		delete(a.activeBy, sl.src)
	}
}

// finish ends sl. A handshake past its lease gives the broker its
// duration but no say on the limit.
func (a *admission) finish(sl *slot, released bool) {
	if sl.over {
		return
	}
	sl.over = true
	if sl.nonce != "" {
		delete(a.byNonce, sl.nonce)
	}
	now := time.Now()
	if released && a.rate.add(now) {
		a.limit = min(max(a.limit, a.floorNow()), admitCeiling)
	}
	switch {
	case sl.late:
		if released {
			a.fastest.add(now, now.Sub(sl.at))
		}
	default:
		a.uncount(sl)
		if released {
			a.sample(now, now.Sub(sl.at))
		}
	}
	a.wake(now)
}

// sample adjusts the limit to one handshake that finished in its lease.
func (a *admission) sample(now time.Time, d time.Duration) {
	a.fastest.add(now, d)
	f := a.fastest.min(now)
	if d <= admitTolerance*f {
		if a.growing {
			a.limit++
		} else {
			a.limit += 1 / a.limit
		}
		a.limit = min(a.limit, admitCeiling)
		return
	}
	a.growing = false
	// One cut per fastest-handshake time: a burst of late samples is one
	// sign of saturation, not many.
	if now.Sub(a.lastCut) >= f {
		a.limit = max(a.floorNow(), a.limit*0.9)
		a.lastCut = now
	}
}

// floorNow is the lowest the limit goes: what completes in
// admitServiceTime at the recent rate, and at least the fixed floor.
func (a *admission) floorNow() float64 {
	return min(max(a.floor, a.rate.perSec*admitServiceTime.Seconds()), admitCeiling)
}

// lease is how long an admitted handshake counts against the limit.
func (a *admission) lease(now time.Time) time.Duration {
	f := a.fastest.min(now)
	if f == 0 {
		return admitDefaultLease
	}
	return min(max(admitLeaseFactor*f, admitMinLease), admitMaxLease)
}

// expire moves handshakes past their lease to late, and forgets late
// ones that finished, that are older than the longest lease, or that
// are too many.
func (a *admission) expire(now time.Time) {
	lease := a.lease(now)
	for len(a.live) > 0 {
		sl := a.live[0]
		if !sl.over {
			if now.Sub(sl.at) < lease {
				break
			}
			sl.late = true
			a.uncount(sl)
			a.late = append(a.late, sl)
		}
		a.live[0] = nil
		a.live = a.live[1:]
	}
	for len(a.late) > 0 {
		sl := a.late[0]
		if !sl.over && now.Sub(sl.at) < admitMaxLease && len(a.late) <= admitMaxLate {
			break
		}
		if !sl.over {
			sl.over = true
			delete(a.byNonce, sl.nonce)
		}
		a.late[0] = nil
		a.late = a.late[1:]
	}
}

// wake admits waiters while there is room: from the source holding the
// fewest slots, the oldest first among equals.
func (a *admission) wake(now time.Time) {
	a.expire(now)
	for a.nWaiting > 0 && float64(a.active) < a.limit {
		var pick string
		var best *waiter
		for src, q := range a.waiting {
			w := q[0]
			if best == nil || a.activeBy[src] < a.activeBy[pick] ||
				(a.activeBy[src] == a.activeBy[pick] && w.seq < best.seq) {
				pick, best = src, w
			}
		}
		a.dequeue(pick, 0)
		best.slot = a.admit(now, pick)
		close(best.ready)
	}
	a.arm(now)
}

// dequeue removes the i-th waiter of src.
func (a *admission) dequeue(src string, i int) {
	q := a.waiting[src]
	copy(q[i:], q[i+1:])
	q[len(q)-1] = nil
	if q = q[:len(q)-1]; len(q) == 0 {
		delete(a.waiting, src)
	} else {
		a.waiting[src] = q
	}
	a.nWaiting--
}

// arm makes sure that waiters are woken when the oldest lease runs out,
// in case no handshake finishes before (guests that vanished).
func (a *admission) arm(now time.Time) {
	if a.timer != nil || a.nWaiting == 0 || len(a.live) == 0 {
		return
	}
	d := a.live[0].at.Add(a.lease(now)).Sub(now)
	a.timer = time.AfterFunc(max(d, time.Millisecond), func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		a.timer = nil
		a.wake(time.Now())
	})
}

// rateWindow counts events over windows of admitRateWindow.
type rateWindow struct {
	start  time.Time
	n      int
	perSec float64 // over the last whole window
}

// add counts one event at now; true when it closed a window (perSec
// changed).
func (r *rateWindow) add(now time.Time) bool {
	if r.start.IsZero() {
		r.start = now
	}
	r.n++
	el := now.Sub(r.start)
	if el < admitRateWindow {
		return false
	}
	r.perSec = float64(r.n) / el.Seconds()
	r.n, r.start = 0, now
	return true
}

// windowMin is the least duration seen in the current and the previous
// admitWindow.
type windowMin struct {
	start     time.Time
	cur, prev time.Duration
}

func (w *windowMin) add(now time.Time, d time.Duration) {
	switch age := now.Sub(w.start); {
	case w.start.IsZero() || age >= 2*admitWindow:
		w.prev, w.cur, w.start = 0, d, now
	case age >= admitWindow:
		w.prev, w.cur, w.start = w.cur, d, now
	default:
		w.cur = min(w.cur, d)
	}
}

func (w *windowMin) min(now time.Time) time.Duration {
	switch {
	case w.start.IsZero() || now.Sub(w.start) >= 2*admitWindow:
		return 0 // nothing seen lately
	case w.prev > 0:
		return min(w.cur, w.prev)
	default:
		return w.cur
	}
}

// busy answers a guest that left the admission queue.
func (s *Server) busy(err error) error {
	switch {
	case errors.Is(err, errBusy):
		return errorf(http.StatusServiceUnavailable, "broker busy: no handshake could begin within %s; retry later", s.admit.maxWait)
	case errors.Is(err, errQueueFull):
		return errorf(http.StatusServiceUnavailable, "broker busy: %d guests already wait for a turn; retry later", admitMaxQueue)
	}
	return errorf(http.StatusServiceUnavailable, "waiting for a turn to begin the handshake: %v", err)
}
