package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/launcher"
	"github.com/cwrun/cwrun/launcher/oci"
	"github.com/cwrun/cwrun/launcher/qemu"
	"github.com/cwrun/cwrun/launcher/vm"
	"github.com/spf13/cobra"
)

// Annotations (podman run --annotation K=V) and the environment
// variable the OCI runtime reads. None carries a secret: the disk key
// comes from the key broker, through the launcher's relay.
const (
	annoKBS         = "io.cwrun.kbs"          // the broker's URL (default: the sealed attestation_url)
	annoKBSCACert   = "io.cwrun.kbs-cacert"   // PEM CA file for the broker
	annoStopTimeout = "io.cwrun.stop-timeout" // grace period after the stop signal (Go duration)
	annoAccel       = "io.cwrun.accel"        // auto, kvm or tcg
	envKBSCACert    = "CWRUN_KBS_CACERT"      // as annoKBSCACert, for every container (containers.conf)
)

// ociOpts are the global flags runc-compatible callers (conmon,
// podman) put before the verb.
type ociOpts struct {
	logFile, logFormat string
	systemdCgroup      bool
}

// newOCICmds registers the OCI runtime verbs and their global flags.
// In these verbs, --root is the runtime's state folder, as runc's: the
// image store is not used (the bundle carries the sealed layout).
func newOCICmds(root *cobra.Command, g *globalOpts) []*cobra.Command {
	o := &ociOpts{}
	pf := root.PersistentFlags()
	pf.StringVar(&o.logFile, "log", "", "OCI runtime verbs: append errors to this file (conmon's --log)")
	pf.StringVar(&o.logFormat, "log-format", "text", "OCI runtime verbs: text or json (for --log)")
	pf.BoolVar(&o.systemdCgroup, "systemd-cgroup", false, "OCI runtime verbs: accepted and ignored (the VM's limits come from the bundle)")
	for _, n := range []string{"log", "log-format", "systemd-cgroup"} {
		pf.Lookup(n).Hidden = true
	}
	rt := func() oci.Runtime {
		return oci.Runtime{Root: g.root, Log: g.logger(), Supervisor: func(id string) *exec.Cmd {
			exe, err := os.Executable()
			if err != nil {
				exe = "/proc/self/exe"
			}
			return exec.Command(exe, "--root", oci.Runtime{Root: g.root}.RootDir(), "--log-level", g.logLevel, "oci-supervise", id)
		}}
	}
	// wrap writes the error where conmon reads it (--log), as well.
	wrap := func(f func(cmd *cobra.Command, args []string) error) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, args []string) error {
			err := f(cmd, args)
			if err != nil && o.logFile != "" {
				o.writeLog(err)
			}
			return err
		}
	}

	var co oci.CreateOptions
	var preserve int
	var noPivot, noKeyring bool
	create := &cobra.Command{
		Use:   "create --bundle DIR [--pid-file F] ID",
		Short: "OCI runtime: create a container from a bundle whose root file system is a sealed image",
		Args:  cobra.ExactArgs(1),
		RunE: wrap(func(cmd *cobra.Command, args []string) error {
			if preserve > 0 {
				// A descriptor is a host kernel object; the workload runs
				// on the guest's kernel, which cannot hold one.
				return fmt.Errorf("--preserve-fds %d: the workload runs in a VM, which cannot inherit host file descriptors; run it without --preserve-fds (or socket activation)", preserve)
			}
			co.Check = func(rootfs string) error { return launcher.CheckSealedDir(rootfs, "the container's image") }
			return rt().Create(cmd.Context(), args[0], co)
		}),
	}
	f := create.Flags()
	f.StringVarP(&co.Bundle, "bundle", "b", ".", "the bundle folder (config.json and the root file system)")
	f.StringVar(&co.PidFile, "pid-file", "", "write the supervisor's pid here")
	f.StringVar(&co.ConsoleSocket, "console-socket", "", "with process.terminal (podman run -t): send the pty master to this socket")
	f.IntVar(&preserve, "preserve-fds", 0, "extra file descriptors to pass (only 0 is supported)")
	f.BoolVar(&noPivot, "no-pivot", false, "accepted and ignored (there is no pivot_root: the workload runs in a VM)")
	f.BoolVar(&noKeyring, "no-new-keyring", false, "accepted and ignored")

	start := &cobra.Command{
		Use: "start ID", Short: "OCI runtime: boot a created container's VM", Args: cobra.ExactArgs(1),
		RunE: wrap(func(cmd *cobra.Command, args []string) error { return rt().Start(cmd.Context(), args[0]) }),
	}
	state := &cobra.Command{
		Use: "state ID", Short: "OCI runtime: print a container's state (JSON)", Args: cobra.ExactArgs(1),
		RunE: wrap(func(cmd *cobra.Command, args []string) error {
			st, err := rt().State(args[0])
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(st)
		}),
	}
	var all bool
	kill := &cobra.Command{
		Use: "kill [--all] ID [SIGNAL]", Short: "OCI runtime: signal a container (TERM: graceful stop; KILL: the VM dies)",
		Args: cobra.RangeArgs(1, 2),
		RunE: wrap(func(cmd *cobra.Command, args []string) error {
			sigName := "TERM"
			if len(args) == 2 {
				sigName = args[1]
			}
			sig, err := oci.ParseSignal(sigName)
			if err != nil {
				return err
			}
			return rt().Kill(args[0], sig)
		}),
	}
	kill.Flags().BoolVarP(&all, "all", "a", false, "accepted: the container is one VM")
	var force bool
	del := &cobra.Command{
		Use: "delete [--force] ID", Short: "OCI runtime: remove a container (--force: kill it first; never fails for one that is gone)",
		Args: cobra.ExactArgs(1),
		RunE: wrap(func(cmd *cobra.Command, args []string) error {
			return rt().Delete(cmd.Context(), args[0], force, func(ctx context.Context, vmDir string) error {
				// OCI runs boot from the bundle and hold no image mount, so
				// the session's store is never opened.
				sess := images.NewSession(images.Options{})
				defer sess.Close()
				_, err := launcher.Cleanup(ctx, sess, vmDir, g.logger())
				return err
			})
		}),
	}
	del.Flags().BoolVarP(&force, "force", "f", false, "kill the container first; succeed when it does not exist")
	execCmd := &cobra.Command{
		Use: "exec ID ...", Short: "OCI runtime: refused (the workload runs inside a confidential VM)",
		DisableFlagParsing: true,
		RunE: wrap(func(cmd *cobra.Command, args []string) error {
			return errors.New("exec is not supported: the workload runs inside a confidential VM that the host cannot enter; build the tool into the sealed image instead")
		}),
	}
	supervise := &cobra.Command{
		Use: "oci-supervise ID", Hidden: true, Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s := oci.Supervisor{Runtime: rt(), Boot: func(ctx context.Context, b oci.Boot) (int, error) { return ociBoot(ctx, g, b) }}
			// The main context ends at SIGTERM; the supervisor hands
			// signals to the workload instead.
			code := s.Run(context.WithoutCancel(cmd.Context()), args[0])
			if code != 0 {
				return exitError(code)
			}
			return nil
		},
	}
	return []*cobra.Command{create, start, state, kill, del, execCmd, supervise}
}

