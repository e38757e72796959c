package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"golang.org/x/term"
)

// The test binary doubles as the supervisor: a fake Boot that reports
// its bundle, then waits for a signal and exits 128+N, or exits 7.
func TestMain(m *testing.M) {
	if root := os.Getenv("OCI_TEST_SUPERVISOR"); root != "" {
		s := Supervisor{Runtime: Runtime{Root: root}, Boot: func(ctx context.Context, b Boot) (int, error) {
			fmt.Printf("booted %s cpus=%d mem=%d args=%q env=%q tty=%v stdin=%v publish=%v\n",
				filepath.Base(b.Rootfs), b.CPUs, b.MemoryMiB, b.Args, b.Env, b.TTY && term.IsTerminal(0), b.Stdin != nil, b.Publish)
			if b.Started != nil {
				b.Started()
			}
			if b.Annotations["test.fail"] != "" {
				return 0, errors.New("boot failed on purpose")
			}
			select {
			case sig := <-b.Signals:
				return 128 + int(sig.(syscall.Signal)), nil
			case <-time.After(waitFor(b.Annotations["test.wait"])):
				return 7, nil
			}
		}}
		os.Exit(s.Run(context.Background(), os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

func testRuntime(t *testing.T, out *os.File) Runtime {
	root := t.TempDir()
	return Runtime{Root: root, Supervisor: func(id string) *exec.Cmd {
		c := exec.Command(os.Args[0], "-test.run=^$", id)
		c.Env = append(os.Environ(), "OCI_TEST_SUPERVISOR="+root)
		return c
	}}
}

func writeBundle(t *testing.T, spec specs.Spec) string {
	b := t.TempDir()
	os.MkdirAll(filepath.Join(b, "rootfs"), 0o755)
	spec.Root = &specs.Root{Path: "rootfs"}
	j, _ := json.Marshal(spec)
	os.WriteFile(filepath.Join(b, "config.json"), j, 0o644)
	return b
}

func int64p(v int64) *int64    { return &v }
func uint64p(v uint64) *uint64 { return &v }

// lifecycle: create → created; start → running; second start refused;
// kill TERM → the fake boot exits 143; stopped; kill refused; delete.
func TestLifecycle(t *testing.T) {
	rt := testRuntime(t, nil)
	spec := specs.Spec{
		Process:     &specs.Process{Args: []string{SealedEntrypoint, "/bin/sh", "-c", "x"}, Env: []string{"PATH=/bin", "HOSTNAME=h", "FOO=1"}},
		Annotations: map[string]string{"test.wait": "60s"},
		Linux: &specs.Linux{Resources: &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: int64p(150000), Period: uint64p(100000)},
			Memory: &specs.LinuxMemory{Limit: int64p(300 << 20)},
		}},
	}
	bundle := writeBundle(t, spec)
	pidFile := filepath.Join(t.TempDir(), "pid")
	ctx := context.Background()
	checked := ""
	if err := rt.Create(ctx, "c1", CreateOptions{Bundle: bundle, PidFile: pidFile, Check: func(r string) error { checked = r; return nil }}); err != nil {
		t.Fatal(err)
	}
	if checked != filepath.Join(bundle, "rootfs") {
		t.Errorf("checked %q", checked)
	}
	if err := rt.Create(ctx, "c1", CreateOptions{Bundle: bundle}); !errors.Is(err, ErrExist) {
		t.Errorf("second create: %v", err)
	}
	st, err := rt.State("c1")
	if err != nil || st.Status != specs.StateCreated || st.Pid == 0 || st.Bundle != bundle {
		t.Fatalf("state after create: %+v, %v", st, err)
	}
	if b, _ := os.ReadFile(pidFile); string(b) != fmt.Sprint(st.Pid) {
		t.Errorf("pid file %q, state pid %d", b, st.Pid)
	}
	proc, _ := os.FindProcess(st.Pid)
	waited := make(chan int, 1)
	go func() {
		// The test is the supervisor's parent here (conmon is, under podman).
		ps, _ := proc.Wait()
		waited <- ps.ExitCode()
	}()
	if err := rt.Start(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if err := rt.Start(ctx, "c1"); !errors.Is(err, ErrAlreadyStarted) {
		t.Errorf("second start: %v", err)
	}
	if st, _ := rt.State("c1"); st.Status != specs.StateRunning {
		t.Errorf("status %s after start", st.Status)
	}
	if err := rt.Kill("c1", unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-waited:
		if code != 143 {
			t.Errorf("supervisor exit %d, want 143", code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the supervisor did not exit after SIGTERM")
	}
	if st, _ := rt.State("c1"); st.Status != specs.StateStopped || st.Pid != 0 {
		t.Errorf("state after exit: %+v", st)
	}
	if err := rt.Kill("c1", unix.SIGKILL); !errors.Is(err, ErrNotRunning) {
		t.Errorf("kill of a stopped container: %v", err)
	}
	cleaned := ""
	if err := rt.Delete(ctx, "c1", false, func(_ context.Context, d string) error { cleaned = d; return nil }); err != nil {
		t.Fatal(err)
	}
	if cleaned != filepath.Join(rt.Root, VMDir) {
		t.Errorf("cleanup of %q", cleaned)
	}
	if _, err := os.Stat(filepath.Join(rt.Root, "c1")); !os.IsNotExist(err) {
		t.Errorf("state left: %v", err)
	}
	if err := rt.Delete(ctx, "c1", false, nil); !errors.Is(err, ErrNotExist) {
		t.Errorf("delete of a deleted container: %v", err)
	}
	if err := rt.Delete(ctx, "c1", true, nil); err != nil {
		t.Errorf("delete --force of a deleted container: %v", err)
	}
}

func TestDeleteForceKillsRunning(t *testing.T) {
	rt := testRuntime(t, nil)
	bundle := writeBundle(t, specs.Spec{Annotations: map[string]string{"test.wait": "60s"}})
	ctx := context.Background()
	if err := rt.Create(ctx, "c2", CreateOptions{Bundle: bundle}); err != nil {
		t.Fatal(err)
	}
	st, _ := rt.State("c2")
	proc, _ := os.FindProcess(st.Pid)
	go proc.Wait() // reap, as conmon would
	if err := rt.Start(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if err := rt.Delete(ctx, "c2", false, nil); err == nil || !strings.Contains(err.Error(), "running") {
		t.Errorf("delete of a running container: %v", err)
	}
	if err := rt.Delete(ctx, "c2", true, nil); err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(st.Pid, 0); err == nil {
		if s, _ := procStart(st.Pid); s == 0 {
			return // a zombie not yet reaped
		}
		t.Errorf("supervisor %d alive after delete --force", st.Pid)
	}
}

func TestCreateRefusals(t *testing.T) {
	rt := testRuntime(t, nil)
	ctx := context.Background()
	tty := writeBundle(t, specs.Spec{Process: &specs.Process{Terminal: true}})
	for _, c := range []struct {
		id, bundle, want string
		check            func(string) error
	}{
		{"a/b", tty, "without slashes", nil},
		{"t", tty, "terminal", nil},
		{"n", t.TempDir(), "config.json", nil},
		{"s", writeBundle(t, specs.Spec{}), "not sealed here", func(string) error { return errors.New("not sealed here") }},
	} {
		err := rt.Create(ctx, c.id, CreateOptions{Bundle: c.bundle, Check: c.check})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %s: %v, want %q", c.id, err, c.want)
		}
		if _, err := os.Stat(filepath.Join(rt.Root, c.id)); err == nil {
			t.Errorf("create %s left state", c.id)
		}
	}
}

func TestParseSignal(t *testing.T) {
	for in, want := range map[string]unix.Signal{"15": unix.SIGTERM, "9": unix.SIGKILL, "TERM": unix.SIGTERM, "sigkill": unix.SIGKILL, "SIGINT": unix.SIGINT} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("%s: %v %v", in, got, err)
		}
	}
	for _, in := range []string{"", "0", "65", "BOGUS", "-1"} {
		if _, err := ParseSignal(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

func TestResourcesAndOverrides(t *testing.T) {
	s := &specs.Spec{
		Process: &specs.Process{Args: []string{SealedEntrypoint}, Env: []string{"PATH=/bin", "TERM=xterm", "container=podman", "HOSTNAME=x", "HOME=/root"}},
		Linux: &specs.Linux{Resources: &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: int64p(150000), Period: uint64p(100000)},
			Memory: &specs.LinuxMemory{Limit: int64p(300<<20 + 1)},
		}},
	}
	if c, m := Resources(s); c != 2 || m != 301 {
		t.Errorf("resources %d %d, want 2 vCPUs 301 MiB", c, m)
	}
	if c, m := Resources(&specs.Spec{}); c != 0 || m != 0 {
		t.Errorf("no limits: %d %d", c, m)
	}
	if a, e := Overrides(s); a != nil || e != nil {
		t.Errorf("podman's defaults taken as overrides: %q %q", a, e)
	}
	s.Process.Args = append(s.Process.Args, "echo", "hi")
	s.Process.Env = append(s.Process.Env, "FOO=1")
	if a, e := Overrides(s); strings.Join(a, " ") != "echo hi" || strings.Join(e, " ") != "FOO=1" {
		t.Errorf("overrides %q %q", a, e)
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add("1 (init) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 42 1000 1")
	f.Add("7 (a) b) Z 0")
	f.Fuzz(func(t *testing.T, s string) {
		parseStat(s) //nolint:errcheck // must not panic
	})
}

func waitFor(s string) time.Duration {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0
	}
	return d
}
