package launcher

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/launcher/vm"
)

func needProgs(t *testing.T, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (hack/deps.sh installs it)", p)
		}
	}
}

func TestDiskFormat(t *testing.T) {
	needProgs(t, "qemu-img")
	dir := t.TempDir()
	raw := filepath.Join(dir, "a.raw")
	os.WriteFile(raw, make([]byte, 1<<20), 0o644)
	q := filepath.Join(dir, "a.qcow2")
	withBacking := filepath.Join(dir, "b.qcow2")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", q, "1M"},
		{"create", "-q", "-f", "qcow2", "-F", "raw", "-b", raw, withBacking},
	} {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v: %s", args, err, out)
		}
	}
	zst := filepath.Join(dir, "a.raw.zst")
	os.WriteFile(zst, []byte("\x28\xb5\x2f\xfd rest"), 0o644)
	dataFile := filepath.Join(dir, "data.qcow2")
	// A qcow2 v3 header with the external data file bit, by hand:
	// qemu-img would want the data file to exist.
	h := make([]byte, 104)
	copy(h, "QFI\xfb\x00\x00\x00\x03")
	h[79] = 1 << 2
	os.WriteFile(dataFile, h, 0o644)

	for _, c := range []struct {
		path, declared string
		untrusted      bool
		want, errPart  string
	}{
		{raw, "", false, "raw", ""},
		{raw, "raw", true, "raw", ""},
		{q, "", true, "qcow2", ""},
		{q, "qcow2", true, "qcow2", ""},
		{q, "raw", false, "", "declared raw, but it is a qcow2"},
		{raw, "qcow2", false, "", "no qcow2 header"},
		{raw, "vmdk", false, "", "unknown format"},
		{zst, "", false, "", "zstd-compressed"},
		{withBacking, "", false, "qcow2", ""}, // the user's own file
		{withBacking, "", true, "", "backing file"},
		{dataFile, "", true, "", "external data file"},
	} {
		got, err := diskFormat(c.path, c.declared, c.untrusted)
		if c.errPart != "" {
			if err == nil || !strings.Contains(err.Error(), c.errPart) {
				t.Errorf("%s (%q, untrusted %v): err %v, want one saying %q", filepath.Base(c.path), c.declared, c.untrusted, err, c.errPart)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%s (%q, untrusted %v): %q, %v; want %q", filepath.Base(c.path), c.declared, c.untrusted, got, err, c.want)
		}
	}
}

func TestBuildSeed(t *testing.T) {
	needProgs(t, "mkfs.vfat", "mcopy", "mtype", "mlabel")
	dir := t.TempDir()
	ci := filepath.Join(dir, "ci")
	os.Mkdir(ci, 0o755)
	if err := BuildSeed(context.Background(), ci, filepath.Join(dir, "x.img"), "id"); err == nil || !strings.Contains(err.Error(), "no user-data") {
		t.Fatalf("a folder without user-data: %v", err)
	}
	os.WriteFile(filepath.Join(ci, "user-data"), []byte("#cloud-config\nhostname: cwtest\n"), 0o644)
	os.WriteFile(filepath.Join(ci, "network-config"), []byte("version: 2\n"), 0o644)
	os.WriteFile(filepath.Join(ci, "unrelated"), []byte("x"), 0o644)
	seed := filepath.Join(dir, "seed.img")
	if err := BuildSeed(context.Background(), ci, seed, "cwrun-web"); err != nil {
		t.Fatal(err)
	}
	mt := func(args ...string) string {
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), "MTOOLS_SKIP_CHECK=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, out)
		}
		return string(out)
	}
	for name, want := range map[string]string{
		"user-data":      "#cloud-config\nhostname: cwtest\n",
		"network-config": "version: 2\n",
		"meta-data":      "instance-id: cwrun-web\n",
	} {
		if got := mt("mtype", "-i", seed, "::"+name); got != want {
			t.Errorf("%s in the seed: %q, want %q", name, got, want)
		}
	}
	if out := mt("mdir", "-i", seed, "-b", "::"); strings.Contains(out, "unrelated") {
		t.Errorf("a file other than the seed's was carried: %s", out)
	}
	if out := mt("mlabel", "-s", "-i", seed, "::"); !strings.Contains(strings.ToLower(out), "cidata") {
		t.Errorf("volume label: %q, want cidata", out)
	}
	// A given meta-data is carried as it is.
	os.WriteFile(filepath.Join(ci, "meta-data"), []byte("instance-id: mine\n"), 0o644)
	if err := BuildSeed(context.Background(), ci, seed, "cwrun-web"); err != nil {
		t.Fatal(err)
	}
	if got := mt("mtype", "-i", seed, "::meta-data"); got != "instance-id: mine\n" {
		t.Errorf("meta-data: %q", got)
	}
}

