package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/internal/sdnotify"
	"github.com/cwrun/cwrun/launcher/vm"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Boot is what the supervisor hands to the function that runs the VM.
type Boot struct {
	ID, Bundle, Rootfs string
	Spec               *specs.Spec
	// CPUs and MemoryMiB come from the bundle's resource limits
	// (podman run --cpus, --memory); 0: the sealed config's.
	CPUs, MemoryMiB int
	// Annotations are the bundle's (podman run --annotation).
	Annotations map[string]string
	// Args and Env are what the user asked podman to change (see
	// Overrides); the launcher refuses them unless the seal allows.
	Args, Env []string
	// Signals carries the signals the supervisor got (from `kill`):
	// the first asks the workload to stop, as launcher.Options.Signals.
	Signals <-chan os.Signal
	// VMDir is the base of the VM's run folder (launcher.Options.RunDir).
	VMDir string

	// TTY: the bundle asks for a terminal (podman run -t). The
	// supervisor's stdio is then the slave of the pty whose master
	// conmon holds, and Resized carries its size changes (SIGWINCH).
	TTY     bool
	Resized <-chan os.Signal
	// Stdin is the workload's input: the terminal with TTY, conmon's
	// pipe with podman run -i; nil when conmon gave /dev/null.
	Stdin *os.File
	// NetNS is the network namespace QEMU must run in (see
	// QEMUInNetNS); the zero value: the supervisor's own.
	NetNS NetNS
	// Publish are the ports QEMU forwards from that namespace to the
	// guest (AnnotationPublish).
	Publish []vm.Forward
	// Started is called when the workload runs (launcher.Options.Started):
	// it sends READY=1 to the bundle's sd_notify socket, if any.
	Started func()
}

// Supervisor is the process whose pid the pid file names.
type Supervisor struct {
	Runtime Runtime
	// Boot runs the VM and returns the workload's exit status.
	Boot func(ctx context.Context, b Boot) (int, error)
	// Stderr receives the supervisor's own errors (conmon's pipe, so
	// they show in podman logs); default os.Stderr.
	Stderr io.Writer
}

// forwarded are the signals the workload gets; SIGKILL cannot be
// caught and ends the supervisor, whose QEMU dies with it.
var forwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2}

// Run waits for Start, boots the VM and returns the exit status for
// the supervisor to exit with: the workload's, 128+N when signal N
// came before the start, 125 when the VM could not run.
func (s Supervisor) Run(ctx context.Context, id string) int {
	stderr := s.Stderr
	if stderr == nil {
		stderr = os.Stderr
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "cwrun: %s: %v\n", id, err)
		return 125
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, forwarded...)
	defer signal.Stop(sigs)

	rec, err := s.Runtime.load(id)
	if err != nil {
		return fail(err)
	}
	d := s.Runtime.dir(id)
	// Before the start, Start is the one waiting: tell it why.
	failEarly := func(err error) int {
		writeFileAtomic(filepath.Join(d, failedFile), []byte(err.Error())) //nolint:errcheck // stderr has it too
		return fail(err)
	}
	tick := time.NewTicker(10 * time.Millisecond)
