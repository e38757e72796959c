// Package postgres is the broker's shared store: PostgreSQL through
// pgx, for several brokers that serve one fleet. It must never hold a
// secret in clear (the broker seals them first) and never rely on one
// broker's memory for correctness: replay protection and ID uniqueness
// are decided by the database (a primary key and an atomic upsert), so
// any replica may serve any request.
//
// Durability: a write returns only after PostgreSQL acknowledged its
// commit, which with the server's default synchronous_commit=on means
// the commit record reached the server's WAL on disk. A kill -9 of the
// broker therefore cannot lose it: the broker holds nothing the server
// has not already made durable.
//
// Nonce inserts, the hot path (one per handshake), are the exception,
// as in the SQLite store: they run on connections with
// synchronous_commit=off, so their commit is acknowledged once it is in
// the server's WAL buffers, without waiting for the disk. A kill -9 of
// the broker still loses nothing (the server has the commit); a crash
// of the PostgreSQL server or its machine can lose the last few hundred
// milliseconds of spent nonces (until the WAL writer's next flush),
// which reopens a replay window for nonces that expire within minutes
// anyway, and a replayed attestation still only yields a token bound to
// the original guest's TEE key. Everything else (workloads, resources,
// policies) keeps the server's full durability.
//
// Group commit. Concurrent UseNonce calls are gathered: a few committer
// goroutines each take whatever inserts are queued (up to
// maxNonceBatch) and spend them in one statement, an upsert over
// unnest() arrays that returns the nonces it took. A handshake then
// costs the server a share of one statement and one commit instead of
// its own (under 64 concurrent handshakes, most of what the server
// spent per handshake). Each UseNonce returns once its statement
// committed, so it is exactly as durable and as atomic as before.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/internal/prune"
)

const (
	// migrationLock is the advisory lock key ("cwrunkbs") held while the
	// schema is checked and migrated, so that brokers starting together
	// do not race to create it. Advisory locks are per database.
	migrationLock int64 = 0x637772756e6b6273
	// defaultMaxConns is the pool size unless the URL sets
	// pool_max_conns: enough connections that 64 concurrent handshakes
	// share the server's group commit rather than queue for a few.
	defaultMaxConns = 16
	// pruneEvery is how many nonce inserts start one background prune.
	pruneEvery = 512
	// pruneBatch bounds one DELETE.
	pruneBatch = 1000
	// uniqueViolation is PostgreSQL's SQLSTATE for a duplicate key.
	uniqueViolation = "23505"
	// nonceCommitters is how many batches of nonces may be in flight to
	// the server at once; maxNonceBatch bounds one batch. Fewer
	// committers make larger batches: under 64 concurrent handshakes the
	// server spent about 200 µs a handshake with 4, about 110 with 2 or
	// 1 (BenchmarkHandshakeSplit/sample/postgres). Since the broker
	// queues handshakes (admission), fewer run at once and batches are
	// smaller, and one committer made the difference: 105 against 158
	// µs a handshake (BenchmarkHandshake/sample/postgres). A statement
	// that waits (a row lock, only when one nonce is replayed to two
	// brokers at once) holds the others up for that wait.
	nonceCommitters = 1
	maxNonceBatch   = 256
	// nonceQueue is how many inserts may wait for a committer.
	nonceQueue = 1024
)

// nonceReq is one UseNonce waiting for its batch.
type nonceReq struct {
	ctx     context.Context
	nonce   string
	expires time.Time
	result  chan error
}

// migrations are applied in order; schema_version holds how many have
// run. Never edit one that has shipped: append a new one.
var migrations = []string{
	// 1: the initial schema. References are JSON kept as text, so they
	// come back byte for byte (jsonb would reorder and refuse \u0000).
	`CREATE TABLE workloads (
		id                text PRIMARY KEY,
		tee               text NOT NULL,
		sealed_passphrase bytea NOT NULL,
		refs              text NOT NULL,
		policy            text NOT NULL,
		cpus              bigint NOT NULL,
		memory_mib        bigint NOT NULL,
		created           timestamptz NOT NULL
	);
	CREATE TABLE resources (
		path    text PRIMARY KEY,
		sealed  bytea NOT NULL,
		updated timestamptz NOT NULL
	);
	CREATE TABLE policies (
		name    text PRIMARY KEY,
		rego    text NOT NULL,
		updated timestamptz NOT NULL
	);
	CREATE TABLE nonces (
		nonce   text PRIMARY KEY,
		expires timestamptz NOT NULL
	);
	CREATE INDEX nonces_expires ON nonces (expires);`,
}

