package launcher

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/launcher/qemu"
	"github.com/cwrun/cwrun/launcher/vm"
	"golang.org/x/term"
)

// A whole-disk VM boots an ordinary VM disk (a cloud image, a podman
// machine disk, a bootc disk) through UEFI firmware, as a PC would:
// no cwrun-init, no control channel, no key. The guest's serial console
// is the user's terminal, and the run ends when the guest powers off.

// Disk formats.
const (
	FormatRaw   = "raw"
	FormatQCOW2 = "qcow2"
)

// EscapeKey is the key (Ctrl-]) that, typed on the console's terminal,
// stops a whole-disk VM as SIGTERM does; typed again, kills it.
const EscapeKey = 0x1d

// DiskOptions say how to boot one whole VM disk. The zero value of
// each field means its documented default.
type DiskOptions struct {
	// Disk is the disk file. It is never written: the guest writes to a
	// throw-away overlay, or with Persist to a saved one.
	Disk string
	// Format is "raw" or "qcow2"; default: read from the file's header.
	Format string
	// Untrusted marks a disk that came from elsewhere (a registry): a
	// qcow2 that names other files on the host (a backing file, an
	// external data file) is refused, since the guest could read them.
	Untrusted bool
	// Digest identifies the disk's content (a pulled disk's digest):
	// a persistent overlay is tied to it. Default: the file's path,
	// size and modification time.
	Digest string

	// Persist keeps the guest's writes, and the firmware's variables,
	// across runs, in a qcow2 overlay over Disk in the state folder of
	// Name (which it requires). Default: a throw-away overlay.
	Persist bool
	// StateDir holds the persistent overlays, one folder per name;
	// default DefaultStateDir().
	StateDir string
	// CloudInit is a folder with cloud-init's user-data (and
	// optionally meta-data, network-config, vendor-data), given to the
	// guest as a NoCloud seed disk labelled cidata. Default: none.
	CloudInit string

	// CPUs and MemoryMiB shape the VM; default 1 vCPU and 1024 MiB.
	CPUs, MemoryMiB int
	// Accel is auto (default), kvm or tcg.
	Accel vm.Accel
	// Network is "user" (default: QEMU user-mode networking) or "none".
	Network string
	// Publish are host ports forwarded to guest ports (user network).
	Publish []vm.Forward
	// Name names the VM, its run folder and its persistent state;
	// default a random one.
	Name string

	// Stdin is relayed to the guest's serial console; nil: nothing is
	// typed. When it is a terminal, it is in raw mode while the VM
	// runs (every key goes to the guest; EscapeKey stops the VM).
	Stdin io.Reader
	// Stdout receives the guest's serial console; default os.Stdout.
	// Warn receives cwrun's own messages; default os.Stderr.
	Stdout, Warn io.Writer
	// Signals are the signals cwrun received: the first presses the
	// guest's ACPI power button, and the VM is killed StopTimeout later
	// or at the second signal.
	Signals <-chan os.Signal
	// StopTimeout is the grace period after a stop request; default 10 s.
	StopTimeout time.Duration
	// RunDir is where the run folder is made, as for Options.RunDir.
	RunDir string
	// VMM starts the machine; default QEMU.
	VMM vm.VMM
	// Log receives debug and info records; default discards.
	Log *slog.Logger
}

