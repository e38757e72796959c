package tests

// End-to-end tests of `cwrun run --disk`: whole VM disks booted with
// UEFI (OVMF) under QEMU TCG. The disk is built here (internal/testdisk)
// from Debian's cloud kernel and busybox: its init prints a marker,
// counts its boots in a raw sector of the disk, reports a cloud-init
// seed and the CPUs and memory it sees, can serve HTTP on QEMU's user
// network, and powers off. Each boot takes 15 s or more under TCG.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/internal/testdisk"
	"github.com/cwrun/cwrun/launcher/kernel"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// needDiskVM skips unless QEMU, OVMF and the disk builder's tools
// exist, and builds the test disk (raw) in dir.
func needDiskVM(t *testing.T, dir string, o testdisk.Options) string {
	t.Helper()
	need(t, "qemu-system-x86_64", "qemu-img", "apt-get")
	if _, err := os.Stat("/usr/share/OVMF/OVMF_CODE_4M.fd"); err != nil {
		if _, err := os.Stat("/usr/share/OVMF/OVMF_CODE.fd"); err != nil {
			t.Skip("needs UEFI firmware (Debian package ovmf)")
		}
	}
	testdisk.Need(t)
	// The cache the other VM tests' cwrun runs use (XDG_CACHE_HOME).
	k, err := kernel.Fetcher{CacheDir: filepath.Join(os.TempDir(), "cwrun-e2e-cache", "cwrun", "kernel")}.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	o.Kernel = k
	return testdisk.Build(t, dir, o)
}

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func wantBoot(t *testing.T, r vmResult, boots string) {
	t.Helper()
	if r.code != 0 || !strings.Contains(r.stdout, testdisk.Marker) || !strings.Contains(r.stdout, testdisk.BootsPrefix+boots+"\n") {
		t.Fatalf("exit %d; want 0 and the marker with %s%s\nstdout: %s\nstderr: %s", r.code, testdisk.BootsPrefix, boots, r.stdout, r.stderr)
	}
}

// wantGuestSize checks the CPUs and memory the guest reported: MemTotal
// is below the VM's memory (the firmware and kernel keep some), but
// within a quarter of it.
func wantGuestSize(t *testing.T, stdout string, cpus, memMiB int) {
	t.Helper()
	if !strings.Contains(stdout, fmt.Sprintf("%s%d\n", testdisk.CPUsPrefix, cpus)) {
		t.Errorf("the guest did not see %d CPUs\nstdout: %s", cpus, stdout)
	}
	var kib int
	if i := strings.Index(stdout, testdisk.MemTotalPrefix); i < 0 {
		t.Errorf("the guest did not report its memory\nstdout: %s", stdout)
	} else if _, err := fmt.Sscan(stdout[i+len(testdisk.MemTotalPrefix):], &kib); err != nil {
		t.Errorf("the guest's memory report: %v\nstdout: %s", err, stdout)
	} else if kib > memMiB<<10 || kib < memMiB<<10*3/4 {
		t.Errorf("the guest sees MemTotal %d KiB; want a little under %d MiB", kib, memMiB)
	}
}

// httpGetUntil GETs url until it answers 200 or the run ends or the
// deadline passes: QEMU accepts the forwarded port's connections as
// soon as it runs, and drops them while nothing listens in the guest.
func httpGetUntil(t *testing.T, b *bgRun, url string, deadline time.Time) string {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-b.done:
			t.Fatalf("cwrun ended (%v) before %s answered (last: %v)\nstdout: %s\nstderr: %s", b.err, url, last, b.out.String(), b.stderr.String())
		default:
		}
		resp, err := c.Get(url)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && rerr == nil {
				return string(body)
			}
			err = fmt.Errorf("%s, %v", resp.Status, rerr)
		}
		last = err
		time.Sleep(500 * time.Millisecond)
	}
	t.Fatalf("GET %s: no answer by the deadline (last: %v)\nstdout: %s\nstderr: %s", url, last, b.out.String(), b.stderr.String())
	return ""
}

