// Package kernel finds the guest kernel cwrun boots: a user-given one,
// or Debian's cloud kernel fetched with apt-get download and unpacked
// with dpkg-deb into cwrun's cache (no install, no root needed beyond
// what apt-get download needs).
//
// It only reads and unpacks packages; it never installs anything or
// touches the host's boot files.
package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultPackage is the metapackage whose current kernel cwrun boots.
const DefaultPackage = "linux-image-cloud-amd64"

// Kernel is a guest kernel on the host.
type Kernel struct {
	Vmlinuz string
	// ModulesDir is lib/modules/<version>; empty when the user gave a
	// kernel without modules (then the initrd carries none).
	ModulesDir string
	Version    string // uname -r, e.g. 6.1.0-56-cloud-amd64
}

// FromPath is a user-given kernel (--kernel); modulesDir may be empty.
func FromPath(vmlinuz, modulesDir string) (Kernel, error) {
	if _, err := os.Stat(vmlinuz); err != nil {
		return Kernel{}, fmt.Errorf("kernel %s: %w", vmlinuz, err)
	}
	k := Kernel{Vmlinuz: vmlinuz}
	if modulesDir != "" {
		if st, err := os.Stat(modulesDir); err != nil || !st.IsDir() {
			return Kernel{}, fmt.Errorf("kernel modules folder %s: not a folder (want lib/modules/<version> of the same kernel)", modulesDir)
		}
		k.ModulesDir = modulesDir
		k.Version = filepath.Base(modulesDir)
	}
	return k, nil
}

// Fetcher gets Debian's kernel package into a cache folder.
type Fetcher struct {
	// CacheDir holds the unpacked kernels; default
	// $XDG_CACHE_HOME/cwrun/kernel, else ~/.cache/cwrun/kernel.
	CacheDir string
	// Package is the metapackage to follow; default DefaultPackage.
	Package string
}

// ErrNoApt says the host cannot fetch a kernel itself.
var ErrNoApt = errors.New("apt-get not found")

// Fetch returns the cached kernel of the metapackage's current version,
// downloading and unpacking it first if needed. Concurrent callers (in
// one or several processes) wait for one another through a lock file
// and never see a half-unpacked kernel: it is unpacked into a temporary
// folder and renamed into place.
func (f Fetcher) Fetch(ctx context.Context) (Kernel, error) {
	meta := f.Package
	if meta == "" {
		meta = DefaultPackage
	}
	dir, err := f.cacheDir()
	if err != nil {
		return Kernel{}, err
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return Kernel{}, fmt.Errorf("fetching the guest kernel (%s): %w: on Debian/Ubuntu run `apt-get download %s` and pass the kernel with --kernel, or install apt", meta, ErrNoApt, meta)
	}
	pkg, version, err := resolve(ctx, dir, meta)
	if err != nil {
		return Kernel{}, err
	}
	final := filepath.Join(dir, pkg+"_"+sanitize(version))
	if k, err := found(final); err == nil {
		return k, nil
	}

	if err := os.MkdirAll(dir, 0o755); err != nil {
		return Kernel{}, fmt.Errorf("creating the kernel cache %s: %w", dir, err)
	}
	unlock, err := lock(filepath.Join(dir, ".lock"))
	if err != nil {
		return Kernel{}, err
	}
	defer unlock()
	if k, err := found(final); err == nil { // another caller made it meanwhile
		return k, nil
	}
	tmp, err := os.MkdirTemp(dir, ".fetch-")
	if err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := run(ctx, tmp, "apt-get", "download", pkg+"="+version); err != nil {
		return Kernel{}, fmt.Errorf("downloading the guest kernel %s=%s: %w; check that Debian's archive is reachable (`apt-get update`), or run `apt-get download %s` yourself and pass --kernel", pkg, version, err, pkg)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return Kernel{}, fmt.Errorf("apt-get download %s left %d .deb files, want 1", pkg, len(debs))
	}
	root := filepath.Join(tmp, "root")
	if err := run(ctx, tmp, "dpkg-deb", "-x", debs[0], root); err != nil {
		return Kernel{}, fmt.Errorf("unpacking %s: %w (is dpkg installed?)", debs[0], err)
	}
	if _, err := found(root); err != nil {
		return Kernel{}, fmt.Errorf("package %s: %w", pkg, err)
	}
	if err := os.Rename(root, final); err != nil {
		return Kernel{}, fmt.Errorf("kernel cache: %w", err)
	}
	return found(final)
}

func (f Fetcher) cacheDir() (string, error) {
	if f.CacheDir != "" {
		return f.CacheDir, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("no cache folder for the guest kernel: set XDG_CACHE_HOME or HOME")
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "cwrun", "kernel"), nil
}

var dependsRE = regexp.MustCompile(`(?m)^Depends:.*?\b(linux-image-[^\s,(]+)\s*\(=\s*([^)\s]+)\)`)

// resolveTTL is how long a resolution is trusted before apt is asked
// again: apt-cache costs about a second here, on every run otherwise.
const resolveTTL = 24 * time.Hour

// resolve finds the versioned package the metapackage depends on and
// its version, from apt's local lists (no network), remembering the
// answer in dir for resolveTTL. When apt-cache fails, an older answer
// is used: a cached kernel keeps working offline.
func resolve(ctx context.Context, dir, meta string) (pkg, version string, err error) {
	memo := filepath.Join(dir, meta+".resolved")
	var old []string
	if b, err := os.ReadFile(memo); err == nil {
		old = strings.Fields(string(b))
		if st, err := os.Stat(memo); err == nil && len(old) == 2 && time.Since(st.ModTime()) < resolveTTL {
			return old[0], old[1], nil
		}
	}
	pkg, version, err = aptResolve(ctx, meta)
	if err != nil {
		if len(old) == 2 {
			return old[0], old[1], nil
		}
		return "", "", err
	}
	if err := os.MkdirAll(dir, 0o755); err == nil {
		os.WriteFile(memo, []byte(pkg+" "+version+"\n"), 0o644) //nolint:errcheck // only a shortcut
	}
	return pkg, version, nil
}

func aptResolve(ctx context.Context, meta string) (pkg, version string, err error) {
	out, err := output(ctx, "apt-cache", "show", "--no-all-versions", meta)
	if err != nil {
		return "", "", fmt.Errorf("resolving the guest kernel package %s: %w; run `apt-get update` (Debian bookworm's main and security archives must be in the sources)", meta, err)
	}
	m := dependsRE.FindSubmatch(out)
	if m == nil {
		return "", "", fmt.Errorf("package %s depends on no exact linux-image-* version (apt-cache show %s): run `apt-get update`", meta, meta)
	}
	return string(m[1]), string(m[2]), nil
}

// found checks an unpacked package and returns its kernel.
func found(root string) (Kernel, error) {
	vm, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	mods, _ := filepath.Glob(filepath.Join(root, "lib", "modules", "*"))
	if len(vm) != 1 || len(mods) != 1 {
		return Kernel{}, fmt.Errorf("%s does not hold exactly one boot/vmlinuz-* and one lib/modules/* (found %d and %d)", root, len(vm), len(mods))
	}
	return Kernel{Vmlinuz: vm[0], ModulesDir: mods[0], Version: filepath.Base(mods[0])}, nil
}

func lock(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("kernel cache lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("kernel cache lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil // closing releases the lock
}

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '/' || r == ':' {
			return '_'
		}
		return r
	}, s)
}

func run(ctx context.Context, dir, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLine(out))
	}
	return nil
}

func output(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, lastLine(stderr.Bytes()))
	}
	return out, nil
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}
