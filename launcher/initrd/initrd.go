// Package initrd assembles the initramfs cwrun boots: the cwrun-init
// binary as /init and exactly the kernel modules it needs, in
// dependency order, as a newc cpio. The output is a pure function of
// its inputs, byte for byte (the attested launch measurement covers
// it), and is cached under the hash of those inputs.
//
// It never holds a key and never runs anything.
package initrd

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// BaseModules are what every boot needs: the virtio PCI transport, the
// disk, the serial ports and dm-crypt with AES-XTS (aes and cbc are
// built into Debian's cloud kernel; aesni-intel is left out: it fails
// with ENODEV on TCG's CPU and the generic AES is enough).
func BaseModules() []string {
	return []string{"virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio", "virtio_pci",
		"virtio_blk", "virtio_console", "dm-mod", "dm-crypt", "ecb", "xts"}
}

// EntropyModules are added for guests that attest: the virtio entropy
// device seeds the random pool at once, where a fresh TCG guest would
// wait about a second at its first getrandom. Runs that do not attest
// need no random numbers early, and skip the module's load.
func EntropyModules() []string { return []string{"virtio_rng"} }

// NetworkModules are added for --network user.
func NetworkModules() []string { return []string{"virtio_net"} }

// ShareModules are added for -v shares over 9p. Debian's cloud kernel
// is built without 9p (CONFIG_NET_9P unset): Resolve then says so.
func ShareModules() []string { return []string{"9pnet_virtio", "9p"} }

// Spec is what goes into an initrd.
type Spec struct {
	// Init is the cwrun-init binary (static), carried as /init.
	Init string
	// ModulesDir is the kernel's lib/modules/<version>; empty carries no
	// modules (a kernel with everything built in).
	ModulesDir string
	// Modules are the wanted modules; their dependencies are added.
	// Default BaseModules().
	Modules []string
	// CacheDir holds built initrds; default $XDG_CACHE_HOME/cwrun/initrd,
	// else ~/.cache/cwrun/initrd.
	CacheDir string
	// Gzip compresses the cpio. Default off: under TCG the kernel
	// unpacks an uncompressed cpio faster than it inflates a gzip one,
	// and the file only travels from the local disk.
	Gzip bool
}

// ModuleList is the path of the load-order list inside the initrd.
const ModuleList = "etc/cwrun-modules"

// formatVersion changes when the layout below changes, so that old
// cache entries are not reused for a new layout.
const formatVersion = "cwrun-initrd-1"

type entry struct {
	name  string
	kind  byte // 'd' dir, 'f' file, 'c' char device
	perm  uint32
	data  []byte
	major uint32
	minor uint32
	// path and size, for a file: its bytes are streamed from path, not
	// held (the init and modules are megabytes, and the launcher that
	// builds this stays resident while its VM runs).
	path string
	size int64
}

