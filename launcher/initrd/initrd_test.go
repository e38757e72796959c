package initrd

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/launcher/kernel"
)

// testKernel fetches Debian's cloud kernel into a cache shared by test
// runs (nothing secret in it); a first run downloads it.
func testKernel(t *testing.T) kernel.Kernel {
	t.Helper()
	if testing.Short() {
		t.Skip("needs Debian's cloud kernel (a ~27 MB download on the first run)")
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skip("needs apt-get to fetch Debian's cloud kernel")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := kernel.Fetcher{CacheDir: filepath.Join(os.TempDir(), "cwrun-test-kernel")}.Fetch(ctx)
	if err != nil {
		t.Fatalf("fetching the guest kernel: %v", err)
	}
	return k
}

func TestResolveOrder(t *testing.T) {
	k := testKernel(t)
	mods, err := Resolve(k.ModulesDir, append(BaseModules(), NetworkModules()...))
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	var names []string
	for i, m := range mods {
		pos[normalise(m.Name)] = i
		names = append(names, m.Name)
	}
	t.Logf("load order: %s", strings.Join(names, " "))
	for _, c := range []struct{ before, after string }{
		{"dm_mod", "dm_crypt"}, {"virtio_ring", "virtio_blk"}, {"virtio", "virtio_blk"},
		{"virtio", "virtio_pci"}, {"virtio_pci_modern_dev", "virtio_pci"}, {"failover", "net_failover"},
		{"net_failover", "virtio_net"},
	} {
		b, okb := pos[c.before]
		a, oka := pos[c.after]
		if !okb || !oka || b >= a {
			t.Errorf("%s (at %d, present %v) must load before %s (at %d, present %v)", c.before, b, okb, c.after, a, oka)
		}
	}
	for _, m := range mods {
		for _, d := range m.Depends {
			if _, ok := pos[d]; ok && pos[d] > pos[normalise(m.Name)] {
				t.Errorf("%s loads before its dependency %s", m.Name, d)
			}
		}
	}
	// Every wanted module is there once, named by its file (dm-crypt, not dm_crypt).
	if len(pos) != len(mods) {
		t.Errorf("duplicates in %v", names)
	}
	if _, ok := pos["dm_crypt"]; !ok || names[pos["dm_crypt"]] != "dm-crypt" {
		t.Errorf("dm-crypt missing or misnamed in %v", names)
	}
}

func TestResolveMissing(t *testing.T) {
	k := testKernel(t)
	_, err := Resolve(k.ModulesDir, ShareModules())
	if err == nil {
		t.Fatal("9p resolved in a kernel built without it")
	}
	if !strings.Contains(err.Error(), "9pnet_virtio") {
		t.Fatalf("error does not name the module: %v", err)
	}
}

func fakeInit(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "init")
	if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBuildDeterministic(t *testing.T) {
	k := testKernel(t)
	init := fakeInit(t, "#!init one")
	a, err := Build(context.Background(), Spec{Init: init, ModulesDir: k.ModulesDir, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(context.Background(), Spec{Init: init, ModulesDir: k.ModulesDir, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ab, _ := os.ReadFile(a)
	bb, _ := os.ReadFile(b)
	if len(ab) == 0 || !bytes.Equal(ab, bb) {
		t.Fatalf("two builds of the same inputs differ (%d vs %d bytes)", len(ab), len(bb))
	}
	if filepath.Base(a) != filepath.Base(b) {
		t.Fatalf("same inputs, different cache names: %s vs %s", a, b)
	}
	c, err := Build(context.Background(), Spec{Init: fakeInit(t, "#!init two"), ModulesDir: k.ModulesDir, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Base(c) == filepath.Base(a) {
		t.Fatalf("a different init gave the same initrd name %s", c)
	}
	t.Logf("initrd %s: %d bytes", filepath.Base(a), len(ab))
}

// TestCPIOWithGNUCpio checks our cpio against GNU cpio: it lists and
// extracts what we wrote, with the right contents and modes.
func TestCPIOWithGNUCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("needs GNU cpio (Debian package cpio)")
	}
	cache := t.TempDir()
	init := fakeInit(t, "#!the init\x00binary")
	p, err := Build(context.Background(), Spec{Init: init, CacheDir: cache})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	list := exec.Command("cpio", "-t", "--quiet")
	list.Stdin = f
	out, err := list.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	got := strings.Fields(string(out))
	want := []string{"dev", "dev/console", "etc", "etc/cwrun-modules", "init", "lib", "lib/modules", "proc", "run", "sys", "sysroot"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("cpio -t lists %v, want %v", got, want)
	}
	// Extract (no device nodes unless root: list them, extract files).
	dst := t.TempDir()
	f.Seek(0, 0)
	ext := exec.Command("cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "init", "etc/cwrun-modules")
	ext.Dir = dst
	ext.Stdin = f
	if out, err := ext.CombinedOutput(); err != nil {
		t.Fatalf("cpio -i: %v: %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dst, "init"))
	if err != nil || string(b) != "#!the init\x00binary" {
		t.Fatalf("extracted init: %q, %v", b, err)
	}
	st, _ := os.Stat(filepath.Join(dst, "init"))
	if st.Mode().Perm() != 0o755 {
		t.Fatalf("init mode %v", st.Mode())
	}
	// gzip variant: same listing through gzip -d.
	pz, err := Build(context.Background(), Spec{Init: init, CacheDir: cache, Gzip: true})
	if err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command("sh", "-c", "gzip -dc < '"+pz+"' | cpio -t --quiet").Output()
	if err != nil || strings.Join(strings.Fields(string(out)), " ") != strings.Join(want, " ") {
		t.Fatalf("gzip initrd lists %q, %v", out, err)
	}
}
