// Package pgtest runs a real, throw-away PostgreSQL server for tests,
// from the distribution's binaries (Debian's postgresql package, which
// hack/deps.sh installs). It is for tests only and must never be
// linked into cwrun.
//
// A test calls Start for a server of its own, or Shared for a fresh
// database on one server per test binary (the package's TestMain calls
// Main so that server is stopped at the end). Both skip the test, with
// the reason, when no server can run here, and in -short mode.
//
// The server runs with fsync on. The durability tests kill the client
// (the broker), not the server, so what they rely on is the server
// acknowledging a commit only once it is in its WAL; fsync=off would
// not change that for a client kill, but it would make this server
// unlike any production one, and timings taken against it (the nonce
// benchmark) flattering. initdb alone runs with --no-sync: the
// template it writes is thrown away with the test.
package pgtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvBinDir names a folder holding initdb and postgres, to use instead
// of the newest /usr/lib/postgresql/*/bin.
const EnvBinDir = "PGTEST_BINDIR"

// EnvNoCache, when set, makes every server run initdb rather than copy
// the cluster cached in the user's cache folder.
const EnvNoCache = "PGTEST_NO_CACHE"

const (
	startTimeout = 30 * time.Second
	stopTimeout  = 15 * time.Second
	superuser    = "postgres"
)

// Server is a running throw-away PostgreSQL server.
type Server struct {
	// Dir holds the data folder, the log and the unix socket.
	Dir string
	// Port is the loopback TCP port (also the socket's number).
	Port int

	cmd    *exec.Cmd
	exited chan struct{} // closed when the postmaster has exited
	mu     sync.Mutex
	dbs    int // databases made so far, for unique names
}

// unavailable is why no server can run here: a reason to skip, not to
// fail.
type unavailable struct{ reason string }

func (u unavailable) Error() string { return u.reason }

// Start starts a server for t and stops it, removing its files, when
// t ends.
func Start(t testing.TB) *Server {
	t.Helper()
	if testing.Short() {
		t.Skip("PostgreSQL tests skipped in -short mode")
	}
	s, err := start()
	var u unavailable
	if errors.As(err, &u) {
		t.Skip("PostgreSQL unavailable: " + u.reason)
	}
	if err != nil {
		t.Fatalf("start PostgreSQL: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Stop(); err != nil {
			t.Errorf("stop PostgreSQL: %v", err)
		}
	})
	return s
}

// shared is the per-binary server behind Shared. It is state of the
// test binary as a whole (one server for all its tests), which is why
// it is package-level; Main owns its lifetime.
var shared struct {
	mu     sync.Mutex
	inMain bool
	srv    *Server
	err    error
}

// Main runs the tests and then stops the shared server, if a test
// started one. Use it as: func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }.
func Main(m *testing.M) int {
	shared.mu.Lock()
	shared.inMain = true
	shared.mu.Unlock()
	code := m.Run()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.srv != nil {
		if err := shared.srv.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "pgtest: stop shared PostgreSQL: %v\n", err)
			if code == 0 {
				code = 1
			}
		}
		shared.srv = nil
	}
	return code
}

// Shared returns the URL of a fresh, empty database for t on the test
// binary's shared server, starting that server on first use. Without
// Main in TestMain nobody would stop a shared server, so t then gets a
// server of its own.
func Shared(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("PostgreSQL tests skipped in -short mode")
	}
	shared.mu.Lock()
	if !shared.inMain {
		shared.mu.Unlock()
		return Start(t).NewDatabase(t)
	}
	if shared.srv == nil && shared.err == nil {
		shared.srv, shared.err = start()
	}
	srv, err := shared.srv, shared.err
	shared.mu.Unlock()
	var u unavailable
	if errors.As(err, &u) {
		t.Skip("PostgreSQL unavailable: " + u.reason)
	}
	if err != nil {
		t.Fatalf("start shared PostgreSQL: %v", err)
	}
	return srv.NewDatabase(t)
}

// URL is the TCP URL of database db as the superuser.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", superuser, s.Port, db)
}

