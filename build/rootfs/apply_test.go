package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/treesum"
)

// capV2 is a VFS_CAP_REVISION_2 security.capability granting
// cap_net_raw (bit 13) permitted+effective, as ping carries.
const capV2 = "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

func TestApply(t *testing.T) {
	needRoot(t)
	root := dirE("./", 0o755)
	cases := []struct {
		name   string
		layers [][]ent
		want   []treesum.Entry
	}{
		{
			name: "files, owners, special bits, symlinks, empty file",
			layers: [][]ent{{
				root,
				dirE("etc/", 0o755),
				fileE("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
				fileE("etc/shadow", "root:*:1::::::\n", 0o640, 0, 42),
				dirE("/bin", 0o755), // absolute name
				fileE("./bin/su", "su binary", 0o4755),
				fileE("bin/wall", "wall binary", 0o2755, 0, 5),
				dirE("tmp/", 0o1777),
				dirE("home/user/", 0o700, 1000, 1000), // parent home/ not listed
				fileE("home/user/.profile", "PS1=$\n", 0o600, 1000, 1000),
				fileE("empty", "", 0o600),
				symE("link/abs", "/etc/passwd"), // parent link/ not listed
				symE("link/rel", "../etc/passwd"),
				symE("link/dangling", "/nowhere"),
			}},
			want: []treesum.Entry{
				wDir("/", 0o755),
				wDir("/bin", 0o755),
				wFile("/bin/su", "su binary", 0o4755),
				wFile("/bin/wall", "wall binary", 0o2755, 0, 5),
				wFile("/empty", "", 0o600),
				wDir("/etc", 0o755),
				wFile("/etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
				wFile("/etc/shadow", "root:*:1::::::\n", 0o640, 0, 42),
				wDir("/home", 0o755),
				wDir("/home/user", 0o700, 1000, 1000),
				wFile("/home/user/.profile", "PS1=$\n", 0o600, 1000, 1000),
				wDir("/link", 0o755),
				wSym("/link/abs", "/etc/passwd"),
				wSym("/link/dangling", "/nowhere"),
				wSym("/link/rel", "../etc/passwd"),
				wDir("/tmp", 0o1777),
			},
		},
		{
			name: "whiteouts delete files and trees of lower layers",
			layers: [][]ent{{
				root,
				dirE("etc/", 0o755),
				fileE("etc/keep", "k", 0o644),
				fileE("etc/gone", "g", 0o644),
				dirE("usr/share/doc/a/", 0o755),
				fileE("usr/share/doc/a/README", "a", 0o644),
				fileE("usr/share/doc/b/README", "b", 0o644),
				fileE("usr/share/keep", "k", 0o644),
				symE("usr/lnk", "/etc"),
			}, {
				fileE("etc/.wh.gone", "", 0o644),
				fileE("usr/share/.wh.doc", "", 0o644),
				fileE("usr/.wh.lnk", "", 0o644), // the symlink, not /etc
				fileE(".wh.never-existed", "", 0o644),
				fileE("nodir/.wh.x", "", 0o644), // must not create nodir
			}},
			want: []treesum.Entry{
				wDir("/", 0o755),
				wDir("/etc", 0o755),
				wFile("/etc/keep", "k", 0o644),
				wDir("/usr", 0o755),
				wDir("/usr/share", 0o755),
				wFile("/usr/share/keep", "k", 0o644),
			},
		},
		{
			name: "opaque directories, marker before and after siblings",
			layers: [][]ent{{
				root,
				dirE("a/", 0o755),
				fileE("a/old1", "o", 0o644),
				dirE("a/olddir/", 0o755),
				fileE("a/olddir/x", "o", 0o644),
				dirE("b/", 0o755),
				fileE("b/old", "o", 0o644),
				dirE("b/sub/", 0o755),
				fileE("b/sub/old", "o", 0o644),
				fileE("c/untouched", "u", 0o644),
			}, {
				dirE("a/", 0o750),
				fileE("a/new1", "n1", 0o644), // before the marker
				fileE("a/.wh..wh..opq", "", 0o644),
				fileE("a/new2", "n2", 0o644), // after it
				fileE("b/.wh..wh..opq", "", 0o644),
				dirE("b/sub/", 0o700),
				fileE("b/sub/new", "n", 0o644),
			}, {
				// An earlier layer's opaque marker does not hide later additions.
				fileE("a/third", "3", 0o644),
			}},
			want: []treesum.Entry{
				wDir("/", 0o755),
				wDir("/a", 0o750),
				wFile("/a/new1", "n1", 0o644),
				wFile("/a/new2", "n2", 0o644),
				wFile("/a/third", "3", 0o644),
				wDir("/b", 0o755),
				wDir("/b/sub", 0o700),
				wFile("/b/sub/new", "n", 0o644),
				wDir("/c", 0o755),
				wFile("/c/untouched", "u", 0o644),
			},
		},
		{
			name: "file replaces dir, dir replaces file, dir over dir keeps content, duplicates",
			layers: [][]ent{{
				root,
				fileE("f2d", "file", 0o644),
				dirE("d2f/", 0o755),
				dirE("d2f/deep/", 0o755),
				fileE("d2f/deep/child", "c", 0o644),
				dirE("keep/", 0o755),
				fileE("keep/content", "c", 0o644),
				symE("s2d", "/keep"),
			}, {
				dirE("f2d/", 0o711),
				fileE("f2d/inner", "in", 0o644),
				fileE("d2f", "now a file", 0o600),
				dirE("keep/", 0o700, 1000, 1000),
				dirE("s2d/", 0o755), // replaces the symlink, /keep untouched
				fileE("dup", "one", 0o644),
				fileE("dup", "two", 0o640),
				dirE("dupdir/", 0o755),
				fileE("dupdir/x", "x", 0o644),
				dirE("dupdir/", 0o700), // a later dir entry keeps the content
			}},
			want: []treesum.Entry{
				wDir("/", 0o755),
				wFile("/d2f", "now a file", 0o600),
				wFile("/dup", "two", 0o640),
				wDir("/dupdir", 0o700),
				wFile("/dupdir/x", "x", 0o644),
				wDir("/f2d", 0o711),
				wFile("/f2d/inner", "in", 0o644),
				wDir("/keep", 0o700, 1000, 1000),
				wFile("/keep/content", "c", 0o644),
				wDir("/s2d", 0o755),
			},
		},
		{
			name: "hard links, in one layer and to a lower layer",
			layers: [][]ent{{
				root,
				dirE("lower/", 0o755),
				fileE("lower/data", "shared", 0o640, 1000, 1000),
				fileE("a", "hard", 0o755),
				linkE("b", "a"),
				linkE("./c", "/a"),
			}, {
				linkE("lower2", "lower/data"),
				fileE("b", "b replaced", 0o644), // breaks b out of the group
			}},
			want: func() []treesum.Entry {
				a := wFile("/a", "hard", 0o755)
				a.LinkGroup = "/a"
				c := a
				c.Path = "/c"
				d := wFile("/lower/data", "shared", 0o640, 1000, 1000)
				d.LinkGroup = "/lower/data"
				l2 := d
				l2.Path = "/lower2"
				return []treesum.Entry{wDir("/", 0o755), a, wFile("/b", "b replaced", 0o644), c, wDir("/lower", 0o755), d, l2}
			}(),
		},
		{
			name: "device nodes and a fifo",
			layers: [][]ent{{
				root,
				dirE("dev/", 0o755),
				devE(tar.TypeChar, "/dev/null", 0o666, 1, 3),
				devE(tar.TypeChar, "dev/console", 0o600, 5, 1),
				devE(tar.TypeBlock, "dev/sda", 0o660, 8, 0, 0, 6),
				devE(tar.TypeFifo, "run/initctl", 0o600, 0, 0),
			}},
			want: []treesum.Entry{
				wDir("/", 0o755),
				wDir("/dev", 0o755),
				{Path: "/dev/console", Type: treesum.TypeChar, Mode: 0o600, Dev: "5:1"},
				{Path: "/dev/null", Type: treesum.TypeChar, Mode: 0o666, Dev: "1:3"},
				{Path: "/dev/sda", Type: treesum.TypeBlock, Mode: 0o660, GID: 6, Dev: "8:0"},
				wDir("/run", 0o755),
				{Path: "/run/initctl", Type: treesum.TypeFifo, Mode: 0o600},
			},
		},
		{
			name: "xattrs: security.capability and user.*",
			layers: [][]ent{{
				root,
				withXattrs(fileE("ping", "ping", 0o755), "security.capability", capV2, "user.note", "hi"),
				withXattrs(dirE("d/", 0o755), "user.dir", "yes"),
			}},
			want: func() []treesum.Entry {
				p := wFile("/ping", "ping", 0o755)
				p.Xattrs = map[string]string{"security.capability": capV2, "user.note": "hi"}
				d := wDir("/d", 0o755)
				d.Xattrs = map[string]string{"user.dir": "yes"}
				return []treesum.Entry{wDir("/", 0o755), d, p}
			}(),
		},
	}
	for _, r := range resolvers {
		for _, tc := range cases {
			t.Run(r.name+"/"+tc.name, func(t *testing.T) {
				parent, dir := sandbox(t)
				var layers [][]byte
				for _, l := range tc.layers {
					layers = append(layers, layer(t, l...))
				}
				if err := applyAll(t, dir, r.opts, layers...); err != nil {
					t.Fatal(err)
				}
				got, err := treesum.Dir(dir)
				if err != nil {
					t.Fatal(err)
				}
				for _, d := range treesum.Diff(tc.want, got) {
					t.Error(d)
				}
				checkContained(t, parent)
			})
		}
	}
}

// bigFile is 20 MiB: data, 18 MiB of zeros, data; generated while read.
type bigFile struct{ off, size int64 }

func (b *bigFile) Read(p []byte) (int, error) {
	if b.off >= b.size {
		return 0, io.EOF
	}
	n := int64(len(p))
	if b.size-b.off < n {
		n = b.size - b.off
	}
	for i := int64(0); i < n; i++ {
		o := b.off + i
		if o < 1<<20 || o >= b.size-1<<20 {
			p[i] = byte(o*7 + o>>8)
		} else {
			p[i] = 0
		}
	}
	b.off += n
	return int(n), nil
}

func TestApplyLargeSparseFile(t *testing.T) {
	needRoot(t)
	const size = 20 << 20
	h := sha256.New()
	if _, err := io.Copy(h, &bigFile{size: size}); err != nil {
		t.Fatal(err)
	}
	want := hex.EncodeToString(h.Sum(nil))

	// Stream the layer through a pipe: Apply never sees it whole.
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: "var/log/lastlog", Mode: 0o664, Size: size, ModTime: epoch}
		err := tw.WriteHeader(hdr)
		if err == nil {
			_, err = io.Copy(tw, &bigFile{size: size})
		}
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	_, dir := sandbox(t)
	if err := Apply(context.Background(), dir, pr, Options{}); err != nil {
		t.Fatal(err)
	}
	got, err := treesum.Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var f *treesum.Entry
	for i := range got {
		if got[i].Path == "/var/log/lastlog" {
			f = &got[i]
		}
	}
	if f == nil || f.Size != size || f.SHA256 != want || f.Mode != 0o664 {
		t.Fatalf("lastlog = %+v, want size %d sha256 %s mode 0664", f, size, want)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "var/log/lastlog"), &st); err != nil {
		t.Fatal(err)
	}
	if used := st.Blocks * 512; used > 4<<20 {
		t.Errorf("lastlog uses %d bytes on disk; the zero run should be a hole", used)
	}
}