func TestOpenState(t *testing.T) {
	needProgs(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "disk.raw")
	os.WriteFile(base, make([]byte, 1<<20), 0o644)
	vars := filepath.Join(dir, "vars.fd")
	os.WriteFile(vars, []byte("fresh vars"), 0o600)
	sd := filepath.Join(dir, "state", "web")
	ctx := context.Background()

	st, err := openState(ctx, sd, base, "raw", "", vars)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", st.overlay).Output()
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Format  string `json:"format"`
		Backing string `json:"backing-filename"`
		BFormat string `json:"backing-filename-format"`
	}
	json.Unmarshal(out, &info)
	if info.Format != "qcow2" || info.Backing != base || info.BFormat != "raw" {
		t.Fatalf("overlay %+v: want a qcow2 over %s (raw)", info, base)
	}
	if b, _ := os.ReadFile(st.vars); string(b) != "fresh vars" {
		t.Fatalf("variables %q", b)
	}
	// The guest's writes and the firmware's survive the next open.
	os.WriteFile(st.overlay, append(mustRead(t, st.overlay), "guest wrote"...), 0o600)
	os.WriteFile(st.vars, []byte("guest's boot entries"), 0o600)
	again, err := openState(ctx, sd, base, "raw", "", vars)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(mustRead(t, again.overlay), []byte("guest wrote")) || string(mustRead(t, again.vars)) != "guest's boot entries" {
		t.Fatal("the second open replaced the saved state")
	}
	// Another base under the same name is refused.
	other := filepath.Join(dir, "other.raw")
	os.WriteFile(other, make([]byte, 2<<20), 0o644)
	if _, err := openState(ctx, sd, other, "raw", "", vars); err == nil || !strings.Contains(err.Error(), "another disk") {
		t.Fatalf("another base: %v", err)
	}
	// So is the same file changed since (size or time).
	os.WriteFile(base, make([]byte, 3<<20), 0o644)
	if _, err := openState(ctx, sd, base, "raw", "", vars); err == nil {
		t.Fatal("a changed base was accepted")
	}
	// A pulled disk is tied to its digest, not to the file's time.
	sd2 := filepath.Join(dir, "state", "pulled")
	if _, err := openState(ctx, sd2, base, "raw", "sha256:aa", vars); err != nil {
		t.Fatal(err)
	}
	now := time.Now().Add(time.Hour)
	os.Chtimes(base, now, now)
	if _, err := openState(ctx, sd2, base, "raw", "sha256:aa", vars); err != nil {
		t.Fatalf("a re-pulled disk of the same digest: %v", err)
	}
	if _, err := openState(ctx, sd2, base, "raw", "sha256:bb", vars); err == nil {
		t.Fatal("another digest was accepted")
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRelayInput(t *testing.T) {
	for _, c := range []struct {
		terminal bool
		in, want string
		escapes  int
	}{
		{true, "ab\x1dcd\x1d", "abcd", 2},
		{true, "plain", "plain", 0},
		{false, "ab\x1dcd", "ab\x1dcd", 0}, // piped bytes pass unchanged
	} {
		var out bytes.Buffer
		esc := make(chan struct{}, 4)
		relayInput(&out, strings.NewReader(c.in), c.terminal, esc)
		if out.String() != c.want || len(esc) != c.escapes {
			t.Errorf("terminal %v, %q: relayed %q with %d escapes; want %q, %d", c.terminal, c.in, out.String(), len(esc), c.want, c.escapes)
		}
	}
}

// fakeVMM stands in for QEMU: it serves the console socket, prints a
// line, and powers off at the power button unless told to ignore it.
type fakeVMM struct {
	ignorePowerdown bool
	exitAfter       time.Duration // power off by itself; 0: never
	specs           chan vm.Spec
}

type fakeMachine struct {
	vmm       *fakeVMM
	done      chan struct{}
	once      sync.Once
	ln        net.Listener
	powerdown int
	mu        sync.Mutex
	killed    bool
}

func (f *fakeVMM) Start(ctx context.Context, spec vm.Spec) (vm.Machine, error) {
	if f.specs != nil {
		f.specs <- spec
	}
	ln, err := net.Listen("unix", spec.ConsoleSocket)
	if err != nil {
		return nil, err
	}
	m := &fakeMachine{vmm: f, done: make(chan struct{}), ln: ln}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("guest says hello\r\n"))
		go func() {
			buf := make([]byte, 64)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					c.Write([]byte("echo:" + string(buf[:n]) + "\r\n"))
				}
				if err != nil {
					return
				}
			}
		}()
		<-m.done
		c.Close()
	}()
	if f.exitAfter > 0 {
		time.AfterFunc(f.exitAfter, m.off)
	}
	return m, nil
}

