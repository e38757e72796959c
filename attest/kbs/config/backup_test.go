package config

import (
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs"
)

// addWorkloadVia registers a sample workload through a broker built on
// c, as serve would build it.
func addWorkloadVia(t *testing.T, c *Config, id string) {
	t.Helper()
	o, closer, err := c.Options(context.Background(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	srv, err := kbs.New(o)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	ad, err := NewAdminClient(ClientOptions{URL: ts.URL, Dir: c.Dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ad.AddWorkload(context.Background(), kbs.WorkloadSpec{ID: id, Tee: attest.TeeSample, Passphrase: "pw-" + id}); err != nil {
		t.Fatal(err)
	}
}

// A backup made before a secrets key rotation restores after it, on
// the earlier key kept in the file; once that key is dropped, the same
// backup is refused and the store is left as it was.
func TestBackupAcrossRotation(t *testing.T) {
	ctx := context.Background()
	dir := initDir(t, InitOptions{})
	cfg := filepath.Join(dir, FileName)
	c, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	addWorkloadVia(t, c, "w")
	backup := filepath.Join(t.TempDir(), "b.db")
	res, err := c.Backup(ctx, backup)
	if err != nil || res.Counts.Workloads != 1 || res.Sealed.Current != 1 || !res.Sealed.Done() {
		t.Fatalf("Backup = %+v, %v", res, err)
	}
	if _, err := os.Stat(backup + ".check"); !os.IsNotExist(err) {
		t.Errorf("the check's scratch copy was left: %v", err)
	}

	if _, err := RotateSecrets(cfg, time.Now()); err != nil {
		t.Fatal(err)
	}
	rc, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	rr, err := rc.Restore(ctx, backup, time.Now())
	if err != nil || rr.Sealed.Previous != 1 || rr.Aside == "" {
		t.Fatalf("restore on the rotated file = %+v, %v; want it opened by the earlier key", rr, err)
	}

	if _, err := dropPreviousSecrets(cfg); err != nil {
		t.Fatal(err)
	}
	dc, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "kbs.db"))
	_, err = dc.Restore(ctx, backup, time.Now().Add(time.Second))
	if err == nil || !strings.Contains(err.Error(), "open with no key") || !strings.Contains(err.Error(), "nothing changed") {
		t.Fatalf("restore after the earlier key was dropped: %v", err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "kbs.db")); string(after) != string(before) {
		t.Error("a refused restore changed the store")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "kbs.db.restore*")); len(left) != 0 {
		t.Errorf("a refused restore left %v", left)
	}
}

func TestBackupPostgresRefused(t *testing.T) {
	c := &Config{Store: "postgres://kbs:secretpw@db.example/kbs"}
	_, err := c.Backup(context.Background(), filepath.Join(t.TempDir(), "b.db"))
	if err == nil || !strings.Contains(err.Error(), "pg_dump") || strings.Contains(err.Error(), "secretpw") {
		t.Errorf("backup of a PostgreSQL store: %v", err)
	}
}