// SchemaVersion is the schema version this package writes.
func SchemaVersion() int { return len(migrations) }

// Store is the PostgreSQL store. It implements store.Store and
// store.Pruner.
type Store struct {
	pool *pgxpool.Pool
	// nonces is a pool of connections with synchronous_commit=off, for
	// UseNonce only (see the package documentation).
	nonces *pgxpool.Pool
	prune  *prune.Trigger
	now    func() time.Time

	queue     chan *nonceReq // to the committers
	closing   chan struct{}  // closed by Close: the committers stop
	closeOnce sync.Once
	committed sync.WaitGroup // the committers
	stopped   chan struct{}  // closed by Close once every committer returned
}

var (
	_ store.Store  = (*Store)(nil)
	_ store.Pruner = (*Store)(nil)
)

// Open connects to the database at url (postgres:// or postgresql://,
// libpq's parameters and pgxpool's pool_* parameters), checks that it
// answers and creates or migrates the schema.
func Open(ctx context.Context, url string) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgx's message may quote the URL; name it without its password.
		return nil, fmt.Errorf("open postgres store %s: parse URL: %w", redact(url), err)
	}
	if !strings.Contains(url, "pool_max_conns") {
		cfg.MaxConns = defaultMaxConns
	}
	where := fmt.Sprintf("%s@%s:%d/%s", cfg.ConnConfig.User, cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open postgres store %s: %w", where, ctxErr(ctx, err))
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open postgres store %s: %w (is the server up and the URL right?)", where, ctxErr(ctx, err))
	}
	s := &Store{pool: pool, now: time.Now}
	if err := s.migrate(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open postgres store %s: %w", where, ctxErr(ctx, err))
	}
	ncfg := cfg.Copy()
	ncfg.ConnConfig.RuntimeParams["synchronous_commit"] = "off"
	// Commits that do not wait for the disk take a connection only for
	// a round trip: half the main pool serves as many handshakes.
	ncfg.MaxConns = max(2, cfg.MaxConns/2)
	ncfg.MinConns = 0
	if s.nonces, err = pgxpool.NewWithConfig(ctx, ncfg); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open postgres store %s: nonce pool: %w", where, ctxErr(ctx, err))
	}
	s.prune = prune.New(pruneEvery, s.backgroundPrune)
	s.queue = make(chan *nonceReq, nonceQueue)
	s.closing = make(chan struct{})
	s.stopped = make(chan struct{})
	for range nonceCommitters {
		s.committed.Go(s.commitNonces)
	}
	return s, nil
}

// redact returns raw without a password, or a placeholder when it
// does not parse as a URL.
func redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// Close stops the nonce committers and the background prune and closes
// the pools.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.committed.Wait()
		close(s.stopped)
	})
	<-s.stopped
	s.prune.Close()
	s.nonces.Close()
	s.pool.Close()
	return nil
}