func TestApplyDirTimes(t *testing.T) {
	needRoot(t)
	old := time.Unix(1500000000, 0)
	l1 := layer(t, dirE("./", 0o755), func() ent { e := dirE("lower/", 0o755); e.hdr.ModTime = old; return e }())
	// The dir entry comes before its children; its time must survive them.
	l2 := layer(t, dirE("d/", 0o755), fileE("d/a", "a", 0o644), dirE("d/sub/", 0o755), fileE("d/sub/b", "b", 0o644),
		fileE("lower/new", "n", 0o644)) // lower/ changed but not declared
	_, dir := sandbox(t)
	if err := applyAll(t, dir, Options{}, l1, l2); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]time.Time{"d": epoch, "d/sub": epoch, "lower": old, ".": epoch} {
		fi, err := os.Stat(filepath.Join(dir, p))
		if err != nil {
			t.Fatal(err)
		}
		if !fi.ModTime().Equal(want) {
			t.Errorf("%s: mtime %v, want %v", p, fi.ModTime(), want)
		}
	}
	fi, err := os.Lstat(filepath.Join(dir, "d/a"))
	if err != nil || !fi.ModTime().Equal(epoch) {
		t.Errorf("d/a: mtime %v (%v), want %v", fi.ModTime(), err, epoch)
	}
}

