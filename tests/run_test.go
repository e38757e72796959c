package tests

// End-to-end tests of `cwrun run`: real QEMU (TCG here), Debian's cloud
// kernel, a busybox image sealed by `cwrun build` in the test and the
// fixture sealed by `buildah mkcw`. After every run: no QEMU left (by
// pid), no run folder left, no image mount left.

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/testimage"
)

var (
	initOnce sync.Once
	initErr  error
)

// needVM skips unless QEMU, a static busybox and apt-get (for the
// kernel) exist, and builds cwrun-init next to the cwrun binary, where
// cwrun looks for it.
func needVM(t *testing.T) {
	t.Helper()
	need(t, "qemu-system-x86_64", "mkfs.ext4", "apt-get")
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("needs a static /bin/busybox (Debian package busybox-static)")
	}
	initOnce.Do(func() {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", filepath.Join(filepath.Dir(cwrunBin), "cwrun-init"), "../cmd/cwrun-init")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			initErr = fmt.Errorf("building cwrun-init: %v\n%s", err, out)
		}
	})
	if initErr != nil {
		t.Fatal(initErr)
	}
}

// vmEnv is the environment of a cwrun run: a cache shared by all runs
// (the kernel is downloaded once, into the temporary folder) and a
// private runtime folder, checked for leftovers after each run.
type vmEnv struct {
	s      store
	rtDir  string
	extra  []string // more environment
	stdin  io.Reader
	onLine func(line string, p *os.Process) // called for each stdout line
}

func newVMEnv(t *testing.T, s store) *vmEnv {
	rt, err := os.MkdirTemp("", "cwrt") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(rt) })
	return &vmEnv{s: s, rtDir: rt}
}

type vmResult struct {
	result
	pids    []int // cwrun's QEMU children seen during the run
	elapsed time.Duration
}

// run runs cwrun with args, watching its children, and checks that it
// left nothing behind.
func (e *vmEnv) run(t *testing.T, args ...string) vmResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cwrunBin, e.s.flags(args...)...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(os.TempDir(), "cwrun-e2e-cache"), "XDG_RUNTIME_DIR="+e.rtDir)
	cmd.Env = append(cmd.Env, e.extra...)
	cmd.Stdin = e.stdin
	var errb syncBuffer
	cmd.Stderr = &errb
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var r vmResult
	watchDone := make(chan struct{})
	var pidsMu sync.Mutex
	go func() {
		for {
			for _, pid := range childrenOf(cmd.Process.Pid) {
				pidsMu.Lock()
				if !containsInt(r.pids, pid) {
					r.pids = append(r.pids, pid)
				}
				pidsMu.Unlock()
			}
			select {
			case <-watchDone:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	var out strings.Builder
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		out.WriteString(sc.Text() + "\n")
		if e.onLine != nil {
			e.onLine(sc.Text(), cmd.Process)
		}
	}
	err = cmd.Wait()
	close(watchDone)
	r.elapsed = time.Since(start)
	if ctx.Err() != nil {
		t.Fatalf("cwrun %s: timed out\nstderr: %s", strings.Join(args, " "), errb.String())
	}
	r.stdout, r.stderr = out.String(), errb.String()
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatal(err)
		}
		r.code = ee.ExitCode()
	}
	e.noLeftovers(t, r)
	return r
}

func (e *vmEnv) noLeftovers(t *testing.T, r vmResult) {
	t.Helper()
	for _, pid := range r.pids {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(b), ") Z ") {
			t.Errorf("process %d (%s) outlived cwrun", pid, strings.Fields(string(b))[1])
		}
	}
	if ents, err := os.ReadDir(filepath.Join(e.rtDir, "cwrun")); err == nil && len(ents) > 0 {
		t.Errorf("run folder left behind: %v", ents[0].Name())
	}
	mounts, _ := os.ReadFile("/proc/mounts")
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, e.s.root) && strings.Contains(l, "/merged") {
			t.Errorf("image mount left behind: %s", l)
		}
	}
}

