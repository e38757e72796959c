package guest

import (
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// console writes the init's log lines to the serial console, where the
// launcher shows the last ones when a boot fails before the control
// port opened.
type console struct{ w io.Writer }

func openConsole() *console {
	// The kernel opened /dev/console (the cpio carries the node) as our
	// stdio; after devtmpfs is mounted open it again in case it did not.
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY|unix.O_NOCTTY, 0); err == nil {
		return &console{w: f}
	}
	return &console{w: os.Stderr}
}

func (c *console) Printf(format string, args ...any) {
	fmt.Fprintf(c.w, "cwrun-init: "+format+"\n", args...)
}

// bootMS is the time since boot, suspend included: the same clock the
// kernel's own timestamps start from, so stage times include the kernel.
func bootMS() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano()).Milliseconds()
}
