// Package prune runs a store's expired-nonce cleanup in the background
// every so many inserts, so that the table stays small without a
// handshake ever waiting for a cleanup. It must never run a cleanup on
// the caller's goroutine.
package prune

import (
	"sync"
	"sync/atomic"
)

// Trigger calls run on a goroutine of its own after every `every`
// calls of Tick, never two runs at once. run receives a function that
// reports whether the trigger was closed, to stop between batches.
type Trigger struct {
	every   uint64
	run     func(stopped func() bool)
	ticks   atomic.Uint64
	running atomic.Bool
	closed  atomic.Bool

	mu sync.Mutex // orders wg.Add in Tick before wg.Wait in Close
	wg sync.WaitGroup
}

// New returns a Trigger that calls run after every `every` ticks
// (every must be at least 1).
func New(every uint64, run func(stopped func() bool)) *Trigger {
	if every == 0 {
		every = 1
	}
	return &Trigger{every: every, run: run}
}

// Tick counts one insert and starts a run in the background when the
// count reaches a multiple of every and no run is under way. It never
// blocks.
func (t *Trigger) Tick() {
	if t.ticks.Add(1)%t.every != 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed.Load() || !t.running.CompareAndSwap(false, true) {
		return // closed, or the run under way will catch these too
	}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		defer t.running.Store(false)
		t.run(t.closed.Load)
	}()
}

// Close stops new runs and waits for the one under way, which sees
// stopped() turn true and returns after its current batch.
func (t *Trigger) Close() {
	t.mu.Lock()
	t.closed.Store(true)
	t.mu.Unlock()
	t.wg.Wait()
}
