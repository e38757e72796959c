package launcher

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/cwrun/cwrun/guest/proto"
	"golang.org/x/term"
)

// hostTerm is the host side of -t: the terminal the user types on
// (cwrun's stdin, when -i relays it and it is a terminal), put in raw
// mode while the workload runs so that every key, Ctrl-C included,
// reaches the guest's pty; and the terminal whose size the pty follows.
type hostTerm struct {
	in    *os.File // the typing terminal; nil: none
	sized *os.File // the terminal to take the size from; nil: none
	saved *term.State
	isRaw atomic.Bool // read by warnWriter, from any goroutine
}

// newHostTerm finds the terminals among stdin (nil when -i is off),
// stdout and stderr.
func newHostTerm(stdin io.Reader, stdout, stderr io.Writer) *hostTerm {
	h := &hostTerm{}
	if f, ok := stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		h.in = f
	}
	// The output's terminal first, as docker does: it is where the
	// workload draws.
	for _, w := range []any{stdout, stderr, stdin} {
		if f, ok := w.(*os.File); ok && f != nil && term.IsTerminal(int(f.Fd())) {
			h.sized = f
			break
		}
	}
	return h
}

// size is the terminal's size, nil when there is no terminal.
func (h *hostTerm) size() *proto.WinSize {
	if h.sized == nil {
		return nil
	}
	w, r, err := term.GetSize(int(h.sized.Fd()))
	if err != nil || w <= 0 || r <= 0 {
		return nil
	}
	return &proto.WinSize{Rows: r, Cols: w}
}

// makeRaw puts the typing terminal in raw mode (no echo, no line
// editing, no signals from keys, no output processing: the guest's pty
// does all of that). restore undoes it; both do nothing without one.
func (h *hostTerm) makeRaw() error {
	if h.in == nil || h.saved != nil {
		return nil
	}
	st, err := term.MakeRaw(int(h.in.Fd()))
	if err != nil {
		return fmt.Errorf("putting the terminal in raw mode for -t: %w", err)
	}
	h.saved = st
	h.isRaw.Store(true)
	return nil
}

func (h *hostTerm) restore() error {
	if h.saved == nil {
		return nil
	}
	st := h.saved
	h.saved = nil
	h.isRaw.Store(false)
	if err := term.Restore(int(h.in.Fd()), st); err != nil {
		return fmt.Errorf("restoring the terminal's mode: %w (run `stty sane` to repair it)", err)
	}
	return nil
}

// raw reports whether the terminal is in raw mode now.
func (h *hostTerm) raw() bool { return h.isRaw.Load() }

// warnWriter carries cwrun's own messages to w. While the terminal is
// in raw mode its output processing is off, so a bare newline would
// only move down a line: each gets the carriage return the terminal no
// longer adds.
type warnWriter struct {
	w io.Writer
	t *hostTerm
}

func (ww warnWriter) Write(p []byte) (int, error) {
	if !ww.t.raw() {
		return ww.w.Write(p)
	}
	if _, err := ww.w.Write(bytes.ReplaceAll(p, []byte("\n"), []byte("\r\n"))); err != nil {
		return 0, err
	}
	return len(p), nil
}
