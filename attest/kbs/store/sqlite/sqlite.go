// Package sqlite is the broker's embedded store: one SQLite file
// (pure Go, modernc.org/sqlite), for a single broker process. It must
// never be shared by brokers on different machines (use the PostgreSQL
// store) and never hold a secret in clear (the broker seals them first).
//
// Durability. The database runs in WAL mode. Nonce inserts, the hot
// path (one per handshake), commit with synchronous=NORMAL: the commit
// is written to the WAL file with write(2) before UseNonce returns, so
// it sits in the kernel's page cache and survives a kill -9 of the
// broker; only an OS crash or power loss before the next checkpoint can
// drop it, which at worst reopens a replay window for nonces that
// expire within minutes anyway. Workload, resource, policy and schema
// writes commit with synchronous=FULL (the WAL is fsynced before they
// return): losing an acknowledged sealed passphrase to a power cut
// would leave a sealed disk nobody can open, and these writes are rare.
//
// Concurrency. SQLite has one writer at a time. Writes go through a
// pool of exactly one connection, so concurrent handshakes queue in
// database/sql (honouring their contexts) instead of spinning in
// SQLite's busy handler or failing with SQLITE_BUSY; transactions begin
// IMMEDIATE so a read-then-write never has to upgrade its lock. Reads
// use a separate pool of query-only connections: WAL readers neither
// block the writer nor wait for it. busy_timeout covers another process
// (an admin command) holding the write lock for a moment.
//
// One broker, nonces in memory. OpenExclusive, what the broker uses,
// locks the file against a second broker and keeps spent nonces in
// memory (package nonceset) instead of the nonces table: a map lookup
// instead of a commit per handshake. A restart forgets them, so the
// store's NonceEpoch changes with every open and the broker refuses
// sessions begun under another epoch: a nonce from before a restart can
// never be answered after it, kill -9 or not. Open (tools and tests
// that share the file) keeps writing nonces, as below.
//
// Group commit. Nonce inserts arrive concurrently, one per handshake,
// and a commit costs several times an insert (WAL frames written, locks
// taken and dropped). One goroutine per store takes every insert queued
// while the previous commit ran and commits them as one transaction;
// each UseNonce returns once the commit holding its insert is done, so
// it is exactly as durable as a commit of its own. A caller whose
// context ends first stops waiting (its insert may still commit, which
// only spends a nonce nobody will answer; one whose context ended
// while the batch waited for the write lock is left out).
package sqlite

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/internal/nonceset"
	"github.com/cwrun/cwrun/attest/kbs/store/internal/prune"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

const (
	// busyTimeout bounds how long a statement waits for a lock held by
	// another process before failing with SQLITE_BUSY.
	busyTimeout = 10 * time.Second
	// pruneEvery is how many nonce inserts start one background prune.
	pruneEvery = 512
	// pruneBatch bounds one DELETE, so the writer is held for
	// milliseconds and handshakes queued behind it barely notice.
	pruneBatch = 1000
)

// migrations are applied in order; schema_version holds how many have
// run. Never edit one that has shipped: append a new one.
var migrations = []string{
	// 1: the initial schema. Times are Unix microseconds.
	`CREATE TABLE workloads (
		id                TEXT PRIMARY KEY,
		tee               TEXT NOT NULL,
		sealed_passphrase BLOB NOT NULL,
		refs              TEXT NOT NULL, -- JSON: claim -> accepted values
		policy            TEXT NOT NULL,
		cpus              INTEGER NOT NULL,
		memory_mib        INTEGER NOT NULL,
		created           INTEGER NOT NULL
	);
	CREATE TABLE resources (
		path    TEXT PRIMARY KEY,
		sealed  BLOB NOT NULL,
		updated INTEGER NOT NULL
	);
	CREATE TABLE policies (
		name    TEXT PRIMARY KEY,
		rego    TEXT NOT NULL,
		updated INTEGER NOT NULL
	);
	CREATE TABLE nonces (
		nonce   TEXT PRIMARY KEY,
		expires INTEGER NOT NULL
	) WITHOUT ROWID;
	CREATE INDEX nonces_expires ON nonces (expires);`,
}

