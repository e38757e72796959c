package rootfs

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Options tunes Apply. The zero value means full fidelity: owners,
// device nodes, setuid bits and xattrs are all restored, which needs
// root (CAP_CHOWN, CAP_MKNOD, CAP_FOWNER, CAP_SYS_ADMIN for trusted.*).
// Fields may be added later (an ID map for rootless sealing); their zero
// value will keep meaning full fidelity.
type Options struct {
	// noOpenat2 makes Apply use the portable path resolver even where
	// the kernel has openat2, so that tests cover the path that old
	// kernels and seccomp-filtered containers take.
	noOpenat2 bool
}

// ErrEscape marks a layer entry whose name, or hard link target, leads
// outside the root file system. Only a corrupt or hostile image has one.
var ErrEscape = errors.New("escapes the root file system")

const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = ".wh..wh." // AUFS bookkeeping (.wh..wh.plnk, ...): never extracted
	whiteoutOpaque = ".wh..wh..opq"

	copyBufSize = 1 << 20

	// maxSparseBytes caps the sizes of the sparse files of one layer,
	// added up. A sparse entry declares its size; only its data is in
	// the layer, and archive/tar hands out the holes as zeros that must
	// be read and scanned (about 20 GB/s), so a few KiB of layer could
	// claim an exabyte and keep Apply busy for years. Images seldom hold
	// sparse entries at all (Go's archive/tar, and so docker, buildkit
	// and containerd, never write them).
	maxSparseBytes = 16 << 30
)

// bufPool holds copy buffers: large buffers mean few write syscalls, and
// pooling them keeps one seal's layers from allocating one each.
var bufPool = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// zeros is compared against to find holes; it is never written.
var zeros [copyBufSize]byte

// Apply extracts one uncompressed layer tar stream onto dir, the root
// file system flattened from the layers below, and applies the layer's
// OCI whiteouts: ".wh.NAME" deletes NAME (a file or a whole tree) left
// by lower layers, and ".wh..wh..opq" in a directory deletes everything
// lower layers put in it, but not what this layer adds there, wherever
// the marker sits in the stream.
//
// Names are taken relative to dir whether they are written "/a", "./a"
// or "a"; a name with a ".." component is refused with ErrEscape.
// Symlinks already in the tree are followed as if dir were "/", so they
// can never lead outside dir; the last component of a name is never
// followed. Within one layer the last entry for a name wins. A directory
// entry over an existing directory updates its owner, mode, xattrs and
// times and keeps its content; any other entry replaces whatever it
// lands on. Hard links may point at files of this or a lower layer.
// Directory times are set once the whole layer is in, since adding
// children changes them; directories of lower layers that the layer
// changes without declaring keep their times.
//
// Extended attributes come from PAX "SCHILY.xattr." records. Where the
// file system refuses a "user." attribute as unsupported it is skipped
// (it is only metadata for programs); any other attribute that cannot be
// set (security.capability above all) fails the layer, since dropping it
// would silently change what the workload may do.
//
// On error dir is left partly extracted and should be thrown away.
// ctx is checked between entries and during long file copies. Apply
// must not run twice at once on the same dir.
func Apply(ctx context.Context, dir string, layer io.Reader, opts Options) error {
	root, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open root file system directory %s: %w", dir, err)
	}
	defer unix.Close(root)

	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	a := &applier{
		ctx:       ctx,
		root:      root,
		res:       newResolver(root, !opts.noOpenat2),
		buf:       *bp,
		umask:     readUmask(),
		euid:      os.Geteuid(),
		egid:      os.Getegid(),
		cacheFd:   -1,
		written:   map[string]bool{},
		ancestors: map[string]bool{},
		dirTimes:  map[string]*[2]unix.Timespec{},
	}
	defer a.dropCache()

	// tar.Reader reads headers 512 bytes at a time; a buffer spares the
	// decompressor below those small reads. Large content reads pass
	// straight through bufio.
	tr := tar.NewReader(bufio.NewReaderSize(layer, 1<<20))
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("extract layer into %s: %w", dir, err)
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read layer tar stream: %w; the layer blob is corrupt or truncated", err)
		}
		if err := a.entry(hdr, tr); err != nil {
			if errors.Is(err, ErrEscape) {
				return fmt.Errorf("layer entry %q %w: the image is corrupt or hostile, refusing to extract it", hdr.Name, err)
			}
			return fmt.Errorf("extract layer entry %q into %s: %w", hdr.Name, dir, err)
		}
	}
	if err := a.restoreDirTimes(); err != nil {
		return fmt.Errorf("extract layer into %s: %w", dir, err)
	}
	return nil
}