func TestDiskBoot(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{})
	// The qcow2 disk serves HTTP and waits for the power button.
	serveDir := filepath.Join(dir, "serve")
	os.Mkdir(serveDir, 0o755)
	qcow := testdisk.QCOW2(t, needDiskVM(t, serveDir, testdisk.Options{Serve: true}), serveDir)
	e := newVMEnv(t, newStore(t))

	// One boot checks the cloud-init seed, a published port and the
	// VM's size; SIGTERM then stops it through the power button.
	t.Run("qcow2 with a cloud-init seed, -p, --cpus, --memory", func(t *testing.T) {
		ci := filepath.Join(dir, "ci")
		os.Mkdir(ci, 0o755)
		os.WriteFile(filepath.Join(ci, "user-data"), []byte("#cloud-config\n"), 0o644)
		os.WriteFile(filepath.Join(ci, "meta-data"), []byte("instance-id: cwrun-e2e-42\n"), 0o644)
		before := fileSum(t, qcow)
		port := freePort(t)
		start := time.Now()
		b := e.start(t, "run", "--disk", qcow, "--cloud-init", ci, "-p", fmt.Sprintf("127.0.0.1:%d:80", port), "--cpus", "2", "--memory", "768")
		body := httpGetUntil(t, b, fmt.Sprintf("http://127.0.0.1:%d/", port), time.Now().Add(3*time.Minute))
		if body != testdisk.ServeBody {
			t.Errorf("GET through -p: body %q, want %q", body, testdisk.ServeBody)
		}
		t.Logf("the guest answered on the published port %s after the start", time.Since(start).Round(time.Millisecond))
		b.waitOutput(t, testdisk.WaitingLine)
		qemus := childrenOf(b.cmd.Process.Pid)
		if len(qemus) == 0 {
			t.Fatal("no QEMU child")
		}
		b.cmd.Process.Signal(syscall.SIGTERM)
		if code := b.exitCode(t); code != 0 {
			t.Fatalf("exit %d after SIGTERM, want 0 (the guest powered off)\nstdout: %s\nstderr: %s", code, b.out.String(), b.stderr.String())
		}
		out := strings.ReplaceAll(b.out.String(), "\r\n", "\n") // the serial console's line ends
		for _, want := range []string{testdisk.Marker, testdisk.BootsPrefix + "1\n", testdisk.ServingLine, testdisk.PressedLine,
			"second disk: instance-id: cwrun-e2e-42"} {
			if !strings.Contains(out, want) {
				t.Errorf("stdout lacks %q\nstdout: %s", want, out)
			}
		}
		wantGuestSize(t, out, 2, 768)
		if !strings.Contains(b.stderr.String(), "power button") {
			t.Errorf("stderr does not say the power button was pressed: %s", b.stderr.String())
		}
		if fileSum(t, qcow) != before {
			t.Error("the qcow2 disk was written: a run must write to a throw-away overlay")
		}
		e.noLeftovers(t, vmResult{pids: qemus})
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second); err == nil {
			c.Close()
			t.Errorf("port %d still accepts connections after the VM stopped", port)
		}
		t.Logf("booted, served and stopped in %s", time.Since(start).Round(time.Millisecond))
	})
	t.Run("raw, flags after REF", func(t *testing.T) {
		before := fileSum(t, raw)
		r := e.run(t, "run", "--disk", raw, "--memory", "512", "--name", "rawvm")
		wantBoot(t, r, "1")
		wantGuestSize(t, r.stdout, 1, 512) // one vCPU by default
		if fileSum(t, raw) != before || testdisk.Boots(t, raw) != "" {
			t.Error("the raw disk was written: a run must write to a throw-away overlay")
		}
		if strings.Contains(r.stdout, "second disk") {
			t.Error("a second disk without --cloud-init")
		}
	})
}

func TestDiskPersist(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{})
	before := fileSum(t, raw)
	e := newVMEnv(t, newStore(t))
	state := filepath.Join(dir, "state")
	args := []string{"run", "--disk", raw, "--persist", "--name", "keep", "--state-dir", state, "--memory", "512"}
	wantBoot(t, e.run(t, args...), "1")
	wantBoot(t, e.run(t, args...), "2")
	if fileSum(t, raw) != before {
		t.Error("--persist wrote the disk itself, not its overlay")
	}
	for _, f := range []string{"overlay.qcow2", "efivars.fd", "base.json"} {
		if _, err := os.Stat(filepath.Join(state, "keep", f)); err != nil {
			t.Errorf("state folder: %v", err)
		}
	}
	// A run without --persist starts from the pristine disk again.
	wantBoot(t, e.run(t, "run", "--disk", raw, "--memory", "512"), "1")
	// --persist without a name is refused before anything boots.
	r := e.run(t, "run", "--disk", raw, "--persist", "--state-dir", state)
	if r.code != 125 || !strings.Contains(r.stderr, "--persist needs --name") {
		t.Errorf("--persist without --name: exit %d, %s", r.code, r.stderr)
	}
}

// TestDiskReboot: a guest that reboots comes back within the same run,
// on the same throw-away overlay, and the run ends at its power-off.
func TestDiskReboot(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{RebootOnce: true})
	before := fileSum(t, raw)
	e := newVMEnv(t, newStore(t))
	r := e.run(t, "run", "--disk", raw, "--memory", "512")
	wantBoot(t, r, "2")
	if !strings.Contains(r.stdout, testdisk.BootsPrefix+"1\n") || !strings.Contains(r.stdout, testdisk.RebootingLine) ||
		strings.Index(r.stdout, testdisk.RebootingLine) > strings.Index(r.stdout, testdisk.BootsPrefix+"2\n") {
		t.Errorf("want boots=1, a reboot, then boots=2 in one run\nstdout: %s", r.stdout)
	}
	if fileSum(t, raw) != before {
		t.Error("the disk itself was written")
	}
}