func (s *Store) migrate(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		// Released at commit or rollback.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, migrationLock); err != nil {
			return fmt.Errorf("take migration lock: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)`); err != nil {
			return fmt.Errorf("create schema_version: %w", err)
		}
		var v int
		if err := tx.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		if v > len(migrations) {
			return fmt.Errorf("database schema version %d is newer than this cwrun knows (%d): upgrade cwrun", v, len(migrations))
		}
		for i := v; i < len(migrations); i++ {
			if _, err := tx.Exec(ctx, migrations[i]); err != nil {
				return fmt.Errorf("migrate schema to version %d: %w", i+1, err)
			}
		}
		if v == len(migrations) {
			return nil
		}
		if _, err := tx.Exec(ctx, `DELETE FROM schema_version`); err != nil {
			return fmt.Errorf("record schema version: %w", err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO schema_version (version) VALUES ($1)`, len(migrations)); err != nil {
			return fmt.Errorf("record schema version: %w", err)
		}
		return nil
	})
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
	_, err = s.pool.Exec(ctx, `INSERT INTO workloads
		(id, tee, sealed_passphrase, refs, policy, cpus, memory_mib, created)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`,
		w.ID, w.Tee, blob(w.SealedPassphrase), string(refs), w.Policy, w.CPUs, w.MemoryMiB, store.Created(w, s.now()))
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == uniqueViolation {
		err = store.ErrExists
	}
	if err != nil {
		return fmt.Errorf("add workload %s: %w", w.ID, ctxErr(ctx, err))
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
	tag, err := s.pool.Exec(ctx, `UPDATE workloads SET
		tee = $2, sealed_passphrase = $3, refs = $4, policy = $5, cpus = $6, memory_mib = $7
		WHERE id = $1`,
		w.ID, w.Tee, blob(w.SealedPassphrase), string(refs), w.Policy, w.CPUs, w.MemoryMiB)
	if err == nil {
		err = affected(tag, store.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("update workload %s: %w", w.ID, ctxErr(ctx, err))
	}
	return nil
}

const workloadColumns = `id, tee, sealed_passphrase, refs, policy, cpus, memory_mib, created`

// Workload implements store.Store.
func (s *Store) Workload(ctx context.Context, id string) (store.Workload, error) {
	w, err := scanWorkload(s.pool.QueryRow(ctx, `SELECT `+workloadColumns+` FROM workloads WHERE id = $1`, id))
	if errors.Is(err, pgx.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return store.Workload{}, fmt.Errorf("workload %s: %w", id, ctxErr(ctx, err))
	}
	return w, nil
}

// Workloads implements store.Store. IDs sort bytewise (COLLATE "C"),
// as the SQLite store and Go's sort.Strings do, whatever the
// database's collation.
func (s *Store) Workloads(ctx context.Context) ([]store.Workload, error) {
	rows, err := s.pool.Query(ctx, `SELECT `+workloadColumns+` FROM workloads ORDER BY id COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list workloads: %w", ctxErr(ctx, err))
	}
	defer rows.Close()
	ws := []store.Workload{}
	for rows.Next() {
		w, err := scanWorkload(rows)
		if err != nil {
			return nil, fmt.Errorf("list workloads: %w", ctxErr(ctx, err))
		}
		ws = append(ws, w)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list workloads: %w", ctxErr(ctx, err))
	}
	return ws, nil
}

func scanWorkload(row pgx.Row) (store.Workload, error) {
	var (
		w    store.Workload
		refs string
	)
	if err := row.Scan(&w.ID, &w.Tee, &w.SealedPassphrase, &refs, &w.Policy, &w.CPUs, &w.MemoryMiB, &w.Created); err != nil {
		return store.Workload{}, err
	}
	if err := json.Unmarshal([]byte(refs), &w.References); err != nil {
		return store.Workload{}, fmt.Errorf("workload %s: decode references: %w (the database is damaged)", w.ID, err)
	}
	w.SealedPassphrase = blob(w.SealedPassphrase)
	w.Created = w.Created.UTC()
	return w, nil
}

// DeleteWorkload implements store.Store.
func (s *Store) DeleteWorkload(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM workloads WHERE id = $1`, id)
	if err == nil {
		err = affected(tag, store.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("delete workload %s: %w", id, ctxErr(ctx, err))
	}
	return nil
}

// SetResource implements store.Store.
func (s *Store) SetResource(ctx context.Context, path string, sealed []byte) error {
	if err := store.CheckText("resource path", path); err != nil {
		return fmt.Errorf("set resource: %w", err)
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO resources (path, sealed, updated) VALUES ($1, $2, $3)
		ON CONFLICT (path) DO UPDATE SET sealed = EXCLUDED.sealed, updated = EXCLUDED.updated`,
		path, blob(sealed), s.now())
	if err != nil {
		return fmt.Errorf("set resource %s: %w", path, ctxErr(ctx, err))
	}
	return nil
}

// Resource implements store.Store.
func (s *Store) Resource(ctx context.Context, path string) ([]byte, error) {
	var sealed []byte
	err := s.pool.QueryRow(ctx, `SELECT sealed FROM resources WHERE path = $1`, path).Scan(&sealed)
	if errors.Is(err, pgx.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("resource %s: %w", path, ctxErr(ctx, err))
	}
	return blob(sealed), nil
}

