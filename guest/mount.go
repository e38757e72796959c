package guest

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

type mount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

// earlyMounts are what the init needs before anything else; they move
// into the sealed root later.
var earlyMounts = []mount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
}

func mountAll(ms []mount) error {
	for _, m := range ms {
		if err := doMount(m); err != nil {
			return err
		}
	}
	return nil
}

func doMount(m mount) error {
	if err := os.MkdirAll(m.target, 0o755); err != nil {
		return fmt.Errorf("creating mount point %s: %w", m.target, err)
	}
	if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
		return fmt.Errorf("mounting %s (%s) on %s: %w", m.source, m.fstype, m.target, err)
	}
	return nil
}
