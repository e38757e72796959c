package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/treesum"
)

// resolvers runs a test under both path resolvers.
var resolvers = []struct {
	name string
	opts Options
}{
	{"openat2", Options{}},
	{"portable", Options{noOpenat2: true}},
}

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: extraction restores owners, device nodes and security.* xattrs")
	}
}

var epoch = time.Unix(1700000000, 0)

// ent is one tar entry to write; body is the content of regular files.
type ent struct {
	hdr  tar.Header
	body []byte
}

func dirE(name string, mode int64, owner ...int) ent {
	return ent{hdr: hdrOf(tar.TypeDir, name, mode, owner)}
}

func fileE(name, content string, mode int64, owner ...int) ent {
	h := hdrOf(tar.TypeReg, name, mode, owner)
	h.Size = int64(len(content))
	return ent{hdr: h, body: []byte(content)}
}

func symE(name, target string) ent {
	h := hdrOf(tar.TypeSymlink, name, 0o777, nil)
	h.Linkname = target
	return ent{hdr: h}
}

func linkE(name, target string) ent {
	h := hdrOf(tar.TypeLink, name, 0o644, nil)
	h.Linkname = target
	return ent{hdr: h}
}

func devE(typ byte, name string, mode int64, major, minor int64, owner ...int) ent {
	h := hdrOf(typ, name, mode, owner)
	h.Devmajor, h.Devminor = major, minor
	return ent{hdr: h}
}

func withXattrs(e ent, kv ...string) ent {
	e.hdr.PAXRecords = map[string]string{}
	for i := 0; i < len(kv); i += 2 {
		e.hdr.PAXRecords["SCHILY.xattr."+kv[i]] = kv[i+1]
	}
	e.hdr.Format = tar.FormatPAX
	return e
}

func hdrOf(typ byte, name string, mode int64, owner []int) tar.Header {
	h := tar.Header{Typeflag: typ, Name: name, Mode: mode, ModTime: epoch, Format: tar.FormatPAX}
	if len(owner) == 2 {
		h.Uid, h.Gid = owner[0], owner[1]
	}
	return h
}

func layer(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("write header %s: %v", h.Name, err)
		}
		if e.body != nil {
			if _, err := tw.Write(e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// sandbox returns a root dir inside a fresh parent that also holds an
// empty sentinel directory; checkContained verifies the parent.
func sandbox(t testing.TB) (parent, root string) {
	t.Helper()
	parent = t.TempDir()
	root = filepath.Join(parent, "root")
	for _, d := range []string{root, filepath.Join(parent, "sentinel")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return parent, root
}

func checkContained(t testing.TB, parent string) {
	t.Helper()
	des, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, de := range des {
		names = append(names, de.Name())
	}
	if len(names) != 2 || names[0] != "root" || names[1] != "sentinel" {
		t.Errorf("something was written beside the root: parent holds %q", names)
	}
	fi, err := os.Lstat(filepath.Join(parent, "sentinel"))
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o755 {
		t.Errorf("sentinel directory changed: %v %v", fi, err)
	}
	s, err := os.ReadDir(filepath.Join(parent, "sentinel"))
	if err != nil || len(s) != 0 {
		t.Errorf("sentinel directory is not empty: %v %v", s, err)
	}
}

func applyAll(t testing.TB, root string, opts Options, layers ...[]byte) error {
	t.Helper()
	for i, l := range layers {
		if err := Apply(context.Background(), root, bytes.NewReader(l), opts); err != nil {
			t.Logf("layer %d: %v", i, err)
			return err
		}
	}
	return nil
}

func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// Expected entries, declared by hand.
func wDir(p string, mode uint32, owner ...int) treesum.Entry {
	e := treesum.Entry{Path: p, Type: treesum.TypeDir, Mode: treesum.Mode(mode)}
	if len(owner) == 2 {
		e.UID, e.GID = owner[0], owner[1]
	}
	return e
}

func wFile(p, content string, mode uint32, owner ...int) treesum.Entry {
	e := treesum.Entry{Path: p, Type: treesum.TypeFile, Mode: treesum.Mode(mode), Size: int64(len(content)), SHA256: sum(content)}
	if len(owner) == 2 {
		e.UID, e.GID = owner[0], owner[1]
	}
	return e
}

func wSym(p, target string) treesum.Entry {
	return treesum.Entry{Path: p, Type: treesum.TypeSymlink, Link: target}
}