func TestApplyErrors(t *testing.T) {
	needRoot(t)
	cases := []struct {
		name string
		ents []ent
		want string
	}{
		{"missing hard link target", []ent{linkE("h", "nope")}, `hard link target "nope" does not exist`},
		{"hard link to a directory", []ent{dirE("d/", 0o755), linkE("h", "d")}, "must not be a directory"},
		{"file under a file", []ent{fileE("f", "x", 0o644), fileE("f/g", "x", 0o644)}, "not a directory"},
		{"root as a file", []ent{fileE(".", "x", 0o644)}, "the root may only be a directory"},
		{"xattr refused", []ent{withXattrs(fileE("f", "x", 0o644), "bogus.name", "v")}, "set xattr bogus.name"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, dir := sandbox(t)
			err := Apply(context.Background(), dir, bytes.NewReader(layer(t, tc.ents...)), Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
	t.Run("truncated layer", func(t *testing.T) {
		_, dir := sandbox(t)
		l := layer(t, fileE("f", strings.Repeat("x", 5000), 0o644))
		err := Apply(context.Background(), dir, bytes.NewReader(l[:3000]), Options{})
		if err == nil || !strings.Contains(err.Error(), "corrupt or truncated") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		_, dir := sandbox(t)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err := Apply(ctx, dir, bytes.NewReader(layer(t, fileE("f", "x", 0o644))), Options{})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if _, err := os.Lstat(filepath.Join(dir, "f")); !os.IsNotExist(err) {
			t.Errorf("cancelled Apply still wrote f: %v", err)
		}
	})
	t.Run("not a directory", func(t *testing.T) {
		err := Apply(context.Background(), filepath.Join(t.TempDir(), "missing"), bytes.NewReader(nil), Options{})
		if err == nil || !strings.Contains(err.Error(), "open root file system directory") {
			t.Fatalf("err = %v", err)
		}
	})
}