// SchemaVersion is the schema version this package writes.
func SchemaVersion() int { return len(migrations) }

// Store is the SQLite store. It implements store.Store and store.Pruner.
type Store struct {
	path  string
	w     *sql.DB // exactly one connection: the single writer
	r     *sql.DB // query-only readers
	prune *prune.Trigger
	now   func() time.Time
	st    stmts

	nonces    chan *nonceReq // to the committer
	closing   chan struct{}  // closed by Close: the committer stops
	closeOnce sync.Once
	done      chan struct{} // closed by the committer when it stopped

	// Set by OpenExclusive: the broker lock, and the spent nonces kept
	// in memory under epoch instead of in the nonces table.
	lock  *os.File
	spent *nonceset.Set
	epoch uint64
}

// nonceReq is one UseNonce waiting for its group commit.
type nonceReq struct {
	ctx          context.Context
	nonce        string
	expires, now int64 // Unix microseconds
	result       chan error
}

const (
	// maxNonceBatch bounds one group commit, so the write lock is held
	// for a bounded time and an admin write waits little behind it.
	maxNonceBatch = 128
	// nonceQueue is how many inserts may wait for the committer; more
	// wait to enter the queue, honouring their contexts.
	nonceQueue = 1024
)

// stmts are the statements every handshake runs, prepared once.
// Parsing SQL costs SQLite more than running these statements does
// (about 100 µs a handshake, before they were kept); a *sql.Stmt keeps
// the compiled statement on each connection that ran it, and the
// driver resets rather than finalizes it between runs.
type stmts struct {
	useNonce, pruneNonces      *sql.Stmt // writer
	workload, resource, policy *sql.Stmt // readers
}

const (
	sqlUseNonce = `INSERT INTO nonces (nonce, expires) VALUES (?, ?)
		ON CONFLICT (nonce) DO UPDATE SET expires = excluded.expires WHERE nonces.expires <= ?`
	sqlPruneNonces = `DELETE FROM nonces WHERE nonce IN
		(SELECT nonce FROM nonces WHERE expires <= ? LIMIT ?)`
	sqlWorkload = `SELECT ` + workloadColumns + ` FROM workloads WHERE id = ?`
	sqlResource = `SELECT sealed FROM resources WHERE path = ?`
	sqlPolicy   = `SELECT rego FROM policies WHERE name = ?`
)

// prepare makes s.stmts; on failure it closes what it made.
func (s *Store) prepare(ctx context.Context) error {
	var err error
	prep := func(db *sql.DB, q string) *sql.Stmt {
		if err != nil {
			return nil
		}
		var st *sql.Stmt
		st, err = db.PrepareContext(ctx, q)
		return st
	}
	s.st.useNonce = prep(s.w, sqlUseNonce)
	s.st.pruneNonces = prep(s.w, sqlPruneNonces)
	s.st.workload = prep(s.r, sqlWorkload)
	s.st.resource = prep(s.r, sqlResource)
	s.st.policy = prep(s.r, sqlPolicy)
	if err != nil {
		s.closeStmts()
		return fmt.Errorf("prepare statements: %w", err)
	}
	return nil
}