// NewDatabase creates an empty database for t, dropped when t ends,
// and returns its URL.
func (s *Server) NewDatabase(t testing.TB) string {
	t.Helper()
	s.mu.Lock()
	s.dbs++
	name := fmt.Sprintf("test_%d", s.dbs)
	s.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := s.admin(ctx, `CREATE DATABASE `+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		select {
		case <-s.exited:
			return // stopped already: the database went with it
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
		defer cancel()
		// FORCE: a store a failed test left open must not keep it.
		if err := s.admin(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`); err != nil {
			t.Logf("drop database %s: %v", name, err)
		}
	})
	return s.URL(name)
}

// admin runs one statement on the postgres database over the socket.
func (s *Server) admin(ctx context.Context, sql string) error {
	conn, err := pgx.Connect(ctx, s.socketConnString("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql)
	return err
}

func (s *Server) socketConnString(db string) string {
	return fmt.Sprintf("host=%s port=%d user=%s dbname=%s sslmode=disable", s.Dir, s.Port, superuser, db)
}

// Stop shuts the server down (SIGINT: PostgreSQL's fast shutdown,
// which ends sessions and checkpoints), kills it if it does not stop
// in time, and removes its files.
func (s *Server) Stop() error {
	return errors.Join(s.shutdown(), os.RemoveAll(s.Dir))
}

// shutdown stops the server and waits for it, leaving its files.
func (s *Server) shutdown() error {
	select {
	case <-s.exited:
		return nil
	default:
	}
	if err := s.cmd.Process.Signal(syscall.SIGINT); err != nil {
		return err
	}
	select {
	case <-s.exited:
		return nil
	case <-time.After(stopTimeout):
		_ = s.cmd.Process.Kill()
		<-s.exited
		return fmt.Errorf("server did not stop within %s of SIGINT; killed it", stopTimeout)
	}
}

// binDir finds the folder with initdb and postgres.
func binDir() (string, error) {
	if d := os.Getenv(EnvBinDir); d != "" {
		if !isExec(filepath.Join(d, "postgres")) || !isExec(filepath.Join(d, "initdb")) {
			return "", unavailable{EnvBinDir + "=" + d + " holds no initdb and postgres executables"}
		}
		return d, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	// Newest major version first: "15" before "9.6", numerically.
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dirs[i])), 64)
		vj, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dirs[j])), 64)
		return vi > vj
	})
	for _, d := range dirs {
		if isExec(filepath.Join(d, "postgres")) && isExec(filepath.Join(d, "initdb")) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", unavailable{"no initdb and postgres in /usr/lib/postgresql/*/bin or $PATH: install the postgresql package (hack/deps.sh does) or set " + EnvBinDir}
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// credential is who the server runs as: PostgreSQL refuses to run as
// root, so root runs it as the postgres user; anyone else runs it as
// themselves.
func credential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup(superuser)
	if err != nil {
		return nil, unavailable{"running as root, and PostgreSQL refuses root, but there is no postgres user to run it as: " + err.Error()}
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("postgres user has uid %q gid %q", u.Uid, u.Gid)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// tempBase is where the server's folder goes: $TMPDIR unless the unix
// socket's path would be too long for sun_path (108 bytes), then /tmp.
func tempBase() string {
	base := os.TempDir()
	if len(base) > 60 {
		base = "/tmp"
	}
	return base
}

// checkTraversable fails when a user other than root could not reach
// dir: each parent must be searchable by others.
func checkTraversable(dir string) error {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%s (mode %o) is not searchable by the postgres user: set TMPDIR to a folder it can reach, such as /tmp", p, fi.Mode().Perm())
		}
		if p == filepath.Dir(p) {
			return nil
		}
	}
}

// freePort asks the kernel for a free loopback port. Another process
// could take it before the server binds it; start retries then.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func start() (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	cred, err := credential()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(tempBase(), "pgtest-")
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(dir)
		}
	}()
	if cred != nil {
		if err := checkTraversable(dir); err != nil {
			return nil, err
		}
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("hand %s to the postgres user: %w", dir, err)
		}
	}
	data := filepath.Join(dir, "data")
	tpl := templateDir(bin)
	fromCache := tpl != "" && copyTree(tpl, data) == nil
	if !fromCache {
		if err := initdb(bin, dir, data, cred); err != nil {
			return nil, err
		}
		if tpl != "" {
			saveTemplate(data, tpl)
		}
	}

	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		s, err := launch(bin, dir, data, cred)
		if err == nil {
			ok = true
			return s, nil
		}
		lastErr = err
		if fromCache {
			// A damaged cache entry must not fail every later run:
			// drop it and start over from initdb.
			_ = os.RemoveAll(tpl)
			_ = os.RemoveAll(data)
			if err := initdb(bin, dir, data, cred); err != nil {
				return nil, err
			}
			fromCache = false
			continue
		}
		if !strings.Contains(err.Error(), "could not bind") && !strings.Contains(err.Error(), "already in use") {
			break
		}
	}
	return nil, lastErr
}

// initdbArgs are the cluster's settings; they are part of the cache key.
var initdbArgs = []string{"-U", superuser, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"}

func initdb(bin, dir, data string, cred *syscall.Credential) error {
	cmd := exec.Command(filepath.Join(bin, "initdb"), append([]string{"-D", data}, initdbArgs...)...)
	cmd.Dir = dir
	cmd.Env = env(dir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("initdb in %s: %w\n%s", dir, err, out)
	}
	return nil
}

// templateDir is where a fresh cluster made by these binaries is kept
// between test runs, in the user's cache folder: initdb takes seconds,
// copying its result a fraction of one. "" when caching is off
// (EnvNoCache) or there is no cache folder.
func templateDir(bin string) string {
	if os.Getenv(EnvNoCache) != "" {
		return ""
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	// Key on the binaries (path, size, time) and the settings, so an
	// upgraded PostgreSQL gets a new template.
	h := sha256.New()
	fmt.Fprintln(h, bin, initdbArgs)
	for _, name := range []string{"initdb", "postgres"} {
		if fi, err := os.Stat(filepath.Join(bin, name)); err == nil {
			fmt.Fprintln(h, name, fi.Size(), fi.ModTime().UnixNano())
		}
	}
	return filepath.Join(cache, "cwrun-pgtest", hex.EncodeToString(h.Sum(nil))[:16])
}

// saveTemplate copies a fresh cluster into the cache at tpl: into a
// temporary folder first, renamed into place, so that test binaries
// running at once never see half a template. Best effort: a failure
// only means the next run runs initdb again.
func saveTemplate(data, tpl string) {
	if err := os.MkdirAll(filepath.Dir(tpl), 0o700); err != nil {
		return
	}
	tmp, err := os.MkdirTemp(filepath.Dir(tpl), filepath.Base(tpl)+".tmp-")
	if err != nil {
		return
	}
	defer os.RemoveAll(tmp)
	if err := copyTree(data, filepath.Join(tmp, "data")); err != nil {
		return
	}
	_ = os.Rename(filepath.Join(tmp, "data"), tpl) // loses harmlessly to another binary's rename
}

// copyTree copies a cluster's folder with owners and modes (PostgreSQL
// insists on a 0700 data folder owned by its user).
func copyTree(from, to string) error {
	if _, err := os.Stat(filepath.Join(from, "global", "pg_control")); err != nil {
		return err
	}
	if out, err := exec.Command("cp", "-a", from, to).CombinedOutput(); err != nil {
		return fmt.Errorf("cp -a %s %s: %w: %s", from, to, err, out)
	}
	return nil
}

// env is the servers' environment: nothing of the test's own, so that
// a PGDATA or locale setting there cannot change the server.
func env(dir string) []string {
	return []string{"HOME=" + dir, "LANG=C", "LC_ALL=C", "PATH=/usr/bin:/bin"}
}

func launch(bin, dir, data string, cred *syscall.Credential) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, fmt.Sprintf("postgres-%d.log", port))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	cmd := exec.Command(filepath.Join(bin, "postgres"),
		"-D", data,
		"-k", dir,
		"-h", "127.0.0.1",
		"-p", strconv.Itoa(port),
		"-c", "fsync=on",
		"-c", "synchronous_commit=on",
		"-c", "max_connections=300",
		"-c", "shared_buffers=64MB",
		"-c", "logging_collector=off",
		"-c", "log_min_messages=warning",
	)
	cmd.Dir = dir
	cmd.Env = env(dir)
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: cred,
		// A test binary that dies without cleaning up takes the server
		// with it (SIGQUIT: PostgreSQL's immediate shutdown).
		Pdeathsig: syscall.SIGQUIT,
		// Its own process group: a ^C meant for go test reaches the
		// server through Stop, not twice.
		Setpgid: true,
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start postgres: %w", err)
	}
	s := &Server{Dir: dir, Port: port, cmd: cmd, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, s.socketConnString("postgres"))
		if err == nil {
			_ = conn.Close(ctx)
			return s, nil
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("postgres exited during startup: %s", logTail(logPath))
		case <-ctx.Done():
			_ = s.shutdown()
			return nil, fmt.Errorf("postgres not ready after %s: %v; log: %s", startTimeout, err, logTail(logPath))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(bytes.TrimSpace(b))
}
