package kbs

import (
	"context"
	"sync"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

// Every release reads its workload; with PostgreSQL that read cost the
// database server more CPU than the rest of the handshake cost the
// broker. Workloads change rarely (an admin registers, replaces or
// removes one), so a release may use a copy read within workloadTTL: a
// change made through this broker applies at once (its admin handlers
// drop the copies), one made through another replica within
// workloadTTL, as with the resource policy (policyTTL).
const (
	workloadTTL        = time.Second
	maxCachedWorkloads = 4096
)

type workloadCache struct {
	mu sync.Mutex
	// gen counts local writes: a read that started before one must
	// not cache what it read.
	gen uint64
	m   map[string]cachedWorkload
}

type cachedWorkload struct {
	w  store.Workload
	at time.Time
}

// workload reads workload id for a release, from a copy younger than
// workloadTTL when there is one. A missing workload is never cached: a
// registration on any replica is served at once. The caller must not
// change what it gets (the copy is shared).
func (s *Server) workload(ctx context.Context, id string) (store.Workload, error) {
	c := &s.workloads
	now := time.Now()
	c.mu.Lock()
	if e, ok := c.m[id]; ok && !e.at.After(now) && now.Sub(e.at) < workloadTTL {
		c.mu.Unlock()
		return e.w, nil
	}
	gen := c.gen
	c.mu.Unlock()
	w, err := s.store.Workload(ctx, id)
	if err != nil {
		return w, err
	}
	c.mu.Lock()
	if c.gen == gen {
		if c.m == nil || len(c.m) >= maxCachedWorkloads {
			c.m = map[string]cachedWorkload{}
		}
		c.m[id] = cachedWorkload{w: w, at: now}
	}
	c.mu.Unlock()
	return w, nil
}

// forgetWorkloads drops every copy; the admin handlers call it after a
// workload write.
func (s *Server) forgetWorkloads() {
	c := &s.workloads
	c.mu.Lock()
	c.gen++
	c.m = nil
	c.mu.Unlock()
}
