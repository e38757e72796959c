package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"

	"github.com/cwrun/cwrun/artifact"
	"github.com/cwrun/cwrun/launcher"
	"github.com/cwrun/cwrun/launcher/vm"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// diskOpts are the flags of `cwrun run --disk`.
type diskOpts struct {
	on, persist                        bool
	cloudInit, stateDir                string
	diskType, referrerOf, artifactType string
}

// active tells whether the run boots a whole disk.
func (d *diskOpts) active() bool { return d.on || d.referrerOf != "" }

const diskHelp = `

With --disk, REF is a whole VM disk (qcow2 or raw) booted with UEFI firmware
(OVMF) on q35, not a sealed image: a registry reference (a podman-machine
style index, chosen by --disktype and platform; an OCI artifact whose layer
is a disk; a containerdisk image), or a disk file (a path that is absolute
or starts with ./ or ../, or an existing file). --referrer-of IMAGE instead
boots the newest referrer of IMAGE of --artifact-type (implies --disk; no
REF). Pulled disks are cached by digest. --cpus and --memory default to 1
and 1024 MiB.

The disk itself is never written: the guest writes to a throw-away overlay,
or with --persist (and --name) to a qcow2 overlay kept in --state-dir under
the name, with the firmware's variables; remove that folder to start
afresh. --cloud-init DIR gives the guest DIR's user-data, meta-data and
network-config as a NoCloud seed disk (labelled cidata).

The guest's serial console is on the terminal: what you type goes to the
guest (raw mode: Ctrl-C too). Ctrl-], SIGINT or SIGTERM press the VM's ACPI
power button; the VM is killed --stop-timeout later or at the next one.
A guest reboot restarts the VM within the same run (and the same overlay).
cwrun exits 0 when the guest powers off, 137 when it had to kill it, 125
when cwrun itself failed.`

// addDiskFlags adds --disk and its companions to the run command.
func addDiskFlags(cmd *cobra.Command, d *diskOpts) {
	cmd.Use += "\n  cwrun run --disk [flags] REF"
	cmd.Long += diskHelp
	f := cmd.Flags()
	f.BoolVar(&d.on, "disk", false, "boot REF as a whole VM disk (qcow2/raw: registry reference or file path) with UEFI, not a sealed image")
	f.BoolVar(&d.persist, "persist", false, "--disk: keep the guest's writes across runs (needs --name; kept in --state-dir)")
	f.StringVar(&d.cloudInit, "cloud-init", "", "--disk: give the guest this folder's user-data, meta-data, network-config as a cloud-init NoCloud seed")
	f.StringVar(&d.stateDir, "state-dir", "", "--disk --persist: where saved disk state lives (default /var/lib/cwrun/disks as root, else $XDG_STATE_HOME/cwrun/disks)")
	f.StringVar(&d.diskType, "disktype", "", "--disk: the disktype of a podman-machine index entry to boot (default qemu)")
	f.StringVar(&d.referrerOf, "referrer-of", "", "--disk: boot the newest disk artifact that refers to this image (OCI 1.1 subject)")
	f.StringVar(&d.artifactType, "artifact-type", "", "--disk --referrer-of: the artifact type to look for (default cwrun's sealed disk)")
	cmd.Args = func(cmd *cobra.Command, args []string) error {
		if d.active() {
			return nil // runDisk checks its own
		}
		return cobra.MinimumNArgs(1)(cmd, args)
	}
}

// diskFlags are the run flags that mean something for --disk; the
// others are a sealed image's and are refused.
var diskFlags = map[string]bool{
	"disk": true, "persist": true, "cloud-init": true, "state-dir": true,
	"disktype": true, "referrer-of": true, "artifact-type": true,
	"cpus": true, "memory": true, "accel": true, "publish": true, "network": true,
	"name": true, "rm": true, "stop-timeout": true,
	// The console is always interactive: accepted out of habit.
	"interactive": true, "tty": true,
}

