package rootfs

import (
	"archive/tar"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

const paxXattr = "SCHILY.xattr."

// futimens sets the times of fd itself. x/sys has no futimens, and its
// Futimes goes through /proc; utimensat with a NULL path is the syscall.
func futimens(fd int, ts *[2]unix.Timespec) error {
	_, _, e := unix.Syscall6(unix.SYS_UTIMENSAT, uintptr(fd), 0, uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// readUmask returns the process umask without changing it (umask(2)
// can only be read by setting it, which races with other goroutines),
// or -1 where /proc does not say (Linux before 4.7).
func readUmask() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				return -1
			}
			return int(m)
		}
	}
	return -1
}

// setXattrs sets the entry's PAX xattrs with set. "user." attributes are
// skipped where the file system does not support them, or (userOK false:
// symlinks, devices, fifos) where the kernel forbids them on such inodes;
// every other failure is an error.
func setXattrs(hdr *tar.Header, userOK bool, set func(name string, val []byte) error) error {
	if len(hdr.PAXRecords) == 0 {
		return nil
	}
	var names []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) {
			names = append(names, k)
		}
	}
	sort.Strings(names) // deterministic order, deterministic errors
	for _, k := range names {
		name := k[len(paxXattr):]
		err := set(name, []byte(hdr.PAXRecords[k]))
		if err == nil {
			continue
		}
		if strings.HasPrefix(name, "user.") &&
			(errors.Is(err, unix.ENOTSUP) || (!userOK && errors.Is(err, unix.EPERM))) {
			continue
		}
		return fmt.Errorf("set xattr %s: %w; the root file system directory must be on a file system with xattrs (ext4, xfs, tmpfs), and security.* needs root", name, err)
	}
	return nil
}
