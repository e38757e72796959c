package kernel

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestFetch(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads ~27 MB from Debian's archive")
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		t.Skip("needs apt-get (Debian/Ubuntu host)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	dir := t.TempDir()
	// Two concurrent fetches into an empty cache: both must get the
	// same complete kernel (the lock and the rename make that so).
	var wg sync.WaitGroup
	ks := make([]Kernel, 2)
	errs := make([]error, 2)
	for i := range ks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ks[i], errs[i] = Fetcher{CacheDir: dir}.Fetch(ctx)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("fetch %d: %v", i, err)
		}
	}
	if ks[0] != ks[1] {
		t.Fatalf("concurrent fetches differ: %+v vs %+v", ks[0], ks[1])
	}
	k := ks[0]
	st, err := os.Stat(k.Vmlinuz)
	if err != nil || st.Size() < 1<<20 {
		t.Fatalf("vmlinuz %s: %v (size %v)", k.Vmlinuz, err, st)
	}
	if _, err := os.Stat(filepath.Join(k.ModulesDir, "kernel", "drivers", "md", "dm-crypt.ko")); err != nil {
		t.Fatalf("no dm-crypt module: %v", err)
	}
	if filepath.Base(k.ModulesDir) != k.Version || len(k.Version) < 5 {
		t.Fatalf("version %q, modules %s", k.Version, k.ModulesDir)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".fetch-*"))
	if len(left) != 0 {
		t.Fatalf("temporary folders left: %v", left)
	}
	// A second fetch is served from the cache.
	start := time.Now()
	k2, err := Fetcher{CacheDir: dir}.Fetch(ctx)
	if err != nil || k2 != k {
		t.Fatalf("cached fetch: %+v, %v", k2, err)
	}
	t.Logf("cached fetch took %s", time.Since(start))
}

func TestFetchUnknownPackage(t *testing.T) {
	if _, err := exec.LookPath("apt-cache"); err != nil {
		t.Skip("needs apt-cache")
	}
	_, err := Fetcher{CacheDir: t.TempDir(), Package: "linux-image-no-such-flavour"}.Fetch(context.Background())
	if err == nil {
		t.Fatal("fetching a package that does not exist succeeded")
	}
	t.Log(err)
}

func TestFromPath(t *testing.T) {
	if _, err := FromPath("/nonexistent/vmlinuz", ""); err == nil {
		t.Fatal("FromPath accepted a missing kernel")
	}
	dir := t.TempDir()
	vm := filepath.Join(dir, "vmlinuz")
	os.WriteFile(vm, []byte("x"), 0o644)
	mods := filepath.Join(dir, "6.1.0-test")
	os.Mkdir(mods, 0o755)
	k, err := FromPath(vm, mods)
	if err != nil || k.Version != "6.1.0-test" {
		t.Fatalf("FromPath: %+v, %v", k, err)
	}
}