// DeleteResource implements store.Store.
func (s *Store) DeleteResource(ctx context.Context, path string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM resources WHERE path = $1`, path)
	if err == nil {
		err = affected(tag, store.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("delete resource %s: %w", path, ctxErr(ctx, err))
	}
	return nil
}

// ResourcePaths implements store.Store, sorted bytewise as Workloads.
func (s *Store) ResourcePaths(ctx context.Context) ([]string, error) {
	rows, err := s.pool.Query(ctx, `SELECT path FROM resources ORDER BY path COLLATE "C"`)
	if err != nil {
		return nil, fmt.Errorf("list resources: %w", ctxErr(ctx, err))
	}
	paths, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list resources: %w", ctxErr(ctx, err))
	}
	if paths == nil {
		paths = []string{}
	}
	return paths, nil
}

// SwapPassphrase implements store.Store.
func (s *Store) SwapPassphrase(ctx context.Context, id string, prev, next []byte) error {
	if err := s.swap(ctx, `workloads`, `sealed_passphrase`, `id`, id, prev, next); err != nil {
		return fmt.Errorf("swap passphrase of workload %s: %w", id, ctxErr(ctx, err))
	}
	return nil
}

// SwapResource implements store.Store.
func (s *Store) SwapResource(ctx context.Context, path string, prev, next []byte) error {
	if err := s.swap(ctx, `resources`, `sealed`, `path`, path, prev, next); err != nil {
		return fmt.Errorf("swap resource %s: %w", path, ctxErr(ctx, err))
	}
	return nil
}

// swap sets column to next in table's row key = k while it holds prev,
// in one statement; when no row changed, a second read tells a missing
// row from a changed one. The names are the callers' constants, never
// input.
func (s *Store) swap(ctx context.Context, table, column, key, k string, prev, next []byte) error {
	tag, err := s.pool.Exec(ctx, `UPDATE `+table+` SET `+column+` = $3 WHERE `+key+` = $1 AND `+column+` = $2`, k, blob(prev), blob(next))
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+table+` WHERE `+key+` = $1)`, k).Scan(&exists); err != nil {
		return err
	}
	if !exists {
		return store.ErrNotFound
	}
	return store.ErrChanged
}

// SetPolicy implements store.Store.
func (s *Store) SetPolicy(ctx context.Context, name, rego string) error {
	if err := store.CheckText("policy name", name); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	if err := store.CheckText("policy "+name+" rego", rego); err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO policies (name, rego, updated) VALUES ($1, $2, $3)
		ON CONFLICT (name) DO UPDATE SET rego = EXCLUDED.rego, updated = EXCLUDED.updated`,
		name, rego, s.now())
	if err != nil {
		return fmt.Errorf("set policy %s: %w", name, ctxErr(ctx, err))
	}
	return nil
}

// Policy implements store.Store.
func (s *Store) Policy(ctx context.Context, name string) (string, error) {
	var rego string
	err := s.pool.QueryRow(ctx, `SELECT rego FROM policies WHERE name = $1`, name).Scan(&rego)
	if errors.Is(err, pgx.ErrNoRows) {
		err = store.ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("policy %s: %w", name, ctxErr(ctx, err))
	}
	return rego, nil
}

