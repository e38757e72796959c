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
// signals reach its whole process group) with the ports as its stdio.
// os.StartProcess rather than exec.Cmd: PID 1 reaps with Wait4(-1),
// which would race exec.Cmd.Wait.
func startWorkload(w workload, cred *syscall.Credential, stdio []*os.File) (*os.Process, error) {
	path, err := lookPath(w.Args[0], w.Env)
	if err != nil {
		return nil, err
	}
	p, err := os.StartProcess(path, w.Args, &os.ProcAttr{
		Dir:   w.Dir,
		Env:   w.Env,
		Files: stdio,
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: cred},
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

// forwardSignals delivers the host's "signal" messages to the
// workload's process group until the control stream ends.
func forwardSignals(conn *proto.Conn, pid int, log *console) {
	for {
		m, err := conn.Recv()
		if err != nil {
			return
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
