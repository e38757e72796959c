package artifact

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	specs "github.com/opencontainers/image-spec/specs-go"
	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cwrun/cwrun/internal/testimage"
)

// putMachineIndex publishes a podman-machine style index: per platform
// and disk type one manifest with one compressed disk layer.
func putMachineIndex(t *testing.T, r *reg, name string, entries []machineEntry) imgspecv1.Descriptor {
	t.Helper()
	repo := repo(t, r, name)
	var idx imgspecv1.Index
	idx.SchemaVersion, idx.MediaType = 2, imgspecv1.MediaTypeImageIndex
	for _, e := range entries {
		m, _ := putArtifact(t, repo, "", "application/zstd", zstdOf(t, e.disk), map[string]string{AnnotationTitle: e.title})
		m.Platform = &imgspecv1.Platform{OS: "linux", Architecture: e.arch}
		m.Annotations = map[string]string{AnnotationDiskType: e.diskType}
		idx.Manifests = append(idx.Manifests, m)
	}
	return putManifest(t, repo, imgspecv1.MediaTypeImageIndex, idx, "5.3")
}

type machineEntry struct {
	arch, diskType, title string
	disk                  []byte
}

func TestPullMachineIndex(t *testing.T) {
	bothRegistries(t, func(t *testing.T, r *reg) {
		raw := rawDisk(t, 3<<20, 1)
		qcow := qcow2Of(t, raw)
		other := rawDisk(t, 1<<20, 2)
		putMachineIndex(t, r, "podman/machine-os", []machineEntry{
			{"arm64", "qemu", "podman-machine.aarch64.qemu.qcow2.zst", other},
			{"amd64", "applehv", "podman-machine.x86_64.applehv.raw.zst", raw},
			{"amd64", "qemu", "podman-machine.x86_64.qemu.qcow2.zst", qcow},
		})
		opts := testOpts(t)
		d, err := Pull(context.Background(), "docker://"+r.addr+"/podman/machine-os:5.3", opts)
		if err != nil {
			t.Fatal(err)
		}
		if d.Format != "qcow2" {
			t.Errorf("format %q, want qcow2", d.Format)
		}
		sameFile(t, d.Path, qcow)
		if st, _ := os.Stat(d.Path); st.Mode().Perm()&0o222 != 0 {
			t.Errorf("cached disk %s is writable (%v)", d.Path, st.Mode())
		}

		opts.DiskType = "applehv"
		d2, err := Pull(context.Background(), r.addr+"/podman/machine-os:5.3", opts)
		if err != nil {
			t.Fatal(err)
		}
		if d2.Format != "raw" || d2.Digest == d.Digest {
			t.Errorf("applehv: format %q digest %s (qemu's was %s)", d2.Format, d2.Digest, d.Digest)
		}
		sameFile(t, d2.Path, raw)
	})
}

func TestPullNoMatchingEntry(t *testing.T) {
	r := startGGCR(t)
	putMachineIndex(t, r, "machine", []machineEntry{
		{"arm64", "qemu", "a.qcow2.zst", rawDisk(t, 1<<16, 1)},
		{"amd64", "hyperv", "b.vhdx.zst", rawDisk(t, 1<<16, 2)},
	})
	_, err := Pull(context.Background(), "docker://"+r.addr+"/machine:5.3", testOpts(t))
	t.Log(err)
	if !errors.Is(err, ErrNoMatch) {
		t.Fatalf("err %v, want ErrNoMatch", err)
	}
	for _, want := range []string{"linux/amd64 disktype=qemu", "linux/arm64 disktype=qemu", "linux/amd64 disktype=hyperv"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if n := r.blobGets.Load(); n != 0 {
		t.Errorf("%d blob downloads before refusing", n)
	}
}

func TestPullArtifactCompressions(t *testing.T) {
	r := startGGCR(t)
	raw := rawDisk(t, 2<<20, 3)
	qcow := qcow2Of(t, raw)
	for _, c := range []struct {
		name, mediaType, title string
		layer, want            []byte
		format                 string
	}{
		{"zstd by media type", "application/vnd.example.disk.qcow2+zstd", "", zstdOf(t, qcow), qcow, "qcow2"},
		{"xz by title", "application/octet-stream", "fedora.qcow2.xz", xzOf(t, qcow), qcow, "qcow2"},
		{"gzip by media type", "application/gzip", "disk", gzipOf(t, raw), raw, "raw"},
		{"none by title", "application/octet-stream", "disk.raw", raw, raw, "raw"},
		{"none, nothing said", "application/octet-stream", "", qcow, qcow, "qcow2"},
		{"zstd, nothing said (sniffed)", "application/octet-stream", "", zstdOf(t, raw), raw, "raw"},
	} {
		t.Run(c.name, func(t *testing.T) {
			tag := strings.NewReplacer(" ", "-", ",", "", "(", "", ")", "").Replace(c.name)
			var ann map[string]string
			if c.title != "" {
				ann = map[string]string{AnnotationTitle: c.title}
			}
			_, l := putArtifact(t, repo(t, r, "disks"), tag, c.mediaType, c.layer, ann)
			d, err := Pull(context.Background(), "docker://"+r.addr+"/disks:"+tag, testOpts(t))
			if err != nil {
				t.Fatal(err)
			}
			if d.Format != c.format || d.Digest != l.Digest {
				t.Errorf("format %q digest %s, want %q %s", d.Format, d.Digest, c.format, l.Digest)
			}
			sameFile(t, d.Path, c.want)
		})
	}
}

func TestPullUnknownCompression(t *testing.T) {
	r := startGGCR(t)
	rp := repo(t, r, "disks")
	putArtifact(t, rp, "bz2", "application/vnd.example.disk.raw+bzip2", []byte("BZh91AY&SY"), nil)
	putArtifact(t, rp, "lz4", "application/octet-stream", []byte("x"), map[string]string{AnnotationTitle: "disk.raw.lz4"})
	for _, c := range []struct{ tag, want string }{{"bz2", "application/vnd.example.disk.raw+bzip2"}, {"lz4", "disk.raw.lz4"}} {
		_, err := Pull(context.Background(), "docker://"+r.addr+"/disks:"+c.tag, testOpts(t))
		t.Log(err)
		if !errors.Is(err, ErrUnknownCompression) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want ErrUnknownCompression naming %q", c.tag, err, c.want)
		}
	}
	if n := r.blobGets.Load(); n != 0 {
		t.Errorf("%d blob downloads before refusing", n)
	}
}

