// Package sdnotify sends sd_notify(3) messages: a service tells systemd
// (or podman's conmon) that it is ready, what it is doing, or that it is
// stopping, on the datagram socket named by NOTIFY_SOCKET.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Env names the socket.
const Env = "NOTIFY_SOCKET"

// Send writes state ("READY=1", "STOPPING=1", "STATUS=...", several
// joined by newlines) to the socket at path: a file system path, or an
// abstract one written "@name" (Go dials those as such).
func Send(path, state string) error {
	addr := path
	// conmon's socket lies deep in podman's storage, past the 107 bytes
	// a socket address holds: reach it through a descriptor of its
	// folder instead.
	if len(addr) > 100 && addr[0] != '@' {
		dir, err := os.OpenFile(filepath.Dir(path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("sd_notify socket %s: %w", path, err)
		}
		defer dir.Close()
		addr = fmt.Sprintf("/proc/self/fd/%d/%s", dir.Fd(), filepath.Base(path))
	}
	c, err := net.DialTimeout("unixgram", addr, 5*time.Second)
	if err != nil {
		return fmt.Errorf("sd_notify socket %s: %w", path, err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(5 * time.Second)) //nolint:errcheck // a plain socket has deadlines
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify to %s: %w", path, err)
	}
	return nil
}

// FromEnv sends state to the socket NOTIFY_SOCKET names; without one it
// does nothing (the service runs outside systemd).
func FromEnv(state string) error {
	path := os.Getenv(Env)
	if path == "" {
		return nil
	}
	return Send(path, state)
}