func runDisk(cmd *cobra.Command, g *globalOpts, o *runOpts, args []string) (err error) {
	defer func() {
		var ee exitError
		if err != nil && !errors.As(err, &ee) {
			fmt.Fprintln(os.Stderr, "cwrun:", err)
			err = exitError(125)
		}
	}()
	ref, opts, err := diskOptions(cmd, o, args)
	if err != nil {
		return err
	}
	opts.Stdin, opts.Log = os.Stdin, g.logger()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	opts.Signals = sigs

	sess := g.session()
	defer sess.Close()
	ctx := context.WithoutCancel(cmd.Context())
	if !localDisk(ref) {
		d := &o.disk
		disk, err := pullDisk(ctx, ref, artifact.PullOptions{
			DiskType: d.diskType, ReferrerOf: d.referrerOf, ArtifactType: d.artifactType,
			Progress: os.Stderr, System: sess.System(), Log: opts.Log,
		})
		if err != nil {
			return err
		}
		opts.Disk, opts.Format, opts.Digest, opts.Untrusted = disk.Path, disk.Format, disk.Digest.String(), true
	}
	code, err := launcher.RunDisk(ctx, sess, opts)
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError(code)
	}
	return nil
}

// diskOptions reads the command line of `run --disk`: REF (empty with
// --referrer-of) and the options; Disk is set when REF is a local file.
func diskOptions(cmd *cobra.Command, o *runOpts, args []string) (ref string, opts launcher.DiskOptions, err error) {
	// run stops parsing flags at its first argument (what follows is
	// a sealed image's command): a disk has no command, so flags after
	// REF are the run's own.
	if len(args) > 0 {
		ref = args[0]
		f := cmd.Flags()
		if err := f.Parse(args[1:]); err != nil {
			return "", opts, err
		}
		if rest := f.Args(); len(rest) > 0 {
			return "", opts, fmt.Errorf("--disk: unexpected arguments %q: a disk has no command", rest)
		}
	}
	var refused []string
	// Changed, not Visit: flags parsed above are recorded as set only
	// in cmd.Flags(), not in the LocalFlags view.
	cmd.LocalFlags().VisitAll(func(fl *pflag.Flag) {
		if fl.Changed && !diskFlags[fl.Name] {
			refused = append(refused, "--"+fl.Name)
		}
	})
	if len(refused) > 0 {
		sort.Strings(refused)
		return "", opts, fmt.Errorf("%s: only for sealed images, not with --disk", strings.Join(refused, ", "))
	}
	d := &o.disk
	switch {
	case o.rm && d.persist:
		return "", opts, errors.New("--rm and --persist contradict each other: --persist keeps the disk's state, --rm would drop it")
	case ref == "" && d.referrerOf == "":
		return "", opts, errors.New("--disk needs REF (a registry reference or a disk file), or --referrer-of IMAGE")
	case ref != "" && d.referrerOf != "":
		return "", opts, fmt.Errorf("both REF (%s) and --referrer-of (%s) given: give one", ref, d.referrerOf)
	}
	opts = launcher.DiskOptions{
		Persist: d.persist, StateDir: d.stateDir, CloudInit: d.cloudInit,
		CPUs: o.opts.CPUs, MemoryMiB: o.opts.MemoryMiB, Network: o.opts.Network, Name: o.opts.Name,
		StopTimeout: o.opts.StopTimeout,
	}
	if opts.Accel, err = vm.ParseAccel(o.accel); err != nil {
		return "", opts, err
	}
	for _, p := range o.publish {
		fw, err := parsePublish(p)
		if err != nil {
			return "", opts, err
		}
		opts.Publish = append(opts.Publish, fw)
	}
	if localDisk(ref) {
		opts.Disk = ref
	}
	return ref, opts, nil
}

// localDisk tells whether ref names a disk file rather than a registry
// reference: a path (absolute or ./, ../), or an existing file.
func localDisk(ref string) bool {
	if ref == "" {
		return false
	}
	if strings.HasPrefix(ref, "/") || strings.HasPrefix(ref, "./") || strings.HasPrefix(ref, "../") {
		return true
	}
	st, err := os.Stat(ref)
	return err == nil && st.Mode().IsRegular()
}

// pullDisk fetches a disk from a registry into the cache.
func pullDisk(ctx context.Context, ref string, opts artifact.PullOptions) (*artifact.Disk, error) {
	return artifact.Pull(ctx, ref, opts)
}
