package guest

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/cwrun/cwrun/guest/proto"
	"golang.org/x/sys/unix"
)

// startWorkload starts the workload in its own session (so that host
// signals reach its whole process group) with stdio as its stdin,
// stdout and stderr. With tty, stdio[0] is a pty slave and becomes the
// session's controlling terminal (setsid, then TIOCSCTTY), so that the
// pty's line discipline signals the workload (Ctrl-C, window size).
// os.StartProcess rather than exec.Cmd: PID 1 reaps with Wait4(-1),
// which would race exec.Cmd.Wait.
func startWorkload(w workload, cred *syscall.Credential, stdio []*os.File, tty bool) (*os.Process, error) {
	path, err := lookPath(w.Args[0], w.Env)
	if err != nil {
		return nil, err
	}
	// Ctty is a descriptor number in the child: its stdin.
	p, err := os.StartProcess(path, w.Args, &os.ProcAttr{
		Dir:   w.Dir,
		Env:   w.Env,
		Files: stdio,
		Sys:   &syscall.SysProcAttr{Setsid: true, Setctty: tty, Ctty: 0, Credential: cred},
	})
	if err != nil {
		return nil, fmt.Errorf("starting %q in %s: %w", w.Args, w.Dir, err)
	}
	return p, nil
}

// reapUntil reaps every child (PID 1 inherits all orphans) until pid
// exits, and returns pid's status.
func reapUntil(pid int) (unix.WaitStatus, error) {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("waiting for the workload (pid %d): %w", pid, err)
		}
		if got == pid {
			return ws, nil
		}
	}
}

// exitMessage reports how the workload ended.
func exitMessage(ws unix.WaitStatus) proto.Message {
	if ws.Signaled() {
		return proto.Message{Type: proto.TypeExit, Signal: int(ws.Signal())}
	}
	return proto.Exit(ws.ExitStatus())
}

// forwardControl serves the host's messages while the workload runs:
// "signal" goes to the workload's process group, "resize" to its pty
// (resize nil: no pty, ignored). It returns when the control stream
// ends.
func forwardControl(conn *proto.Conn, pid int, resize func(proto.WinSize) error, log *console) {
	for {
		m, err := conn.Recv()
		if err != nil {
			return
		}
		if m.Type == proto.TypeResize && resize != nil {
			if err := resize(proto.WinSize{Rows: m.Rows, Cols: m.Cols}); err != nil {
				log.Printf("resizing the pty: %v", err)
			}
			continue
		}
		if m.Type != proto.TypeSignal || m.Signal <= 0 || m.Signal >= 65 {
			continue
		}
		sig := unix.Signal(m.Signal)
		if err := unix.Kill(-pid, sig); err != nil {
			if err := unix.Kill(pid, sig); err != nil {
				log.Printf("forwarding signal %d to pid %d: %v", m.Signal, pid, err)
			}
		}
	}
}
