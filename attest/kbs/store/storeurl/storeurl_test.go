package storeurl

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/attest/kbs/store/pgtest"
	"github.com/cwrun/cwrun/attest/kbs/store/postgres"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

func TestParse(t *testing.T) {
	for _, c := range []struct {
		in   string
		kind Kind
		arg  string
		err  string
	}{
		{in: "postgres://u:p@db:5432/kbs?sslmode=require", kind: Postgres, arg: "postgres://u:p@db:5432/kbs?sslmode=require"},
		{in: "postgresql://db/kbs", kind: Postgres, arg: "postgresql://db/kbs"},
		{in: "POSTGRES://db/kbs", kind: Postgres, arg: "POSTGRES://db/kbs"},
		{in: "sqlite:///var/lib/cwrun/kbs.db", kind: SQLite, arg: "/var/lib/cwrun/kbs.db"},
		{in: "sqlite:kbs.db", kind: SQLite, arg: "kbs.db"},
		{in: "sqlite:/abs/kbs.db", kind: SQLite, arg: "/abs/kbs.db"},
		{in: "sqlite3:///abs/kbs.db", kind: SQLite, arg: "/abs/kbs.db"},
		{in: "/var/lib/cwrun/kbs.db", kind: SQLite, arg: "/var/lib/cwrun/kbs.db"},
		{in: "kbs.db", kind: SQLite, arg: "kbs.db"},
		{in: "./odd:name.db", kind: SQLite, arg: "./odd:name.db"},
		{in: "/data/a:b.db", kind: SQLite, arg: "/data/a:b.db"},
		{in: "", err: "no store given"},
		{in: "sqlite://host/kbs.db", err: "takes no host"},
		{in: "sqlite:", err: "give a file path"},
		{in: "sqlite:///x.db?mode=memory", err: "no query"},
		{in: "mysql://db/kbs", err: `unknown scheme "mysql"`},
		{in: "odd:name.db", err: "./odd:name.db"},
	} {
		kind, arg, err := Parse(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("Parse(%q) = %s, %q, %v; want an error mentioning %q", c.in, kind, arg, err, c.err)
			}
			if err != nil && c.in != "" && !strings.Contains(err.Error(), "postgres://") && !strings.Contains(err.Error(), "sqlite:///") {
				t.Errorf("Parse(%q): error %q does not list the accepted forms", c.in, err)
			}
			continue
		}
		if err != nil || kind != c.kind || arg != c.arg {
			t.Errorf("Parse(%q) = %s, %q, %v; want %s, %q", c.in, kind, arg, err, c.kind, c.arg)
		}
	}
}

func TestOpenSQLite(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kbs.db")
	for _, target := range []string{"sqlite://" + path, path} {
		s, err := Open(ctx, target)
		if err != nil {
			t.Fatalf("Open(%s): %v", target, err)
		}
		if _, ok := s.(*sqlite.Store); !ok {
			t.Errorf("Open(%s) = %T, want *sqlite.Store", target, s)
		}
		s.Close()
	}
	if _, err := os.Stat(path); err != nil {
		t.Errorf("database file: %v", err)
	}
}

func TestOpenPostgres(t *testing.T) {
	s, err := Open(context.Background(), pgtest.Shared(t))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, ok := s.(*postgres.Store); !ok {
		t.Errorf("Open = %T, want *postgres.Store", s)
	}
}

func TestOpenUnknown(t *testing.T) {
	if _, err := Open(context.Background(), "redis://x"); err == nil {
		t.Fatal("Open(redis://x) succeeded")
	}
}

// FuzzParse: Parse never panics, routes only postgres URLs to
// PostgreSQL, hands SQLite a non-empty path, and names the target in
// every error.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"postgres://u@h/db", "sqlite:///a/b.db", "sqlite:x", "sqlite://h/x", "x.db", "a:b", "", "SQLITE3:///x", "/p?q#f"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		kind, arg, err := Parse(in)
		if err != nil {
			if kind != "" || arg != "" {
				t.Fatalf("Parse(%q) returned %s %q with error %v", in, kind, arg, err)
			}
			return
		}
		switch kind {
		case Postgres:
			l := strings.ToLower(in)
			if arg != in || !(strings.HasPrefix(l, "postgres:") || strings.HasPrefix(l, "postgresql:")) {
				t.Fatalf("Parse(%q) = postgres %q", in, arg)
			}
		case SQLite:
			if arg == "" || !strings.HasSuffix(in, arg) {
				t.Fatalf("Parse(%q) = sqlite %q", in, arg)
			}
		default:
			t.Fatalf("Parse(%q) = unknown kind %q", in, kind)
		}
	})
}
