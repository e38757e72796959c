package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest/kbs/store"
)

func workload(id string) store.Workload {
	return store.Workload{ID: id, Tee: "sample", SealedPassphrase: []byte("sealed " + id), References: map[string][]string{}}
}

// A backup taken beside a serving broker holds every acknowledged
// write, including those still in the WAL, and is private.
func TestBackupBesideServingBroker(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := filepath.Join(dir, "kbs.db")
	s, err := OpenExclusive(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := range 50 {
		if err := s.AddWorkload(ctx, workload(fmt.Sprintf("w%02d", i))); err != nil {
			t.Fatal(err)
		}
	}
	s.SetResource(ctx, "a/b/c", []byte("r"))
	s.SetPolicy(ctx, "resource", "package policy")
	if fi, err := os.Stat(db + "-wal"); err != nil || fi.Size() == 0 {
		t.Fatalf("the writes should still sit in the WAL for this test: %v", err)
	}
	dest := filepath.Join(dir, "backup.db")
	sum, err := Backup(ctx, db, dest)
	if err != nil {
		t.Fatal(err)
	}
	if sum != (Summary{Schema: SchemaVersion(), Workloads: 50, Resources: 1, Policies: 1}) {
		t.Errorf("Backup summary = %+v", sum)
	}
	if fi, _ := os.Stat(dest); fi.Mode().Perm() != 0o600 {
		t.Errorf("backup mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := os.Stat(dest + ".partial"); !os.IsNotExist(err) {
		t.Errorf("a .partial file was left: %v", err)
	}
	if _, err := Backup(ctx, db, dest); err == nil || !strings.Contains(err.Error(), "exists; nothing written") {
		t.Errorf("a backup onto an existing file: %v", err)
	}
	// The broker goes on serving.
	if err := s.AddWorkload(ctx, workload("after")); err != nil {
		t.Fatal(err)
	}
	if _, err := Backup(ctx, filepath.Join(dir, "none.db"), filepath.Join(dir, "x.db")); err == nil {
		t.Error("a backup of a missing database succeeded")
	}
	if _, err := os.Stat(filepath.Join(dir, "none.db")); !os.IsNotExist(err) {
		t.Error("backing up a missing database created it")
	}
}

func TestInspectRefuses(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	junk := filepath.Join(dir, "junk.db")
	os.WriteFile(junk, []byte(strings.Repeat("not sqlite ", 500)), 0o600)
	if _, err := Inspect(ctx, junk); err == nil {
		t.Error("Inspect of junk succeeded")
	}
	// A SQLite database that is not a broker's.
	other := filepath.Join(dir, "other.db")
	db, err := sql.Open("sqlite", other)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`CREATE TABLE t (x INTEGER)`); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if _, err := Inspect(ctx, other); err == nil || !strings.Contains(err.Error(), "not a key broker's database") {
		t.Errorf("Inspect of another database: %v", err)
	}
	if _, err := Inspect(ctx, filepath.Join(dir, "missing.db")); err == nil {
		t.Error("Inspect of a missing file succeeded")
	}
}

// Restore refuses while a broker serves, keeps the database it
// replaces, and leaves the restored one serving what the backup held.
func TestRestore(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	db := filepath.Join(dir, "kbs.db")
	s, err := OpenExclusive(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	s.AddWorkload(ctx, workload("old"))
	backup := filepath.Join(dir, "backup.db")
	if _, err := Backup(ctx, db, backup); err != nil {
		t.Fatal(err)
	}
	s.AddWorkload(ctx, workload("new")) // only in the live database

	staged := filepath.Join(dir, "kbs.db.restore")
	copyFile(t, backup, staged)
	aside := filepath.Join(dir, "kbs.db.aside")
	if err := Restore(ctx, db, staged, aside); err == nil || !strings.Contains(err.Error(), "a broker is serving") {
		t.Fatalf("Restore beside a serving broker: %v", err)
	}
	if _, err := os.Stat(aside); !os.IsNotExist(err) {
		t.Fatal("a refused restore wrote the aside copy")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Restore(ctx, db, staged, aside); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(staged); !os.IsNotExist(err) {
		t.Error("the staged copy is still there")
	}
	r, err := OpenExclusive(ctx, db)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ids := func(st store.Store) []string {
		ws, err := st.Workloads(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, w := range ws {
			out = append(out, w.ID)
		}
		return out
	}
	if got := fmt.Sprint(ids(r)); got != "[old]" {
		t.Errorf("restored database holds %s, want the backup's [old]", got)
	}
	kept, err := Open(ctx, aside)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	if got := fmt.Sprint(ids(kept)); got != "[new old]" {
		t.Errorf("the replaced database kept aside holds %s, want [new old]", got)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
