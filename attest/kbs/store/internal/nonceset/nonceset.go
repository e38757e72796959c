// Package nonceset keeps spent nonces in memory, for a store that is
// the only one its broker process uses (the SQLite store opened with
// OpenExclusive): the replay check then costs a map lookup instead of a
// database write per handshake. It forgets everything when the process
// ends, so it must never be used without an epoch that makes a broker
// refuse sessions begun before it started (store.NonceEpocher), and
// never by brokers that share a database.
package nonceset

import (
	"hash/maphash"
	"sync"
	"time"
)

// rotateEvery is how long a generation takes inserts before a new one
// starts. A generation is dropped whole once every entry in it has
// expired, so a set holds about rotateEvery plus the session TTL worth
// of nonces (in TTL/rotateEvery + 1 generations, each a map lookup) and
// never scans its entries to forget them.
const rotateEvery = time.Minute

// key is a 128-bit keyed hash of a nonce: 16 bytes a nonce whatever
// its length, and with random seeds a collision (which could only make
// a fresh nonce look spent, never the other way round) is out of reach.
type key [2]uint64

type generation struct {
	m     map[key]int64 // expiry, Unix microseconds
	max   int64         // the latest expiry in m
	since time.Time     // when it started taking inserts
}

// Set is a set of spent nonces, each until its expiry. Safe for
// concurrent use.
type Set struct {
	seeds [2]maphash.Seed

	mu   sync.Mutex
	gens []generation // oldest first; the last takes inserts
}

// New returns an empty set.
func New() *Set {
	return &Set{seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}}
}

func (s *Set) key(nonce string) key {
	return key{maphash.String(s.seeds[0], nonce), maphash.String(s.seeds[1], nonce)}
}

// Use records nonce as spent until expires and reports true, or
// reports false when it is spent already and its entry has not expired
// at now. An expired entry is taken over, as the stores' UseNonce does.
func (s *Set) Use(nonce string, expires, now time.Time) bool {
	k := s.key(nonce)
	exp, n := expires.UnixMicro(), now.UnixMicro()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rotate(now)
	for _, g := range s.gens {
		if e, ok := g.m[k]; ok {
			if e > n {
				return false
			}
			delete(g.m, k)
		}
	}
	cur := &s.gens[len(s.gens)-1]
	cur.m[k] = exp
	cur.max = max(cur.max, exp)
	return true
}

// rotate drops the generations whose entries all expired, and starts a
// new one when the newest is rotateEvery old (or there is none).
func (s *Set) rotate(now time.Time) {
	n := now.UnixMicro()
	kept := s.gens[:0]
	for i, g := range s.gens {
		if g.max > n || i == len(s.gens)-1 {
			kept = append(kept, g)
		}
	}
	clear(s.gens[len(kept):])
	s.gens = kept
	if len(s.gens) == 0 || now.Sub(s.gens[len(s.gens)-1].since) >= rotateEvery {
		s.gens = append(s.gens, generation{m: map[key]int64{}, since: now})
	}
}

// Prune forgets the nonces whose expiry is at or before now and
// returns how many (store.Pruner).
func (s *Set) Prune(now time.Time) int64 {
	n := now.UnixMicro()
	s.mu.Lock()
	defer s.mu.Unlock()
	var dropped int64
	for _, g := range s.gens {
		for k, e := range g.m {
			if e <= n {
				delete(g.m, k)
				dropped++
			}
		}
	}
	return dropped
}

// Len is how many entries the set holds, expired ones not yet dropped
// included.
func (s *Set) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := 0
	for _, g := range s.gens {
		l += len(g.m)
	}
	return l
}