func TestPullContainerDisk(t *testing.T) {
	r := startGGCR(t)
	raw := rawDisk(t, 2<<20, 4)
	qcow := qcow2Of(t, raw)
	rp := repo(t, r, "containerdisks")
	// KubeVirt's layout: /disk/<name>.qcow2, under a base layer with other files.
	base := testimage.Layer(t, testimage.Entry{Name: "etc/", Type: '5'}, testimage.Entry{Name: "etc/os-release", Body: "ID=test\n"})
	top := testimage.Layer(t, testimage.Entry{Name: "disk/", Type: '5'}, testimage.Entry{Name: "disk/fedora.qcow2", Body: string(qcow)})
	putImage(t, rp, "kubevirt", true, base, top)
	opts := testOpts(t)
	d, err := Pull(context.Background(), r.addr+"/containerdisks:kubevirt", opts)
	if err != nil {
		t.Fatal(err)
	}
	if d.Format != "qcow2" {
		t.Errorf("format %q", d.Format)
	}
	sameFile(t, d.Path, qcow)

	// A disk at / of an uncompressed layer.
	putImage(t, rp, "root", false, testimage.Layer(t, testimage.Entry{Name: "./disk.img", Body: string(raw)}))
	d, err = Pull(context.Background(), r.addr+"/containerdisks:root", opts)
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, d.Path, raw)

	// Two disks: refused, and nothing is cached.
	putImage(t, rp, "two", true, testimage.Layer(t, testimage.Entry{Name: "disk/a.qcow2", Body: string(qcow)}, testimage.Entry{Name: "disk/b.raw", Body: "x"}))
	if _, err := Pull(context.Background(), r.addr+"/containerdisks:two", opts); !errors.Is(err, ErrNoDisk) || !strings.Contains(err.Error(), "disk/b.raw") {
		t.Errorf("two disks: err %v", err)
	}
	// No disk at all.
	putImage(t, rp, "none", true, base)
	if _, err := Pull(context.Background(), r.addr+"/containerdisks:none", opts); !errors.Is(err, ErrNoDisk) {
		t.Errorf("no disk: err %v", err)
	}
	if l := cacheLeftovers(t, opts.CacheDir); len(l) > 0 {
		t.Errorf("partial files left: %v", l)
	}
}