func TestDiskStopTimeout(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{Hang: true})
	e := newVMEnv(t, newStore(t))
	b := e.start(t, "run", "--disk", raw, "--memory", "512", "--stop-timeout", "3s")
	b.waitOutput(t, testdisk.IgnoringStop)
	qemus := childrenOf(b.cmd.Process.Pid)
	b.cmd.Process.Signal(syscall.SIGTERM)
	start := time.Now()
	if code := b.exitCode(t); code != 137 {
		t.Fatalf("exit %d, want 137 (killed)\nstderr: %s", code, b.stderr.String())
	}
	if d := time.Since(start); d < 3*time.Second || d > 30*time.Second {
		t.Errorf("stopped %s after SIGTERM; want the 3 s stop timeout", d)
	}
	for _, want := range []string{"power button", "did not power off within 3s"} {
		if !strings.Contains(b.stderr.String(), want) {
			t.Errorf("stderr lacks %q: %s", want, b.stderr.String())
		}
	}
	e.noLeftovers(t, vmResult{pids: qemus})
}

func TestDiskKilledCwrun(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{Hang: true})
	e := newVMEnv(t, newStore(t))
	b := e.start(t, "run", "--disk", raw, "--memory", "512", "--name", "doomed")
	// Killed as soon as QEMU runs: its run folder then stays behind.
	sock := filepath.Join(e.rtDir, "cwrun", "doomed", "qmp.sock")
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("QEMU did not start\nstderr: %s", b.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	qemus := childrenOf(b.cmd.Process.Pid)
	if len(qemus) == 0 {
		t.Fatal("no QEMU child")
	}
	b.cmd.Process.Kill()
	<-b.done
	time.Sleep(time.Second) // the parent-death signal is asynchronous
	for _, pid := range qemus {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(st), ") Z ") {
			t.Errorf("QEMU %d outlived the SIGKILLed cwrun", pid)
		}
	}
	if _, err := os.Stat(filepath.Dir(sock)); err != nil {
		t.Fatalf("the killed run's folder: %v; want it left for cleanup", err)
	}
	r := e.run(t, "cleanup")
	if r.code != 0 {
		t.Fatalf("cleanup: exit %d: %s", r.code, r.stderr)
	}
	// e.run checked that the run folder is gone.
}

// rawManifest is a manifest pushed as given.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.b, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mt, nil }

// pushManifest pushes a manifest to host/repo, under tag or, when tag
// is empty, by digest only; it returns the manifest's descriptor.
func pushManifest(t *testing.T, host, repo, tag string, m map[string]any) map[string]any {
	t.Helper()
	const mt = "application/vnd.oci.image.manifest.v1+json"
	b, _ := json.Marshal(m)
	sum := sha256.Sum256(b)
	dg := fmt.Sprintf("sha256:%x", sum)
	at := "@" + dg
	if tag != "" {
		at = ":" + tag
	}
	ref, err := name.ParseReference(host+"/"+repo+at, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Put(ref, rawManifest{b, mt}); err != nil {
		t.Fatal(err)
	}
	return map[string]any{"mediaType": mt, "digest": dg, "size": len(b)}
}

// pushBlobs uploads blobs to host/repo and returns their descriptors.
func pushBlob(t *testing.T, host, repo string, b []byte, mt types.MediaType) map[string]any {
	t.Helper()
	r, err := name.NewRepository(host+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	l := static.NewLayer(b, mt)
	if err := remote.WriteLayer(r, l); err != nil {
		t.Fatal(err)
	}
	d, _ := l.Digest()
	return map[string]any{"mediaType": string(mt), "digest": d.String(), "size": len(b)}
}

const testDiskArtifactType = "application/vnd.cwrun.test.disk.v1"

// pushDiskArtifact pushes disk, zstd-compressed, as an OCI 1.1 artifact
// (empty config, one layer named by its title) to host/repo, under tag
// (or by digest only) and, when subject is set, referring to it.
func pushDiskArtifact(t *testing.T, host, repo, tag, disk string, subject map[string]any) {
	t.Helper()
	plain, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	zw, _ := zstd.NewWriter(&z)
	zw.Write(plain)
	zw.Close()
	layer := pushBlob(t, host, repo, z.Bytes(), "application/zstd")
	layer["annotations"] = map[string]string{"org.opencontainers.image.title": filepath.Base(disk) + ".zst"}
	m := map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"artifactType":  testDiskArtifactType,
		"config":        pushBlob(t, host, repo, []byte("{}"), "application/vnd.oci.empty.v1+json"),
		"layers":        []any{layer},
	}
	if subject != nil {
		m["subject"] = subject
	}
	pushManifest(t, host, repo, tag, m)
}

// blobCounter counts the registry's blob downloads (GET .../blobs/...).
type blobCounter struct {
	h  http.Handler
	mu sync.Mutex
	n  int
}

func (c *blobCounter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
		c.mu.Lock()
		c.n++
		c.mu.Unlock()
	}
	c.h.ServeHTTP(w, r)
}