type applier struct {
	ctx        context.Context
	root       int
	res        resolver
	buf        []byte
	umask      int // -1 when unknown
	euid, egid int

	// One cached parent directory: layers list a directory's entries
	// together, so most entries reuse the previous one's parent. Every
	// change goes through parent(), and a change under the cached
	// directory only touches its children, so the cached fd stays the
	// directory its path names.
	cacheKey    string
	cacheFd     int
	cacheSetgid bool

	sparseBytes int64 // sizes of this layer's sparse files so far

	written   map[string]bool // names this layer created or updated
	ancestors map[string]bool // directories above written names

	dirTimes map[string]*[2]unix.Timespec // atime, mtime to set at the end
	dirOrder []string
}

// cleanName turns a tar name into a path relative to the root ("" for
// the root itself), refusing any ".." component: no image layer needs
// one, and allowing them only invites escapes.
func cleanName(name string) (string, error) {
	if len(name) >= unix.PathMax {
		return "", fmt.Errorf("name is %d bytes long, longer than a path may be", len(name))
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", errors.New("name contains a NUL byte")
	}
	var b strings.Builder
	for _, c := range strings.Split(name, "/") {
		switch c {
		case "", ".":
			continue
		case "..":
			return "", ErrEscape
		}
		if b.Len() > 0 {
			b.WriteByte('/')
		}
		b.WriteString(c)
	}
	return b.String(), nil
}

func splitRel(rel string) (dir, base string) {
	i := strings.LastIndexByte(rel, '/')
	if i < 0 {
		return "", rel
	}
	return rel[:i], rel[i+1:]
}

func joinRel(dir, base string) string {
	if dir == "" {
		return base
	}
	return dir + "/" + base
}

func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	for _, c := range strings.Split(rel, "/") {
		if strings.HasPrefix(c, whiteoutMeta) && c != whiteoutOpaque {
			return nil
		}
	}
	dirRel, base := splitRel(rel)
	if base == whiteoutOpaque {
		return a.opaque(dirRel)
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		name := base[len(whiteoutPrefix):]
		if name == "" || name == "." || name == ".." {
			if name == ".." {
				return ErrEscape
			}
			return fmt.Errorf("whiteout names no file")
		}
		return a.whiteout(dirRel, name)
	}
	if rel == "" && hdr.Typeflag != tar.TypeDir {
		return fmt.Errorf("the root may only be a directory, not tar type %q", hdr.Typeflag)
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		err = a.dir(rel, dirRel, base, hdr)
	case tar.TypeReg, tar.TypeGNUSparse:
		err = a.file(dirRel, base, hdr, r)
	case tar.TypeSymlink:
		err = a.symlink(dirRel, base, hdr)
	case tar.TypeLink:
		err = a.hardlink(rel, dirRel, base, hdr)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		err = a.special(dirRel, base, hdr)
	case tar.TypeXGlobalHeader:
		return nil
	default:
		return fmt.Errorf("unsupported tar entry type %q", hdr.Typeflag)
	}
	if err != nil {
		return err
	}
	a.markWritten(rel)
	return nil
}

func (a *applier) markWritten(rel string) {
	a.written[rel] = true
	for p, _ := splitRel(rel); p != "" && !a.ancestors[p]; p, _ = splitRel(p) {
		a.ancestors[p] = true
	}
}

func (a *applier) dropCache() {
	if a.cacheFd >= 0 {
		unix.Close(a.cacheFd)
		a.cacheFd = -1
	}
}

