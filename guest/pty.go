package guest

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"golang.org/x/sys/unix"
)

// pty is the workload's terminal (cwrun run -t): the workload gets the
// slave as its stdin, stdout, stderr and controlling terminal; the init
// relays the master to and from the host's stdio ports.
type pty struct {
	master, slave *os.File
}

// defaultSize is the pty's size when the host has no terminal.
var defaultSize = proto.WinSize{Rows: 24, Cols: 80}

// openPTY allocates a pty in the devpts instance that switchRoot
// mounted at dev/pts of the sealed root (newinstance, ptmxmode=0666),
// so the workload sees its own /dev/pts/N.
func openPTY(devpts string, size *proto.WinSize) (*pty, error) {
	m, err := os.OpenFile(devpts+"/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("opening a pty master (%s/ptmx): %w (is devpts mounted?)", devpts, err)
	}
	var n int
	err = control(m, func(fd int) error {
		if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
			return fmt.Errorf("unlocking the pty: %w", err)
		}
		var err error
		if n, err = unix.IoctlGetInt(fd, unix.TIOCGPTN); err != nil {
			return fmt.Errorf("reading the pty's number: %w", err)
		}
		return nil
	})
	if err != nil {
		m.Close()
		return nil, err
	}
	s, err := os.OpenFile(fmt.Sprintf("%s/%d", devpts, n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		m.Close()
		return nil, fmt.Errorf("opening the pty slave %s/%d: %w", devpts, n, err)
	}
	p := &pty{master: m, slave: s}
	if size == nil {
		size = &defaultSize
	}
	if err := p.resize(*size); err != nil {
		p.close()
		return nil, err
	}
	return p, nil
}

// control runs f on f's descriptor without File.Fd, which would switch
// the descriptor to blocking mode and take it out of the poller.
func control(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// resize sets the window size; the kernel sends SIGWINCH to the pty's
// foreground process group when it changed.
func (p *pty) resize(s proto.WinSize) error {
	if s.Rows <= 0 || s.Cols <= 0 || s.Rows > 0xffff || s.Cols > 0xffff {
		return fmt.Errorf("window size %dx%d out of range", s.Rows, s.Cols)
	}
	return control(p.master, func(fd int) error {
		if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: uint16(s.Rows), Col: uint16(s.Cols)}); err != nil {
			return fmt.Errorf("setting the pty's size: %w", err)
		}
		return nil
	})
}

// chown gives the slave to the workload's user, as a login does, so
// that it can reopen its terminal by name.
func (p *pty) chown(cred *syscall.Credential) error {
	if cred == nil {
		return nil
	}
	if err := p.slave.Chown(int(cred.Uid), -1); err != nil {
		return fmt.Errorf("giving the pty to uid %d: %w", cred.Uid, err)
	}
	return nil
}

func (p *pty) close() {
	p.master.Close()
	if p.slave != nil {
		p.slave.Close()
	}
}

// closeSlave drops the init's copy of the slave once the workload has
// its own: the master reads EIO when the last holder closes it.
func (p *pty) closeSlave() {
	p.slave.Close()
	p.slave = nil
}

// relayOut copies the terminal's output to w (the stdout port) until
// every process holding the slave has closed it, then closes done.
// Read on a Linux pty master returns what is buffered before EIO.
func (p *pty) relayOut(w io.Writer, done chan<- struct{}) {
	defer close(done)
	buf := make([]byte, 32<<10)
	for {
		n, err := p.master.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// veof is the EOF character of a pty in its default (canonical) mode.
const veof = 0x04

// relayIn types what the host sends (the stdin port) into the terminal.
// The host's end of input becomes the EOF character, as if typed: a pty
// has no other way to say it.
func (p *pty) relayIn(r io.Reader) {
	_, err := io.Copy(p.master, r)
	if err == nil || errors.Is(err, io.EOF) {
		p.master.Write([]byte{veof}) //nolint:errcheck // the workload may be gone
	}
}

// waitOutput waits, bounded, for the output relay to finish after the
// workload ended, so that the exit report follows all of its output.
func waitOutput(done <-chan struct{}, limit time.Duration) bool {
	select {
	case <-done:
		return true
	case <-time.After(limit):
		return false
	}
}
