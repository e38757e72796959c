package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
)

// Backups. A broker's SQLite file holds the only copy of the disk
// passphrases it was given (sealed), so losing the file loses every
// disk registered with it. Backup copies it beside a serving broker:
// VACUUM INTO reads one snapshot (in WAL mode a reader neither blocks
// the writer nor waits for it) into a fresh, compact file. Restore puts
// a backup in place while no broker serves, keeping what it replaces.

// Summary counts what a database holds.
type Summary struct {
	Schema    int // schema version
	Workloads int
	Resources int
	Policies  int
}

// Backup writes a consistent copy of the database at path to dest, a
// new file of mode 0600 (it fails if dest exists), and checks it
// (Inspect). An interrupted backup leaves no dest: the copy is written
// to dest+".partial" and renamed when whole.
func Backup(ctx context.Context, path, dest string) (Summary, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return Summary{}, err
	}
	if _, err := os.Stat(abs); err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	if _, err := os.Lstat(dest); err == nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %s exists; nothing written (name a new file)", abs, dest)
	}
	partial := dest + ".partial"
	// VACUUM INTO refuses an existing file; one left by an interrupted
	// run is ours to replace. Made empty and private first, so the copy
	// is never readable by others, even for a moment.
	os.Remove(partial)
	f, err := os.OpenFile(partial, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	f.Close()
	ok := false
	defer func() {
		if !ok {
			os.Remove(partial)
		}
	}()
	db, err := openReadOnly(abs)
	if err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	_, err = db.ExecContext(ctx, `VACUUM INTO ?`, partial)
	db.Close()
	if err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	if err := syncFile(partial); err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	sum, err := Inspect(ctx, partial)
	if err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: the copy: %w", abs, err)
	}
	if err := os.Rename(partial, dest); err != nil {
		return Summary{}, fmt.Errorf("back up sqlite store %s: %w", abs, err)
	}
	ok = true
	return sum, nil
}

// Inspect opens the database at path read-only, checks its integrity
// and its schema (a broker's, not newer than this cwrun's) and counts
// its records.
func Inspect(ctx context.Context, path string) (Summary, error) {
	var sum Summary
	db, err := openReadOnly(path)
	if err != nil {
		return sum, err
	}
	defer db.Close()
	var check string
	if err := db.QueryRowContext(ctx, `PRAGMA integrity_check`).Scan(&check); err != nil {
		return sum, fmt.Errorf("%s is not a SQLite database cwrun can read: %w", path, err)
	}
	if check != "ok" {
		return sum, fmt.Errorf("%s is damaged (integrity check: %s)", path, check)
	}
	if err := db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&sum.Schema); err != nil {
		return sum, fmt.Errorf("%s is not a key broker's database: %w", path, err)
	}
	if sum.Schema == 0 || sum.Schema > len(migrations) {
		return sum, fmt.Errorf("%s has schema version %d; this cwrun knows 1 to %d", path, sum.Schema, len(migrations))
	}
	for table, n := range map[string]*int{"workloads": &sum.Workloads, "resources": &sum.Resources, "policies": &sum.Policies} {
		if err := db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+table).Scan(n); err != nil {
			return sum, fmt.Errorf("%s: count %s: %w", path, table, err)
		}
	}
	return sum, nil
}

// Restore replaces the database at path with staged, a checked copy in
// path's folder (renamed into place, so staged is gone afterwards). The
// database it replaces is first copied whole to aside, a new file. It
// holds the broker lock throughout: it refuses while a broker serves
// from path, and no broker starts on a half-restored store.
func Restore(ctx context.Context, path, staged, aside string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	lock, err := os.OpenFile(abs+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("restore sqlite store %s: broker lock: %w", abs, err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("restore sqlite store %s: a broker is serving from it: stop it first; nothing changed", abs)
		}
		return fmt.Errorf("restore sqlite store %s: lock: %w", abs, err)
	}
	if _, err := os.Stat(abs); err == nil {
		// Keep the database being replaced, its WAL included, then fold
		// the WAL into the main file so that no stale -wal or -shm is
		// left to be read against the restored one.
		if _, err := Backup(ctx, abs, aside); err != nil {
			return fmt.Errorf("restore sqlite store %s: keeping the current database: %w; nothing changed", abs, err)
		}
		if err := checkpoint(ctx, abs); err != nil {
			return fmt.Errorf("restore sqlite store %s: %w; nothing changed (the current database is also in %s)", abs, err, aside)
		}
		for _, ext := range []string{"-wal", "-shm"} {
			if err := os.Remove(abs + ext); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("restore sqlite store %s: %w; nothing changed (the current database is also in %s)", abs, err, aside)
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("restore sqlite store %s: %w", abs, err)
	}
	if err := os.Rename(staged, abs); err != nil {
		return fmt.Errorf("restore sqlite store %s: %w", abs, err)
	}
	return syncFile(filepath.Dir(abs))
}

// checkpoint copies the WAL's frames into the main file and empties it.
func checkpoint(ctx context.Context, abs string) error {
	db, err := sql.Open("sqlite", dsn(abs, url.Values{"_pragma": {fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds())}}))
	if err != nil {
		return err
	}
	defer db.Close()
	var busy, logFrames, done int
	if err := db.QueryRowContext(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`).Scan(&busy, &logFrames, &done); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	if busy != 0 {
		return errors.New("checkpoint: another process holds the database")
	}
	return nil
}

// openReadOnly opens path for reading only, never creating it.
func openReadOnly(path string) (*sql.DB, error) {
	db, err := sql.Open("sqlite", dsn(path, url.Values{
		"mode":    {"ro"},
		"_pragma": {fmt.Sprintf("busy_timeout(%d)", busyTimeout.Milliseconds())},
	}))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