// parent returns an O_PATH fd of directory dirRel, owned by the cache
// (callers must not close it). With create, missing directories are made
// (root-owned, 0755, as other extractors do). It returns -1 and no error
// when !create and the directory does not exist.
func (a *applier) parent(dirRel string, create bool) (int, error) {
	if a.cacheFd >= 0 && a.cacheKey == dirRel {
		return a.cacheFd, nil
	}
	a.dropCache()
	fd, err := a.openDir(dirRel, create)
	if err != nil {
		if !create && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR)) {
			return -1, nil
		}
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, err
	}
	a.noteDirTimes(dirRel, &st)
	a.cacheKey, a.cacheFd, a.cacheSetgid = dirRel, fd, st.Mode&unix.S_ISGID != 0
	return fd, nil
}

func (a *applier) openDir(dirRel string, create bool) (int, error) {
	fd, err := a.res.openDir(dirRel)
	if err == nil || !create || dirRel == "" || !errors.Is(err, unix.ENOENT) {
		if err != nil {
			return -1, fmt.Errorf("parent directory /%s: %w", dirRel, err)
		}
		return fd, nil
	}
	pRel, base := splitRel(dirRel)
	pfd, err := a.openDir(pRel, true)
	if err != nil {
		return -1, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err == nil {
		a.noteDirTimes(pRel, &st)
	}
	err = unix.Mkdirat(pfd, base, 0o755)
	if err == nil {
		err = unix.Fchmodat(pfd, base, 0o755, 0) // umask-proof
	} else if errors.Is(err, unix.EEXIST) {
		err = nil
	}
	unix.Close(pfd)
	if err != nil {
		return -1, fmt.Errorf("create parent directory /%s: %w", dirRel, err)
	}
	fd, err = a.res.openDir(dirRel)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return -1, fmt.Errorf("parent directory /%s: %w: a symlink there points to a directory that does not exist in the image", dirRel, err)
		}
		return -1, fmt.Errorf("parent directory /%s: %w", dirRel, err)
	}
	return fd, nil
}

func (a *applier) noteDirTimes(rel string, st *unix.Stat_t) {
	if _, ok := a.dirTimes[rel]; ok {
		return
	}
	a.dirTimes[rel] = &[2]unix.Timespec{st.Atim, st.Mtim}
	a.dirOrder = append(a.dirOrder, rel)
}

func tarTimes(hdr *tar.Header) [2]unix.Timespec {
	ts := func(t time.Time) unix.Timespec {
		return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
	}
	at := hdr.AccessTime
	if at.IsZero() {
		at = hdr.ModTime // deterministic, unlike "now"
	}
	return [2]unix.Timespec{ts(at), ts(hdr.ModTime)}
}

func perm(hdr *tar.Header) uint32 {
	return uint32(hdr.Mode) & 0o7777
}

// needChown reports whether a new inode needs chown: it is born owned
// by our euid and egid, or the directory's group when that is setgid.
func (a *applier) needChown(hdr *tar.Header) bool {
	return hdr.Uid != a.euid || hdr.Gid != a.egid || a.cacheSetgid
}

// needChmod reports whether the mode given at creation, minus the umask,
// differs from the one wanted. Setuid, setgid and sticky bits always
// need chmod, after chown, which clears setuid and setgid.
func (a *applier) needChmod(mode uint32) bool {
	return a.umask < 0 || mode&0o7000 != 0 || mode&uint32(a.umask) != 0
}

// replace clears the way for a new entry at parent/base; create is
// retried once after removing what is there.
func replace(parent int, base string, create func() error) error {
	err := create()
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := removeAllAt(parent, base); err != nil {
		return fmt.Errorf("remove what a lower layer put there: %w", err)
	}
	return create()
}

