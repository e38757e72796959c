// Package oci makes cwrun an OCI runtime that podman (through conmon)
// can drive: create, start, state, kill and delete, as runc's command
// line has them.
//
// A container is one supervisor process: `create` forks it (a hidden
// verb of cwrun itself), writes its pid to the pid file and returns;
// the supervisor waits for `start`, then boots the sealed layout of
// the bundle's root file system as a microVM and exits with the
// workload's status. conmon, a child subreaper, inherits it when
// `create` exits and collects that status as the container's exit
// code; the supervisor's stdout and stderr are conmon's pipes, which
// makes the workload's output `podman logs`.
//
// State lives in Root/<id>/: state.json (written once by create), the
// start marker (made by `start`, exclusively: a second start fails),
// the running marker (made by the supervisor when it took the start),
// and, when the supervisor ended before the start, why. Liveness is
// the supervisor's pid and its start time in /proc, so a reused pid is
// not mistaken for it.
//
// What the bundle asks beyond the VM's shape: a terminal (-t: conmon
// gets a host pty's master, the supervisor its slave, the workload a
// pty in the guest), a network namespace (QEMU runs in it, serving the
// ports podman publishes there, found in its DNAT rules or named by
// AnnotationPublish), and an sd_notify socket (READY=1 when
// the workload starts). Extra file descriptors (--preserve-fds) cannot
// reach a VM and are refused.
package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

const (
	stateFile     = "state.json"
	startMarker   = "start"
	runningMarker = "running"
	// failedFile holds why a supervisor ended before it took the
	// start, for Start to report.
	failedFile = "failed"
	// VMDir is the folder under Root that holds the VMs' run folders
	// (launcher.Options.RunDir): short, for the sockets' path limit.
	VMDir = "vm"
)

// Errors callers test for.
var (
	ErrNotExist       = errors.New("container does not exist")
	ErrExist          = errors.New("container already exists")
	ErrNotRunning     = errors.New("container is not running")
	ErrAlreadyStarted = errors.New("container was already started")
)

// DefaultRoot is where container state lives when the runtime is not
// given --root: /run/cwrun-oci as root, else $XDG_RUNTIME_DIR/cwrun-oci,
// else a folder in the temporary folder.
func DefaultRoot() string {
	if os.Geteuid() == 0 {
		return "/run/cwrun-oci"
	}
	if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" {
		return filepath.Join(x, "cwrun-oci")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("cwrun-oci-%d", os.Geteuid()))
}

// Runtime is the OCI verbs over one state root.
type Runtime struct {
	// Root holds the containers' state; "" means DefaultRoot.
	Root string
	// Supervisor returns the command that supervises container id:
	// cwrun re-executing itself with its hidden verb. create starts it
	// with create's own stdio and does not wait for it.
	Supervisor func(id string) *exec.Cmd
	// Log receives debug records; nil discards.
	Log *slog.Logger
}

