package rootfs

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// hostFacts are host files a hostile layer might aim at.
type hostFacts struct {
	passwd      [32]byte
	passwdNlink uint64
	passwdMode  uint32
	evilXattr   bool
}

func readHost(t *testing.T) hostFacts {
	t.Helper()
	b, err := os.ReadFile("/etc/passwd")
	if err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Lstat("/etc/passwd", &st); err != nil {
		t.Fatal(err)
	}
	_, xerr := unix.Lgetxattr("/etc/passwd", "trusted.evil", make([]byte, 16))
	return hostFacts{sha256.Sum256(b), uint64(st.Nlink), st.Mode, xerr == nil}
}

func TestApplyHostile(t *testing.T) {
	needRoot(t)
	for _, p := range []string{"/evil", "/etc/evil"} {
		if _, err := os.Lstat(p); err == nil {
			t.Fatalf("%s exists before the test; remove it", p)
		}
	}
	cases := []struct {
		name    string
		layers  [][]ent
		wantErr string // "" when the entries must be contained instead
		inside  []string
	}{
		{name: "dotdot name", layers: [][]ent{{fileE("../escape", "x", 0o644)}},
			wantErr: `layer entry "../escape" escapes the root file system`},
		{name: "dotdot deep", layers: [][]ent{{fileE("a/b/../../../escape", "x", 0o644)}},
			wantErr: "escapes the root file system"},
		{name: "absolute symlink to / then a write through it",
			layers: [][]ent{{symE("x", "/"), fileE("x/etc/evil", "pwned", 0o644)}},
			inside: []string{"etc/evil"}},
		{name: "absolute symlink to /etc in a lower layer",
			layers: [][]ent{{dirE("etc/", 0o755), symE("a", "/etc")}, {fileE("a/passwd", "pwned", 0o644), fileE("a/evil", "pwned", 0o644)}},
			inside: []string{"etc/passwd", "etc/evil"}},
		{name: "relative symlink climbing out",
			layers: [][]ent{{symE("a", "../../.."), fileE("a/evil", "pwned", 0o644)}},
			inside: []string{"evil"}},
		{name: "symlink chain climbing out",
			layers: [][]ent{{symE("a", ".."), dirE("d/", 0o755), dirE("sentinel/", 0o755), symE("d/b", "../a/../a/../sentinel"), fileE("d/b/evil", "pwned", 0o644)}},
			inside: []string{"sentinel/evil"}},
		{name: "dotdot through a symlink", layers: [][]ent{{symE("a", ".."), fileE("a/../../evil", "x", 0o644)}},
			wantErr: "escapes the root file system"},
		{name: "hard link target escaping", layers: [][]ent{{linkE("h", "../../etc/passwd")}},
			wantErr: `hard link target "../../etc/passwd" escapes the root file system`},
		{name: "hard link through a symlink to the host",
			layers:  [][]ent{{symE("hostetc", "/etc"), linkE("h", "hostetc/passwd")}},
			wantErr: "it must be a file of this or a lower layer"},
		{name: "dangling symlink to a missing dir outside",
			layers:  [][]ent{{symE("a", "../../nonexistent"), fileE("a/evil", "x", 0o644)}},
			wantErr: "points to a directory that does not exist"},
		{name: "hard link to a symlink that points out",
			layers: [][]ent{{symE("s", "/etc/passwd"), linkE("h", "s")}},
			inside: []string{"h", "s"}},
		{name: "whiteout escaping", layers: [][]ent{{fileE("../.wh.x", "", 0o644)}},
			wantErr: "escapes the root file system"},
		{name: "whiteout of dotdot", layers: [][]ent{{fileE("d/.wh...", "", 0o644)}},
			wantErr: "escapes the root file system"},
		{name: "whiteout through a symlink to the host",
			layers: [][]ent{{symE("e", "/etc"), symE("p", "/"), fileE("e/.wh.passwd", "", 0o644), fileE("p/.wh.sentinel", "", 0o644)}}},
		{name: "opaque marker through a symlink to the host",
			layers: [][]ent{{symE("e", "/etc"), fileE("e/.wh..wh..opq", "", 0o644), symE("up", "../"), fileE("up/.wh..wh..opq", "", 0o644)}}},
		{name: "file over a symlink to a host file",
			layers: [][]ent{{symE("f", "/etc/passwd")}, {fileE("f", "replaced", 0o644)}},
			inside: []string{"f"}},
		{name: "dir entry over a symlink to outside",
			layers: [][]ent{{symE("s", "../sentinel")}, {dirE("s/", 0o777, 1000, 1000)}},
			inside: []string{"s"}},
		{name: "device over a symlink to outside",
			layers: [][]ent{{symE("s", "../sentinel/x")}, {devE(tar.TypeFifo, "s", 0o600, 0, 0)}},
			inside: []string{"s"}},
		{name: "xattr on a symlink's target",
			layers: [][]ent{{symE("s", "/etc/passwd")}, {withXattrs(symE("s", "/etc/passwd"), "trusted.evil", "1")}},
			inside: []string{"s"}},
		{name: "xattr set on the symlink itself",
			layers: [][]ent{{withXattrs(symE("s", "/etc/passwd"), "trusted.evil", "1"), fileE("probe", "", 0o644)}}},
	}
	for _, r := range resolvers {
		for _, tc := range cases {
			t.Run(r.name+"/"+tc.name, func(t *testing.T) {
				before := readHost(t)
				parent, dir := sandbox(t)
				var err error
				for _, l := range tc.layers {
					if err = Apply(context.Background(), dir, bytes.NewReader(layer(t, l...)), r.opts); err != nil {
						break
					}
				}
				switch {
				case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
					t.Errorf("err = %v, want one containing %q", err, tc.wantErr)
				case tc.wantErr == "" && err != nil:
					t.Errorf("err = %v, want the entries contained inside the root", err)
				}
				if tc.wantErr != "" && strings.Contains(tc.wantErr, "escapes") && !errors.Is(err, ErrEscape) {
					t.Errorf("err = %v, want ErrEscape", err)
				}
				for _, p := range tc.inside {
					if _, err := os.Lstat(filepath.Join(dir, p)); err != nil {
						t.Errorf("%s not created inside the root: %v", p, err)
					}
				}
				checkContained(t, parent)
				if after := readHost(t); after != before {
					t.Errorf("host /etc/passwd changed: %+v -> %+v", before, after)
				}
				for _, p := range []string{"/evil", "/etc/evil", filepath.Join(filepath.Dir(parent), "evil")} {
					if _, err := os.Lstat(p); err == nil {
						os.Remove(p)
						t.Errorf("%s was created outside the root", p)
					}
				}
			})
		}
	}
}
