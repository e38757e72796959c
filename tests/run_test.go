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
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/internal/testimage"
	"golang.org/x/sys/unix"
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
	r := e.runOnly(t, args...)
	e.noLeftovers(t, r)
	return r
}

// runOnly is run without the check for leftovers (other runs of the
// same environment are still going).
func (e *vmEnv) runOnly(t *testing.T, args ...string) vmResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cwrunBin, e.s.flags(args...)...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(os.TempDir(), "cwrun-e2e-cache"), "XDG_RUNTIME_DIR="+e.rtDir)
	cmd.Env = append(cmd.Env, e.extra...)
	cmd.Stdin = e.stdin
	var errb syncbuf.Buffer
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
	return r
}

func (e *vmEnv) command(args ...string) *exec.Cmd {
	cmd := exec.Command(cwrunBin, e.s.flags(args...)...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(os.TempDir(), "cwrun-e2e-cache"), "XDG_RUNTIME_DIR="+e.rtDir)
	cmd.Env = append(cmd.Env, e.extra...)
	return cmd
}

// bgRun is a cwrun run in the background, its output collected.
type bgRun struct {
	cmd         *exec.Cmd
	out, stderr syncbuf.Buffer
	done        chan struct{}
	err         error
}

func (e *vmEnv) start(t *testing.T, args ...string) *bgRun {
	t.Helper()
	b := &bgRun{cmd: e.command(args...), done: make(chan struct{})}
	b.cmd.Stdout, b.cmd.Stderr = &b.out, &b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { b.err = b.cmd.Wait(); close(b.done) }()
	t.Cleanup(func() {
		b.cmd.Process.Kill()
		<-b.done
	})
	return b
}