// record is state.json.
type record struct {
	ID          string            `json:"id"`
	Bundle      string            `json:"bundle"`
	Rootfs      string            `json:"rootfs"`
	Pid         int               `json:"pid"`
	PidStart    uint64            `json:"pid_start"` // /proc/PID/stat starttime
	Created     time.Time         `json:"created"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

// CreateOptions are create's flags.
type CreateOptions struct {
	Bundle, PidFile, ConsoleSocket string
	// Check validates the bundle's root file system before anything is
	// forked (launcher.CheckSealedDir); nil skips it.
	Check func(rootfs string) error
}

// RootDir is the state folder in use: Root, or DefaultRoot.
func (r Runtime) RootDir() string { return r.root() }

func (r Runtime) root() string {
	if r.Root != "" {
		return r.Root
	}
	return DefaultRoot()
}

func (r Runtime) dir(id string) string { return filepath.Join(r.root(), id) }

// ValidID checks a container id: it names a folder.
func ValidID(id string) error {
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") || len(id) > 1024 {
		return fmt.Errorf("container id %q: want a non-empty name without slashes", id)
	}
	return nil
}

// LoadBundle reads a bundle's config.json and resolves its root file
// system's path.
func LoadBundle(bundle string) (*specs.Spec, string, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, "", fmt.Errorf("reading the bundle's config: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, "", fmt.Errorf("the bundle's config.json %s: %w", filepath.Join(bundle, "config.json"), err)
	}
	if s.Root == nil || s.Root.Path == "" {
		return nil, "", fmt.Errorf("the bundle's config.json in %s names no root file system (root.path)", bundle)
	}
	rootfs := s.Root.Path
	if !filepath.IsAbs(rootfs) {
		rootfs = filepath.Join(bundle, rootfs)
	}
	return &s, rootfs, nil
}

// Create makes container id from a bundle and starts its supervisor,
// which waits for Start.
func (r Runtime) Create(ctx context.Context, id string, o CreateOptions) error {
	if err := ValidID(id); err != nil {
		return err
	}
	bundle, err := filepath.Abs(o.Bundle)
	if err != nil {
		return err
	}
	spec, rootfs, err := LoadBundle(bundle)
	if err != nil {
		return err
	}
	terminal := spec.Process != nil && spec.Process.Terminal
	if terminal && o.ConsoleSocket == "" {
		return errors.New("the bundle asks for a terminal (process.terminal) but no --console-socket was given to send it to")
	}
	if o.Check != nil {
		if err := o.Check(rootfs); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(r.root(), 0o700); err != nil {
		return fmt.Errorf("state folder: %w", err)
	}
	d := r.dir(id)
	if err := os.Mkdir(d, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return fmt.Errorf("%s: %w (its state is in %s)", id, ErrExist, d)
		}
		return fmt.Errorf("state folder: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(d)
		}
	}()
	rec := record{ID: id, Bundle: bundle, Rootfs: rootfs, Created: time.Now().UTC(), Annotations: spec.Annotations}
	cmd := r.Supervisor(id)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Dir = "/"
	var master, slave *os.File
	if terminal {
		master, slave, err = openPTY(spec.Process.ConsoleSize)
		if err != nil {
			return err
		}
		// create's copies: conmon gets the master, the supervisor the slave.
		defer master.Close()
		defer slave.Close()
		// The slave is the supervisor's stdio and controlling terminal,
		// so that a resize from conmon reaches it as SIGWINCH.
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	}
	// Written before the fork, without the pid: the supervisor reads
	// its bundle from it at once.
	if err := writeJSON(filepath.Join(d, stateFile), rec); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the supervisor: %w", err)
	}
	rec.Pid = cmd.Process.Pid
	rec.PidStart, err = procStart(rec.Pid)
	if err != nil {
		cmd.Process.Kill() //nolint:errcheck // it died already, then
		cmd.Wait()         //nolint:errcheck // killed on purpose
		return fmt.Errorf("the supervisor died at once: %w", err)
	}
	if err := writeJSON(filepath.Join(d, stateFile), rec); err != nil {
		cmd.Process.Kill() //nolint:errcheck // gone is fine
		cmd.Wait()         //nolint:errcheck // killed on purpose
		return err
	}
	if master != nil {
		if err := sendConsole(o.ConsoleSocket, master, slave); err != nil {
			cmd.Process.Kill() //nolint:errcheck // gone is fine
			cmd.Wait()         //nolint:errcheck // killed on purpose
			return err
		}
	}
	if o.PidFile != "" {
		if err := writeFileAtomic(o.PidFile, []byte(strconv.Itoa(rec.Pid))); err != nil {
			cmd.Process.Kill() //nolint:errcheck // gone is fine
			cmd.Wait()         //nolint:errcheck // killed on purpose
			return fmt.Errorf("--pid-file: %w", err)
		}
	}
	// Not waited for: it outlives create, and conmon (a subreaper)
	// inherits it.
	cmd.Process.Release() //nolint:errcheck // nothing to release on Linux
	ok = true
	r.log().Debug("created", "id", id, "pid", rec.Pid, "bundle", bundle)
	return nil
}

// Start lets the supervisor of a created container boot its VM, and
// returns once it took the start.
//
// The supervisor may take the start, fail to boot (a refused
// override, a bad annotation) and exit before Start looks again: the
// running marker, which it makes before it boots, is what tells that
// apart from a supervisor that died before the start, and it is looked
// for after every liveness check, never before.
func (r Runtime) Start(ctx context.Context, id string) error {
	rec, err := r.load(id)
	if err != nil {
		return err
	}
	d := r.dir(id)
	f, err := os.OpenFile(filepath.Join(d, startMarker), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if errors.Is(err, os.ErrExist) {
		return fmt.Errorf("%s: %w: a container starts once", id, ErrAlreadyStarted)
	}
	if err != nil {
		return fmt.Errorf("starting %s: %w", id, err)
	}
	f.Close()
	taken := func() bool {
		_, err := os.Stat(filepath.Join(d, runningMarker))
		return err == nil
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(30 * time.Second)
	for {
		alive := rec.alive()
		if taken() {
			return nil
		}
		if !alive {
			why := "its error is in the container's output: podman logs"
			if b, err := os.ReadFile(filepath.Join(d, failedFile)); err == nil && len(b) > 0 {
				why = strings.TrimSpace(string(b))
			}
			return fmt.Errorf("%s: %w: its supervisor (pid %d) exited before it took the start (%s)", id, ErrNotRunning, rec.Pid, why)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-deadline:
			return fmt.Errorf("%s: its supervisor (pid %d) did not take the start within 30 s (an overloaded host?)", id, rec.Pid)
		case <-tick.C:
		}
	}
}

// State is the runtime spec's state of container id.
func (r Runtime) State(id string) (specs.State, error) {
	rec, err := r.load(id)
	if err != nil {
		return specs.State{}, err
	}
	st := specs.State{Version: specs.Version, ID: id, Bundle: rec.Bundle, Annotations: rec.Annotations, Pid: rec.Pid}
	st.Status = r.status(rec)
	if st.Status == specs.StateStopped {
		st.Pid = 0
	}
	return st, nil
}

func (r Runtime) status(rec *record) specs.ContainerState {
	if !rec.alive() {
		return specs.StateStopped
	}
	if _, err := os.Stat(filepath.Join(r.dir(rec.ID), runningMarker)); err == nil {
		return specs.StateRunning
	}
	return specs.StateCreated
}

// Kill sends sig to the container's supervisor: SIGKILL ends it and,
// through QEMU's parent-death signal, the VM; any other signal asks
// the workload to stop (see Supervisor).
func (r Runtime) Kill(id string, sig unix.Signal) error {
	rec, err := r.load(id)
	if err != nil {
		return err
	}
	if !rec.alive() {
		return fmt.Errorf("%s: %w (it exited): nothing to signal", id, ErrNotRunning)
	}
	if err := unix.Kill(rec.Pid, sig); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("%s: %w (it exited): nothing to signal", id, ErrNotRunning)
		}
		return fmt.Errorf("signalling %s (pid %d): %w", id, rec.Pid, err)
	}
	return nil
}

// Delete removes container id's state. A live container is refused
// unless force, which kills it first. Force never fails for a
// container that is gone or was never known.
func (r Runtime) Delete(ctx context.Context, id string, force bool, cleanup func(ctx context.Context, vmDir string) error) error {
	if err := ValidID(id); err != nil {
		return err
	}
	rec, err := r.load(id)
	if errors.Is(err, ErrNotExist) {
		if force {
			return nil
		}
		return err
	}
	if err != nil && !force {
		return err
	}
	if rec != nil && rec.alive() {
		if !force && r.status(rec) == specs.StateRunning {
			return fmt.Errorf("%s is running: stop it first, or delete --force", id)
		}
		unix.Kill(rec.Pid, unix.SIGKILL) //nolint:errcheck // gone is fine
		deadline := time.Now().Add(10 * time.Second)
		for rec.alive() && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if rec.alive() {
			return fmt.Errorf("deleting %s: its supervisor (pid %d) survived SIGKILL for 10 s", id, rec.Pid)
		}
	}
	var errs []error
	if cleanup != nil {
		// The supervisor is dead: its VM's run folder is unlocked.
		if err := cleanup(ctx, filepath.Join(r.root(), VMDir)); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(r.dir(id)); err != nil {
		errs = append(errs, fmt.Errorf("removing the state of %s: %w", id, err))
	}
	return errors.Join(errs...)
}

func (r Runtime) load(id string) (*record, error) {
	if err := ValidID(id); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(r.dir(id), stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w (no state in %s)", id, ErrNotExist, r.root())
	}
	if err != nil {
		return nil, fmt.Errorf("reading the state of %s: %w", id, err)
	}
	var rec record
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("the state of %s (%s) is damaged: %w; `delete --force %s` removes it", id, r.dir(id), err, id)
	}
	return &rec, nil
}

func (r Runtime) log() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.New(slog.DiscardHandler)
}

// alive tells whether the supervisor still runs (a zombie does not).
func (rec *record) alive() bool {
	if rec.Pid <= 0 {
		return false
	}
	st, err := procStart(rec.Pid)
	return err == nil && st == rec.PidStart
}

// procStart is a live process's start time (clock ticks since boot),
// which with its pid names it uniquely; an error for a zombie or no
// process.
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStat(string(b))
}

// parseStat reads the state and start time from a /proc/PID/stat line.
func parseStat(s string) (uint64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("malformed /proc stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); starttime is field 22.
	if len(f) < 20 {
		return 0, errors.New("malformed /proc stat")
	}
	if f[0] == "Z" || f[0] == "X" {
		return 0, errors.New("the process has exited")
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// ParseSignal reads a signal as kill(1) takes it: 15, TERM or SIGTERM.
func ParseSignal(s string) (unix.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n <= 0 || n > 64 {
			return 0, fmt.Errorf("signal %q: want 1 to 64", s)
		}
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("signal %q: unknown (want a number or a name such as TERM or SIGKILL)", s)
}

func writeJSON(p string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return writeFileAtomic(p, b)
}

func writeFileAtomic(p string, b []byte) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