// DefaultStateDir is where persistent disk overlays live:
// /var/lib/cwrun/disks as root, else $XDG_STATE_HOME/cwrun/disks, else
// ~/.local/state/cwrun/disks.
func DefaultStateDir() (string, error) {
	if os.Geteuid() == 0 {
		return "/var/lib/cwrun/disks", nil
	}
	if x := os.Getenv("XDG_STATE_HOME"); x != "" {
		return filepath.Join(x, "cwrun", "disks"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no state folder for --persist: set XDG_STATE_HOME or HOME")
	}
	return filepath.Join(home, ".local", "state", "cwrun", "disks"), nil
}

func (o DiskOptions) withDefaults() (DiskOptions, error) {
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Warn == nil {
		o.Warn = os.Stderr
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Accel == "" {
		o.Accel = vm.AccelAuto
	}
	if o.CPUs <= 0 {
		o.CPUs = 1
	}
	if o.MemoryMiB <= 0 {
		o.MemoryMiB = 1024
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 10 * time.Second
	}
	var err error
	if o.Network, err = networkMode(o.Network, o.Publish); err != nil {
		return o, err
	}
	if o.Persist {
		if o.Name == "" {
			return o, errors.New("--persist needs --name: the saved disk state is kept under the VM's name")
		}
		if o.StateDir == "" {
			d, err := DefaultStateDir()
			if err != nil {
				return o, err
			}
			o.StateDir = d
		}
	}
	if o.CloudInit != "" {
		if _, _, err := seedTools(); err != nil {
			return o, err
		}
	}
	st, err := os.Stat(o.Disk)
	if err != nil {
		return o, fmt.Errorf("disk %s: %w", o.Disk, err)
	}
	if !st.Mode().IsRegular() {
		return o, fmt.Errorf("disk %s: not a regular file", o.Disk)
	}
	if o.Disk, err = filepath.Abs(o.Disk); err != nil {
		return o, err
	}
	if o.Format, err = diskFormat(o.Disk, o.Format, o.Untrusted); err != nil {
		return o, err
	}
	return o, nil
}

// diskFormat checks the disk's header against the declared format (or
// finds the format when none is declared), and refuses compressed
// files and, for untrusted disks, qcow2 images that reach out to other
// host files.
func diskFormat(path, declared string, untrusted bool) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("disk %s: %w", path, err)
	}
	defer f.Close()
	h := make([]byte, 104)
	n, err := io.ReadFull(f, h)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return "", fmt.Errorf("disk %s: reading its header: %w", path, err)
	}
	h = h[:n]
	for magic, name := range map[string]string{"\x28\xb5\x2f\xfd": "zstd", "\xfd7zXZ\x00": "xz", "\x1f\x8b": "gzip"} {
		if bytes.HasPrefix(h, []byte(magic)) {
			return "", fmt.Errorf("disk %s is %s-compressed: decompress it first (or push it to a registry and run it from there)", path, name)
		}
	}
	isQCOW2 := bytes.HasPrefix(h, []byte("QFI\xfb"))
	format := declared
	switch declared {
	case "":
		format = FormatRaw
		if isQCOW2 {
			format = FormatQCOW2
		}
	case FormatQCOW2:
		if !isQCOW2 {
			return "", fmt.Errorf("disk %s: declared qcow2, but it has no qcow2 header", path)
		}
	case FormatRaw:
		if isQCOW2 {
			return "", fmt.Errorf("disk %s: declared raw, but it is a qcow2 image", path)
		}
	default:
		return "", fmt.Errorf("disk %s: unknown format %q (want raw or qcow2)", path, declared)
	}
	if format == FormatQCOW2 && untrusted {
		if err := checkQCOW2(h); err != nil {
			return "", fmt.Errorf("disk %s: %w", path, err)
		}
	}
	return format, nil
}

// checkQCOW2 refuses a qcow2 header that names a backing file or an
// external data file: either is a host path the guest would read.
func checkQCOW2(h []byte) error {
	if len(h) < 72 {
		return errors.New("truncated qcow2 header")
	}
	version := binary.BigEndian.Uint32(h[4:8])
	if binary.BigEndian.Uint64(h[8:16]) != 0 {
		return errors.New("the qcow2 image names a backing file: refused, since that is a file on this host the guest could read; flatten it with `qemu-img convert -O qcow2` before publishing")
	}
	if version >= 3 {
		if len(h) < 80 {
			return errors.New("truncated qcow2 header")
		}
		const dataFile = 1 << 2 // incompatible feature: external data file
		if binary.BigEndian.Uint64(h[72:80])&dataFile != 0 {
			return errors.New("the qcow2 image uses an external data file: refused, since that is a file on this host the guest could read; flatten it with `qemu-img convert -O qcow2`")
		}
	}
	return nil
}