func (s *Store) closeStmts() error {
	var errs []error
	for _, st := range []*sql.Stmt{s.st.useNonce, s.st.pruneNonces, s.st.workload, s.st.resource, s.st.policy} {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	return errors.Join(errs...)
}

var (
	_ store.Store        = (*Store)(nil)
	_ store.Pruner       = (*Store)(nil)
	_ store.NonceEpocher = (*Store)(nil)
)

// OpenExclusive opens the database as Open does, for the one broker
// process that serves from it: it takes an exclusive lock on
// path+".lock" (flock(2); the kernel drops it when the process dies,
// kill -9 included) and fails at once if another OpenExclusive holds
// it. Spent nonces are then kept in memory rather than written per
// handshake, which no other broker could see, and NonceEpoch returns
// the random epoch that lets the broker refuse sessions begun before
// this open. Workloads, resources and policies are stored as with Open.
func OpenExclusive(ctx context.Context, path string) (*Store, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", path, err)
	}
	lock, err := os.OpenFile(abs+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: broker lock: %w (does its directory exist and is it writable?)", abs, err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = lock.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("open sqlite store %s: another broker is serving from it (it holds %s.lock): stop it, or use a PostgreSQL store for several brokers", abs, abs)
		}
		return nil, fmt.Errorf("open sqlite store %s: lock %s.lock: %w", abs, abs, err)
	}
	s, err := Open(ctx, abs)
	if err != nil {
		_ = lock.Close()
		return nil, err
	}
	var e [8]byte
	for binary.LittleEndian.Uint64(e[:]) == 0 {
		_, _ = rand.Read(e[:]) // never fails (crypto/rand)
	}
	s.lock, s.spent, s.epoch = lock, nonceset.New(), binary.LittleEndian.Uint64(e[:])
	return s, nil
}

// NonceEpoch implements store.NonceEpocher: ok only for a store opened
// with OpenExclusive.
func (s *Store) NonceEpoch() (uint64, bool) { return s.epoch, s.spent != nil }

// Open opens the SQLite database at path, creating it (mode 0600, in
// an existing directory) and its schema on first use.
func Open(ctx context.Context, path string) (*Store, error) {
	if path == "" || path == ":memory:" || strings.HasPrefix(path, "file:") {
		return nil, fmt.Errorf("open sqlite store %q: give the path of a database file (in-memory and file: URIs are not supported)", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", path, err)
	}
	// Create the file ourselves so that it is private from the start;
	// SQLite gives its -wal and -shm files the database file's mode.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w (does its directory exist and is it writable?)", abs, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}

	w, err := sql.Open("sqlite", dsn(abs, url.Values{
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()),
			"journal_mode(WAL)",
			"synchronous(NORMAL)",
			"foreign_keys(1)",
		},
		"_txlock": {"immediate"},
	}))
	if err != nil {
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	w.SetConnMaxIdleTime(0)

	s := &Store{path: abs, w: w, now: time.Now}
	// The writer must have switched the file to WAL before readers
	// open it; migrating does that.
	if err := s.migrate(ctx); err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}

	readers := max(4, runtime.GOMAXPROCS(0))
	r, err := sql.Open("sqlite", dsn(abs, url.Values{
		"_pragma": {
			fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds()),
			"foreign_keys(1)",
			"query_only(1)",
		},
	}))
	if err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	r.SetMaxOpenConns(readers)
	r.SetMaxIdleConns(readers)
	r.SetConnMaxLifetime(0)
	if err := r.PingContext(ctx); err != nil {
		_ = r.Close()
		_ = w.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	s.r = r
	if err := s.prepare(ctx); err != nil {
		_ = r.Close()
		_ = w.Close()
		return nil, fmt.Errorf("open sqlite store %s: %w", abs, err)
	}
	s.prune = prune.New(pruneEvery, s.backgroundPrune)
	s.nonces = make(chan *nonceReq, nonceQueue)
	s.closing = make(chan struct{})
	s.done = make(chan struct{})
	go s.commitNonces()
	return s, nil
}

// dsn builds a file: URI, so that any character in the path is escaped
// rather than read as a query.
func dsn(abs string, q url.Values) string {
	return (&url.URL{Scheme: "file", Path: abs, RawQuery: q.Encode()}).String()
}

// Path is the absolute path of the database file.
func (s *Store) Path() string { return s.path }

// Close stops the nonce committer and the background prune and closes
// the database; the last connection's close checkpoints the WAL into
// the main file.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	<-s.done
	s.prune.Close()
	err := errors.Join(s.closeStmts(), s.r.Close(), s.w.Close())
	if s.lock != nil {
		// Closing the file drops the flock.
		err = errors.Join(err, s.lock.Close())
	}
	return err
}