func childrenOf(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			out = append(out, pid)
		}
	}
	return out
}

func containsInt(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// busyboxLayer is a root file system with Debian's static busybox.
func busyboxLayer(t *testing.T) []byte {
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs /bin/busybox: %v", err)
	}
	es := []E{
		{Name: "bin/", Type: tar.TypeDir}, {Name: "etc/", Type: tar.TypeDir}, {Name: "tmp/", Type: tar.TypeDir, Mode: 0o1777},
		{Name: "work/", Type: tar.TypeDir}, {Name: "www/", Type: tar.TypeDir},
		{Name: "bin/busybox", Mode: 0o755, Body: string(bb)},
		{Name: "etc/passwd", Body: "root:x:0:0:root:/root:/bin/sh\n"},
		{Name: "etc/group", Body: "root:x:0:\n"},
		{Name: "www/index.html", Body: "hello from the sealed guest\n"},
	}
	for _, l := range []string{"sh", "echo", "cat", "pwd", "sleep", "httpd", "ls", "id", "mount"} {
		es = append(es, E{Name: "bin/" + l, Type: tar.TypeSymlink, Link: "busybox"})
	}
	return testimage.Layer(t, es...)
}

const sealedCmd = `echo hello from the guest; echo FOO=$FOO; echo PWD=$(pwd); echo to-stderr >&2; exit 3`

// sealedImages seals the busybox image twice: "plain" (no overrides)
// into an OCI layout (the extract-and-cache path) and "open"
// (--allow-overrides) into local storage (the read-only mount path).
type sealedImages struct {
	s          store
	plain      string // oci:DIR:plain
	plainDir   string
	open       string // local storage name
	key, wrong string
}

func sealImages(t *testing.T) sealedImages {
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	testimage.WriteLayout(t, src, "v1", testimage.Config{
		Cmd: []string{"/bin/sh", "-c", sealedCmd}, Env: []string{"PATH=/bin", "FOO=bar"}, WorkingDir: "/work",
	}, busyboxLayer(t))
	s := newStore(t)
	si := sealedImages{s: s, plainDir: filepath.Join(dir, "sealed"), open: "localhost/cwrun-run/open:1",
		key: writeKey(t, dir, "run-test-passphrase")}
	si.plain = "oci:" + si.plainDir + ":plain"
	os.WriteFile(filepath.Join(dir, "wrong"), []byte("not-the-passphrase"), 0o600)
	si.wrong = filepath.Join(dir, "wrong")
	for _, c := range [][]string{
		{"build", "--tee", "sample", "--cpus", "1", "--memory", "512", "--passphrase-file", si.key, "oci:" + src + ":v1", si.plain},
		{"build", "--tee", "sample", "--cpus", "1", "--memory", "512", "--allow-overrides", "--passphrase-file", si.key, "oci:" + src + ":v1", si.open},
	} {
		if r := s.cwrun(t, c...); r.code != 0 {
			t.Fatalf("cwrun %s: exit %d\n%s", strings.Join(c, " "), r.code, r.stderr)
		}
	}
	return si
}

