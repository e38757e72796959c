package launcher

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestHostTerm: the size comes from the terminal, raw mode turns off
// echo, line editing and key signals, and restore brings them back.
func TestHostTerm(t *testing.T) {
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pty: %v", err)
	}
	defer m.Close()
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := unix.IoctlSetWinsize(int(m.Fd()), unix.TIOCSWINSZ, &unix.Winsize{Row: 42, Col: 137}); err != nil {
		t.Fatal(err)
	}
	lflag := func() uint32 {
		tio, err := unix.IoctlGetTermios(int(s.Fd()), unix.TCGETS)
		if err != nil {
			t.Fatal(err)
		}
		return tio.Lflag & (unix.ECHO | unix.ICANON | unix.ISIG)
	}
	cooked := lflag()
	if cooked != unix.ECHO|unix.ICANON|unix.ISIG {
		t.Fatalf("a new pty is not cooked: %#x", cooked)
	}

	// Output to a buffer, stdin the terminal: the size comes from stdin.
	h := newHostTerm(s, &bytes.Buffer{}, &bytes.Buffer{})
	if sz := h.size(); sz == nil || sz.Rows != 42 || sz.Cols != 137 {
		t.Fatalf("size %+v, want 42x137", sz)
	}
	var warned bytes.Buffer
	warn := warnWriter{w: &warned, t: h}
	fmt.Fprintf(warn, "cooked\n")
	if err := h.makeRaw(); err != nil {
		t.Fatal(err)
	}
	if got := lflag(); got != 0 || !h.raw() {
		t.Errorf("raw mode left lflag %#x", got)
	}
	fmt.Fprintf(warn, "cwrun: one\ntwo\n")
	if err := h.restore(); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(warn, "again\n")
	if got, want := warned.String(), "cooked\ncwrun: one\r\ntwo\r\nagain\n"; got != want {
		t.Errorf("cwrun's messages around raw mode: %q, want %q", got, want)
	}
	if got := lflag(); got != cooked || h.raw() {
		t.Errorf("restored lflag %#x, want %#x", got, cooked)
	}
	if err := h.restore(); err != nil {
		t.Errorf("a second restore: %v", err)
	}

	// No terminal at all: no size, and raw mode is a no-op.
	none := newHostTerm(nil, &bytes.Buffer{}, &bytes.Buffer{})
	if none.size() != nil || none.makeRaw() != nil || none.raw() {
		t.Error("a terminal was found among buffers")
	}
	// A terminal on stdout only: its size, but nothing to make raw.
	out := newHostTerm(nil, s, &bytes.Buffer{})
	if sz := out.size(); sz == nil || sz.Rows != 42 {
		t.Errorf("stdout's size: %+v", sz)
	}
	if err := out.makeRaw(); err != nil || out.raw() || lflag() != cooked {
		t.Errorf("stdout's terminal was made raw: %v", err)
	}
}