func (s *Store) migrate(ctx context.Context) error {
	return s.write(ctx, true, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
			return fmt.Errorf("create schema_version: %w", err)
		}
		var v int
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this cwrun knows (%d): upgrade cwrun", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
				return fmt.Errorf("migrate schema to version %d: %w", i+1, err)
			}
		}
		if v == len(migrations) {
			return nil
		}
		if _, err := tx.ExecContext(ctx, `DELETE FROM schema_version`); err != nil {
			return fmt.Errorf("record schema version: %w", err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (?)`, len(migrations)); err != nil {
			return fmt.Errorf("record schema version: %w", err)
		}
		return nil
	})
}

// write runs fn in an IMMEDIATE transaction on the writer. durable
// makes the commit fsync the WAL (synchronous=FULL) before returning.
func (s *Store) write(ctx context.Context, durable bool, fn func(tx *sql.Tx) error) (err error) {
	conn, err := s.w.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if durable {
		if _, err := conn.ExecContext(ctx, `PRAGMA synchronous = FULL`); err != nil {
			return err
		}
		defer func() {
			// Back to NORMAL for the nonce inserts that share this
			// connection, even when ctx is done. Should this fail the
			// connection only stays slower, never less durable.
			if _, rerr := conn.ExecContext(context.Background(), `PRAGMA synchronous = NORMAL`); rerr != nil && err == nil {
				err = fmt.Errorf("restore synchronous=NORMAL: %w", rerr)
			}
		}()
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// AddWorkload implements store.Store.
func (s *Store) AddWorkload(ctx context.Context, w store.Workload) error {
	if err := store.CheckWorkload(w); err != nil {
		return fmt.Errorf("add workload: %w", err)
	}
	refs, err := json.Marshal(w.References)
	if err != nil {
		return fmt.Errorf("add workload %s: encode references: %w", w.ID, err)
	}
	created := store.Created(w, s.now())
	err = s.write(ctx, true, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO workloads
			(id, tee, sealed_passphrase, refs, policy, cpus, memory_mib, created)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?)
			ON CONFLICT (id) DO NOTHING`,
			w.ID, w.Tee, blob(w.SealedPassphrase), string(refs), w.Policy, w.CPUs, w.MemoryMiB, created.UnixMicro())
		if err != nil {
			return err
		}
		return affected(res, store.ErrExists)
	})
	if err != nil {
		return fmt.Errorf("add workload %s: %w", w.ID, err)
	}
	return nil
}