// ociBoot runs a container's VM with the bundle's sealed root file system.
func ociBoot(ctx context.Context, g *globalOpts, b oci.Boot) (int, error) {
	opts := launcher.Options{
		Image: "container " + b.ID, SealedDir: b.Rootfs,
		CPUs: b.CPUs, MemoryMiB: b.MemoryMiB, Args: b.Args, Env: b.Env,
		Signals: b.Signals, StopTimeout: 8 * time.Second,
		RunDir: b.VMDir, Name: b.ID[:min(12, len(b.ID))],
		TTY: b.TTY, Resized: b.Resized, Publish: b.Publish, Started: b.Started,
		Log: g.logger(),
	}
	if b.Stdin != nil {
		opts.Stdin = b.Stdin
	}
	if b.NetNS != (oci.NetNS{}) {
		q, err := qemu.QEMU{}.Path()
		if err != nil {
			return 0, err
		}
		w, closer, err := oci.QEMUInNetNS(q, b.NetNS)
		if err != nil {
			return 0, err
		}
		defer closer.Close()
		opts.VMM = qemu.QEMU{Binary: w}
	}
	if v := b.Annotations[annoStopTimeout]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return 0, fmt.Errorf("annotation %s=%q: want a duration such as 8s", annoStopTimeout, v)
		}
		opts.StopTimeout = d
	}
	if v := b.Annotations[annoAccel]; v != "" {
		a, err := vm.ParseAccel(v)
		if err != nil {
			return 0, fmt.Errorf("annotation %s: %w", annoAccel, err)
		}
		opts.Accel = a
	}
	ca := b.Annotations[annoKBSCACert]
	if ca == "" {
		ca = os.Getenv(envKBSCACert)
	}
	if url := b.Annotations[annoKBS]; url != "" || ca != "" {
		client, err := launcher.BrokerClient(ca)
		if err != nil {
			return 0, err
		}
		opts.Broker = &launcher.Broker{URL: url, Client: client}
	}
	if env := os.Getenv("CWRUN_INIT"); env != "" {
		opts.InitPath = env
	}
	// The image store is not used: the bundle's root file system is the
	// sealed image, mounted by podman.
	sess := images.NewSession(images.Options{})
	defer sess.Close()
	return launcher.Run(ctx, sess, opts)
}

// writeLog appends err to --log as runc does: one JSON object a line
// with --log-format json, which podman reads to show the error.
func (o *ociOpts) writeLog(err error) {
	f, ferr := os.OpenFile(o.logFile, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if ferr != nil {
		return
	}
	defer f.Close()
	if strings.EqualFold(o.logFormat, "json") {
		b, _ := json.Marshal(map[string]string{"level": "error", "msg": err.Error(), "time": time.Now().UTC().Format(time.RFC3339Nano)})
		f.Write(append(b, '\n')) //nolint:errcheck // stderr has it too
		return
	}
	fmt.Fprintf(f, "cwrun: %v\n", err)
}
