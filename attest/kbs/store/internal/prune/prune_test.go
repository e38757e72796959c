package prune

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestTriggerRunsEveryN(t *testing.T) {
	var runs atomic.Int32
	done := make(chan struct{}, 10)
	tr := New(3, func(func() bool) { runs.Add(1); done <- struct{}{} })
	for i := 0; i < 2; i++ {
		tr.Tick()
	}
	if got := runs.Load(); got != 0 {
		t.Fatalf("after 2 ticks of every 3: %d runs, want 0", got)
	}
	tr.Tick()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("no run after the 3rd tick")
	}
	tr.Close()
	for i := 0; i < 6; i++ {
		tr.Tick()
	}
	if got := runs.Load(); got != 1 {
		t.Fatalf("runs after Close: %d, want 1 (no run after Close)", got)
	}
}

func TestTriggerOneRunAtATime(t *testing.T) {
	release := make(chan struct{})
	var runs, concurrent, maxConcurrent atomic.Int32
	tr := New(1, func(stopped func() bool) {
		n := concurrent.Add(1)
		for {
			m := maxConcurrent.Load()
			if n <= m || maxConcurrent.CompareAndSwap(m, n) {
				break
			}
		}
		runs.Add(1)
		<-release
		concurrent.Add(-1)
	})
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); tr.Tick() }()
	}
	wg.Wait() // Tick never blocks, even while a run is held
	close(release)
	tr.Close()
	if got := maxConcurrent.Load(); got != 1 {
		t.Fatalf("max concurrent runs = %d, want 1", got)
	}
	if got := runs.Load(); got < 1 {
		t.Fatalf("runs = %d, want at least 1", got)
	}
}

func TestCloseStopsRun(t *testing.T) {
	started := make(chan struct{})
	var sawStop atomic.Bool
	tr := New(1, func(stopped func() bool) {
		close(started)
		for !stopped() {
			time.Sleep(time.Millisecond)
		}
		sawStop.Store(true)
	})
	tr.Tick()
	<-started
	tr.Close() // must return: the run polls stopped()
	if !sawStop.Load() {
		t.Fatal("Close returned before the run saw stopped()")
	}
}
