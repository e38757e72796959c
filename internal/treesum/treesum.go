// Package treesum describes a file system tree, from a directory or a
// tar stream, as a sorted list of entries holding everything a sealed
// root file system must keep (type, mode, owner, content hash, symlink
// target, device numbers, xattrs, hard link groups), so that tests can
// compare what went into a seal with what came out.
//
// It is for tests: it reads trees and never writes to them, never
// follows symlinks, and deliberately leaves out what legitimately
// differs between equal trees (times, directory sizes, inode numbers).
package treesum

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Types of Entry.
const (
	TypeFile    = "file"
	TypeDir     = "dir"
	TypeSymlink = "symlink"
	TypeChar    = "char"
	TypeBlock   = "block"
	TypeFifo    = "fifo"
	TypeSocket  = "socket"
)

// Entry is one path of a tree.
//
// Hard links are not a type of their own: each linked path is an entry
// like any other (a file with its content hash, usually), and all paths
// of one link group carry the group's first path (in sort order) in
// LinkGroup. So a tree read from a directory (same inode) and one read
// from a tar (TypeLink entries) compare equal. LinkGroup is empty for a
// path with no other link in the tree.
type Entry struct {
	Path      string      // "/" for the root, "/etc/passwd" below it
	Type      string      // TypeFile, TypeDir, ...
	Mode      fs.FileMode // permission bits plus ModeSetuid, ModeSetgid, ModeSticky; 0 for symlinks
	UID, GID  int
	Size      int64             // files only
	SHA256    string            // files only, hex
	Link      string            // symlink target
	Dev       string            // "major:minor" for Char and Block
	Xattrs    map[string]string // nil when none
	LinkGroup string            // see above
}

// Dir walks the tree at root, without following symlinks, and returns
// its entries sorted by path, the root itself included as "/".
func Dir(root string) ([]Entry, error) {
	var out []Entry
	type inode struct{ dev, ino uint64 }
	groups := map[inode][]int{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		e := Entry{Path: path.Clean("/" + filepath.ToSlash(rel))}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("treesum: %w", &fs.PathError{Op: "lstat", Path: p, Err: err})
		}
		e.UID, e.GID = int(st.Uid), int(st.Gid)
		e.Mode = unixToMode(st.Mode)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			e.Type = TypeFile
			e.Size = st.Size
			if e.SHA256, err = hashFile(p); err != nil {
				return err
			}
		case unix.S_IFDIR:
			e.Type = TypeDir
		case unix.S_IFLNK:
			e.Type = TypeSymlink
			e.Mode = 0
			if e.Link, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			e.Type = TypeChar
			if st.Mode&unix.S_IFMT == unix.S_IFBLK {
				e.Type = TypeBlock
			}
			e.Dev = fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev))
		case unix.S_IFIFO:
			e.Type = TypeFifo
		case unix.S_IFSOCK:
			e.Type = TypeSocket
		default:
			return fmt.Errorf("treesum: %s: unknown file type %#o", p, st.Mode&unix.S_IFMT)
		}
		if e.Xattrs, err = listXattrs(p); err != nil {
			return err
		}
		if e.Type != TypeDir && st.Nlink > 1 {
			k := inode{st.Dev, st.Ino}
			groups[k] = append(groups[k], len(out))
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, idx := range groups {
		if len(idx) < 2 {
			continue // other links live outside the tree
		}
		first := out[idx[0]].Path // WalkDir visits in lexical order
		for _, i := range idx {
			out[i].LinkGroup = first
		}
	}
	sortEntries(out)
	return out, nil
}

func hashFile(p string) (string, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("treesum: read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func listXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ENOTSUP) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("treesum: list xattrs of %s: %w", p, err)
	}
	var m map[string]string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		val := make([]byte, 64<<10)
		vn, err := unix.Lgetxattr(p, name, val)
		if err != nil {
			return nil, fmt.Errorf("treesum: get xattr %s of %s: %w", name, p, err)
		}
		if m == nil {
			m = map[string]string{}
		}
		m[name] = string(val[:vn])
	}
	return m, nil
}

// Tar reads an uncompressed tar stream of a whole tree (what
// `podman export` or `tar -C dir -cf - .` writes) the way Dir reads a
// directory. The root appears as "/" only if the stream has an entry
// for it. Later entries for a path replace earlier ones, as extraction
// would; whiteouts are not interpreted.
func Tar(r io.Reader) ([]Entry, error) {
	tr := tar.NewReader(r)
	byPath := map[string]*Entry{}
	group := map[string]string{} // path -> a key shared by its link group
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("treesum: read tar: %w", err)
		}
		p := path.Clean("/" + hdr.Name)
		e := Entry{Path: p, UID: hdr.Uid, GID: hdr.Gid, Mode: unixToMode(uint32(hdr.Mode) & 0o7777)}
		for k, v := range hdr.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if e.Xattrs == nil {
					e.Xattrs = map[string]string{}
				}
				e.Xattrs[name] = v
			}
		}
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeGNUSparse:
			e.Type = TypeFile
			h := sha256.New()
			n, err := io.Copy(h, tr)
			if err != nil {
				return nil, fmt.Errorf("treesum: read %s: %w", p, err)
			}
			e.Size, e.SHA256 = n, hex.EncodeToString(h.Sum(nil))
		case tar.TypeDir:
			e.Type = TypeDir
		case tar.TypeSymlink:
			e.Type, e.Link, e.Mode = TypeSymlink, hdr.Linkname, 0
		case tar.TypeChar, tar.TypeBlock:
			e.Type = TypeChar
			if hdr.Typeflag == tar.TypeBlock {
				e.Type = TypeBlock
			}
			e.Dev = fmt.Sprintf("%d:%d", hdr.Devmajor, hdr.Devminor)
		case tar.TypeFifo:
			e.Type = TypeFifo
		case tar.TypeLink:
			t := path.Clean("/" + hdr.Linkname)
			te, ok := byPath[t]
			if !ok {
				return nil, fmt.Errorf("treesum: %s: hard link to %s, which comes nowhere before it", p, t)
			}
			e = *te
			e.Path = p
			if te.Xattrs != nil {
				e.Xattrs = map[string]string{}
				for k, v := range te.Xattrs {
					e.Xattrs[k] = v
				}
			}
			if _, ok := group[t]; !ok {
				group[t] = t
			}
			group[p] = group[t]
			byPath[p] = &e
			continue
		case tar.TypeXGlobalHeader:
			continue
		default:
			return nil, fmt.Errorf("treesum: %s: unsupported tar type %q", p, hdr.Typeflag)
		}
		delete(group, p) // a new inode replaces any earlier link
		byPath[p] = &e
	}
	members := map[string][]string{}
	for p, k := range group {
		members[k] = append(members[k], p)
	}
	out := make([]Entry, 0, len(byPath))
	for _, e := range byPath {
		if ps := members[group[e.Path]]; len(ps) > 1 {
			sort.Strings(ps)
			e.LinkGroup = ps[0]
		}
		out = append(out, *e)
	}
	sortEntries(out)
	return out, nil
}