func TestRun(t *testing.T) {
	needVM(t)
	needRoot(t) // local storage's image mount
	need(t, "cryptsetup")
	si := sealImages(t)
	run := func(t *testing.T, e *vmEnv, args ...string) vmResult {
		t.Helper()
		r := e.run(t, append([]string{"run"}, args...)...)
		t.Logf("cwrun run %s: exit %d after %s\nstderr: %s", strings.Join(args, " "), r.code, r.elapsed.Round(time.Millisecond), r.stderr)
		return r
	}

	t.Run("sealed-workload", func(t *testing.T) {
		// Output, exit status, sealed env and workdir, timings, and the
		// KVM fallback warning (this host's KVM is PVM).
		r := run(t, newVMEnv(t, si.s), "--timings", "--passphrase-file", si.key, si.plain)
		if r.code != 3 {
			t.Fatalf("exit %d, want 3\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		if want := "hello from the guest\nFOO=bar\nPWD=/work\n"; r.stdout != want {
			t.Errorf("stdout %q, want %q", r.stdout, want)
		}
		for _, want := range []string{"to-stderr\n", "cwrun timings", "guest unlock", "first output on the host"} {
			if !strings.Contains(r.stderr, want) {
				t.Errorf("stderr lacks %q:\n%s", want, r.stderr)
			}
		}
		if len(r.pids) == 0 {
			t.Errorf("no QEMU child was seen")
		}
		if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
			if n := strings.Count(r.stderr, "falling back to TCG"); n != 1 {
				t.Errorf("%d fallback warnings, want 1:\n%s", n, r.stderr)
			}
		}
		// --accel tcg: no warning; the disk now comes from the cache.
		r = run(t, newVMEnv(t, si.s), "--log-level", "debug", "--accel", "tcg", "--passphrase-file", si.key, si.plain)
		if r.code != 3 || strings.Contains(r.stderr, "falling back") || !strings.Contains(r.stderr, "extracted by an earlier run") {
			t.Errorf("--accel tcg: exit %d, stderr %s", r.code, r.stderr)
		}
	})

	t.Run("wrong-passphrase", func(t *testing.T) {
		r := run(t, newVMEnv(t, si.s), "--passphrase-file", si.wrong, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "wrong passphrase for the sealed disk") || r.stdout != "" {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("overrides-refused", func(t *testing.T) {
		for _, args := range [][]string{{si.plain, "/bin/sh", "-c", "echo hijacked"}, {"-e", "FOO=evil", si.plain}} {
			r := run(t, newVMEnv(t, si.s), append([]string{"--passphrase-file", si.key}, args...)...)
			if r.code != 125 || !strings.Contains(r.stderr, "does not allow host overrides") || !strings.Contains(r.stderr, "--allow-overrides") {
				t.Errorf("%v: exit %d, stderr %s", args, r.code, r.stderr)
			}
			if len(r.pids) != 0 || r.elapsed > 20*time.Second {
				t.Errorf("%v: a VM was started (%v) or it took %s: the refusal must come before the boot", args, r.pids, r.elapsed)
			}
		}
	})

	t.Run("tty-refused", func(t *testing.T) {
		r := run(t, newVMEnv(t, si.s), "-t", "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "pty") || len(r.pids) != 0 {
			t.Fatalf("exit %d, children %v, stderr %s", r.code, r.pids, r.stderr)
		}
	})

	t.Run("overrides-allowed-stdin", func(t *testing.T) {
		e := newVMEnv(t, si.s)
		e.stdin = strings.NewReader("line from the host\n")
		r := run(t, e, "-i", "--network", "none", "-e", "FOO=baz", "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `echo FOO=$FOO; read l; echo "read: $l"; ls /sys/class/net`)
		if r.code != 0 {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		for _, want := range []string{"FOO=baz\n", "read: line from the host\n"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("stdout %q lacks %q", r.stdout, want)
			}
		}
		if strings.Contains(r.stdout, "eth0") {
			t.Errorf("--network none, but the guest has eth0: %q", r.stdout)
		}
	})

	t.Run("signal", func(t *testing.T) {
		e := newVMEnv(t, si.s)
		var sent time.Time
		e.onLine = func(line string, p *os.Process) {
			if line == "waiting" {
				sent = time.Now()
				p.Signal(syscall.SIGTERM)
			}
		}
		r := run(t, e, "--log-level", "debug", "--name", "sig", "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `trap 'echo got TERM; exit 42' TERM; echo waiting; while true; do sleep 0.1; done`)
		if r.code != 42 || !strings.Contains(r.stdout, "got TERM") {
			t.Fatalf("exit %d, want 42 from the trap\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		// A local-storage image is booted in place, not copied.
		if !strings.Contains(r.stderr, "booting the disk in the mounted image") {
			t.Errorf("the local image was not mounted:\n%s", r.stderr)
		}
		if sent.IsZero() {
			t.Fatal("the workload never printed")
		}
	})

	t.Run("signal-ignored-stop-timeout", func(t *testing.T) {
		e := newVMEnv(t, si.s)
		var sent time.Time
		e.onLine = func(line string, p *os.Process) {
			if line == "waiting" {
				sent = time.Now()
				p.Signal(syscall.SIGINT)
			}
		}
		r := run(t, e, "--stop-timeout", "2s", "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `trap '' TERM; echo waiting; while true; do sleep 0.1; done`)
		if r.code != 137 || !strings.Contains(r.stderr, "did not stop within 2s") {
			t.Fatalf("exit %d, want 137\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		if d := time.Since(sent); d > 15*time.Second {
			t.Errorf("stopping took %s after the signal", d)
		}
	})

	t.Run("publish", func(t *testing.T) {
		port := freePort(t)
		e := newVMEnv(t, si.s)
		var body string
		var getErr error
		e.onLine = func(line string, p *os.Process) {
			if line != "listening" {
				return
			}
			go func() {
				defer p.Signal(syscall.SIGTERM)
				c := http.Client{Timeout: 5 * time.Second}
				deadline := time.Now().Add(30 * time.Second)
				for time.Now().Before(deadline) {
					resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/index.html", port))
					if err == nil {
						b, _ := io.ReadAll(resp.Body)
						resp.Body.Close()
						body, getErr = string(b), nil
						return
					}
					getErr = err
					time.Sleep(200 * time.Millisecond)
				}
			}()
		}
		r := run(t, e, "-p", fmt.Sprintf("127.0.0.1:%d:8080", port), "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `trap 'exit 0' TERM; httpd -f -p 8080 -h /www & echo listening; wait`)
		if body != "hello from the sealed guest\n" {
			t.Fatalf("GET from the host: %q, %v\nstdout: %s\nstderr: %s", body, getErr, r.stdout, r.stderr)
		}
		if r.code != 0 {
			t.Errorf("exit %d after SIGTERM, want 0 (the trap)\nstderr: %s", r.code, r.stderr)
		}
	})

	t.Run("volumes", func(t *testing.T) {
		if _, err := os.Stat("/usr/lib/qemu/virtiofsd"); err != nil {
			if _, err := exec.LookPath("virtiofsd"); err != nil {
				t.Skip("needs virtiofsd (Debian's qemu-system-common)")
			}
		}
		ro, rw := t.TempDir(), t.TempDir()
		os.WriteFile(filepath.Join(ro, "in.txt"), []byte("from the host\n"), 0o644)
		r := run(t, newVMEnv(t, si.s), "-v", ro+":/mnt/ro:ro", "-v", rw+":/mnt/rw", "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `cat /mnt/ro/in.txt; echo x > /mnt/ro/new 2>/dev/null || echo ro-refused; `+
				`mount -o remount,rw /mnt/ro && echo remounted; echo y > /mnt/ro/new2 2>/dev/null || echo host-refused; echo from the guest > /mnt/rw/out.txt`)
		if r.code != 0 {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		if !strings.Contains(r.stdout, "from the host\n") || !strings.Contains(r.stdout, "ro-refused\n") || !strings.Contains(r.stdout, "host-refused\n") {
			t.Errorf("stdout %q", r.stdout)
		}
		if b, err := os.ReadFile(filepath.Join(rw, "out.txt")); err != nil || string(b) != "from the guest\n" {
			t.Errorf("the guest's file on the host: %q, %v", b, err)
		}
		for _, f := range []string{"new", "new2"} {
			if _, err := os.Stat(filepath.Join(ro, f)); err == nil {
				t.Errorf("the guest wrote %s into a :ro volume", f)
			}
		}
	})

	t.Run("corrupt-disk", func(t *testing.T) {
		layout := corruptCopy(t, si.plainDir, "plain")
		r := run(t, newVMEnv(t, si.s), "--passphrase-file", si.key, "oci:"+layout+":bad")
		if r.code != 125 || !strings.Contains(r.stderr, "no valid LUKS header") || !strings.Contains(r.stderr, "damaged") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
		if len(r.pids) != 0 {
			t.Errorf("a VM was started for a damaged disk")
		}
	})

	t.Run("guest-dies-early", func(t *testing.T) {
		// A kernel without its modules: the init finds no virtio ports,
		// says so on the console and powers off. cwrun shows the console.
		k, err := filepath.Glob(filepath.Join(os.TempDir(), "cwrun-e2e-cache", "cwrun", "kernel", "*", "boot", "vmlinuz-*"))
		if err != nil || len(k) == 0 {
			t.Skip("no cached kernel")
		}
		r := run(t, newVMEnv(t, si.s), "--kernel", k[0], "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "last console lines") || !strings.Contains(r.stderr, " failed: ") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
	})

	t.Run("boot-timeout", func(t *testing.T) {
		// An init that never opens the control port, as a hung guest.
		e := newVMEnv(t, si.s)
		e.extra = []string{"CWRUN_INIT=" + tinyInit(t, hangInit)}
		r := run(t, e, "--boot-timeout", "6s", "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "did not report ready within 6s") || !strings.Contains(r.stderr, "hanging on purpose") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
		if r.elapsed > 30*time.Second {
			t.Errorf("took %s", r.elapsed)
		}
	})

	t.Run("kernel-panic", func(t *testing.T) {
		// An init that exits: the kernel panics ("Attempted to kill
		// init!"), QEMU stops (panic=-1, -no-reboot), and cwrun shows
		// the panic from the console.
		e := newVMEnv(t, si.s)
		e.extra = []string{"CWRUN_INIT=" + tinyInit(t, "package main\n\nfunc main() {}\n")}
		r := run(t, e, "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "last console lines") || !strings.Contains(r.stderr, "Kernel panic") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
	})

	t.Run("signal-while-booting", func(t *testing.T) {
		// Nothing runs yet that could clean up: the VM stops at once.
		e := newVMEnv(t, si.s)
		cmd := exec.Command(cwrunBin, si.s.flags("run", "--passphrase-file", si.key, si.plain)...)
		cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(os.TempDir(), "cwrun-e2e-cache"), "XDG_RUNTIME_DIR="+e.rtDir)
		var errb syncBuffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		var pids []int
		for deadline := time.Now().Add(20 * time.Second); len(pids) == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			pids = childrenOf(cmd.Process.Pid)
		}
		if len(pids) == 0 {
			t.Fatal("no QEMU was started")
		}
		sent := time.Now()
		cmd.Process.Signal(syscall.SIGINT)
		err := cmd.Wait()
		ee, ok := err.(*exec.ExitError)
		if !ok || ee.ExitCode() != 130 {
			t.Fatalf("%v, want exit 130\nstderr: %s", err, errb.String())
		}
		if d := time.Since(sent); d > 8*time.Second {
			t.Errorf("stopping a booting VM took %s", d)
		}
		e.noLeftovers(t, vmResult{pids: pids})
	})

	t.Run("missing-qemu", func(t *testing.T) {
		e := newVMEnv(t, si.s)
		e.extra = []string{"PATH=/nonexistent"}
		r := run(t, e, "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "qemu-system-x86") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
	})

	t.Run("not-sealed", func(t *testing.T) {
		layout := filepath.Join(t.TempDir(), "plain")
		testimage.WriteLayout(t, layout, "v1", testimage.Config{Cmd: []string{"/bin/sh"}}, busyboxLayer(t))
		r := run(t, newVMEnv(t, si.s), "--passphrase-file", si.key, "oci:"+layout+":v1")
		if r.code != 125 || !strings.Contains(r.stderr, "not a sealed image") || !strings.Contains(r.stderr, "cwrun build") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
	})
}

// TestRunMkcwFixture runs the image that a real `buildah mkcw` sealed.
// Its 2.3 million PBKDF2 iterations take about 45 s under TCG.
func TestRunMkcwFixture(t *testing.T) {
	needVM(t)
	fixture := "../../shared/fixtures/mkcw-busybox.oci.tar"
	if _, err := os.Stat(fixture); err != nil {
		t.Skipf("fixture %s absent: %v", fixture, err)
	}
	dir := t.TempDir()
	key := writeKey(t, dir, "fixture-passphrase-0123456789")
	e := newVMEnv(t, newStore(t))
	r := e.run(t, "run", "--accel", "tcg", "--timings", "--passphrase-file", key, "oci-archive:"+fixture+":cw")
	if r.code != 7 {
		t.Fatalf("exit %d, want 7\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	for _, want := range []string{"sealed-hello from guest\n", "env FOO=bar\n"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout %q lacks %q", r.stdout, want)
		}
	}
	t.Logf("mkcw fixture: exit 7 after %s\n%s", r.elapsed.Round(time.Millisecond), r.stderr)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// corruptCopy rewrites an OCI layout's sealed image with both LUKS
// header magics of disk.img flipped, as a new layout tagged "bad".
func corruptCopy(t *testing.T, layout, tag string) string {
	t.Helper()
	read := func(d string) []byte {
		b, err := os.ReadFile(filepath.Join(layout, "blobs", "sha256", strings.TrimPrefix(d, "sha256:")))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var index struct {
		Manifests []struct {
			Digest      string
			Annotations map[string]string
		}
	}
	b, _ := os.ReadFile(filepath.Join(layout, "index.json"))
	if err := json.Unmarshal(b, &index); err != nil {
		t.Fatal(err)
	}
	var mDigest string
	for _, m := range index.Manifests {
		if m.Annotations["org.opencontainers.image.ref.name"] == tag {
			mDigest = m.Digest
		}
	}
	var manifest struct{ Layers []struct{ Digest string } }
	if err := json.Unmarshal(read(mDigest), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	blob := read(manifest.Layers[0].Digest)
	var lr io.Reader = bytes.NewReader(blob)
	if len(blob) > 2 && blob[0] == 0x1f && blob[1] == 0x8b {
		zr, err := gzip.NewReader(bytes.NewReader(blob))
		if err != nil {
			t.Fatal(err)
		}
		lr = zr
	}
	var entries []E
	tr := tar.NewReader(lr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		if strings.TrimPrefix(h.Name, "./") == "disk.img" {
			flipped := 0
			for _, magic := range [][]byte{[]byte("LUKS\xba\xbe"), []byte("SKUL\xba\xbe")} {
				if i := bytes.Index(body[:min(len(body), 4<<20)], magic); i >= 0 {
					body[i] ^= 0xff
					body[i+1] ^= 0xff
					flipped++
				}
			}
			if flipped == 0 {
				t.Fatal("no LUKS magic found in disk.img")
			}
		}
		typ := h.Typeflag
		entries = append(entries, E{Name: h.Name, Type: typ, Mode: h.Mode, Body: string(body), Link: h.Linkname})
	}
	out := filepath.Join(t.TempDir(), "bad")
	testimage.WriteLayout(t, out, "bad", testimage.Config{Entrypoint: []string{"/entrypoint"}}, testimage.Layer(t, entries...))
	return out
}

const hangInit = `package main

import (
	"fmt"
	"time"
)

func main() {
	fmt.Println("hanging on purpose")
	for {
		time.Sleep(time.Hour)
	}
}
`

// tinyInit builds a static Go program from src, to stand in for an init.
func tinyInit(t testing.TB, src string) string {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "main.go"), []byte(src), 0o644)
	os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module tinyinit\n\ngo 1.22\n"), 0o644)
	out := filepath.Join(dir, "init")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, ".")
	build.Dir, build.Env = dir, append(os.Environ(), "CGO_ENABLED=0")
	if b, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building an init: %v\n%s", err, b)
	}
	return out
}
