// Package store keeps the broker's state: workloads, resources,
// policies and used nonces. SQLite (one process) and PostgreSQL
// (brokers sharing state) implement Store and run one conformance
// suite (storetest).
//
// The store never sees a secret in clear: attest/kbs seals passphrases
// and resources with the at-rest key from the broker's config before
// they reach it.
package store

import (
	"context"
	"errors"
	"time"
)

// Sentinels.
var (
	ErrNotFound = errors.New("not found")
	ErrExists   = errors.New("already exists")
	ErrReplay   = errors.New("nonce already used")
	// ErrChanged: a swap found another value than the one it was to
	// replace (the record was rewritten since it was read).
	ErrChanged = errors.New("changed since it was read")
)

// Workload is one sealed image the broker releases a key for.
type Workload struct {
	ID  string
	Tee string // attest.TeeSample, TeeSNP, TeeTDX, TeeTPM
	// SealedPassphrase is the disk passphrase, sealed with the at-rest key.
	SealedPassphrase []byte
	// References: claim name → accepted values (see attest.Claims.Values).
	References map[string][]string
	// Policy is an optional Rego resource policy for this workload.
	Policy    string
	CPUs      int
	MemoryMiB int
	Created   time.Time
}

// Store is the broker's state. Every method is safe for concurrent use
// and durable when it returns nil: an acknowledged write survives a
// kill -9 of the process.
//
// Keys (workload IDs, resource paths, policy names, nonces) and text
// (Tee, Policy, Rego) must be non-empty valid UTF-8 without NUL bytes
// (see CheckText): PostgreSQL cannot store anything else, so SQLite
// refuses it too and both behave alike. Times are kept to the
// microsecond (PostgreSQL's precision) and returned in UTC. A method
// whose ctx is done returns an error that wraps ctx.Err().
type Store interface {
	// AddWorkload stores w; ErrExists when its ID is taken (never an
	// overwrite). A zero Created is set to the current time.
	AddWorkload(ctx context.Context, w Workload) error
	// UpdateWorkload replaces an existing workload; ErrNotFound if none.
	// Created keeps its original value: it records the registration.
	UpdateWorkload(ctx context.Context, w Workload) error
	// Workload returns one workload; ErrNotFound if none.
	Workload(ctx context.Context, id string) (Workload, error)
	// Workloads lists every workload ordered by ID (empty, not an
	// error, when there are none).
	Workloads(ctx context.Context) ([]Workload, error)
	// DeleteWorkload removes a workload; ErrNotFound if none.
	DeleteWorkload(ctx context.Context, id string) error

	// Resources are sealed blobs at "repo/type/tag". SetResource creates
	// or overwrites; Resource and DeleteResource return ErrNotFound for
	// a missing path.
	SetResource(ctx context.Context, path string, sealed []byte) error
	Resource(ctx context.Context, path string) ([]byte, error)
	DeleteResource(ctx context.Context, path string) error
	// ResourcePaths lists every resource's path, sorted bytewise (empty,
	// not an error, when there are none).
	ResourcePaths(ctx context.Context) ([]string, error)

	// SwapPassphrase and SwapResource replace a sealed blob with next
	// only while it still is prev, and change nothing else: ErrNotFound
	// when the record is gone, ErrChanged when it holds another blob.
	// Re-sealing under a new at-rest key uses them, so that a record
	// rewritten meanwhile (an admin's replace) is never overwritten
	// with an older secret.
	SwapPassphrase(ctx context.Context, id string, prev, next []byte) error
	SwapResource(ctx context.Context, path string, prev, next []byte) error

	// Policies by name ("resource" is the broker-wide resource policy).
	// SetPolicy creates or overwrites; Policy returns ErrNotFound for a
	// missing name.
	SetPolicy(ctx context.Context, name, rego string) error
	Policy(ctx context.Context, name string) (string, error)

	// UseNonce records a nonce as consumed until expires; ErrReplay when
	// it already was. Expired entries may be dropped at any time, and a
	// nonce whose entry has expired may be used again (the broker refuses
	// expired nonces before it gets here). An expires not in the future
	// is an error: recording it would guard nothing.
	UseNonce(ctx context.Context, nonce string, expires time.Time) error

	Close() error
}

// Pruner is an optional power of a Store: dropping expired nonces now
// rather than opportunistically. Both stores have it; a broker may call
// it from a ticker, and tests use it to check pruning.
type Pruner interface {
	// PruneNonces deletes nonces whose expiry is at or before now and
	// returns how many it deleted.
	PruneNonces(ctx context.Context, now time.Time) (int64, error)
}

// NonceEpocher is an optional power of a Store whose UseNonce may
// remember in memory only: the SQLite store opened with OpenExclusive,
// which no other broker process can share. A broker over such a store
// seals the epoch into every session at /auth and refuses, at /attest, a
// session sealed under another epoch: nonces handed out before a
// restart were forgotten with the process, so their sessions must not
// be answered after it.
type NonceEpocher interface {
	// NonceEpoch returns a random nonzero value that stays the same for
	// as long as UseNonce's memory lasts (the store is open), and
	// ok = false when UseNonce records nonces durably (no epoch to check).
	NonceEpoch() (epoch uint64, ok bool)
}
