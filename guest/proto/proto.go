// Package proto is the control protocol between cwrun's launcher (host)
// and cwrun-init (guest): newline-delimited JSON objects, one a line,
// over the virtio-serial port named PortControl. The workload's stdio
// travel on their own ports so that binary output never mixes with
// control messages.
//
// Host → guest: "config" (once, first), then any number of "signal"
// and, with a pty, "resize".
// Guest → host: "ready" as soon as the control port is open, "stage"
// after each boot step, then "started" and "exit", or "error" (after
// which the guest powers off).
//
// With Config.TTY the workload's stdin, stdout and stderr are one pty
// in the guest: its output travels on PortStdout alone, and what the
// host relays on PortStdin is typed into it (so a Ctrl-C byte becomes
// SIGINT there, by the pty's own line discipline).
//
// With Config.KBS the port PortKBS carries plain HTTP/1.1 requests from
// the guest to the key broker, which the launcher relays: the guest
// opens the port and speaks HTTP on it as on a TCP connection.
//
// It is a leaf imported by both sides: no I/O beyond the io interfaces.
package proto

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Names of the virtio-serial ports, as the guest finds them in
// /sys/class/virtio-ports/*/name.
const (
	PortControl = "cwrun.control"
	PortStdout  = "cwrun.stdout"
	PortStderr  = "cwrun.stderr"
	PortStdin   = "cwrun.stdin" // only when Config.Stdin
	PortKBS     = "cwrun.kbs"   // only when Config.KBS: HTTP to the key broker
)

// Message types.
const (
	TypeConfig  = "config"  // host → guest
	TypeSignal  = "signal"  // host → guest
	TypeResize  = "resize"  // host → guest: the pty's new window size
	TypeReady   = "ready"   // guest → host
	TypeStage   = "stage"   // guest → host
	TypeStarted = "started" // guest → host
	TypeExit    = "exit"    // guest → host
	TypeError   = "error"   // guest → host
)

// Stages of the guest's boot, in order, as named in "stage" and "error".
const (
	StageModules = "modules"
	StagePorts   = "ports"
	StageConfig  = "config"
	StageKey     = "key" // the broker released the key (attested runs only; its failures are "unlock")
	StageUnlock  = "unlock"
	StageMount   = "mount"
	StageNetwork = "network"
	StageStart   = "start"
	StageRun     = "run" // errors while the workload runs
)

// MaxLine bounds one message; a config is a few KiB at most.
const MaxLine = 1 << 20

// Message is every message: Type says which fields mean something.
// One flat struct keeps both ends' code and the wire format small.
type Message struct {
	Type string `json:"type"`

	// config
	*Config

	// signal (host → guest: deliver it; guest → host in "exit": the
	// workload died of it)
	Signal int `json:"signal,omitempty"`

	// stage, error
	Stage string `json:"stage,omitempty"`
	MS    int64  `json:"ms,omitempty"` // CLOCK_BOOTTIME milliseconds when the stage ended

	// started
	PID int `json:"pid,omitempty"`

	// resize: the host terminal's new size, in character cells. Not
	// "rows" inside Config's tty_size: fields of the embedded Config
	// with the same JSON name would be hidden by these.
	Rows int `json:"rows,omitempty"`
	Cols int `json:"cols,omitempty"`

	// exit: Code is set when the workload exited, Signal when killed.
	Code *int `json:"code,omitempty"`

	// error: what failed and what to do, for a person.
	Message string `json:"message,omitempty"`
}

// Config is what the host tells the guest. Empty Args, Env, Workdir and
// User mean "as sealed" (/.krun_config.json in the encrypted disk); the
// guest honours non-empty ones only when the sealed config allows
// overrides.
type Config struct {
	// Passphrase unlocks the sealed disk in development mode; empty when
	// the key comes from attestation (a later key source).
	Passphrase string   `json:"passphrase,omitempty"`
	Args       []string `json:"args,omitempty"` // replaces the image's Cmd (Entrypoint stays), as `docker run IMAGE ARGS` does
	Env        []string `json:"env,omitempty"`  // "K=V", added to (and winning over) the sealed Env
	Workdir    string   `json:"workdir,omitempty"`
	User       string   `json:"user,omitempty"`     // "uid[:gid]" or "name[:group]"
	TTY        bool     `json:"tty,omitempty"`      // give the workload a pty (stdin, stdout and stderr), its output on PortStdout
	TTYSize    *WinSize `json:"tty_size,omitempty"` // the pty's first size; nil: 24 rows, 80 columns
	Stdin      bool     `json:"stdin,omitempty"`    // the PortStdin port exists; else stdin is /dev/null
	Network    bool     `json:"network,omitempty"`  // configure eth0 for QEMU user networking
	Shares     []Share  `json:"shares,omitempty"`
	Timings    bool     `json:"timings,omitempty"` // also log each stage's time on the console
	// KBS says that PortKBS exists and leads to the key broker, so that
	// the guest can attest and fetch its key there (no network needed).
	KBS bool `json:"kbs,omitempty"`
}

// WinSize is a terminal's size in character cells.
type WinSize struct {
	Rows int `json:"rows"`
	Cols int `json:"cols"`
}

// Resize builds a "resize" message.
func Resize(s WinSize) Message { return Message{Type: TypeResize, Rows: s.Rows, Cols: s.Cols} }

// Share is a host folder the guest mounts.
type Share struct {
	Tag      string `json:"tag"`
	Path     string `json:"path"` // absolute, in the guest
	ReadOnly bool   `json:"readonly,omitempty"`
	// FSType is "9p" (the default) or "virtiofs".
	FSType string `json:"fstype,omitempty"`
}

// Exit builds an "exit" message for a workload that exited with code.
func Exit(code int) Message { return Message{Type: TypeExit, Code: &code} }

// Conn reads and writes messages on one stream. Send is safe for
// concurrent use; Recv is for one reader.
type Conn struct {
	mu sync.Mutex
	w  io.Writer
	r  *bufio.Reader
}

// NewConn wraps a stream (the control port's file or socket).
func NewConn(rw io.ReadWriter) *Conn {
	return &Conn{w: rw, r: bufio.NewReaderSize(rw, 64<<10)}
}

// Send writes one message as one line.
func (c *Conn) Send(m Message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encoding %q message: %w", m.Type, err)
	}
	b = append(b, '\n')
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.w.Write(b); err != nil {
		return fmt.Errorf("sending %q message: %w", m.Type, err)
	}
	return nil
}

// ErrTooLong says a line exceeded MaxLine: the peer is broken or hostile.
var ErrTooLong = errors.New("control message longer than 1 MiB")

// Recv reads the next message. It returns io.EOF when the peer closed
// the stream between messages.
func (c *Conn) Recv() (Message, error) {
	var line []byte
	for {
		chunk, isPrefix, err := c.r.ReadLine()
		if err != nil {
			if err == io.EOF && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return Message{}, err
		}
		line = append(line, chunk...)
		if len(line) > MaxLine {
			return Message{}, ErrTooLong
		}
		if !isPrefix {
			if len(line) == 0 {
				continue // tolerate blank lines
			}
			break
		}
	}
	return Decode(line)
}

// Decode parses one message.
func Decode(line []byte) (Message, error) {
	var m Message
	if err := json.Unmarshal(line, &m); err != nil {
		return Message{}, fmt.Errorf("decoding control message: %w", err)
	}
	if m.Type == "" {
		return Message{}, fmt.Errorf("control message without a \"type\"")
	}
	return m, nil
}
