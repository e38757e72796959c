package sdnotify

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// listen opens a datagram socket at addr as systemd's would be.
func listen(t *testing.T, addr string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func read(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

func TestSend(t *testing.T) {
	// A path past what a socket address holds, as conmon's are.
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 90))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{
		filepath.Join(t.TempDir(), "notify.sock"),
		filepath.Join(dir, "notify.sock"),
		"@cwrun-sdnotify-test-" + filepath.Base(t.TempDir()),
	} {
		var c *net.UnixConn
		if len(addr) > 100 && addr[0] != '@' {
			// Bound through the folder, as Send reaches it.
			wd, _ := os.Getwd()
			os.Chdir(filepath.Dir(addr))
			c = listen(t, filepath.Base(addr))
			os.Chdir(wd)
		} else {
			c = listen(t, addr)
		}
		if err := Send(addr, "READY=1\nSTATUS=serving"); err != nil {
			t.Fatalf("Send to %s: %v", addr, err)
		}
		if got := read(t, c); got != "READY=1\nSTATUS=serving" {
			t.Errorf("%s received %q", addr, got)
		}
	}
	if err := Send(filepath.Join(t.TempDir(), "none.sock"), "READY=1"); err == nil {
		t.Error("Send to a missing socket succeeded")
	}
	t.Setenv(Env, "")
	if err := FromEnv("READY=1"); err != nil {
		t.Errorf("FromEnv without a socket: %v", err)
	}
}