func (c *blobCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func TestDiskFromRegistry(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{})
	qcow := testdisk.QCOW2(t, raw, dir)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// go-containerregistry's registry serves the referrers API.
	blobs := &blobCounter{h: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	srv := &http.Server{Handler: blobs}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	host := ln.Addr().String()
	e := newVMEnv(t, newStore(t))
	cache := filepath.Join(dir, "cache")
	e.extra = []string{"XDG_CACHE_HOME=" + cache}

	t.Run("by tag", func(t *testing.T) {
		pushDiskArtifact(t, host, "disks/testdisk", "v1", qcow, nil)
		r := e.run(t, "--tls-verify=false", "run", "--disk", host+"/disks/testdisk:v1", "--memory", "512")
		wantBoot(t, r, "1")
		// The pulled disk is in the cache, as pushed, and the boot did
		// not write it.
		var cached []string
		filepath.Walk(cache, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.Mode().IsRegular() && fi.Size() > 1<<20 {
				cached = append(cached, p)
			}
			return nil
		})
		if len(cached) != 1 {
			t.Fatalf("cache holds %v, want one disk", cached)
		}
		if fileSum(t, cached[0]) != fileSum(t, qcow) {
			t.Error("the cached disk differs from the pushed one (or the boot wrote it)")
		}
	})
	t.Run("referrer of an image", func(t *testing.T) {
		cfg := pushBlob(t, host, "apps/web", []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`),
			"application/vnd.oci.image.config.v1+json")
		subject := pushManifest(t, host, "apps/web", "v1", map[string]any{
			"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": []any{},
		})
		pushDiskArtifact(t, host, "apps/web", "", qcow, subject) // untagged: found through the referrers API only
		before := blobs.count()
		r := e.run(t, "--tls-verify=false", "run", "--disk", "--referrer-of", host+"/apps/web:v1", "--artifact-type", testDiskArtifactType, "--memory", "512")
		wantBoot(t, r, "1")
		// The same disk (same layer digest) was cached by the first run.
		if n := blobs.count() - before; n > 1 {
			t.Errorf("%d blob downloads for a disk already in the cache; want at most the config", n)
		}
	})
}

// TestDiskConsoleTerminal types on the guest's serial console through
// a terminal, then stops the VM with Ctrl-]: the guest sees the ACPI
// power button, shuts down, and cwrun gives the terminal back as it was.
func TestDiskConsoleTerminal(t *testing.T) {
	dir := t.TempDir()
	raw := needDiskVM(t, dir, testdisk.Options{Interactive: true})
	e := newVMEnv(t, newStore(t))
	master, slave := openTestPTY(t, 24, 80)
	cmd := e.command("run", "--disk", raw, "--memory", "512")
	var stderr syncbuf.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
		}
	})
	var out syncbuf.Buffer
	go io.Copy(&out, master) //nolint:errcheck // ends when the pty closes
	waitFor := func(what string) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Minute)
		for !strings.Contains(out.String(), what) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q on the terminal\nterminal: %q\nstderr: %s", what, out.String(), stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor(testdisk.AskLine)
	if tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil || tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != 0 {
		t.Errorf("the terminal is not raw while the console runs: lflag %#x, %v", tio.Lflag, err)
	}
	master.Write([]byte("hello-vm\r"))
	waitFor(testdisk.GotPrefix + "hello-vm")
	waitFor(testdisk.WaitingLine)
	master.Write([]byte{0x1d}) // Ctrl-]
	waitFor(testdisk.PressedLine)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cwrun: %v; want exit 0 after a clean shutdown\nstderr: %s", err, stderr.String())
		}
	case <-time.After(time.Minute):
		t.Fatalf("cwrun did not end after the guest's shutdown\nstderr: %s", stderr.String())
	}
	for _, want := range []string{"Ctrl-] stops the VM", "Ctrl-]: pressing the VM's power button"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q: %s", want, stderr.String())
		}
	}
	if tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil || tio.Lflag&(unix.ECHO|unix.ICANON|unix.ISIG) != unix.ECHO|unix.ICANON|unix.ISIG {
		t.Errorf("cwrun did not restore its terminal: lflag %#x, %v", tio.Lflag, err)
	}
	e.noLeftovers(t, vmResult{})
}