wait:
	for {
		if _, err := os.Stat(filepath.Join(d, startMarker)); err == nil {
			break wait
		}
		if _, err := os.Stat(d); err != nil {
			tick.Stop()
			return fail(errors.New("the container's state was removed before it started"))
		}
		select {
		case sig := <-sigs:
			tick.Stop()
			n, ok := sig.(syscall.Signal)
			if !ok {
				n = syscall.SIGTERM
			}
			writeFileAtomic(filepath.Join(d, failedFile), []byte(fmt.Sprintf("it got %v before the start", sig))) //nolint:errcheck // best effort
			return 128 + int(n)
		case <-ctx.Done():
			tick.Stop()
			return failEarly(context.Cause(ctx))
		case <-tick.C:
		}
	}
	tick.Stop()
	spec, rootfs, err := LoadBundle(rec.Bundle)
	if err != nil {
		return failEarly(err)
	}
	if err := writeFileAtomic(filepath.Join(d, runningMarker), nil); err != nil {
		return failEarly(err)
	}
	cpus, mem := Resources(spec)
	args, env := Overrides(spec)
	publish, err := ParsePublish(spec.Annotations[AnnotationPublish])
	if err != nil {
		return fail(err)
	}
	netns := BundleNetNS(spec)
	if netns.Path != "" {
		// podman made the namespace: serve the ports its -p forwards
		// there. Unreadable rules (rootless podman) leave the
		// annotation as the only source, as before.
		if found, err := PodmanPublished(ctx, id, netns.Path); err == nil {
			publish = MergePublish(publish, found)
		}
	}
	b := Boot{
		ID: id, Bundle: rec.Bundle, Rootfs: rootfs, Spec: spec, CPUs: cpus, MemoryMiB: mem,
		Annotations: spec.Annotations, Args: args, Env: env, Signals: sigs,
		VMDir: filepath.Join(s.Runtime.root(), VMDir),
		NetNS: netns, Publish: publish,
	}
	if spec.Process != nil && spec.Process.Terminal {
		b.TTY, b.Stdin = true, os.Stdin
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		b.Resized = winch
	} else if !isDevNull(os.Stdin) {
		b.Stdin = os.Stdin
	}
	if sock := NotifySocket(spec); sock != "" {
		// Off the launcher's control loop: a stuck socket must not hold
		// up the workload's messages.
		b.Started = func() {
			go func() {
				if err := sdnotify.Send(sock, "READY=1"); err != nil {
					fmt.Fprintf(stderr, "cwrun: %s: warning: %v\n", id, err)
				}
			}()
		}
	}
	code, err := s.Boot(ctx, b)
	if err != nil {
		return fail(err)
	}
	return code
}

// isDevNull tells whether f is /dev/null (or unusable): conmon's stdin
// for a container without podman run -i.
func isDevNull(f *os.File) bool {
	var st, null unix.Stat_t
	if f == nil || unix.Fstat(int(f.Fd()), &st) != nil {
		return true
	}
	if unix.Stat("/dev/null", &null) != nil {
		return false
	}
	return st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == null.Rdev
}

// Resources are the VM's vCPUs and MiB from the bundle's limits
// (podman --cpus sets a CFS quota, --memory a limit); 0 when unset.
func Resources(s *specs.Spec) (cpus, memMiB int) {
	if s == nil || s.Linux == nil || s.Linux.Resources == nil {
		return 0, 0
	}
	r := s.Linux.Resources
	if c := r.CPU; c != nil && c.Quota != nil && *c.Quota > 0 && c.Period != nil && *c.Period > 0 {
		cpus = int(math.Ceil(float64(*c.Quota) / float64(*c.Period)))
	}
	if m := r.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		memMiB = int((*m.Limit + (1<<20 - 1)) >> 20)
	}
	return cpus, memMiB
}

// SealedEntrypoint is the entrypoint of a sealed image's outer config
// (cwrun build and buildah mkcw): podman puts it first in the process
// arguments, and the user's COMMAND after it.
const SealedEntrypoint = "/entrypoint"

// engineEnv are the variables podman sets itself in every container
// (containers.conf's defaults, HOSTNAME, container=podman, and
// NOTIFY_SOCKET with --sdnotify=container, which the supervisor
// answers for the guest); the rest
// of a sealed bundle's environment is the user's -e, since the outer
// config of a sealed image has none.
var engineEnv = map[string]bool{"PATH": true, "TERM": true, "HOSTNAME": true, "HOME": true, "container": true, notifyEnv: true}

// Overrides are the command and environment the user gave podman for a
// sealed image: the arguments after the sealed entrypoint, and the
// variables podman did not add itself.
func Overrides(s *specs.Spec) (args, env []string) {
	if s == nil || s.Process == nil {
		return nil, nil
	}
	a := s.Process.Args
	if len(a) > 0 && a[0] == SealedEntrypoint {
		a = a[1:]
	}
	if len(a) > 0 {
		args = append([]string(nil), a...)
	}
	for _, kv := range s.Process.Env {
		k, _, _ := strings.Cut(kv, "=")
		if !engineEnv[k] {
			env = append(env, kv)
		}
	}
	return args, env
}