func (a *applier) file(dirRel, base string, hdr *tar.Header, r io.Reader) error {
	if isSparse(hdr) {
		if hdr.Size > maxSparseBytes-a.sparseBytes {
			return fmt.Errorf("sparse file of %d bytes: the sparse files of one layer may hold %d bytes in all, and this layer's already hold %d; the image is corrupt or hostile", hdr.Size, int64(maxSparseBytes), a.sparseBytes)
		}
		a.sparseBytes += hdr.Size
	}
	p, err := a.parent(dirRel, true)
	if err != nil {
		return err
	}
	mode := perm(hdr)
	fd := -1
	// Never truncate an existing file: it may be a hard link shared with
	// another path. O_EXCL|O_NOFOLLOW: never write through a symlink.
	err = replace(p, base, func() error {
		var err error
		fd, err = unix.Openat(p, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, mode&0o777)
		return err
	})
	if err != nil {
		return fmt.Errorf("create file: %w", err)
	}
	defer func() {
		if fd >= 0 {
			unix.Close(fd)
		}
	}()
	if err := a.copyContent(fd, r, hdr.Size); err != nil {
		return err
	}
	if a.needChown(hdr) {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown %d:%d: %w (restoring owners needs root)", hdr.Uid, hdr.Gid, err)
		}
	}
	if a.needChmod(mode) {
		if err := unix.Fchmod(fd, mode); err != nil {
			return fmt.Errorf("chmod %04o: %w", mode, err)
		}
	}
	// After content and chown: both drop security.capability.
	if err := setXattrs(hdr, true, func(name string, val []byte) error {
		return unix.Fsetxattr(fd, name, val, 0)
	}); err != nil {
		return err
	}
	ts := tarTimes(hdr)
	if err := futimens(fd, &ts); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	err = unix.Close(fd)
	fd = -1
	return err
}

// isSparse reports whether archive/tar may read hdr's entry as a sparse
// file: an old GNU sparse header, or any GNU sparse PAX record.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// copyContent streams size bytes from r to fd. Whole buffers of zeros
// become holes: images carry sparse files (lastlog, faillog) that would
// otherwise fill the disk with zeros.
func (a *applier) copyContent(fd int, r io.Reader, size int64) error {
	var off int64
	hole := false
	for off < size {
		if err := a.ctx.Err(); err != nil {
			return err
		}
		n := int64(len(a.buf))
		if size-off < n {
			n = size - off
		}
		chunk := a.buf[:n]
		if _, err := io.ReadFull(r, chunk); err != nil {
			return fmt.Errorf("read content: %w; the layer blob is corrupt or truncated", err)
		}
		if bytes.Equal(chunk, zeros[:n]) {
			if _, err := unix.Seek(fd, n, io.SeekCurrent); err != nil {
				return fmt.Errorf("write content: %w", err)
			}
			hole = true
		} else {
			for len(chunk) > 0 {
				w, err := unix.Write(fd, chunk)
				if err != nil {
					if errors.Is(err, unix.EINTR) {
						continue
					}
					return fmt.Errorf("write content: %w", err)
				}
				chunk = chunk[w:]
			}
			hole = false
		}
		off += n
	}
	if hole {
		if err := unix.Ftruncate(fd, size); err != nil {
			return fmt.Errorf("write content: %w", err)
		}
	}
	return nil
}

func (a *applier) dir(rel, dirRel, base string, hdr *tar.Header) error {
	var fd int
	if rel == "" {
		var err error
		fd, err = unix.Openat(a.root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
	} else {
		p, err := a.parent(dirRel, true)
		if err != nil {
			return err
		}
		err = unix.Mkdirat(p, base, 0o700)
		if errors.Is(err, unix.EEXIST) {
			var st unix.Stat_t
			if err = unix.Fstatat(p, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
				if err = unix.Unlinkat(p, base, 0); err == nil {
					err = unix.Mkdirat(p, base, 0o700)
				}
			}
		}
		if err != nil {
			return fmt.Errorf("create directory: %w", err)
		}
		fd, err = unix.Openat(p, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open directory: %w", err)
		}
	}
	defer unix.Close(fd)
	// Always chown and chmod: the directory may be a lower layer's.
	if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
		return fmt.Errorf("chown %d:%d: %w (restoring owners needs root)", hdr.Uid, hdr.Gid, err)
	}
	if err := unix.Fchmod(fd, perm(hdr)); err != nil {
		return fmt.Errorf("chmod %04o: %w", perm(hdr), err)
	}
	if err := setXattrs(hdr, true, func(name string, val []byte) error {
		return unix.Fsetxattr(fd, name, val, 0)
	}); err != nil {
		return err
	}
	ts := tarTimes(hdr)
	if _, ok := a.dirTimes[rel]; !ok {
		a.dirOrder = append(a.dirOrder, rel)
	}
	a.dirTimes[rel] = &ts
	return nil
}

