package oci

import (
	"fmt"
	"net"
	"os"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// openPTY makes a host pseudo-terminal pair. With -t, conmon gets the
// master (its console: podman logs, attach, resize) and the supervisor
// the slave as its stdin, stdout, stderr and controlling terminal; the
// launcher then gives the workload a pty in the guest and relays
// between the two.
func openPTY(size *specs.Box) (master, slave *os.File, err error) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("opening a pseudo-terminal for -t: %w", err)
	}
	fail := func(what string, err error) (*os.File, *os.File, error) {
		m.Close()
		return nil, nil, fmt.Errorf("setting up the pseudo-terminal for -t: %s: %w", what, err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		return fail("unlockpt", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		return fail("ptsname", err)
	}
	name := "/dev/pts/" + strconv.Itoa(n)
	s, err := os.OpenFile(name, os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail("opening "+name, err)
	}
	if size != nil && size.Width > 0 && size.Height > 0 {
		ws := &unix.Winsize{Row: uint16(size.Height), Col: uint16(size.Width)}
		if err := unix.IoctlSetWinsize(int(m.Fd()), unix.TIOCSWINSZ, ws); err != nil {
			s.Close()
			return fail("setting its size", err)
		}
	}
	return m, s, nil
}

// sendConsole hands the pty master to conmon over its console socket,
// as runc does: one message whose data is the terminal's name and
// whose control message carries the descriptor (SCM_RIGHTS).
func sendConsole(socket string, master, slave *os.File) error {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		return fmt.Errorf("--console-socket %s: %w", socket, err)
	}
	defer c.Close()
	n, oobn, err := c.WriteMsgUnix([]byte(slave.Name()), unix.UnixRights(int(master.Fd())), nil)
	if err == nil && (n == 0 || oobn == 0) {
		err = fmt.Errorf("short write (%d bytes, %d of control data)", n, oobn)
	}
	if err != nil {
		return fmt.Errorf("sending the terminal to --console-socket %s: %w", socket, err)
	}
	return nil
}
