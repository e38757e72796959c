package initrd

// End-to-end boots of cwrun-init under QEMU (TCG) with Debian's cloud
// kernel: sealed disks made here with the real cryptsetup (header) and
// AES-XTS (payload), and the real buildah mkcw fixture.

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/aes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/xts"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/cwrun/cwrun/sealed"
)

func need(t *testing.T, progs ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM under QEMU TCG (seconds each)")
	}
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (Debian packages qemu-system-x86, cryptsetup-bin, e2fsprogs, busybox-static)", p)
		}
	}
}

var (
	initOnce sync.Once
	initPath string
	initErr  error
)

// buildInit builds cmd/cwrun-init static, once per test binary.
func buildInit(t *testing.T) string {
	t.Helper()
	initOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cwrun-init-")
		if err != nil {
			initErr = err
			return
		}
		initPath = filepath.Join(dir, "cwrun-init")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initPath, "github.com/cwrun/cwrun/cmd/cwrun-init")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			initErr = fmt.Errorf("building cwrun-init: %v: %s", err, out)
		}
	})
	if initErr != nil {
		t.Fatal(initErr)
	}
	return initPath
}

type testVM struct {
	vmlinuz, initrd string
}

func prepareVM(t *testing.T, network bool) testVM {
	k := testKernel(t)
	mods := BaseModules()
	if network {
		mods = append(mods, NetworkModules()...)
	}
	p, err := Build(context.Background(), Spec{Init: buildInit(t), ModulesDir: k.ModulesDir, Modules: mods, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	return testVM{vmlinuz: k.Vmlinuz, initrd: p}
}

// busyboxRoot is a root file system with a static busybox and the OCI
// image config the workload comes from.
func busyboxRoot(t *testing.T, imageConfig string) string {
	root := t.TempDir()
	for _, d := range []string{"bin", "etc", "tmp", "work"} {
		os.MkdirAll(filepath.Join(root, d), 0o755)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs a static /bin/busybox (Debian package busybox-static): %v", err)
	}
	os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755)
	for _, l := range []string{"sh", "echo", "cat", "id", "sleep", "pwd"} {
		os.Symlink("busybox", filepath.Join(root, "bin", l))
	}
	os.WriteFile(filepath.Join(root, "etc", "passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nworker:x:1000:1000::/work:/bin/sh\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc", "group"), []byte("root:x:0:\nworker:x:1000:\nextra:x:2000:worker\n"), 0o644)
	os.WriteFile(filepath.Join(root, ".krun_config.json"), []byte(imageConfig), 0o644)
	return root
}

const helloConfig = `{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","FOO=bar"],` +
	`"Cmd":["/bin/sh","-c","echo hello; echo FOO=$FOO; echo PWD=$(pwd); echo ID=$(id -u):$(id -g):$(id -G); echo err >&2; exit 7"],` +
	`"WorkingDir":"/work","User":"worker"}}`

// openConfig is helloConfig sealed with overrides allowed: the label
// inside the encrypted disk is what the guest obeys.
var openConfig = strings.Replace(helloConfig, `"User":"worker"`, `"User":"worker","Labels":{"`+sealed.LabelAllowOverrides+`":"true"}`, 1)

// sealDisk makes disk.img the way cwrun and buildah do: a LUKS header
// by cryptsetup itself, the ext4 payload encrypted with the volume key
// cryptsetup reports (aes-xts-plain64, IV = 512-byte sector number),
// then the krun footer.
func sealDisk(t *testing.T, root string, luksVersion, sectorSize int, pass string, cfg sealed.Config) string {
	need(t, "cryptsetup", "mkfs.ext4")
	dir := t.TempDir()
	payload := filepath.Join(dir, "payload.ext4")
	run(t, "mkfs.ext4", "-q", "-F", "-b", "4096", "-d", root, payload, "16M")
	passFile := filepath.Join(dir, "pass")
	os.WriteFile(passFile, []byte(pass), 0o600)
	disk := filepath.Join(dir, "disk.img")
	const offset = 16 << 20
	plain, err := os.ReadFile(payload)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(disk, offset+int64(len(plain)))
	args := []string{"luksFormat", "--batch-mode", "--type", fmt.Sprintf("luks%d", luksVersion),
		"--cipher", "aes-xts-plain64", "--key-size", "512", "--hash", "sha256",
		"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--offset", fmt.Sprint(offset / 512),
		"--key-file", passFile}
	if luksVersion == 2 {
		args = append(args, "--sector-size", fmt.Sprint(sectorSize))
	}
	run(t, "cryptsetup", append(args, disk)...)
	dump := run(t, "cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file", passFile, disk)
	key := volumeKey(t, dump)

	c, err := xts.NewCipher(aes.NewCipher, key)
	if err != nil {
		t.Fatal(err)
	}
	enc := make([]byte, len(plain))
	for off := 0; off < len(plain); off += sectorSize {
		c.Encrypt(enc[off:off+sectorSize], plain[off:off+sectorSize], uint64(off/512))
	}
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(enc, offset); err != nil {
		t.Fatal(err)
	}
	js, _ := cfg.Marshal()
	end := int64(offset + len(enc))
	if _, err := f.WriteAt(sealed.Footer(end, js), end); err != nil {
		t.Fatal(err)
	}
	return disk
}

// padDisk rounds the file up to whole 512-byte sectors with zeros, as
// a qcow2 overlay's virtual size does.
func padDisk(t *testing.T, disk string) {
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, (st.Size()+511)&^511); err != nil {
		t.Fatal(err)
	}
}