// waitOutput waits for what in the run's stdout.
func (b *bgRun) waitOutput(t *testing.T, what string) {
	t.Helper()
	deadline := time.After(2 * time.Minute)
	for !strings.Contains(b.out.String(), what) {
		select {
		case <-b.done:
			t.Fatalf("cwrun ended (%v) before printing %q\nstdout: %s\nstderr: %s", b.err, what, b.out.String(), b.stderr.String())
		case <-deadline:
			t.Fatalf("no %q within 2 minutes\nstdout: %s\nstderr: %s", what, b.out.String(), b.stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (b *bgRun) exitCode(t *testing.T) int {
	t.Helper()
	select {
	case <-b.done:
	case <-time.After(2 * time.Minute):
		t.Fatalf("cwrun did not end\nstderr: %s", b.stderr.String())
	}
	if ee, ok := b.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if b.err != nil {
		t.Fatal(b.err)
	}
	return 0
}

// imageMounts are the store's image mounts in the mount table.
func imageMounts(s store) []string {
	mounts, _ := os.ReadFile("/proc/mounts")
	var out []string
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, s.root) && strings.Contains(l, "/merged") {
			out = append(out, strings.Fields(l)[1])
		}
	}
	return out
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
	for _, m := range imageMounts(e.s) {
		t.Errorf("image mount left behind: %s", m)
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
	for _, l := range []string{"sh", "echo", "cat", "pwd", "sleep", "httpd", "ls", "id", "mount", "tty", "stty"} {
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

	t.Run("no-key", func(t *testing.T) {
		// Sealed without a broker and run without a passphrase: refused
		// before any VM, saying what to pass.
		r := run(t, newVMEnv(t, si.s), si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "names no key broker") || !strings.Contains(r.stderr, "--kbs") || len(r.pids) != 0 {
			t.Fatalf("exit %d, children %v, stderr %s", r.code, r.pids, r.stderr)
		}
	})

	t.Run("tty", func(t *testing.T) { testTTY(t, si) })

	t.Run("tty-without-terminal", func(t *testing.T) {
		// -it with a pipe as stdin: a warning, as podman gives, and the
		// workload still gets a pty (CRLF output, stderr on stdout).
		e := newVMEnv(t, si.s)
		e.stdin = strings.NewReader("piped line\n")
		r := run(t, e, "-i", "-t", "--network", "none", "--passphrase-file", si.key, si.open,
			"/bin/sh", "-c", `tty; read l; echo "read: $l"; echo to-stderr >&2`)
		if r.code != 0 {
			t.Fatalf("exit %d\nstdout: %q\nstderr: %s", r.code, r.stdout, r.stderr)
		}
		if !strings.Contains(r.stderr, "input device is not a TTY") {
			t.Errorf("no warning about the non-terminal stdin:\n%s", r.stderr)
		}
		// (the line scanner drops the pty's CRs)
		for _, want := range []string{"/dev/pts/0\n", "read: piped line\n", "to-stderr\n"} {
			if !strings.Contains(r.stdout, want) {
				t.Errorf("stdout %q lacks %q", r.stdout, want)
			}
		}
		if strings.Contains(r.stderr, "to-stderr") {
			t.Errorf("with -t, the workload's stderr came on cwrun's stderr: %s", r.stderr)
		}
	})

	t.Run("killed-leftovers", func(t *testing.T) { testKilledLeftovers(t, si) })

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
		// 20 s: a boot reaches the init in about 3 s, but a loaded
		// machine (CI next to other work) can triple that under TCG.
		r := run(t, e, "--boot-timeout", "20s", "--passphrase-file", si.key, si.plain)
		if r.code != 125 || !strings.Contains(r.stderr, "did not report ready within 20s") || !strings.Contains(r.stderr, "hanging on purpose") {
			t.Fatalf("exit %d, stderr %s", r.code, r.stderr)
		}
		if r.elapsed > 45*time.Second {
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
		var errb syncbuf.Buffer
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

// testTTY drives `cwrun run -it` from a pty of the test's own, as a
// person at a terminal would: the guest has a pty of the terminal's
// size that follows a resize, typed input arrives, Ctrl-C is a byte
// that the guest's pty turns into SIGINT, the exit status comes back,
// and the terminal is raw while the workload runs and restored after.
func testTTY(t *testing.T, si sealedImages) {
	master, slave := openTestPTY(t, 37, 111)
	e := newVMEnv(t, si.s)
	cmd := e.command("run", "-i", "-t", "--network", "none", "--passphrase-file", si.key, si.open, "/bin/sh", "-c",
		`tty; stty size; echo ready; read l; echo "got:$l"; trap 'stty size; echo winch' WINCH; trap 'echo INT; exit 9' INT; echo armed; while :; do sleep 0.1; done`)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	// cwrun leads a session whose controlling terminal is the slave, so
	// the kernel sends it SIGWINCH when the test resizes the terminal.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
	}()
	var out syncbuf.Buffer
	go io.Copy(&out, master) //nolint:errcheck // ends when the master closes
	wait := func(what string) { t.Helper(); waitOutput(t, "cwrun", &out, done, what) }
	wait("ready")
	if tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil || tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != 0 {
		t.Errorf("cwrun's terminal is not raw while the workload runs: lflag %#x, %v", tio.Lflag, err)
	}
	master.Write([]byte("typed\r"))
	wait("got:typed")
	wait("armed")
	if err := unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 40, Col: 120}); err != nil {
		t.Fatal(err)
	}
	wait("winch")
	master.Write([]byte{3}) // Ctrl-C
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Minute):
		t.Fatalf("Ctrl-C did not end the workload:\n%s", out.String())
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the last output, through the test's pty
	got := strings.ReplaceAll(out.String(), "\r", "")
	if code != 9 || !strings.Contains(got, "INT\n") {
		t.Errorf("exit %d, want 9 from the INT trap:\n%s", code, got)
	}
	if !regexp.MustCompile(`(?m)^/dev/pts/[0-9]+$`).MatchString(got) {
		t.Errorf("tty in the guest did not name a pty:\n%s", got)
	}
	for _, want := range []string{"37 111\n", "40 120\nwinch\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil || tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != unix.ECHO|unix.ICANON|unix.ISIG {
		t.Errorf("cwrun did not restore its terminal: lflag %#x, %v", tio.Lflag, err)
	}
	e.noLeftovers(t, vmResult{})
}

// openTestPTY opens a pty of the given size: the master for the test,
// the slave for cwrun.
// waitOutput waits up to 2 minutes for what in out (carriage returns
// dropped, as a pty adds them), failing if the program (who) ends first
// (done).
func waitOutput(t *testing.T, who string, out *syncbuf.Buffer, done <-chan error, what string) {
	t.Helper()
	deadline := time.After(2 * time.Minute)
	for !strings.Contains(strings.ReplaceAll(out.String(), "\r", ""), what) {
		select {
		case err := <-done:
			t.Fatalf("%s ended (%v) before %q:\n%s", who, err, what, out.String())
		case <-deadline:
			t.Fatalf("no %q within 2 minutes:\n%s", what, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func openTestPTY(t *testing.T, rows, cols uint16) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	fd := int(m.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: rows, Col: cols}); err != nil {
		t.Fatal(err)
	}
	return m, s
}

// testKilledLeftovers SIGKILLs a cwrun while another run of the same
// local image goes on: QEMU dies with it, its run folder and its image
// mount count stay, and the next run removes the folder and releases
// that one count, leaving the live run's mount in place.
func testKilledLeftovers(t *testing.T, si sealedImages) {
	e := newVMEnv(t, si.s)
	loop := `trap 'echo bye; exit 42' TERM; echo waiting; while true; do sleep 0.1; done`
	live := e.start(t, "run", "--name", "live", "--network", "none", "--passphrase-file", si.key, si.open, "/bin/sh", "-c", loop)
	killed := e.start(t, "run", "--name", "killed", "--network", "none", "--passphrase-file", si.key, si.open, "/bin/sh", "-c", loop)
	live.waitOutput(t, "waiting")
	killed.waitOutput(t, "waiting")
	qemus := childrenOf(killed.cmd.Process.Pid)
	if len(qemus) == 0 {
		t.Fatal("the run to kill has no QEMU child")
	}
	mountsBefore := imageMounts(si.s)
	if len(mountsBefore) != 1 {
		t.Fatalf("image mounts of two runs of one image: %v, want one (counted twice)", mountsBefore)
	}
	killed.cmd.Process.Kill()
	if code := killed.exitCode(t); code != 137 && code != -1 {
		t.Fatalf("SIGKILLed cwrun: exit %d", code)
	}
	// QEMU dies with cwrun (parent-death signal); the folder stays.
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range qemus {
		for {
			b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
			if err != nil || strings.Contains(string(b), ") Z ") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("QEMU %d outlived its SIGKILLed cwrun", pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	killedDir := filepath.Join(e.rtDir, "cwrun", "killed")
	if _, err := os.Stat(killedDir); err != nil {
		t.Fatalf("the killed run's folder is already gone (%v): this test checks nothing", err)
	}

	// The next run cleans up after the dead one, not after the live one.
	r := e.runOnly(t, "run", "--log-level", "debug", "--network", "none", "--passphrase-file", si.key, si.open, "/bin/sh", "-c", "echo next")
	if r.code != 0 || r.stdout != "next\n" {
		t.Fatalf("the next run: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "released the image mount of a dead run") {
		t.Errorf("the next run did not release the dead run's mount:\n%s", r.stderr)
	}
	if _, err := os.Stat(killedDir); !os.IsNotExist(err) {
		t.Errorf("the killed run's folder stays after the next run: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.rtDir, "cwrun", "live")); err != nil {
		t.Errorf("the live run's folder was removed: %v", err)
	}
	if m := imageMounts(si.s); len(m) != 1 {
		t.Errorf("the live run's image mount: %v, want it still there", m)
	}
	live.cmd.Process.Signal(syscall.SIGTERM)
	if code := live.exitCode(t); code != 42 || !strings.Contains(live.out.String(), "bye") {
		t.Errorf("the live run: exit %d, want 42\nstdout: %s\nstderr: %s", code, live.out.String(), live.stderr.String())
	}
	// With the live run gone, so is the mount: the dead run's count was
	// released exactly once.
	e.noLeftovers(t, vmResult{pids: qemus})
}