func (a *applier) symlink(dirRel, base string, hdr *tar.Header) error {
	if hdr.Linkname == "" {
		return errors.New("symlink has an empty target")
	}
	p, err := a.parent(dirRel, true)
	if err != nil {
		return err
	}
	// The target is data, stored as is: it is resolved later, inside
	// dir by this package and inside the guest's root at run time.
	if err := replace(p, base, func() error { return unix.Symlinkat(hdr.Linkname, p, base) }); err != nil {
		return fmt.Errorf("create symlink: %w", err)
	}
	return a.pathMeta(p, base, hdr, false)
}

// pathMeta sets owner, mode (unless symlink), xattrs and times of a
// non-regular, non-directory inode that cannot be opened for writing.
func (a *applier) pathMeta(p int, base string, hdr *tar.Header, chmod bool) error {
	if a.needChown(hdr) {
		if err := unix.Fchownat(p, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown %d:%d: %w (restoring owners needs root)", hdr.Uid, hdr.Gid, err)
		}
	}
	if chmod && a.needChmod(perm(hdr)) {
		// No AT_SYMLINK_NOFOLLOW (older kernels refuse it); base was
		// just created as a node by us and is not a symlink.
		if err := unix.Fchmodat(p, base, perm(hdr), 0); err != nil {
			return fmt.Errorf("chmod %04o: %w", perm(hdr), err)
		}
	}
	// Through /proc/self/fd/P: the directory fd pins the resolved
	// parent, and lsetxattr does not follow base.
	path := "/proc/self/fd/" + strconv.Itoa(p) + "/" + base
	if err := setXattrs(hdr, false, func(name string, val []byte) error {
		return unix.Lsetxattr(path, name, val, 0)
	}); err != nil {
		return err
	}
	ts := tarTimes(hdr)
	if err := unix.UtimesNanoAt(p, base, ts[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

func (a *applier) special(dirRel, base string, hdr *tar.Header) error {
	p, err := a.parent(dirRel, true)
	if err != nil {
		return err
	}
	mode := perm(hdr) & 0o777
	switch hdr.Typeflag {
	case tar.TypeChar:
		mode |= unix.S_IFCHR
	case tar.TypeBlock:
		mode |= unix.S_IFBLK
	default:
		mode |= unix.S_IFIFO
	}
	dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	err = replace(p, base, func() error { return unix.Mknodat(p, base, mode, int(dev)) })
	if err != nil {
		if errors.Is(err, unix.EPERM) {
			return fmt.Errorf("create device node or fifo: %w: this needs root (CAP_MKNOD); run the seal as root", err)
		}
		return fmt.Errorf("create device node or fifo: %w", err)
	}
	return a.pathMeta(p, base, hdr, true)
}

func (a *applier) hardlink(rel, dirRel, base string, hdr *tar.Header) error {
	target, err := cleanName(hdr.Linkname)
	if err != nil {
		if errors.Is(err, ErrEscape) {
			return fmt.Errorf("hard link target %q %w", hdr.Linkname, err)
		}
		return fmt.Errorf("hard link target %q: %w", hdr.Linkname, err)
	}
	if target == "" {
		return errors.New("hard link to the root directory")
	}
	if target == rel {
		return nil // a link to itself: nothing to do
	}
	tDir, tBase := splitRel(target)
	tp, err := a.res.openDir(tDir)
	if err != nil {
		return fmt.Errorf("hard link target %q: %w; it must be a file of this or a lower layer", hdr.Linkname, err)
	}
	defer unix.Close(tp)
	p, err := a.parent(dirRel, true)
	if err != nil {
		return err
	}
	// Flags 0: link the target itself, never what a symlink there names.
	link := func() error { return unix.Linkat(tp, tBase, p, base, 0) }
	err = link()
	if errors.Is(err, unix.EEXIST) {
		var st1, st2 unix.Stat_t
		if unix.Fstatat(tp, tBase, &st1, unix.AT_SYMLINK_NOFOLLOW) == nil &&
			unix.Fstatat(p, base, &st2, unix.AT_SYMLINK_NOFOLLOW) == nil &&
			st1.Dev == st2.Dev && st1.Ino == st2.Ino {
			return nil // already that file, under another spelling
		}
		err = replace(p, base, link)
	}
	switch {
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("hard link target %q does not exist in this or a lower layer", hdr.Linkname)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("hard link to %q: %w; the target must not be a directory", hdr.Linkname, err)
	case err != nil:
		return fmt.Errorf("hard link to %q: %w", hdr.Linkname, err)
	}
	return nil
}

func (a *applier) whiteout(dirRel, name string) error {
	p, err := a.parent(dirRel, false)
	if err != nil || p < 0 {
		return err
	}
	if err := a.prune(p, name, joinRel(dirRel, name)); err != nil {
		return fmt.Errorf("whiteout: %w", err)
	}
	return nil
}

func (a *applier) opaque(dirRel string) error {
	p, err := a.parent(dirRel, false)
	if err != nil || p < 0 {
		return err
	}
	fd, err := unix.Openat(p, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("opaque whiteout: %w", err)
	}
	if err := a.pruneChildren(fd, dirRel); err != nil {
		return fmt.Errorf("opaque whiteout: %w", err)
	}
	return nil
}

// prune removes what lower layers left at parent/name and keeps what
// this layer wrote: whiteouts apply to lower layers only, and may come
// before or after the entries they must spare.
func (a *applier) prune(parent int, name, rel string) error {
	if !a.written[rel] && !a.ancestors[rel] {
		return removeAllAt(parent, name)
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP):
		if a.written[rel] {
			return nil // a file of this layer
		}
		return removeAllAt(parent, name)
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return err
	}
	return a.pruneChildren(fd, rel)
}

// pruneChildren prunes every child of directory fd, and closes fd.
func (a *applier) pruneChildren(fd int, rel string) error {
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err == nil {
		a.noteDirTimes(rel, &st)
	}
	names, err := readDirNames(fd)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := a.prune(fd, n, joinRel(rel, n)); err != nil {
			return err
		}
	}
	return nil
}

// readDirNames lists directory fd (opened O_RDONLY), leaving it open.
func readDirNames(fd int) ([]string, error) {
	buf := make([]byte, 32<<10)
	var names []string
	for {
		n, err := unix.Getdents(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n <= 0 {
			return names, nil
		}
		_, _, names = unix.ParseDirent(buf[:n], -1, names)
	}
}

// removeAllAt removes parent/name and everything below it, never
// following a symlink. A missing name is not an error.
func removeAllAt(parent int, name string) error {
	err := unix.Unlinkat(parent, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) {
		return err
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readDirNames(fd)
	if err != nil {
		unix.Close(fd)
		return err
	}
	for _, n := range names {
		if err := removeAllAt(fd, n); err != nil {
			unix.Close(fd)
			return err
		}
	}
	unix.Close(fd)
	return unix.Unlinkat(parent, name, unix.AT_REMOVEDIR)
}

// restoreDirTimes sets the times of the directories this layer declared
// or changed, now that nothing more is added to them.
func (a *applier) restoreDirTimes() error {
	a.dropCache()
	for _, rel := range a.dirOrder {
		ts := a.dirTimes[rel]
		if rel == "" {
			fd, err := unix.Openat(a.root, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
			if err != nil {
				return err
			}
			err = futimens(fd, ts)
			unix.Close(fd)
			if err != nil {
				return fmt.Errorf("set times of /: %w", err)
			}
			continue
		}
		dirRel, base := splitRel(rel)
		p, err := a.parent(dirRel, false)
		if err != nil {
			return err
		}
		if p < 0 {
			continue // removed later in the layer
		}
		var st unix.Stat_t
		if unix.Fstatat(p, base, &st, unix.AT_SYMLINK_NOFOLLOW) != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
			continue // removed or replaced later in the layer
		}
		if err := unix.UtimesNanoAt(p, base, ts[:], unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("set times of /%s: %w", rel, err)
		}
	}
	return nil
}