// RunDisk boots a whole VM disk with UEFI firmware (OVMF, q35) and
// returns when the VM is off: exit code 0 when the guest powered off
// (a reboot restarts it within the run), 128+9 when cwrun had to
// kill it after a stop request. err is set when the VM could not run or
// the VMM failed. Nothing is left behind but, with Persist, the saved
// overlay; a run whose cwrun was killed is cleaned up by the next one.
func RunDisk(ctx context.Context, sess *images.Session, opts DiskOptions) (exitCode int, err error) {
	o, err := opts.withDefaults()
	if err != nil {
		return 0, err
	}
	if o.VMM == nil {
		q := qemu.QEMU{}
		if _, err := q.Path(); err != nil {
			return 0, err
		}
		o.VMM = q
	}
	accel, warn, err := o.Accel.Resolve()
	if err != nil {
		return 0, err
	}
	if warn != "" {
		fmt.Fprintf(o.Warn, "cwrun: warning: %s\n", warn)
	}

	if sess == nil {
		sess = images.NewSession(images.Options{}) // opened only for a dead sealed run's mount
		defer sess.Close()
	}
	base := runBase(o.RunDir)
	if _, cerr := Cleanup(ctx, sess, base, o.Log); cerr != nil {
		fmt.Fprintf(o.Warn, "cwrun: warning: cleaning up after earlier runs: %v\n", cerr)
	}
	rf, err := makeRunDir(base, o.Name)
	if err != nil {
		return 0, err
	}
	defer func() {
		if rerr := rf.remove(); rerr != nil && err == nil {
			err = rerr
		}
	}()

	fw, err := qemu.OVMF(rf.dir)
	if err != nil {
		return 0, err
	}
	boot := vm.Disk{Path: o.Disk, Format: o.Format, Boot: true, Snapshot: true}
	if o.Persist {
		st, err := openState(ctx, filepath.Join(o.StateDir, o.Name), o.Disk, o.Format, o.Digest, fw.Vars)
		if err != nil {
			return 0, err
		}
		boot = vm.Disk{Path: st.overlay, Format: FormatQCOW2, Boot: true, Durable: true}
		fw.Vars = st.vars
		o.Log.Debug("persistent disk state", "folder", st.dir)
	}
	spec := vm.Spec{
		Name:     filepath.Base(rf.dir),
		Firmware: fw,
		CPUs:     o.CPUs, MemoryMiB: o.MemoryMiB, Accel: accel,
		Disks:         []vm.Disk{boot},
		ConsoleSocket: filepath.Join(rf.dir, "console.sock"),
		RNG:           true,
		Reboot:        true,
		RunDir:        rf.dir,
	}
	if o.CloudInit != "" {
		seed := filepath.Join(rf.dir, "cidata.img")
		id := "cwrun-" + filepath.Base(rf.dir)
		if o.Name != "" {
			id = "cwrun-" + o.Name
		}
		if err := BuildSeed(ctx, o.CloudInit, seed, id); err != nil {
			return 0, err
		}
		spec.Disks = append(spec.Disks, vm.Disk{Path: seed, Format: FormatRaw, ReadOnly: true})
	}
	if o.Network == "user" {
		spec.Network = &vm.Network{Forwards: o.Publish}
	}
	return runConsole(ctx, o, spec)
}