// Build returns the path of the initrd for spec, building it into the
// cache if it is not there yet.
func Build(ctx context.Context, spec Spec) (string, error) {
	entries, err := contents(spec)
	if err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	sum, err := hashEntries(entries, spec.Gzip)
	if err != nil {
		return "", err
	}
	dir, err := cacheDir(spec.CacheDir)
	if err != nil {
		return "", err
	}
	name := "initrd-" + sum[:32] + ".cpio"
	if spec.Gzip {
		name += ".gz"
	}
	final := filepath.Join(dir, name)
	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("initrd cache %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, ".build-*")
	if err != nil {
		return "", fmt.Errorf("initrd cache: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := write(tmp, entries, spec.Gzip); err != nil {
		tmp.Close()
		return "", fmt.Errorf("writing initrd %s: %w", tmp.Name(), err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("writing initrd %s: %w", tmp.Name(), err)
	}
	// The inputs were read twice (hash, then cpio): a file that changed
	// in between would put other bytes under this name.
	if again, err := hashEntries(entries, spec.Gzip); err != nil || again != sum {
		return "", fmt.Errorf("the initrd's inputs (%s and its modules) changed while it was built: try again", spec.Init)
	}
	// Same inputs, same bytes: a concurrent builder's rename is harmless.
	if err := os.Rename(tmp.Name(), final); err != nil {
		return "", fmt.Errorf("initrd cache: %w", err)
	}
	return final, nil
}

// contents lists the initrd's entries, sorted by name (parents before
// children, and independent of the order inputs were found in).
func contents(spec Spec) ([]entry, error) {
	init, err := fileEntry("init", 0o755, spec.Init)
	if err != nil {
		return nil, fmt.Errorf("reading the guest init %s: %w (build it with CGO_ENABLED=0 go build ./cmd/cwrun-init)", spec.Init, err)
	}
	es := []entry{
		{name: "dev", kind: 'd', perm: 0o755},
		// The kernel opens /dev/console for init's stdio before any
		// devtmpfs exists; without this node init starts with none.
		{name: "dev/console", kind: 'c', perm: 0o600, major: 5, minor: 1},
		{name: "etc", kind: 'd', perm: 0o755},
		init,
		{name: "lib", kind: 'd', perm: 0o755},
		{name: "lib/modules", kind: 'd', perm: 0o755},
		{name: "proc", kind: 'd', perm: 0o755},
		{name: "run", kind: 'd', perm: 0o755},
		{name: "sys", kind: 'd', perm: 0o755},
		{name: "sysroot", kind: 'd', perm: 0o755},
	}
	var list strings.Builder
	if spec.ModulesDir != "" {
		want := spec.Modules
		if want == nil {
			want = BaseModules()
		}
		mods, err := Resolve(spec.ModulesDir, want)
		if err != nil {
			return nil, err
		}
		for _, m := range mods {
			e, err := fileEntry("lib/modules/"+m.Name+".ko", 0o644, m.Path)
			if err != nil {
				return nil, fmt.Errorf("reading kernel module: %w", err)
			}
			es = append(es, e)
			list.WriteString(m.Name + "\n")
		}
	}
	es = append(es, entry{name: ModuleList, kind: 'f', perm: 0o644, data: []byte(list.String())})
	sort.Slice(es, func(i, j int) bool { return es[i].name < es[j].name })
	return es, nil
}

// fileEntry is a file whose bytes stay on disk until written.
func fileEntry(name string, perm uint32, path string) (entry, error) {
	st, err := os.Stat(path)
	if err != nil {
		return entry{}, err
	}
	if !st.Mode().IsRegular() {
		return entry{}, fmt.Errorf("%s is not a regular file", path)
	}
	return entry{name: name, kind: 'f', perm: perm, path: path, size: st.Size()}, nil
}

// open returns a file entry's bytes.
func (e entry) open() (io.ReadCloser, int64, error) {
	if e.path == "" {
		return io.NopCloser(bytes.NewReader(e.data)), int64(len(e.data)), nil
	}
	f, err := os.Open(e.path)
	if err != nil {
		return nil, 0, err
	}
	return f, e.size, nil
}

// hashEntries is the cache key: every byte and field that goes into the
// cpio, length-prefixed so that no two inputs collide by concatenation.
func hashEntries(es []entry, gz bool) (string, error) {
	h := sha256.New()
	length := func(n int64) {
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], uint64(n))
		h.Write(b[:])
	}
	field := func(b []byte) {
		length(int64(len(b)))
		h.Write(b)
	}
	field([]byte(formatVersion))
	field([]byte(fmt.Sprint(gz)))
	for _, e := range es {
		field([]byte(fmt.Sprintf("%s %c %o %d:%d", e.name, e.kind, e.perm, e.major, e.minor)))
		r, size, err := e.open()
		if err != nil {
			return "", fmt.Errorf("initrd input %s: %w", e.name, err)
		}
		length(size)
		n, err := io.Copy(h, r)
		r.Close()
		if err == nil && n != size {
			err = fmt.Errorf("%d bytes, not the %d it had (did it change while being read?)", n, size)
		}
		if err != nil {
			return "", fmt.Errorf("initrd input %s: %w", e.path, err)
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func write(w io.Writer, es []entry, gz bool) error {
	var zw *gzip.Writer
	if gz {
		zw = gzip.NewWriter(w) // zero ModTime and no Name: a fixed header
		w = zw
	}
	c := newCPIOWriter(w)
	for _, e := range es {
		var err error
		switch e.kind {
		case 'd':
			err = c.Dir(e.name, e.perm)
		case 'f':
			var r io.ReadCloser
			var size int64
			if r, size, err = e.open(); err == nil {
				err = c.FileFrom(e.name, e.perm, size, r)
				r.Close()
			}
		case 'c':
			err = c.CharDev(e.name, e.perm, e.major, e.minor)
		}
		if err != nil {
			return err
		}
	}
	if err := c.Close(); err != nil {
		return err
	}
	if zw != nil {
		return zw.Close()
	}
	return nil
}

func cacheDir(dir string) (string, error) {
	if dir != "" {
		return dir, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("no cache folder for the initrd: set XDG_CACHE_HOME or HOME")
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "cwrun", "initrd"), nil
}
