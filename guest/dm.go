package guest

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Device-mapper's ioctl interface (linux/dm-ioctl.h), the part needed to
// create one device with one table. Every command takes a struct
// dm_ioctl followed by its data in one buffer.
const (
	dmIoctlSize  = 312 // sizeof(struct dm_ioctl)
	dmTargetSize = 40  // sizeof(struct dm_target_spec)
	dmNameLen    = 128
	dmUUIDLen    = 129
	dmMaxType    = 16

	dmDevCreate  = 3
	dmDevRemove  = 4
	dmDevSuspend = 6
	dmTableLoad  = 9

	// DM_SECURE_DATA_FLAG: the kernel wipes its copy of our buffer,
	// which holds the volume key, after use.
	dmSecureDataFlag = 1 << 15
	dmReadonlyFlag   = 1 << 0
)

// dmIoc is _IOWR(0xfd, nr, struct dm_ioctl).
func dmIoc(nr uintptr) uintptr {
	return 3<<30 | dmIoctlSize<<16 | 0xfd<<8 | nr
}

// dmTarget is one line of a table.
type dmTarget struct {
	Start, Length uint64 // 512-byte sectors
	Type          string
	Params        []byte // wiped by the caller: holds the key for crypt
}

// dmBuffer lays out struct dm_ioctl, then (for table loads) each
// dm_target_spec with its NUL-terminated, 8-aligned parameter string.
func dmBuffer(name string, flags uint32, targets []dmTarget) []byte {
	size := dmIoctlSize
	for _, t := range targets {
		size += dmTargetSize + align8(len(t.Params)+1)
	}
	b := make([]byte, size)
	le := binary.LittleEndian
	le.PutUint32(b[0:], 4) // interface version 4.0.0: any 4.x kernel accepts it
	le.PutUint32(b[12:], uint32(size))
	le.PutUint32(b[16:], dmIoctlSize) // data_start
	le.PutUint32(b[20:], uint32(len(targets)))
	le.PutUint32(b[28:], flags)
	copy(b[48:48+dmNameLen-1], name)
	off := dmIoctlSize
	for _, t := range targets {
		n := dmTargetSize + align8(len(t.Params)+1)
		le.PutUint64(b[off:], t.Start)
		le.PutUint64(b[off+8:], t.Length)
		le.PutUint32(b[off+20:], uint32(n)) // next: from this spec to the next
		copy(b[off+24:off+24+dmMaxType-1], t.Type)
		copy(b[off+dmTargetSize:], t.Params)
		off += n
	}
	return b
}

func align8(n int) int { return (n + 7) &^ 7 }

func dmIoctl(ctl *os.File, nr uintptr, buf []byte) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), dmIoc(nr), uintptr(unsafe.Pointer(&buf[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

// dmCreate creates device name with the given table, activates it, and
// returns its dev_t. The caller wipes the targets' Params.
func dmCreate(name string, targets []dmTarget, readOnly bool) (dev uint64, err error) {
	ctl, err := os.OpenFile("/dev/mapper/control", os.O_RDWR, 0)
	if err != nil {
		return 0, fmt.Errorf("opening /dev/mapper/control: %w (is the dm-mod module loaded?)", err)
	}
	defer ctl.Close()

	b := dmBuffer(name, 0, nil)
	if err := dmIoctl(ctl, dmDevCreate, b); err != nil {
		return 0, fmt.Errorf("device-mapper: creating %s: %w", name, err)
	}
	dev = binary.LittleEndian.Uint64(b[40:])
	var flags uint32 = dmSecureDataFlag
	if readOnly {
		flags |= dmReadonlyFlag
	}
	tb := dmBuffer(name, flags, targets)
	err = dmIoctl(ctl, dmTableLoad, tb)
	clear(tb)
	if err != nil {
		dmIoctl(ctl, dmDevRemove, dmBuffer(name, 0, nil)) //nolint:errcheck // best effort: we power off next
		return 0, fmt.Errorf("device-mapper: loading the %s table of %s: %w (is the dm-crypt module loaded and the cipher available?)", targets[0].Type, name, err)
	}
	// DM_DEV_SUSPEND without DM_SUSPEND_FLAG resumes: it makes the
	// loaded table live.
	if err := dmIoctl(ctl, dmDevSuspend, dmBuffer(name, 0, nil)); err != nil {
		dmIoctl(ctl, dmDevRemove, dmBuffer(name, 0, nil)) //nolint:errcheck // best effort
		return 0, fmt.Errorf("device-mapper: activating %s: %w", name, err)
	}
	return dev, nil
}

// mknodMapper makes /dev/mapper/<name>: there is no udev to do it.
func mknodMapper(name string, dev uint64) (string, error) {
	path := "/dev/mapper/" + name
	// dm_ioctl.dev is the kernel's huge_encode_dev, the same layout as
	// glibc's dev_t that unix.Major/Minor decode.
	if err := unix.Mknod(path, unix.S_IFBLK|0o600, int(unix.Mkdev(unix.Major(dev), unix.Minor(dev)))); err != nil && !os.IsExist(err) {
		return "", fmt.Errorf("creating %s (%d:%d): %w", path, unix.Major(dev), unix.Minor(dev), err)
	}
	return path, nil
}
