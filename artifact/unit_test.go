package artifact

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	imgspecv1 "github.com/opencontainers/image-spec/specs-go/v1"
)

func TestCompressionOf(t *testing.T) {
	for _, c := range []struct {
		mediaType, title string
		want             compression
		unknown          bool
	}{
		{"application/zstd", "", compZstd, false},
		{"application/vnd.cwrun.disk.raw.v1+zstd", "", compZstd, false},
		{"application/x-xz", "", compXz, false},
		{"application/gzip", "", compGzip, false},
		{"application/vnd.oci.image.layer.v1.tar+gzip", "", compGzip, false},
		{"application/vnd.docker.image.rootfs.diff.tar.gzip", "", compGzip, false},
		{"application/vnd.oci.image.layer.v1.tar", "", compSniff, false},
		{"application/octet-stream", "podman-machine.x86_64.qemu.qcow2.zst", compZstd, false},
		{"application/octet-stream", "fedora.raw.xz", compXz, false},
		{"application/octet-stream", "disk.img.gz", compGzip, false},
		{"application/octet-stream", "disk.qcow2", compNone, false},
		{"application/octet-stream", "", compSniff, false},
		{"application/x-qemu-disk", "disk", compSniff, false},
		// The media type wins over the name.
		{"application/x-xz", "disk.qcow2.zst", compXz, false},
		{"application/x-bzip2", "", "", true},
		{"application/vnd.example+lz4", "", "", true},
		{"application/octet-stream", "disk.raw.bz2", "", true},
	} {
		got, err := compressionOf(c.mediaType, c.title)
		if c.unknown {
			if !errors.Is(err, ErrUnknownCompression) {
				t.Errorf("%q %q: %v, %v; want ErrUnknownCompression", c.mediaType, c.title, got, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q %q: %q, %v; want %q", c.mediaType, c.title, got, err, c.want)
		}
	}
}

func TestDiskEntry(t *testing.T) {
	for name, want := range map[string]bool{
		"disk/fedora.qcow2": true, "./disk/anything": true, "/disk.img": true, "disk.raw": true,
		"vm.qcow2.xz": true, "etc/disk.img": false, "disk/sub/x.qcow2": false, "README": false, "disk": false,
	} {
		if got := diskEntry(name); got != want {
			t.Errorf("diskEntry(%q) = %v", name, got)
		}
	}
}

func TestChooseEntry(t *testing.T) {
	p := &puller{opts: PullOptions{DiskType: "qemu"}, sys: testSys(t)}
	e := func(arch, dt string) imgspecv1.Descriptor {
		d := imgspecv1.Descriptor{Digest: digestOf([]byte(arch + dt)), Platform: &imgspecv1.Platform{OS: "linux", Architecture: arch}}
		if dt != "" {
			d.Annotations = map[string]string{AnnotationDiskType: dt}
		}
		return d
	}
	idx := imgspecv1.Index{Manifests: []imgspecv1.Descriptor{e("amd64", "applehv"), e("arm64", "qemu"), e("x86_64", "qemu")}}
	got, err := p.chooseEntry("x", idx)
	if err != nil || got.Digest != idx.Manifests[2].Digest {
		t.Errorf("podman-machine index: %v, %v", got.Digest, err)
	}
	// Without disktype annotations, the platform alone decides.
	plain := imgspecv1.Index{Manifests: []imgspecv1.Descriptor{e("arm64", ""), e("amd64", "")}}
	if got, err := p.chooseEntry("x", plain); err != nil || got.Digest != plain.Manifests[1].Digest {
		t.Errorf("plain index: %v, %v", got.Digest, err)
	}
	if _, err := p.chooseEntry("x", imgspecv1.Index{}); !errors.Is(err, ErrNoMatch) {
		t.Errorf("empty index: %v", err)
	}
}

func TestNewest(t *testing.T) {
	d := func(n, created string) imgspecv1.Descriptor {
		return imgspecv1.Descriptor{Digest: digestOf([]byte(n)), Annotations: map[string]string{AnnotationCreated: created}}
	}
	rs := []imgspecv1.Descriptor{d("b", "2026-02-01T00:00:00Z"), d("c", "2026-03-01T00:00:00Z"), d("a", "2026-01-01T00:00:00Z")}
	if got := newest(rs); got.Digest != rs[1].Digest {
		t.Errorf("newest = %s", got.Digest)
	}
	if got := newest([]imgspecv1.Descriptor{{Digest: "sha256:1"}, {Digest: "sha256:2"}}); got.Digest != "sha256:2" {
		t.Errorf("undated: %s, want the last listed", got.Digest)
	}
}

// TestCopySparse: zero blocks become holes, and the content is exact.
func TestCopySparse(t *testing.T) {
	data := rawDisk(t, 8<<20, 9) // 64 KiB of data per 256 KiB
	data = append(data, 1, 2, 3) // an odd tail
	f, err := os.Create(filepath.Join(t.TempDir(), "d"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := copySparse(f, bytes.NewReader(data))
	if err != nil || n != int64(len(data)) {
		t.Fatalf("copySparse: %d, %v", n, err)
	}
	sameFile(t, f.Name(), data)
	var st syscall.Stat_t
	if err := syscall.Stat(f.Name(), &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > int64(len(data))/2 {
		t.Errorf("%d bytes allocated for %d bytes mostly zeros: not sparse", used, len(data))
	}
	// A reader that fails mid-way is an error, not a short disk.
	f2, _ := os.Create(filepath.Join(t.TempDir(), "e"))
	defer f2.Close()
	if _, err := copySparse(f2, io.MultiReader(bytes.NewReader(data[:1000]), errReader{io.ErrUnexpectedEOF})); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("failing reader: %v", err)
	}
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// FuzzLayerNames: media types, titles and tar names come from registries;
// reading them never panics, and an accepted compression is one cwrun reads.
func FuzzLayerNames(f *testing.F) {
	for _, s := range []string{"application/zstd", "a+b+zstd", "+", "disk/x.qcow2.xz", "../disk.img", "", "application/x-bzip2;q=1"} {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, mediaType, name string) {
		c, err := compressionOf(mediaType, name)
		if err == nil {
			switch c {
			case compNone, compZstd, compXz, compGzip, compSniff:
			default:
				t.Fatalf("compressionOf(%q, %q) = %q", mediaType, name, c)
			}
		}
		if diskEntry(name) && strings.Contains(strings.TrimPrefix(cleanEntry(name), "disk/"), "/") {
			t.Fatalf("diskEntry(%q) accepts a nested path", name)
		}
	})
}
