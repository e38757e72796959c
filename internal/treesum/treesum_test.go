package treesum

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// makeTree writes a tree with every kind of entry treesum knows.
func makeTree(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the tree has device nodes, foreign owners and security.* xattrs")
	}
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(s string) string { return filepath.Join(dir, s) }
	must(os.MkdirAll(p("etc"), 0o755))
	must(os.WriteFile(p("etc/passwd"), []byte("root:x:0:0\n"), 0o644))
	must(os.WriteFile(p("su"), []byte("su"), 0o644))
	must(unix.Chmod(p("su"), 0o4755)) // os.Chmod would need fs.ModeSetuid
	must(os.Mkdir(p("tmp"), 0o755))
	must(unix.Chmod(p("tmp"), 0o1777))
	must(os.Chmod(dir, 0o755))
	must(os.WriteFile(p("empty"), nil, 0o600))
	must(os.Lchown(p("empty"), 1000, 1000))
	must(os.Symlink("/etc/passwd", p("lnk")))
	must(os.Link(p("etc/passwd"), p("hard")))
	must(unix.Mkfifo(p("fifo"), 0o600))
	must(unix.Mknod(p("null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(os.Chmod(p("null"), 0o666))
	must(unix.Lsetxattr(p("su"), "user.note", []byte("hi"), 0))
	must(unix.Lsetxattr(p("su"), "security.capability", []byte("\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), 0))
	return dir
}

func TestDir(t *testing.T) {
	dir := makeTree(t)
	got, err := Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []Entry{
		{Path: "/", Type: TypeDir, Mode: 0o755},
		{Path: "/empty", Type: TypeFile, Mode: 0o600, UID: 1000, GID: 1000, SHA256: sum("")},
		{Path: "/etc", Type: TypeDir, Mode: 0o755},
		{Path: "/etc/passwd", Type: TypeFile, Mode: 0o644, Size: 11, SHA256: sum("root:x:0:0\n"), LinkGroup: "/etc/passwd"},
		{Path: "/fifo", Type: TypeFifo, Mode: 0o600},
		{Path: "/hard", Type: TypeFile, Mode: 0o644, Size: 11, SHA256: sum("root:x:0:0\n"), LinkGroup: "/etc/passwd"},
		{Path: "/lnk", Type: TypeSymlink, Link: "/etc/passwd"},
		{Path: "/null", Type: TypeChar, Mode: 0o666, Dev: "1:3"},
		{Path: "/su", Type: TypeFile, Mode: Mode(0o4755), Size: 2, SHA256: sum("su"),
			Xattrs: map[string]string{"user.note": "hi", "security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
		{Path: "/tmp", Type: TypeDir, Mode: Mode(0o1777)},
	}
	for _, d := range Diff(want, got) {
		t.Error(d)
	}
}

// TestTarMatchesDir checks that GNU tar's archive of a tree reads the
// same as the tree itself, hard links and xattrs included.
func sum(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func TestTarMatchesDir(t *testing.T) {
	dir := makeTree(t)
	fromDir, err := Dir(dir)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", dir, "-cf", "-", ".")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("GNU tar --xattrs unavailable: %v: %s", err, stderr.String())
	}
	fromTar, err := Tar(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if len(fromTar) != len(fromDir) {
		t.Errorf("tar has %d entries, dir %d", len(fromTar), len(fromDir))
	}
	for _, d := range Diff(fromDir, fromTar) {
		t.Error(d)
	}
}

func TestTarHardLinks(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range []*tar.Header{
		{Typeflag: tar.TypeReg, Name: "b", Mode: 0o644, Size: 1},
		{Typeflag: tar.TypeLink, Name: "a", Linkname: "b"},
		{Typeflag: tar.TypeLink, Name: "./c", Linkname: "/a"},
		{Typeflag: tar.TypeReg, Name: "solo", Mode: 0o644, Size: 1},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			tw.Write([]byte("x"))
		}
	}
	tw.Close()
	es, err := Tar(&buf)
	if err != nil {
		t.Fatal(err)
	}
	groups := map[string]string{}
	for _, e := range es {
		groups[e.Path] = e.LinkGroup
		if e.Type != TypeFile || e.Size != 1 {
			t.Errorf("%s: %+v, want a 1-byte file", e.Path, e)
		}
	}
	want := map[string]string{"/a": "/a", "/b": "/a", "/c": "/a", "/solo": ""}
	for p, g := range want {
		if groups[p] != g {
			t.Errorf("%s: link group %q, want %q", p, groups[p], g)
		}
	}
	if _, err := Tar(bytes.NewReader(func() []byte {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeLink, Name: "x", Linkname: "nowhere"})
		tw.Close()
		return b.Bytes()
	}())); err == nil || !strings.Contains(err.Error(), "comes nowhere before it") {
		t.Errorf("dangling hard link: err = %v", err)
	}
}

func TestDiff(t *testing.T) {
	base := []Entry{
		{Path: "/", Type: TypeDir, Mode: 0o755},
		{Path: "/etc/x", Type: TypeFile, Mode: 0o644, Size: 1, SHA256: "aaaa"},
		{Path: "/l", Type: TypeSymlink, Link: "/a"},
		{Path: "/tmp", Type: TypeDir, Mode: Mode(0o1777)},
		{Path: "/tmp/junk", Type: TypeFile},
	}
	clone := func() []Entry {
		out := append([]Entry(nil), base...)
		return out
	}
	if d := Diff(base, clone()); len(d) != 0 {
		t.Fatalf("equal trees differ: %q", d)
	}
	cases := []struct {
		name   string
		change func([]Entry) []Entry
		want   string
		ignore []string
	}{
		{"mode", func(e []Entry) []Entry { e[1].Mode = 0o600; return e }, "/etc/x: mode 0644 != 0600", nil},
		{"special bits", func(e []Entry) []Entry { e[3].Mode = 0o777; return e }, "/tmp: mode 1777 != 0777", nil},
		{"owner", func(e []Entry) []Entry { e[1].UID = 1000; return e }, "/etc/x: owner 0:0 != 1000:0", nil},
		{"content", func(e []Entry) []Entry { e[1].SHA256 = "bbbb"; return e }, "/etc/x: sha256 aaaa != bbbb", nil},
		{"size", func(e []Entry) []Entry { e[1].Size = 2; return e }, "/etc/x: size 1 != 2", nil},
		{"type", func(e []Entry) []Entry { e[1].Type = TypeDir; return e }, "/etc/x: type file != dir", nil},
		{"symlink", func(e []Entry) []Entry { e[2].Link = "/b"; return e }, `/l: symlink target "/a" != "/b"`, nil},
		{"device", func(e []Entry) []Entry { e[1].Dev = "1:3"; return e }, "/etc/x: device  != 1:3", nil},
		{"xattr added", func(e []Entry) []Entry { e[1].Xattrs = map[string]string{"user.a": "1"}; return e }, "/etc/x: xattr user.a unexpected", nil},
		{"link group", func(e []Entry) []Entry { e[1].LinkGroup = "/etc/x"; return e }, "/etc/x: hard link group (none) != /etc/x", nil},
		{"missing", func(e []Entry) []Entry { return e[:4] }, "/tmp/junk: missing (want file)", nil},
		{"unexpected", func(e []Entry) []Entry { return append(e, Entry{Path: "/new", Type: TypeFifo}) }, "/new: unexpected fifo", nil},
		{"ignored subtree", func(e []Entry) []Entry { return e[:4] }, "", []string{"/tmp/"}},
		{"ignored path", func(e []Entry) []Entry { e[3].Mode = 0; return e }, "", []string{"/tmp"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := Diff(base, tc.change(clone()), tc.ignore...)
			if tc.want == "" {
				if len(d) != 0 {
					t.Errorf("Diff = %q, want none", d)
				}
				return
			}
			if len(d) != 1 || d[0] != tc.want {
				t.Errorf("Diff = %q, want [%q]", d, tc.want)
			}
		})
	}
	// Xattr values are compared, not just names.
	a := []Entry{{Path: "/f", Type: TypeFile, Xattrs: map[string]string{"user.a": "1"}}}
	b := []Entry{{Path: "/f", Type: TypeFile, Xattrs: map[string]string{"user.a": "2"}}}
	if d := Diff(a, b); len(d) != 1 || d[0] != `/f: xattr user.a "1" != "2"` {
		t.Errorf("Diff = %q", d)
	}
}