// TestPullCacheHit: the second pull of the same disk downloads no blob.
func TestPullCacheHit(t *testing.T) {
	r := startGGCR(t)
	raw := rawDisk(t, 2<<20, 5)
	_, l := putArtifact(t, repo(t, r, "disks"), "v1", "application/zstd", zstdOf(t, raw), map[string]string{AnnotationTitle: "d.raw.zst"})
	opts := testOpts(t)
	ref := "docker://" + r.addr + "/disks:v1"
	d1, err := Pull(context.Background(), ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	first := r.blobGets.Load()
	if first == 0 {
		t.Fatal("the first pull downloaded no blob: the counter is broken")
	}
	d2, err := Pull(context.Background(), ref, opts)
	if err != nil {
		t.Fatal(err)
	}
	if n := r.blobGets.Load() - first; n != 0 {
		t.Errorf("second pull downloaded %d blobs, want 0", n)
	}
	if d1.Path != d2.Path || d2.Digest != l.Digest || d2.Path != filepath.Join(opts.CacheDir, "sha256", l.Digest.Encoded()) {
		t.Errorf("second pull: %+v, first %+v", d2, d1)
	}
	sameFile(t, d2.Path, raw)
}

func TestPullDigestMismatch(t *testing.T) {
	r := startGGCR(t)
	raw := rawDisk(t, 1<<20, 6)
	rp := repo(t, r, "disks")
	_, lz := putArtifact(t, rp, "zst", "application/zstd", zstdOf(t, raw), nil)
	_, lr := putArtifact(t, rp, "raw", "application/octet-stream", raw, map[string]string{AnnotationTitle: "d.raw"})
	r.fault(lz.Digest, "flip")
	r.fault(lr.Digest, "flip")
	opts := testOpts(t)
	for _, tag := range []string{"zst", "raw"} {
		_, err := Pull(context.Background(), "docker://"+r.addr+"/disks:"+tag, opts)
		t.Log(err)
		if !errors.Is(err, ErrDigestMismatch) || !strings.Contains(err.Error(), "deleted") {
			t.Errorf("%s: err %v, want a digest mismatch that says the partial file was deleted", tag, err)
		}
	}
	if l := cacheLeftovers(t, opts.CacheDir); len(l) > 0 {
		t.Errorf("partial files left: %v", l)
	}
	for _, d := range []string{lz.Digest.Encoded(), lr.Digest.Encoded()} {
		if _, err := os.Stat(filepath.Join(opts.CacheDir, "sha256", d)); err == nil {
			t.Errorf("a tampered disk was cached as %s", d)
		}
	}
}

func TestPullTruncated(t *testing.T) {
	r := startGGCR(t)
	raw := rawDisk(t, 1<<20, 7)
	_, l := putArtifact(t, repo(t, r, "disks"), "v1", "application/octet-stream", raw, map[string]string{AnnotationTitle: "d.raw"})
	r.fault(l.Digest, "truncate")
	opts := testOpts(t)
	_, err := Pull(context.Background(), "docker://"+r.addr+"/disks:v1", opts)
	t.Log(err)
	if err == nil || !strings.Contains(err.Error(), "deleted") {
		t.Fatalf("err %v, want a failure that deletes the partial file", err)
	}
	if !errors.Is(err, ErrTruncated) {
		t.Errorf("err %v, want ErrTruncated", err)
	}
	if l := cacheLeftovers(t, opts.CacheDir); len(l) > 0 {
		t.Errorf("partial files left: %v", l)
	}
}

func TestPullUnreachable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	_, err = Pull(context.Background(), "docker://"+addr+"/disks:v1", testOpts(t))
	t.Log(err)
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("err %v, want ErrUnreachable naming %s and why", err, addr)
	}
}

// TestPullOCILayout: the oci: transport works as docker:// does.
func TestPullOCILayout(t *testing.T) {
	dir := t.TempDir()
	raw := rawDisk(t, 1<<20, 8)
	layer := xzOf(t, raw)
	blobs := filepath.Join(dir, "blobs", "sha256")
	os.MkdirAll(blobs, 0o755)
	put := func(b []byte, mt string) imgspecv1.Descriptor {
		d := imgspecv1.Descriptor{MediaType: mt, Digest: digestOf(b), Size: int64(len(b))}
		os.WriteFile(filepath.Join(blobs, d.Digest.Encoded()), b, 0o644)
		return d
	}
	cfg := put([]byte("{}"), imgspecv1.MediaTypeEmptyJSON)
	l := put(layer, "application/x-xz")
	m := mustJSON(t, imgspecv1.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: imgspecv1.MediaTypeImageManifest,
		ArtifactType: "application/vnd.example.disk", Config: cfg, Layers: []imgspecv1.Descriptor{l}})
	md := put(m, imgspecv1.MediaTypeImageManifest)
	md.Annotations = map[string]string{imgspecv1.AnnotationRefName: "v1"}
	os.WriteFile(filepath.Join(dir, "index.json"), mustJSON(t, imgspecv1.Index{Versioned: specs.Versioned{SchemaVersion: 2}, Manifests: []imgspecv1.Descriptor{md}}), 0o644)
	os.WriteFile(filepath.Join(dir, "oci-layout"), []byte(`{"imageLayoutVersion":"1.0.0"}`), 0o644)
	d, err := Pull(context.Background(), "oci:"+dir+":v1", testOpts(t))
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, d.Path, raw)
}