// UpdateWorkload implements store.Store.
func (s *Store) UpdateWorkload(ctx context.Context, w store.Workload) error {
	if err := store.CheckWorkload(w); err != nil {
		return fmt.Errorf("update workload: %w", err)
	}
	refs, err := json.Marshal(w.References)
	if err != nil {
		return fmt.Errorf("update workload %s: encode references: %w", w.ID, err)
	}
	err = s.write(ctx, true, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE workloads SET
			tee = ?, sealed_passphrase = ?, refs = ?, policy = ?, cpus = ?, memory_mib = ?
			WHERE id = ?`,
			w.Tee, blob(w.SealedPassphrase), string(refs), w.Policy, w.CPUs, w.MemoryMiB, w.ID)
		if err != nil {
			return err
		}
		return affected(res, store.ErrNotFound)
	})
	if err != nil {
		return fmt.Errorf("update workload %s: %w", w.ID, err)
	}
	return nil
}

const workloadColumns = `id, tee, sealed_passphrase, refs, policy, cpus, memory_mib, created`

// pointRead returns the context for a read of one row by its key. Such
// a read takes microseconds and never waits for the writer (WAL), so it
// is not made interruptible: the driver would start a goroutine per
// statement to watch a cancellable context, which cost more than the
// read. A context already done is refused; a read stuck behind another
// process's exclusive lock waits at most busy_timeout.
func pointRead(ctx context.Context) (context.Context, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return context.WithoutCancel(ctx), nil
}

// Workload implements store.Store.
func (s *Store) Workload(ctx context.Context, id string) (store.Workload, error) {
	rctx, err := pointRead(ctx)
	if err != nil {
		return store.Workload{}, fmt.Errorf("workload %s: %w", id, err)
	}
	w, err := scanWorkload(s.st.workload.QueryRowContext(rctx, id))
	if errors.Is(err, sql.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return store.Workload{}, fmt.Errorf("workload %s: %w", id, err)
	}
	return w, nil
}

// Workloads implements store.Store.
func (s *Store) Workloads(ctx context.Context) ([]store.Workload, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT `+workloadColumns+` FROM workloads ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("list workloads: %w", err)
	}
	defer rows.Close()
	ws := []store.Workload{}
	for rows.Next() {
		w, err := scanWorkload(rows)
		if err != nil {
			return nil, fmt.Errorf("list workloads: %w", err)
		}
		ws = append(ws, w)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list workloads: %w", err)
	}
	return ws, nil
}

func scanWorkload(row interface{ Scan(...any) error }) (store.Workload, error) {
	var (
		w       store.Workload
		refs    string
		created int64
	)
	if err := row.Scan(&w.ID, &w.Tee, &w.SealedPassphrase, &refs, &w.Policy, &w.CPUs, &w.MemoryMiB, &created); err != nil {
		return store.Workload{}, err
	}
	if err := json.Unmarshal([]byte(refs), &w.References); err != nil {
		return store.Workload{}, fmt.Errorf("workload %s: decode references: %w (the database is damaged)", w.ID, err)
	}
	w.SealedPassphrase = blob(w.SealedPassphrase)
	w.Created = time.UnixMicro(created).UTC()
	return w, nil
}

// DeleteWorkload implements store.Store.
func (s *Store) DeleteWorkload(ctx context.Context, id string) error {
	err := s.write(ctx, true, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM workloads WHERE id = ?`, id)
		if err != nil {
			return err
		}
		return affected(res, store.ErrNotFound)
	})
	if err != nil {
		return fmt.Errorf("delete workload %s: %w", id, err)
	}
	return nil
}

// SetResource implements store.Store.
func (s *Store) SetResource(ctx context.Context, path string, sealed []byte) error {
	if err := store.CheckText("resource path", path); err != nil {
		return fmt.Errorf("set resource: %w", err)
	}
	now := s.now().UnixMicro()
	err := s.write(ctx, true, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO resources (path, sealed, updated) VALUES (?, ?, ?)
			ON CONFLICT (path) DO UPDATE SET sealed = excluded.sealed, updated = excluded.updated`,
			path, blob(sealed), now)
		return err
	})
	if err != nil {
		return fmt.Errorf("set resource %s: %w", path, err)
	}
	return nil
}

// Resource implements store.Store.
func (s *Store) Resource(ctx context.Context, path string) ([]byte, error) {
	rctx, err := pointRead(ctx)
	if err != nil {
		return nil, fmt.Errorf("resource %s: %w", path, err)
	}
	var sealed []byte
	err = s.st.resource.QueryRowContext(rctx, path).Scan(&sealed)
	if errors.Is(err, sql.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("resource %s: %w", path, err)
	}
	return blob(sealed), nil
}

// DeleteResource implements store.Store.
func (s *Store) DeleteResource(ctx context.Context, path string) error {
	err := s.write(ctx, true, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM resources WHERE path = ?`, path)
		if err != nil {
			return err
		}
		return affected(res, store.ErrNotFound)
	})
	if err != nil {
		return fmt.Errorf("delete resource %s: %w", path, err)
	}
	return nil
}

// ResourcePaths implements store.Store.
func (s *Store) ResourcePaths(ctx context.Context) ([]string, error) {
	rows, err := s.r.QueryContext(ctx, `SELECT path FROM resources ORDER BY path`)
	if err != nil {
		return nil, fmt.Errorf("list resources: %w", err)
	}
	defer rows.Close()
	paths := []string{}
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			return nil, fmt.Errorf("list resources: %w", err)
		}
		paths = append(paths, p)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list resources: %w", err)
	}
	return paths, nil
}

