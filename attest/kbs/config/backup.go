package config

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/store"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/cwrun/cwrun/attest/kbs/store/storeurl"
)

// Backup and restore of a broker's SQLite store. The store holds the
// only copies of the disk passphrases it was given (sealed under the
// secrets key), so a broker whose disk dies takes every disk registered
// with it along unless its store was copied somewhere. Both verbs check
// the copy with the config's secrets key: a backup whose secrets nothing
// opens is found out when it is made, not when it is needed.

// BackupResult is what Backup copied and which keys open it.
type BackupResult struct {
	Store  string // the database file copied
	Counts sqlite.Summary
	Sealed kbs.ResealReport // Current: the first secrets key opens them; Previous: an earlier one
}

// Backup copies the config's SQLite store to dest, a new file (mode
// 0600), beside a serving broker or not, and checks which of the
// secrets key's keys open its sealed records. A PostgreSQL store is
// backed up with PostgreSQL's tools.
func (c *Config) Backup(ctx context.Context, dest string) (BackupResult, error) {
	path, err := c.sqlitePath("back up")
	if err != nil {
		return BackupResult{}, err
	}
	res := BackupResult{Store: path}
	if res.Counts, err = sqlite.Backup(ctx, path, dest); err != nil {
		return res, err
	}
	// The check opens the copy as a broker would, which may write to it
	// (its WAL): it reads a scratch copy, so that the backup stays the
	// snapshot VACUUM INTO made.
	scratch, err := copyPrivate(dest, dest+".check")
	if err != nil {
		return res, fmt.Errorf("checking the backup: %w (the backup in %s is whole)", err, dest)
	}
	defer removeDB(scratch)
	if res.Sealed, err = c.checkSealed(ctx, scratch); err != nil {
		return res, fmt.Errorf("checking the backup: %w (the backup in %s is whole)", err, dest)
	}
	return res, nil
}

// BackupTo writes a checked backup (Backup) to w: a pipe to another
// machine or to an encrypting tool. The copy is made in a private
// temporary folder first, so that only a whole, checked backup is
// written, and the folder is removed after.
func (c *Config) BackupTo(ctx context.Context, w io.Writer) (BackupResult, error) {
	dir, err := os.MkdirTemp("", "cwrun-kbs-backup-")
	if err != nil {
		return BackupResult{}, err
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "kbs-backup.db")
	res, err := c.Backup(ctx, file)
	if err != nil {
		return res, err
	}
	f, err := os.Open(file)
	if err != nil {
		return res, err
	}
	defer f.Close()
	if _, err := io.Copy(w, f); err != nil {
		return res, fmt.Errorf("writing the backup out: %w", err)
	}
	return res, nil
}

// RestoreResult is what Restore put in place, and where the database it
// replaced went ("" when there was none).
type RestoreResult struct {
	Store  string
	Counts sqlite.Summary
	Sealed kbs.ResealReport
	Aside  string
}

// Restore replaces the config's SQLite store with the backup src while
// no broker serves from it. It refuses, changing nothing, a file that is
// not a broker database, one from a newer cwrun, and one holding secrets
// that no key of the secrets key file opens. The database it replaces
// is kept beside it, named with now.
func (c *Config) Restore(ctx context.Context, src string, now time.Time) (RestoreResult, error) {
	path, err := c.sqlitePath("restore")
	if err != nil {
		return RestoreResult{}, err
	}
	res := RestoreResult{Store: path}
	if serving, err := sqlite.Serving(path); err != nil {
		return res, err
	} else if serving {
		return res, fmt.Errorf("restore: a broker is serving from %s: stop it first; nothing changed", path)
	}
	if res.Counts, err = sqlite.Inspect(ctx, src); err != nil {
		return res, fmt.Errorf("restore: %w; nothing changed", err)
	}
	// Staged beside the store, so that putting it in place is a rename.
	staged, err := copyPrivate(src, path+".restore")
	if err != nil {
		return res, fmt.Errorf("restore: %w; nothing changed", err)
	}
	done := false
	defer func() {
		if !done {
			removeDB(staged)
		}
	}()
	if res.Sealed, err = c.checkSealed(ctx, staged); err != nil {
		return res, fmt.Errorf("restore: checking %s: %w; nothing changed", src, err)
	}
	if !res.Sealed.Done() {
		return res, fmt.Errorf("restore: %d secret(s) in %s open with no key in %s (%s): it was sealed under another secrets key; put that key in the file (an earlier key goes after the first) and run this again; nothing changed",
			len(res.Sealed.Unopened), src, c.SecretsKey, truncateList(res.Sealed.Unopened, 3))
	}
	if _, err := os.Stat(path); err == nil {
		res.Aside = path + ".before-restore-" + now.UTC().Format("20060102T150405Z")
	}
	if err := sqlite.Restore(ctx, path, staged, res.Aside); err != nil {
		return res, err
	}
	done = true
	return res, nil
}

// sqlitePath is the config's SQLite database file, or an error naming
// what to do instead for PostgreSQL.
func (c *Config) sqlitePath(verb string) (string, error) {
	kind, arg, err := storeurl.Parse(c.Store)
	if err != nil {
		return "", err
	}
	if kind != storeurl.SQLite {
		return "", fmt.Errorf("%s: the store is PostgreSQL (%s): use PostgreSQL's own tools (pg_dump, pg_restore, or its base backups); its sealed secrets open with this config's secrets key, as they do here", verb, RedactURL(c.Store))
	}
	return arg, nil
}

// checkSealed opens the database at path as a broker would (migrating
// an older schema) and reports which of the config's keys open its
// sealed records.
func (c *Config) checkSealed(ctx context.Context, path string) (kbs.ResealReport, error) {
	if c.keys == nil {
		if err := c.Validate(); err != nil {
			return kbs.ResealReport{}, err
		}
	}
	st, err := sqlite.Open(ctx, path)
	if err != nil {
		return kbs.ResealReport{}, err
	}
	defer st.Close()
	return c.sealedIn(ctx, st)
}

func (c *Config) sealedIn(ctx context.Context, st store.Store) (kbs.ResealReport, error) {
	srv, err := kbs.New(kbs.Options{
		Store:              st,
		TokenKey:           c.keys.token,
		CookieKey:          c.keys.cookie,
		AtRestKey:          c.keys.atRest,
		PreviousCookieKeys: c.keys.prevCookie,
		PreviousAtRestKeys: c.keys.prevAtRest,
	})
	if err != nil {
		return kbs.ResealReport{}, err
	}
	return srv.CheckSealed(ctx)
}

// copyPrivate copies src to dst, a new file of mode 0600 (one left by an
// interrupted run is replaced), synced, and returns dst.
func copyPrivate(src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	removeDB(dst)
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", err
	}
	_, err = io.Copy(out, in)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		removeDB(dst)
		return "", fmt.Errorf("copying %s to %s: %w", src, dst, err)
	}
	return dst, nil
}

// removeDB removes a scratch database and the files SQLite keeps beside
// it.
func removeDB(path string) {
	for _, ext := range []string{"", "-wal", "-shm", "-journal", ".lock"} {
		os.Remove(path + ext) // scratch: what is not there is fine
	}
}

func truncateList(l []string, n int) string {
	if len(l) <= n {
		return fmt.Sprint(l)
	}
	return fmt.Sprintf("%v and %d more", l[:n], len(l)-n)
}
