package pgtest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

func run(t *testing.T, url, sql string, dst ...any) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	defer conn.Close(ctx)
	if len(dst) == 0 {
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return
	}
	if err := conn.QueryRow(ctx, sql).Scan(dst...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func TestStartStop(t *testing.T) {
	s := Start(t)
	url := s.NewDatabase(t)
	var fsync, user string
	run(t, url, "SELECT current_setting('fsync'), current_user", &fsync, &user)
	if fsync != "on" {
		t.Errorf("fsync = %s, want on", fsync)
	}
	if user != "postgres" {
		t.Errorf("current_user = %s, want postgres", user)
	}
	var n int
	run(t, url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", &n)
	if n != 0 {
		t.Errorf("new database has %d tables, want 0", n)
	}
	if _, err := os.Stat(filepath.Join(s.Dir, ".s.PGSQL."+strconv.Itoa(s.Port))); err != nil {
		t.Errorf("unix socket: %v", err)
	}
	if err := s.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if _, err := os.Stat(s.Dir); !os.IsNotExist(err) {
		t.Errorf("Dir %s still there after Stop: %v", s.Dir, err)
	}
	if conn, err := pgx.Connect(context.Background(), url); err == nil {
		conn.Close(context.Background())
		t.Error("connected after Stop")
	}
}

func TestSharedIsolated(t *testing.T) {
	a, b := Shared(t), Shared(t)
	if a == b {
		t.Fatalf("two Shared calls returned one database: %s", a)
	}
	run(t, a, "CREATE TABLE only_in_a (x int)")
	var n int
	run(t, b, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'", &n)
	if n != 0 {
		t.Errorf("a table made in %s shows in %s", a, b)
	}
	run(t, a, "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'", &n)
	if n != 1 {
		t.Errorf("table missing in its own database %s", a)
	}
}

func TestMissingBinariesSkip(t *testing.T) {
	t.Setenv(EnvBinDir, t.TempDir())
	_, err := start()
	var u unavailable
	if !errors.As(err, &u) || !strings.Contains(err.Error(), EnvBinDir) {
		t.Fatalf("start with no binaries: err = %v, want an unavailable error naming %s", err, EnvBinDir)
	}
	// Start turns that into a skip, which a subtest shows.
	skipped := false
	t.Run("start", func(t *testing.T) {
		defer func() { skipped = t.Skipped() }()
		Start(t)
	})
	if !skipped {
		t.Error("Start with no binaries did not skip")
	}
}