func sortEntries(es []Entry) {
	sort.Slice(es, func(i, j int) bool { return es[i].Path < es[j].Path })
}

func unixToMode(m uint32) fs.FileMode {
	fm := fs.FileMode(m & 0o777)
	if m&unix.S_ISUID != 0 {
		fm |= fs.ModeSetuid
	}
	if m&unix.S_ISGID != 0 {
		fm |= fs.ModeSetgid
	}
	if m&unix.S_ISVTX != 0 {
		fm |= fs.ModeSticky
	}
	return fm
}

// UnixMode is m as chmod writes it, 04755 for setuid rwxr-xr-x.
func UnixMode(m fs.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		u |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		u |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		u |= 0o1000
	}
	return u
}

// Mode is the fs.FileMode for a chmod-style mode such as 04755, to
// declare expected entries by hand.
func Mode(u uint32) fs.FileMode { return unixToMode(u) }

// Diff returns one line per difference between want and got, saying
// want's value first ("/etc/x: mode 0644 != 0600"), or nothing if they
// are equal. Each ignore is a path to leave out, or, ending in "/", a
// directory whose descendants to leave out ("/tmp/" skips /tmp/a but
// not /tmp).
func Diff(want, got []Entry, ignore ...string) []string {
	skip := func(p string) bool {
		for _, ig := range ignore {
			if p == ig || (strings.HasSuffix(ig, "/") && strings.HasPrefix(p, ig) && p != ig) {
				return true
			}
		}
		return false
	}
	w := index(want)
	g := index(got)
	var paths []string
	for p := range w {
		paths = append(paths, p)
	}
	for p := range g {
		if _, ok := w[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	var out []string
	for _, p := range paths {
		if skip(p) {
			continue
		}
		we, wok := w[p]
		ge, gok := g[p]
		switch {
		case !gok:
			out = append(out, fmt.Sprintf("%s: missing (want %s)", p, we.Type))
			continue
		case !wok:
			out = append(out, fmt.Sprintf("%s: unexpected %s", p, ge.Type))
			continue
		}
		add := func(what string, a, b any) {
			out = append(out, fmt.Sprintf("%s: %s %v != %v", p, what, a, b))
		}
		if we.Type != ge.Type {
			add("type", we.Type, ge.Type)
			continue
		}
		if we.Mode != ge.Mode {
			add("mode", fmt.Sprintf("%04o", UnixMode(we.Mode)), fmt.Sprintf("%04o", UnixMode(ge.Mode)))
		}
		if we.UID != ge.UID || we.GID != ge.GID {
			add("owner", fmt.Sprintf("%d:%d", we.UID, we.GID), fmt.Sprintf("%d:%d", ge.UID, ge.GID))
		}
		if we.Size != ge.Size {
			add("size", we.Size, ge.Size)
		}
		if we.SHA256 != ge.SHA256 {
			add("sha256", short(we.SHA256), short(ge.SHA256))
		}
		if we.Link != ge.Link {
			add("symlink target", fmt.Sprintf("%q", we.Link), fmt.Sprintf("%q", ge.Link))
		}
		if we.Dev != ge.Dev {
			add("device", we.Dev, ge.Dev)
		}
		if we.LinkGroup != ge.LinkGroup {
			add("hard link group", orNone(we.LinkGroup), orNone(ge.LinkGroup))
		}
		var names []string
		for k := range we.Xattrs {
			names = append(names, k)
		}
		for k := range ge.Xattrs {
			if _, ok := we.Xattrs[k]; !ok {
				names = append(names, k)
			}
		}
		sort.Strings(names)
		for _, k := range names {
			wv, wok := we.Xattrs[k]
			gv, gok := ge.Xattrs[k]
			switch {
			case !gok:
				out = append(out, fmt.Sprintf("%s: xattr %s missing", p, k))
			case !wok:
				out = append(out, fmt.Sprintf("%s: xattr %s unexpected", p, k))
			case wv != gv:
				add("xattr "+k, fmt.Sprintf("%q", wv), fmt.Sprintf("%q", gv))
			}
		}
	}
	return out
}

func index(es []Entry) map[string]Entry {
	m := make(map[string]Entry, len(es))
	for _, e := range es {
		m[e.Path] = e
	}
	return m
}

func short(h string) string {
	if h == "" {
		return "(none)"
	}
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
