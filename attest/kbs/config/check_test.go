package config

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
	"github.com/cwrun/cwrun/attest/kbs/store/postgres"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
)

// found is the first finding of part at level whose text holds want.
func found(fs []Finding, l Level, part, want string) bool {
	for _, f := range fs {
		if f.Level == l && f.Part == part && strings.Contains(f.Text, want) {
			return true
		}
	}
	return false
}

func failures(fs []Finding) []Finding {
	var out []Finding
	for _, f := range fs {
		if f.Level == Fail {
			out = append(out, f)
		}
	}
	return out
}

// setConfig replaces a top-level key's line in dir's config.toml.
func setConfig(t *testing.T, dir, key, value string) {
	t.Helper()
	p := filepath.Join(dir, FileName)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, key+" = ") {
			l = key + " = " + value
		}
		lines = append(lines, l)
	}
	if err := os.WriteFile(p, []byte(strings.Join(lines, "\n")), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestCheck(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0", Hosts: []string{"kbs.example"}})
	cfg := filepath.Join(dir, FileName)
	now := time.Now()
	fs := Check(context.Background(), cfg, now)
	if f := failures(fs); len(f) > 0 {
		t.Fatalf("a fresh init fails: %v", f)
	}
	for _, want := range []struct {
		l          Level
		part, text string
	}{
		{OK, "config", cfg},
		{OK, "listen", "is free"},
		{OK, "tls", "kbs.example"},
		{OK, "tls", "issued by the broker's CA"},
		{Note, "store", "does not exist yet"},
		{OK, "tees", "snp, tdx"},
	} {
		if !found(fs, want.l, want.part, want.text) {
			t.Errorf("no %s %s finding with %q in %v", want.l, want.part, want.text, fs)
		}
	}

	// A broker holding the address and the store: notes, not failures.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	setConfig(t, dir, "listen", `"`+l.Addr().String()+`"`)
	st, err := sqlite.OpenExclusive(context.Background(), filepath.Join(dir, "kbs.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	fs = Check(context.Background(), cfg, now)
	if !found(fs, Note, "listen", "in use") || !found(fs, Note, "store", "a broker serves from it") || len(failures(fs)) > 0 {
		t.Errorf("beside a running broker: %v", fs)
	}

	// The certificate's end, seen a year on, and then 20 days before it.
	if fs := Check(context.Background(), cfg, now.Add(CertValidity+time.Hour)); !found(fs, Fail, "tls", "ended on") {
		t.Errorf("an ended certificate: %v", fs)
	}
	if fs := Check(context.Background(), cfg, now.Add(CertValidity-20*24*time.Hour)); !found(fs, Warn, "tls", "in 19 days") && !found(fs, Warn, "tls", "in 20 days") {
		t.Errorf("a certificate ending in 20 days: %v", fs)
	}

	// A key file others can read fails; a self-signed certificate (a
	// folder from before init made a CA) is a note.
	writePair(t, filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile))
	os.Chmod(filepath.Join(dir, TokenKeyFile), 0o644)
	os.Chmod(filepath.Join(dir, CAKeyFile), 0o640)
	fs = Check(context.Background(), cfg, now)
	if !found(fs, Fail, "config", "token_key") || !found(fs, Note, "tls", "signs itself") || !found(fs, Fail, "tls", "ca.key has mode 0640") {
		t.Errorf("readable token and CA keys and a self-signed certificate: %v", fs)
	}
	if fs := Check(context.Background(), filepath.Join(dir, "nope.toml"), now); !found(fs, Fail, "config", "nope.toml") {
		t.Errorf("a missing config: %v", fs)
	}
}

// PostgreSQL: the schema is read, never made.
func TestCheckPostgres(t *testing.T) {
	url := pgtest.Shared(t)
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	cfg := filepath.Join(dir, FileName)
	setConfig(t, dir, "store", `"`+url+`"`)
	if fs := Check(context.Background(), cfg, time.Now()); !found(fs, Note, "store", "no broker schema yet") {
		t.Errorf("an empty database: %v", fs)
	}
	if v, err := postgres.SchemaOf(context.Background(), url); err != nil || v != 0 {
		t.Errorf("check made a schema: %d, %v", v, err)
	}
	st, err := postgres.Open(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	st.Close()
	if fs := Check(context.Background(), cfg, time.Now()); !found(fs, OK, "store", "answers, schema") {
		t.Errorf("a migrated database: %v", fs)
	}
	setConfig(t, dir, "store", `"postgres://kbs:hunter2@127.0.0.1:1/kbs?connect_timeout=5"`)
	fs := Check(context.Background(), cfg, time.Now())
	if !found(fs, Fail, "store", "127.0.0.1") {
		t.Errorf("an unreachable server: %v", fs)
	}
	for _, f := range fs {
		if strings.Contains(f.Text, "hunter2") {
			t.Errorf("the password shows: %v", f)
		}
	}
}
