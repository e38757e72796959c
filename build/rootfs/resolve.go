package rootfs

import (
	"errors"
	"strings"

	"golang.org/x/sys/unix"
)

// maxSymlinks matches the kernel's limit on symlinks followed in one
// lookup, so the portable resolver fails where openat2 would.
const maxSymlinks = 40

// resolver opens directories named by paths inside a root directory,
// following symlinks as if the root were "/" (the guest's view), so
// that no symlink planted by a layer can lead a later entry outside.
type resolver struct {
	root    int  // O_PATH fd of the root directory
	openat2 bool // kernel has openat2 with RESOLVE_IN_ROOT (5.6+)
}

func newResolver(root int, tryOpenat2 bool) resolver {
	r := resolver{root: root}
	if !tryOpenat2 {
		return r
	}
	fd, err := unix.Openat2(root, ".", &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err == nil {
		unix.Close(fd)
		r.openat2 = true
	}
	// ENOSYS on old kernels, EPERM or ENOSYS under seccomp filters that
	// predate openat2: the portable walk below does the same job.
	return r
}

// openDir returns a new O_PATH fd of the directory rel ("" is the root).
// Every component, symlinks included, is resolved inside the root. The
// caller closes the fd.
func (r resolver) openDir(rel string) (int, error) {
	if rel == "" {
		rel = "."
	}
	if r.openat2 {
		how := unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
		}
		for {
			fd, err := unix.Openat2(r.root, rel, &how)
			// EAGAIN: a concurrent rename somewhere in the tree; retry as
			// the kernel asks.
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
				continue
			}
			return fd, err
		}
	}
	return r.walk(rel)
}

// walk is openDir without openat2: one component at a time, each opened
// with O_NOFOLLOW, symlinks read and spliced into the remaining path,
// ".." never climbing above the root. Like filepath-securejoin, but on
// fds so a component cannot be swapped between check and use by us.
func (r resolver) walk(rel string) (int, error) {
	var stack []int // directories below the root, deepest last
	defer func() {
		for _, fd := range stack {
			unix.Close(fd)
		}
	}()
	cur := func() int {
		if len(stack) == 0 {
			return r.root
		}
		return stack[len(stack)-1]
	}
	// todo holds the components still to walk, next one last.
	var todo []string
	push := func(p string) {
		parts := strings.Split(p, "/")
		for i := len(parts) - 1; i >= 0; i-- {
			todo = append(todo, parts[i])
		}
	}
	push(rel)
	links := 0
	buf := make([]byte, unix.PathMax)
	for len(todo) > 0 {
		c := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) > 0 {
				unix.Close(stack[len(stack)-1])
				stack = stack[:len(stack)-1]
			}
			continue
		}
		fd, err := unix.Openat(cur(), c, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return -1, err
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			unix.Close(fd)
			return -1, err
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFDIR:
			stack = append(stack, fd)
		case unix.S_IFLNK:
			links++
			n, err := unix.Readlinkat(fd, "", buf)
			unix.Close(fd)
			if err != nil {
				return -1, err
			}
			if links > maxSymlinks {
				return -1, unix.ELOOP
			}
			target := string(buf[:n])
			if strings.HasPrefix(target, "/") {
				for _, fd := range stack {
					unix.Close(fd)
				}
				stack = stack[:0]
			}
			push(target)
		default:
			unix.Close(fd)
			return -1, unix.ENOTDIR
		}
	}
	if len(stack) == 0 {
		return unix.Openat(r.root, ".", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	fd := stack[len(stack)-1]
	stack = stack[:len(stack)-1]
	return fd, nil
}
