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

	specs "github.com/opencontainers/runtime-spec/specs-go"
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
			if n, ok := sig.(syscall.Signal); ok {
				return 128 + int(n)
			}
			return 128 + int(syscall.SIGTERM)
		case <-ctx.Done():
			tick.Stop()
			return fail(context.Cause(ctx))
		case <-tick.C:
		}
	}
	tick.Stop()
	spec, rootfs, err := LoadBundle(rec.Bundle)
	if err != nil {
		return fail(err)
	}
	if err := writeFileAtomic(filepath.Join(d, runningMarker), nil); err != nil {
		return fail(err)
	}
	cpus, mem := Resources(spec)
	args, env := Overrides(spec)
	code, err := s.Boot(ctx, Boot{
		ID: id, Bundle: rec.Bundle, Rootfs: rootfs, Spec: spec, CPUs: cpus, MemoryMiB: mem,
		Annotations: spec.Annotations, Args: args, Env: env, Signals: sigs, VMDir: filepath.Join(s.Runtime.root(), VMDir),
	})
	if err != nil {
		return fail(err)
	}
	return code
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
// (containers.conf's defaults, HOSTNAME, container=podman); the rest
// of a sealed bundle's environment is the user's -e, since the outer
// config of a sealed image has none.
var engineEnv = map[string]bool{"PATH": true, "TERM": true, "HOSTNAME": true, "HOME": true, "container": true}

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