// SwapPassphrase implements store.Store.
func (s *Store) SwapPassphrase(ctx context.Context, id string, prev, next []byte) error {
	if err := s.swap(ctx, `workloads`, `sealed_passphrase`, `id`, id, prev, next); err != nil {
		return fmt.Errorf("swap passphrase of workload %s: %w", id, err)
	}
	return nil
}

// SwapResource implements store.Store.
func (s *Store) SwapResource(ctx context.Context, path string, prev, next []byte) error {
	if err := s.swap(ctx, `resources`, `sealed`, `path`, path, prev, next); err != nil {
		return fmt.Errorf("swap resource %s: %w", path, err)
	}
	return nil
}

// swap sets column to next in table's row key = k while it holds prev.
// The names are the callers' constants, never input.
func (s *Store) swap(ctx context.Context, table, column, key, k string, prev, next []byte) error {
	return s.write(ctx, true, func(tx *sql.Tx) error {
		var cur []byte
		err := tx.QueryRowContext(ctx, `SELECT `+column+` FROM `+table+` WHERE `+key+` = ?`, k).Scan(&cur)
		if errors.Is(err, sql.ErrNoRows) {
			return store.ErrNotFound
		}
		if err != nil {
			return err
		}
		if !bytes.Equal(cur, prev) {
			return store.ErrChanged
		}
		_, err = tx.ExecContext(ctx, `UPDATE `+table+` SET `+column+` = ? WHERE `+key+` = ?`, blob(next), k)
		return err
	})
}

