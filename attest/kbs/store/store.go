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
type Store interface {
	// AddWorkload stores w; ErrExists when its ID is taken (never an
	// overwrite).
	AddWorkload(ctx context.Context, w Workload) error
	// UpdateWorkload replaces an existing workload; ErrNotFound if none.
	UpdateWorkload(ctx context.Context, w Workload) error
	Workload(ctx context.Context, id string) (Workload, error)
	Workloads(ctx context.Context) ([]Workload, error)
	DeleteWorkload(ctx context.Context, id string) error

	// Resources are sealed blobs at "repo/type/tag".
	SetResource(ctx context.Context, path string, sealed []byte) error
	Resource(ctx context.Context, path string) ([]byte, error)
	DeleteResource(ctx context.Context, path string) error

	// Policies by name ("resource" is the broker-wide resource policy).
	SetPolicy(ctx context.Context, name, rego string) error
	Policy(ctx context.Context, name string) (string, error)

	// UseNonce records a nonce as consumed until expires; ErrReplay when
	// it already was. Expired entries may be dropped at any time.
	UseNonce(ctx context.Context, nonce string, expires time.Time) error

	Close() error
}