func (m *fakeMachine) off() {
	m.once.Do(func() {
		m.ln.Close()
		close(m.done)
	})
}
func (m *fakeMachine) Wait() error                        { <-m.done; return nil }
func (m *fakeMachine) Shutdown(ctx context.Context) error { m.off(); return nil }
func (m *fakeMachine) Kill() error {
	m.mu.Lock()
	m.killed = true
	m.mu.Unlock()
	m.off()
	return nil
}
func (m *fakeMachine) Pid() int { return 0 }
func (m *fakeMachine) Powerdown(ctx context.Context) error {
	m.mu.Lock()
	m.powerdown++
	m.mu.Unlock()
	if !m.vmm.ignorePowerdown {
		time.AfterFunc(50*time.Millisecond, m.off)
	}
	return nil
}

func TestRunDiskConsoleAndStop(t *testing.T) {
	if _, err := os.Stat("/usr/share/OVMF"); err != nil {
		t.Skip("needs OVMF (Debian package ovmf)")
	}
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	os.WriteFile(disk, make([]byte, 1<<20), 0o644)
	before := mustRead(t, disk)
	for _, c := range []struct {
		name     string
		vmm      *fakeVMM
		signal   bool
		input    string
		wantCode int
		wantOut  []string
		wantWarn string
	}{
		{"powers off by itself", &fakeVMM{exitAfter: 300 * time.Millisecond}, false, "typed", 0,
			[]string{"guest says hello", "echo:typed"}, ""},
		{"stops at the power button", &fakeVMM{}, true, "", 0, []string{"guest says hello"}, "pressing the VM's power button"},
		{"killed when it ignores the button", &fakeVMM{ignorePowerdown: true}, true, "", 137, nil, "did not power off within"},
	} {
		t.Run(c.name, func(t *testing.T) {
			runDir := filepath.Join(dir, "run-"+strings.ReplaceAll(c.name, " ", "-"))
			var out, warn syncbuf.Buffer
			sigs := make(chan os.Signal, 1)
			c.vmm.specs = make(chan vm.Spec, 1)
			var stdin *strings.Reader
			opts := DiskOptions{
				Disk: disk, Accel: vm.AccelTCG, VMM: c.vmm, RunDir: runDir, Name: "web",
				Stdout: &out, Warn: &warn, Signals: sigs, StopTimeout: 500 * time.Millisecond,
			}
			if c.input != "" {
				stdin = strings.NewReader(c.input)
				opts.Stdin = stdin
			}
			if c.signal {
				go func() {
					for !strings.Contains(out.String(), "hello") {
						time.Sleep(10 * time.Millisecond)
					}
					sigs <- syscall.SIGTERM
				}()
			}
			start := time.Now()
			code, err := RunDisk(context.Background(), nil, opts)
			if err != nil || code != c.wantCode {
				t.Fatalf("exit %d, %v; want %d (warnings: %s)", code, err, c.wantCode, warn.String())
			}
			if time.Since(start) > 10*time.Second {
				t.Errorf("took %s", time.Since(start))
			}
			for _, w := range c.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("console output %q lacks %q", out.String(), w)
				}
			}
			if !strings.Contains(warn.String(), c.wantWarn) {
				t.Errorf("warnings %q lack %q", warn.String(), c.wantWarn)
			}
			spec := <-c.vmm.specs
			if spec.Firmware == nil || len(spec.Disks) != 1 || !spec.Disks[0].Boot || !spec.Disks[0].Snapshot ||
				spec.Disks[0].Path != disk || spec.Disks[0].Format != "raw" || spec.Network == nil || spec.Kernel != "" {
				t.Errorf("spec %+v: want UEFI, the disk alone as a snapshot boot disk, a user network", spec)
			}
			if ents, _ := os.ReadDir(runDir); len(ents) != 0 {
				t.Errorf("left in the run folder base: %v", ents)
			}
		})
	}
	if !bytes.Equal(mustRead(t, disk), before) {
		t.Error("the disk was written")
	}
}

func TestRunDiskRefusals(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.raw")
	os.WriteFile(disk, make([]byte, 4096), 0o644)
	for _, c := range []struct {
		o    DiskOptions
		want string
	}{
		{DiskOptions{Disk: filepath.Join(dir, "missing")}, "no such file"},
		{DiskOptions{Disk: dir}, "not a regular file"},
		{DiskOptions{Disk: disk, Persist: true}, "--persist needs --name"},
		{DiskOptions{Disk: disk, Network: "none", Publish: []vm.Forward{{HostPort: 1, GuestPort: 2}}}, "-p needs a network"},
	} {
		c.o.VMM = &fakeVMM{}
		c.o.RunDir = filepath.Join(dir, "run")
		_, err := RunDisk(context.Background(), nil, c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want an error saying %q", c.o, err, c.want)
		}
		if errors.Is(err, context.Canceled) {
			t.Fatal(err)
		}
	}
}