var hexPair = regexp.MustCompile(`\b[0-9a-f]{2}\b`)

func volumeKey(t *testing.T, dump string) []byte {
	_, rest, ok := strings.Cut(dump, "MK dump:")
	if !ok {
		t.Fatalf("no volume key in cryptsetup's dump:\n%s", dump)
	}
	var hx strings.Builder
	for i, line := range strings.Split(rest, "\n") {
		if i > 0 && !strings.HasPrefix(line, "\t") {
			break
		}
		hx.WriteString(strings.Join(hexPair.FindAllString(line, -1), ""))
	}
	key, err := hex.DecodeString(hx.String())
	if err != nil || len(key) != 64 {
		t.Fatalf("volume key %q: %v", hx.String(), err)
	}
	return key
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// result is what a boot produced.
type result struct {
	msgs           []proto.Message
	stdout, stderr string
	console        string
	firstOutput    time.Duration // QEMU start to the first stdout bytes
	total          time.Duration // QEMU start to QEMU's exit
}

func (r result) last() proto.Message {
	if len(r.msgs) == 0 {
		return proto.Message{}
	}
	return r.msgs[len(r.msgs)-1]
}

func (r result) stages() string {
	var b strings.Builder
	prev := int64(0)
	for _, m := range r.msgs {
		if m.Type == proto.TypeStage {
			fmt.Fprintf(&b, "%s=%dms(+%d) ", m.Stage, m.MS, m.MS-prev)
			prev = m.MS
		}
	}
	return b.String()
}

// boot runs one VM to its end, speaking the control protocol as the
// launcher does.
func boot(t *testing.T, vm testVM, disk string, cfg proto.Config, network bool, timeout time.Duration) result {
	t.Helper()
	return bootWith(t, vm, disk, cfg, network, timeout, nil)
}

// bootWith is boot with a hook called on every control message.
func bootWith(t *testing.T, vm testVM, disk string, cfg proto.Config, network bool, timeout time.Duration, hook func(*proto.Conn, proto.Message)) result {
	t.Helper()
	need(t, "qemu-system-x86_64")
	dir, err := os.MkdirTemp("", "cwrun-boot-") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	args := []string{"-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", vm.vmlinuz, "-initrd", vm.initrd, "-append", "console=ttyS0 quiet panic=-1",
		"-drive", "file=" + disk + ",format=raw,if=virtio,snapshot=on",
		"-device", "virtio-serial-pci"}
	ports := []string{proto.PortControl, proto.PortStdout, proto.PortStderr}
	for i, name := range ports {
		args = append(args, "-chardev", fmt.Sprintf("socket,id=p%d,path=%s,server=on,wait=off", i, filepath.Join(dir, name)),
			"-device", fmt.Sprintf("virtserialport,chardev=p%d,name=%s", i, name))
	}
	if network {
		args = append(args, "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", args...)
	var console syncbuf.Buffer
	qemu.Stdout, qemu.Stderr = &console, &console
	start := time.Now()
	if err := qemu.Start(); err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, len(ports))
	for i, name := range ports {
		p := filepath.Join(dir, name)
		for {
			c, err := net.Dial("unix", p)
			if err == nil {
				conns[i] = c
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("QEMU never listened on %s: %s", p, console.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
		defer conns[i].Close()
	}
	var r result
	var wg sync.WaitGroup
	var firstOnce sync.Once
	outs := make([]string, 2)
	for i := 1; i <= 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b strings.Builder
			buf := make([]byte, 4096)
			for {
				n, err := conns[i].Read(buf)
				if n > 0 && i == 1 {
					firstOnce.Do(func() { r.firstOutput = time.Since(start) })
				}
				b.Write(buf[:n])
				if err != nil {
					break
				}
			}
			outs[i-1] = b.String()
		}()
	}
	ctl := proto.NewConn(conns[0])
	for {
		m, err := ctl.Recv()
		if err != nil {
			break // QEMU exited: the port's socket closed
		}
		r.msgs = append(r.msgs, m)
		if hook != nil {
			hook(ctl, m)
		}
		if m.Type == proto.TypeReady {
			c := cfg
			if err := ctl.Send(proto.Message{Type: proto.TypeConfig, Config: &c}); err != nil {
				t.Fatal(err)
			}
		}
		if m.Type == proto.TypeExit || m.Type == proto.TypeError {
			break
		}
	}
	err = qemu.Wait()
	r.total = time.Since(start)
	for _, c := range conns {
		c.Close()
	}
	wg.Wait()
	r.stdout, r.stderr, r.console = outs[0], outs[1], console.String()
	if ctx.Err() != nil {
		t.Fatalf("QEMU did not power off within %s; console:\n%s", timeout, r.console)
	}
	if err != nil {
		t.Fatalf("QEMU: %v; console:\n%s", err, r.console)
	}
	return r
}

func TestBootSealedDisk(t *testing.T) {
	need(t, "qemu-system-x86_64", "cryptsetup", "mkfs.ext4")
	vm := prepareVM(t, false)
	root := busyboxRoot(t, helloConfig)
	// An unpadded disk.img hides its footer from the guest (block
	// devices end on 512-byte boundaries); a padded one shows it.
	for _, c := range []struct {
		name          string
		luks, sectors int
		pad           bool
	}{{"luks1", 1, 512, false}, {"luks2-4k-padded", 2, 4096, true}, {"luks2-512", 2, 512, false}} {
		t.Run(c.name, func(t *testing.T) {
			disk := sealDisk(t, root, c.luks, c.sectors, "test-passphrase", sealed.Config{TEE: sealed.TEESample, CPUs: 1, RAMMiB: 512})
			if c.pad {
				padDisk(t, disk)
			}
			r := boot(t, vm, disk, proto.Config{Passphrase: "test-passphrase", Timings: true}, false, 90*time.Second)
			last := r.last()
			if last.Type != proto.TypeExit || last.Code == nil || *last.Code != 7 {
				t.Fatalf("last message %+v, want exit code 7; console:\n%s", last, r.console)
			}
			for _, want := range []string{"hello\n", "FOO=bar\n", "PWD=/work\n", "ID=1000:1000:1000 2000\n"} {
				if !strings.Contains(r.stdout, want) {
					t.Errorf("stdout %q lacks %q", r.stdout, want)
				}
			}
			if r.stderr != "err\n" {
				t.Errorf("stderr %q, want \"err\\n\"", r.stderr)
			}
			t.Logf("first output after %s, powered off after %s; guest stages: %s", r.firstOutput.Round(time.Millisecond), r.total.Round(time.Millisecond), r.stages())
		})
	}
}

func TestBootWrongPassphrase(t *testing.T) {
	need(t, "qemu-system-x86_64", "cryptsetup", "mkfs.ext4")
	vm := prepareVM(t, false)
	disk := sealDisk(t, busyboxRoot(t, helloConfig), 2, 4096, "right", sealed.Config{TEE: sealed.TEESample})
	r := boot(t, vm, disk, proto.Config{Passphrase: "wrong"}, false, 90*time.Second)
	last := r.last()
	if last.Type != proto.TypeError || last.Stage != proto.StageUnlock || last.Message != "wrong passphrase for the sealed disk" {
		t.Fatalf("last message %+v, want the unlock error; console:\n%s", last, r.console)
	}
	if r.stdout != "" {
		t.Fatalf("a workload ran: %q", r.stdout)
	}
}

func TestBootOverridesAndNetwork(t *testing.T) {
	need(t, "qemu-system-x86_64", "cryptsetup", "mkfs.ext4")
	vm := prepareVM(t, true)
	root := busyboxRoot(t, openConfig)
	os.Symlink("busybox", filepath.Join(root, "bin", "ip"))
	allow := sealed.Config{TEE: sealed.TEESample, Cwrun: &sealed.CwrunConfig{AllowOverrides: true}}
	cfg := proto.Config{Passphrase: "p", Network: true, Env: []string{"FOO=over"}, User: "0",
		Args: []string{"/bin/sh", "-c", "echo FOO=$FOO; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; ip route | grep default; cat /etc/resolv.conf; kill -TERM $$"}}
	disk := sealDisk(t, root, 2, 4096, "p", allow)
	padDisk(t, disk) // the footer is read even on a padded disk
	r := boot(t, vm, disk, cfg, true, 90*time.Second)
	last := r.last()
	if last.Type != proto.TypeExit || last.Signal != 15 {
		t.Fatalf("last message %+v, want death by signal 15; console:\n%s", last, r.console)
	}
	for _, want := range []string{"FOO=over\n", "inet 10.0.2.15/24", "default via 10.0.2.2", "nameserver 10.0.2.3"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("stdout %q lacks %q", r.stdout, want)
		}
	}
	// The same overrides on a disk sealed without the label, whose
	// host-writable footer was flipped to allow them: refused, because
	// only the encrypted config decides.
	closed := busyboxRoot(t, helloConfig)
	os.Symlink("busybox", filepath.Join(closed, "bin", "ip"))
	disk = sealDisk(t, closed, 2, 4096, "p", allow)
	padDisk(t, disk)
	r = boot(t, vm, disk, cfg, true, 90*time.Second)
	if last := r.last(); last.Type != proto.TypeError || !strings.Contains(last.Message, "does not allow overrides") {
		t.Fatalf("last message %+v, want a refusal; console:\n%s", last, r.console)
	}
}

// TestBootSignal checks that a host "signal" message reaches the workload.
func TestBootSignal(t *testing.T) {
	need(t, "qemu-system-x86_64", "cryptsetup", "mkfs.ext4")
	vm := prepareVM(t, false)
	conf := `{"config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh","-c","trap 'echo got TERM; exit 3' TERM; echo waiting; while true; do sleep 0.1; done"]}}`
	disk := sealDisk(t, busyboxRoot(t, conf), 2, 4096, "p", sealed.Config{TEE: sealed.TEESample})
	r := bootSignal(t, vm, disk)
	if last := r.last(); last.Type != proto.TypeExit || last.Code == nil || *last.Code != 3 {
		t.Fatalf("last message %+v, want exit 3 after the trap; stdout %q console:\n%s", last, r.stdout, r.console)
	}
	if !strings.Contains(r.stdout, "got TERM") {
		t.Fatalf("stdout %q", r.stdout)
	}
}

// bootSignal is boot with a SIGTERM sent once the workload printed.
func bootSignal(t *testing.T, vm testVM, disk string) result {
	return bootWith(t, vm, disk, proto.Config{Passphrase: "p"}, false, 90*time.Second, func(ctl *proto.Conn, m proto.Message) {
		if m.Type == proto.TypeStarted {
			go func() {
				time.Sleep(1500 * time.Millisecond)
				ctl.Send(proto.Message{Type: proto.TypeSignal, Signal: 15})
			}()
		}
	})
}

// TestBootMkcwFixture boots the disk that a real `buildah mkcw` sealed.
func TestBootMkcwFixture(t *testing.T) {
	need(t, "qemu-system-x86_64")
	fixture := filepath.Join("..", "..", "..", "shared", "fixtures", "mkcw-busybox.oci.tar")
	if _, err := os.Stat(fixture); err != nil {
		t.Skipf("fixture %s absent: %v", fixture, err)
	}
	vm := prepareVM(t, false)
	disk := extractDisk(t, fixture)
	r := boot(t, vm, disk, proto.Config{Passphrase: "fixture-passphrase-0123456789", Timings: true}, false, 10*time.Minute)
	last := r.last()
	if last.Type != proto.TypeExit || last.Code == nil || *last.Code != 7 {
		t.Fatalf("last message %+v, want exit 7; console:\n%s", last, r.console)
	}
	if !strings.Contains(r.stdout, "sealed-hello from guest") || !strings.Contains(r.stdout, "env FOO=bar") {
		t.Fatalf("stdout %q", r.stdout)
	}
	t.Logf("mkcw fixture: first output after %s, off after %s; stages %s", r.firstOutput.Round(time.Millisecond), r.total.Round(time.Millisecond), r.stages())
}

// extractDisk pulls disk.img out of the OCI archive's one gzip layer.
func extractDisk(t *testing.T, archive string) string {
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	blobs := map[string][]byte{}
	var index []byte
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		if h.Name == "index.json" {
			index = b
		} else if strings.HasPrefix(h.Name, "blobs/sha256/") {
			blobs[strings.TrimPrefix(h.Name, "blobs/sha256/")] = b
		}
	}
	var desc struct {
		Manifests []struct{ Digest string } `json:"manifests"`
		Layers    []struct{ Digest string } `json:"layers"`
	}
	if err := json.Unmarshal(index, &desc); err != nil || len(desc.Manifests) != 1 {
		t.Fatalf("index.json: %v", err)
	}
	if err := json.Unmarshal(blobs[strings.TrimPrefix(desc.Manifests[0].Digest, "sha256:")], &desc); err != nil || len(desc.Layers) != 1 {
		t.Fatalf("manifest: %v (%d layers)", err, len(desc.Layers))
	}
	zr, err := gzip.NewReader(strings.NewReader(string(blobs[strings.TrimPrefix(desc.Layers[0].Digest, "sha256:")])))
	if err != nil {
		t.Fatal(err)
	}
	lr := tar.NewReader(zr)
	for {
		h, err := lr.Next()
		if err != nil {
			t.Fatalf("no disk.img in the layer: %v", err)
		}
		if strings.TrimPrefix(h.Name, "./") == sealed.DiskPath {
			out := filepath.Join(t.TempDir(), "disk.img")
			w, _ := os.Create(out)
			if _, err := io.Copy(w, lr); err != nil {
				t.Fatal(err)
			}
			w.Close()
			return out
		}
	}
}
