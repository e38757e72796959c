package guest

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

const sysroot = "/sysroot"

// mountRoot mounts the decrypted ext4 at /sysroot.
func mountRoot(device string) error {
	return doMount(mount{device, sysroot, "ext4", unix.MS_NOATIME, ""})
}

// switchRoot makes /sysroot the root, as switch_root does: move the API
// file systems into it, move it over /, chroot. The initramfs stays in
// memory underneath; it holds only the init and a few modules.
func switchRoot() error {
	for _, m := range earlyMounts {
		dst := filepath.Join(sysroot, m.target)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return fmt.Errorf("creating %s in the sealed root: %w", m.target, err)
		}
		if err := unix.Mount(m.target, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("moving %s into the sealed root: %w", m.target, err)
		}
	}
	if err := unix.Chdir(sysroot); err != nil {
		return fmt.Errorf("entering %s: %w", sysroot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("moving %s to /: %w", sysroot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot into the sealed root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("chdir /: %w", err)
	}
	// What workloads expect beyond the basics; not security steps, but
	// a failure here means a broken root, so it still stops the boot.
	return mountAll([]mount{
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
		{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	})
}