// SetPolicy implements store.Store.
func (s *Store) SetPolicy(ctx context.Context, name, rego string) error {
	if err := store.CheckText("policy name", name); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	if err := store.CheckText("policy "+name+" rego", rego); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	now := s.now().UnixMicro()
	err := s.write(ctx, true, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO policies (name, rego, updated) VALUES (?, ?, ?)
			ON CONFLICT (name) DO UPDATE SET rego = excluded.rego, updated = excluded.updated`,
			name, rego, now)
		return err
	})
	if err != nil {
		return fmt.Errorf("set policy %s: %w", name, err)
	}
	return nil
}

// Policy implements store.Store.
func (s *Store) Policy(ctx context.Context, name string) (string, error) {
	rctx, err := pointRead(ctx)
	if err != nil {
		return "", fmt.Errorf("policy %s: %w", name, err)
	}
	var rego string
	err = s.st.policy.QueryRowContext(rctx, name).Scan(&rego)
	if errors.Is(err, sql.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("policy %s: %w", name, err)
	}
	return rego, nil
}

// UseNonce implements store.Store. The insert joins the next group
// commit: a new nonce is inserted, an expired entry is taken over, a
// live one changes nothing and is reported as a replay.
func (s *Store) UseNonce(ctx context.Context, nonce string, expires time.Time) error {
	if err := store.CheckText("nonce", nonce); err != nil {
		return fmt.Errorf("use nonce: %w", err)
	}
	now := s.now()
	if err := store.CheckExpiry(expires, now); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("use nonce: %w", err)
	}
	errClosed := errors.New("use nonce: the store is closed")
	select {
	case <-s.closing:
		return errClosed
	default:
	}
	if s.spent != nil {
		if !s.spent.Use(nonce, expires, now) {
			return fmt.Errorf("use nonce: %w", store.ErrReplay)
		}
		return nil
	}
	req := &nonceReq{ctx: ctx, nonce: nonce, expires: expires.UnixMicro(), now: now.UnixMicro(), result: make(chan error, 1)}
	select {
	case s.nonces <- req:
	case <-s.closing:
		return errClosed
	case <-ctx.Done():
		return fmt.Errorf("use nonce: %w", ctx.Err())
	}
	var err error
	select {
	case err = <-req.result:
	case <-s.done:
		// The committer stopped; it answered what it took from the
		// queue, and nothing else will be.
		select {
		case err = <-req.result:
		default:
			return errClosed
		}
	case <-ctx.Done():
		return fmt.Errorf("use nonce: %w", ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("use nonce: %w", err)
	}
	s.prune.Tick()
	return nil
}

// commitNonces is the committer: it runs until Close, committing what
// the queue holds each time it looks.
func (s *Store) commitNonces() {
	defer close(s.done)
	batch := make([]*nonceReq, 0, maxNonceBatch)
	for {
		select {
		case <-s.closing:
			// Answer whoever is still queued; UseNonce callers also
			// watch closing, but one may have queued just before.
			for {
				select {
				case r := <-s.nonces:
					r.result <- errors.New("the store is closed")
				default:
					return
				}
			}
		case r := <-s.nonces:
			batch = append(batch[:0], r)
		}
	fill:
		for len(batch) < maxNonceBatch {
			select {
			case r := <-s.nonces:
				batch = append(batch, r)
			default:
				break fill
			}
		}
		s.commitBatch(batch)
		clear(batch)
	}
}

// commitBatch inserts batch in one IMMEDIATE transaction and answers
// each request: nil, store.ErrReplay, its own statement's error, or the
// commit's error for all. Requests whose caller has given up are left
// out, so their nonces stay unspent.
func (s *Store) commitBatch(batch []*nonceReq) {
	live := batch[:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.result <- err
			continue
		}
		live = append(live, r)
	}
	if len(live) == 0 {
		return
	}
	// The batch is everyone's: no single caller's context may cut it
	// short. busy_timeout bounds the wait for another process's lock.
	ctx := context.Background()
	results := make([]error, len(live))
	err := s.write(ctx, false, func(tx *sql.Tx) error {
		st := tx.StmtContext(ctx, s.st.useNonce)
		defer st.Close()
		for i, r := range live {
			// The wait for the write lock may have outlasted the
			// caller: leave its nonce unspent.
			if err := r.ctx.Err(); err != nil {
				results[i] = err
				continue
			}
			res, err := st.ExecContext(ctx, r.nonce, r.expires, r.now)
			if err == nil {
				err = affected(res, store.ErrReplay)
			}
			results[i] = err
		}
		return nil
	})
	for i, r := range live {
		if err != nil {
			r.result <- err
		} else {
			r.result <- results[i]
		}
	}
}

// PruneNonces implements store.Pruner.
func (s *Store) PruneNonces(ctx context.Context, now time.Time) (int64, error) {
	if s.spent != nil {
		return s.spent.Prune(now), nil
	}
	return s.pruneNonces(ctx, now, func() bool { return false })
}

func (s *Store) pruneNonces(ctx context.Context, now time.Time, stopped func() bool) (int64, error) {
	var total int64
	for !stopped() {
		res, err := s.st.pruneNonces.ExecContext(ctx, now.UnixMicro(), pruneBatch)
		if err != nil {
			return total, fmt.Errorf("prune nonces: %w", err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, fmt.Errorf("prune nonces: %w", err)
		}
		total += n
		if n < pruneBatch {
			break
		}
	}
	return total, nil
}

// backgroundPrune is the prune.Trigger's run. A failure is left for
// the next run: pruning only keeps the table small, and a broker that
// cares calls PruneNonces itself and sees the error.
func (s *Store) backgroundPrune(stopped func() bool) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, _ = s.pruneNonces(ctx, s.now(), stopped)
}

// affected turns "no row changed" into err.
func affected(res sql.Result, err error) error {
	n, rerr := res.RowsAffected()
	if rerr != nil {
		return rerr
	}
	if n == 0 {
		return err
	}
	return nil
}

// blob keeps a nil slice from becoming a NULL in a NOT NULL column and
// reads an empty blob back as an empty, non-nil slice.
func blob(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// Serving reports, without opening the database or making a file,
// whether a broker serves from path: whether another process holds the
// lock OpenExclusive takes.
func Serving(path string) (bool, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return false, err
	}
	lock, err := os.OpenFile(abs+".lock", os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("broker lock %s.lock: %w", abs, err)
	}
	defer lock.Close() // closing drops a lock taken here
	switch err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); {
	case errors.Is(err, syscall.EWOULDBLOCK):
		return true, nil
	case err != nil:
		return false, fmt.Errorf("broker lock %s.lock: %w", abs, err)
	}
	return false, nil
}