// runConsole starts the VM, relays its serial console to the user, and
// waits for it to power off or be stopped.
func runConsole(ctx context.Context, o DiskOptions, spec vm.Spec) (int, error) {
	// Connect as soon as QEMU listens, before the guest runs, so that
	// none of its output is lost.
	dialCtx, stopDial := context.WithCancel(ctx)
	defer stopDial()
	dialed := make(chan net.Conn, 1)
	go func() {
		for dialCtx.Err() == nil {
			if c, err := net.Dial("unix", spec.ConsoleSocket); err == nil {
				dialed <- c
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	m, err := o.VMM.Start(ctx, spec)
	if err != nil {
		stopDial()
		select {
		case c := <-dialed:
			c.Close()
		default:
		}
		return 0, err
	}
	vmDone := make(chan error, 1)
	go func() { vmDone <- m.Wait() }()
	vmExited := false
	defer func() {
		if !vmExited {
			m.Kill() //nolint:errcheck // it may be gone already
			<-vmDone
		}
	}()
	var conn net.Conn
	select {
	case conn = <-dialed:
	case <-time.After(10 * time.Second):
		return 0, fmt.Errorf("cannot connect to the VM's serial console %s", spec.ConsoleSocket)
	}
	defer conn.Close()

	con := &console{w: o.Warn}
	if f, ok := o.Stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		st, err := term.MakeRaw(int(f.Fd()))
		if err != nil {
			return 0, fmt.Errorf("putting the terminal in raw mode for the VM's console: %w", err)
		}
		con.setRaw(true)
		// Every way out, a panic included, gives the terminal back.
		defer func() {
			con.setRaw(false)
			if err := term.Restore(int(f.Fd()), st); err != nil {
				fmt.Fprintf(o.Warn, "cwrun: restoring the terminal's mode: %v (run `stty sane` to repair it)\n", err)
			}
		}()
		con.printf("cwrun: the serial console of VM %s; Ctrl-] stops the VM\n", o.nameOr(spec.Name))
	}

	outDone := make(chan struct{})
	go func() {
		defer close(outDone)
		io.Copy(o.Stdout, conn) //nolint:errcheck // ends when QEMU closes the console
	}()
	escaped := make(chan struct{}, 2)
	if o.Stdin != nil {
		go relayInput(conn, o.Stdin, con.isRaw(), escaped)
	}

	var (
		stopping  bool
		killed    bool
		stopTimer <-chan time.Time
		vmErr     error
	)
	kill := func(why string) {
		con.printf("cwrun: %s: killing the VM\n", why)
		killed = true
		m.Kill() //nolint:errcheck // gone is fine
	}
	stop := func(why string) {
		if stopping {
			kill(why + " again")
			return
		}
		stopping = true
		stopTimer = time.After(o.StopTimeout)
		con.printf("cwrun: %s: pressing the VM's power button (killed in %s if it is still running)\n", why, o.StopTimeout)
		pd, ok := m.(interface{ Powerdown(context.Context) error })
		if !ok {
			kill("the VMM cannot press a power button")
			return
		}
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := pd.Powerdown(pctx); err != nil {
			kill(fmt.Sprintf("pressing the power button failed (%v)", err))
		}
	}
loop:
	for {
		select {
		case vmErr = <-vmDone:
			vmExited = true
			break loop
		case sig := <-o.Signals:
			stop(fmt.Sprint(sig))
		case <-escaped:
			stop("Ctrl-]")
		case <-stopTimer:
			kill(fmt.Sprintf("the VM did not power off within %s", o.StopTimeout))
			stopTimer = nil
		case <-ctx.Done():
			m.Kill() //nolint:errcheck // gone is fine
			<-vmDone
			vmExited = true
			return 0, context.Cause(ctx)
		}
	}
	// QEMU is gone, so the console is at EOF: let the relay finish.
	select {
	case <-outDone:
	case <-time.After(5 * time.Second):
	}
	if killed {
		return 128 + int(syscall.SIGKILL), nil
	}
	if vmErr != nil {
		return 0, fmt.Errorf("the VMM failed: %w", vmErr)
	}
	return 0, nil
}

func (o DiskOptions) nameOr(generated string) string {
	if o.Name != "" {
		return o.Name
	}
	return generated
}

// console writes cwrun's own messages between the guest's output: on
// a terminal in raw mode, lines need a carriage return.
type console struct {
	mu  sync.Mutex
	w   io.Writer
	raw bool
}

func (c *console) setRaw(raw bool) {
	c.mu.Lock()
	c.raw = raw
	c.mu.Unlock()
}

func (c *console) isRaw() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.raw
}

func (c *console) printf(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := fmt.Sprintf(format, args...)
	if c.raw {
		s = "\r" + strings.ReplaceAll(s, "\n", "\r\n")
	}
	io.WriteString(c.w, s) //nolint:errcheck // a closed terminal must not stop the VM
}

// relayInput copies in to the console. From a terminal, EscapeKey is
// not passed on but reported on escaped; piped input passes unchanged.
// At the input's end it stops; the console stays open for output.
func relayInput(w io.Writer, in io.Reader, terminal bool, escaped chan<- struct{}) {
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		b := buf[:n]
		for terminal && len(b) > 0 {
			i := bytes.IndexByte(b, EscapeKey)
			if i < 0 {
				break
			}
			if _, werr := w.Write(b[:i]); werr != nil {
				return
			}
			select {
			case escaped <- struct{}{}:
			default:
			}
			b = b[i+1:]
		}
		if len(b) > 0 {
			if _, werr := w.Write(b); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// diskState is a VM's persistent state: a qcow2 overlay over its disk,
// which is never written, and the firmware's variable store.
type diskState struct {
	dir, overlay, vars string
}

// stateBase is what a persistent overlay was made over; an overlay over
// another base would show the guest a corrupt disk.
type stateBase struct {
	Disk    string `json:"disk"`
	Format  string `json:"format"`
	Digest  string `json:"digest,omitempty"`
	Size    int64  `json:"size"`
	ModTime int64  `json:"mtime_ns,omitempty"` // only without a digest
}

// openState finds or makes the state folder dir for disk. freshVars is
// the run's pristine copy of the firmware variables, which a new state
// folder starts from.
func openState(ctx context.Context, dir, disk, format, digest, freshVars string) (*diskState, error) {
	st := &diskState{dir: dir, overlay: filepath.Join(dir, "overlay.qcow2"), vars: filepath.Join(dir, "efivars.fd")}
	fi, err := os.Stat(disk)
	if err != nil {
		return nil, fmt.Errorf("disk %s: %w", disk, err)
	}
	want := stateBase{Disk: disk, Format: format, Digest: digest, Size: fi.Size()}
	if digest == "" {
		want.ModTime = fi.ModTime().UnixNano()
	}
	meta := filepath.Join(dir, "base.json")
	b, err := os.ReadFile(meta)
	switch {
	case err == nil:
		var got stateBase
		if err := json.Unmarshal(b, &got); err != nil {
			return nil, fmt.Errorf("--persist: %s is damaged (%v): remove the folder %s to start afresh", meta, err, dir)
		}
		if got != want {
			return nil, fmt.Errorf("--persist: the saved state in %s was made over another disk (%s, %d bytes%s), not %s: "+
				"choose another --name, or remove the folder to start afresh over this disk", dir, got.Disk, got.Size, digestNote(got.Digest), disk)
		}
		if _, err := os.Stat(st.overlay); err != nil {
			return nil, fmt.Errorf("--persist: %w: remove the folder %s to start afresh", err, dir)
		}
		if _, err := os.Stat(st.vars); err != nil {
			// Lost variables only cost the boot entries the guest made.
			if err := copyFileTo(freshVars, st.vars); err != nil {
				return nil, err
			}
		}
		return st, nil
	case !errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("--persist: %w", err)
	}
	qemuImg, err := exec.LookPath("qemu-img")
	if err != nil {
		return nil, errors.New("--persist needs qemu-img: install Debian's qemu-utils (apt-get install qemu-utils)")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("--persist: %w", err)
	}
	// Made under temporary names, base.json last: a folder without it
	// is an unfinished one, made again.
	tmp := st.overlay + ".new"
	os.Remove(tmp) //nolint:errcheck // absent is fine
	if err := runTool(ctx, qemuImg, "create", "-q", "-f", "qcow2", "-F", format, "-b", disk, tmp); err != nil {
		return nil, fmt.Errorf("--persist: making the overlay: %w", err)
	}
	if err := os.Rename(tmp, st.overlay); err != nil {
		return nil, fmt.Errorf("--persist: %w", err)
	}
	if err := copyFileTo(freshVars, st.vars); err != nil {
		return nil, err
	}
	js, _ := json.MarshalIndent(want, "", "  ")
	if err := writeFileSync(meta, append(js, '\n')); err != nil {
		return nil, fmt.Errorf("--persist: %w", err)
	}
	return st, nil
}

func digestNote(d string) string {
	if d == "" {
		return ""
	}
	return ", " + d
}

func copyFileTo(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".new"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}