// UseNonce implements store.Store with an atomic upsert, shared with
// the calls queued at the same time (see Group commit): a new nonce is
// inserted, an expired entry is taken over, a live one changes no row
// and is reported as a replay. PostgreSQL guarantees that of concurrent
// upserts of one nonce exactly one inserts; the others wait for it and
// then see a live entry.
func (s *Store) UseNonce(ctx context.Context, nonce string, expires time.Time) error {
	if err := store.CheckText("nonce", nonce); err != nil {
		return fmt.Errorf("use nonce: %w", err)
	}
	if err := store.CheckExpiry(expires, s.now()); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("use nonce: %w", err)
	}
	errClosed := errors.New("use nonce: the store is closed")
	req := &nonceReq{ctx: ctx, nonce: nonce, expires: expires, result: make(chan error, 1)}
	select {
	case <-s.closing:
		return errClosed
	default:
	}
	select {
	case s.queue <- req:
	case <-s.closing:
		return errClosed
	case <-ctx.Done():
		return fmt.Errorf("use nonce: %w", ctx.Err())
	}
	var err error
	select {
	case err = <-req.result:
	case <-s.stopped:
		// The committers answered what they took; a request queued
		// after they left never will be.
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

// commitNonces is one committer: it runs until Close, spending what is
// queued in batches, and answers what is left queued at Close.
func (s *Store) commitNonces() {
	batch := make([]*nonceReq, 0, maxNonceBatch)
	for {
		batch = batch[:0]
		select {
		case <-s.closing:
			for {
				select {
				case r := <-s.queue:
					r.result <- errors.New("the store is closed")
				default:
					return
				}
			}
		case r := <-s.queue:
			batch = append(batch, r)
		}
	fill:
		for len(batch) < maxNonceBatch {
			select {
			case r := <-s.queue:
				batch = append(batch, r)
			default:
				break fill
			}
		}
		s.commitBatch(batch)
	}
}

// commitBatch spends a batch's nonces in one statement. A nonce twice
// in one batch is a replay the second time (the first either took it or
// found it live); a request whose context ended while it was queued is
// left out, its nonce unspent.
func (s *Store) commitBatch(batch []*nonceReq) {
	nonces := make([]string, 0, len(batch))
	expires := make([]time.Time, 0, len(batch))
	first := make(map[string]bool, len(batch))
	var sent []*nonceReq
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.result <- err
			continue
		}
		if first[r.nonce] {
			r.result <- store.ErrReplay
			continue
		}
		first[r.nonce] = true
		nonces = append(nonces, r.nonce)
		expires = append(expires, r.expires)
		sent = append(sent, r)
	}
	if len(sent) == 0 {
		return
	}
	// The batch is not one caller's: it runs while any of its callers
	// still waits, and is cancelled on the server (pgx sends a cancel
	// request) once all of them gave up, say behind a row lock that
	// another session holds.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var waiting atomic.Int64
	waiting.Store(int64(len(sent)))
	for _, r := range sent {
		stop := context.AfterFunc(r.ctx, func() {
			if waiting.Add(-1) == 0 {
				cancel()
			}
		})
		defer stop()
	}
	rows, err := s.nonces.Query(ctx, `INSERT INTO nonces (nonce, expires)
		SELECT * FROM unnest($1::text[], $2::timestamptz[])
		ON CONFLICT (nonce) DO UPDATE SET expires = EXCLUDED.expires WHERE nonces.expires <= $3
		RETURNING nonce`, nonces, expires, s.now())
	taken := make(map[string]bool, len(sent))
	if err == nil {
		var n string
		_, err = pgx.ForEachRow(rows, []any{&n}, func() error {
			taken[n] = true
			return nil
		})
	}
	for _, r := range sent {
		switch {
		case err != nil:
			r.result <- err
		case taken[r.nonce]:
			r.result <- nil
		default:
			r.result <- store.ErrReplay
		}
	}
}

// PruneNonces implements store.Pruner.
func (s *Store) PruneNonces(ctx context.Context, now time.Time) (int64, error) {
	return s.pruneNonces(ctx, now, func() bool { return false })
}

func (s *Store) pruneNonces(ctx context.Context, now time.Time, stopped func() bool) (int64, error) {
	var total int64
	for !stopped() {
		// SKIP LOCKED: brokers pruning at once split the work instead
		// of waiting on each other's rows.
		tag, err := s.pool.Exec(ctx, `DELETE FROM nonces WHERE nonce IN
			(SELECT nonce FROM nonces WHERE expires <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)`,
			now, pruneBatch)
		if err != nil {
			return total, fmt.Errorf("prune nonces: %w", ctxErr(ctx, err))
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < pruneBatch {
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

// ctxErr makes err wrap ctx.Err() when ctx is done, so that callers
// can tell a cancelled call by errors.Is whatever pgx reported: its
// own timeout error, or the server's answer to the cancel request it
// sends (SQLSTATE 57014). A write whose context ended may still have
// committed (the cancel can arrive after the commit); for a nonce that
// only fails closed.
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w: %w", cerr, err)
	}
	return err
}

// affected turns "no row changed" into err.
func affected(tag pgconn.CommandTag, err error) error {
	if tag.RowsAffected() == 0 {
		return err
	}
	return nil
}

// blob keeps a nil slice from becoming a NULL in a NOT NULL column and
// reads an empty bytea back as an empty, non-nil slice.
func blob(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

// SchemaOf reads, without changing anything, the schema version of the
// database at url: 0 when it has none yet (Open makes it). Open
// migrates an older one to SchemaVersion and refuses a newer one.
func SchemaOf(ctx context.Context, url string) (int, error) {
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return 0, fmt.Errorf("connect to %s: %w", redact(url), ctxErr(ctx, err))
	}
	defer conn.Close(context.Background())
	// Two statements: a query naming a table that does not exist fails
	// when it is parsed, whatever branch would run.
	var exists bool
	err = conn.QueryRow(ctx, `SELECT to_regclass('schema_version') IS NOT NULL`).Scan(&exists)
	var v int
	if err == nil && exists {
		err = conn.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v)
	}
	if err != nil {
		return 0, fmt.Errorf("read the schema version of %s: %w", redact(url), ctxErr(ctx, err))
	}
	return v, nil
}
