package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/launcher"
	"github.com/cwrun/cwrun/launcher/vm"
	"github.com/spf13/cobra"
)

type runOpts struct {
	passFile, accel    string
	kbs, kbsCA         string
	env, publish, vols []string
	stdin, rm          bool
	opts               launcher.Options
	disk               diskOpts // --disk: a whole VM disk (run_disk.go)
}

func newRunCmd(g *globalOpts) *cobra.Command {
	o := &runOpts{}
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [COMMAND [ARG...]]",
		Short: "Run a sealed image as a microVM: its disk is decrypted only inside the VM",
		Long: `Run a sealed image as a microVM.

The workload's command, environment and working folder come from the
encrypted disk. COMMAND and -e replace or extend them only when the image
was sealed with --allow-overrides: the host is the party the seal protects
against.

The disk key comes from the key broker after remote attestation: cwrun
relays the guest's requests to the broker the image was sealed with (its
attestation_url), or to --kbs. The relayed exchange is protected end to end,
so the host learns nothing from it. --passphrase-file instead hands the key
to the guest directly (development mode: the host then knows the key).

-t gives the workload a terminal; with -i as well, cwrun's terminal is in
raw mode while the workload runs, so Ctrl-C goes to the workload (SIGINT
there); stop cwrun itself with SIGTERM or a second terminal.

cwrun exits with the workload's exit status (128+N when signal N ended
it), or 125 when cwrun itself failed. SIGINT or SIGTERM sends SIGTERM to the workload; the VM is killed
--stop-timeout later, or at a second signal.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.disk.active() {
				return runDisk(cmd, g, o, args)
			}
			return runRun(cmd, g, o, args)
		},
	}
	addDiskFlags(cmd, &o.disk) // also relaxes Args: --disk --referrer-of takes no argument
	f := cmd.Flags()
	f.SetInterspersed(false) // flags after IMAGE belong to COMMAND
	f.StringVar(&o.passFile, "passphrase-file", "", "read the disk passphrase from this file (development mode: no key broker, the host knows the key)")
	f.StringVar(&o.kbs, "kbs", "", "the key broker's URL (default: the one the image was sealed with)")
	f.StringVar(&o.kbsCA, "kbs-cacert", os.Getenv("CWRUN_KBS_CACERT"), "trust only the CA certificates in this PEM file for the key broker, e.g. its ca.crt (env CWRUN_KBS_CACERT, as for cwrun build and podman; default: the system's roots)")
	f.IntVar(&o.opts.CPUs, "cpus", 0, "vCPUs (default: the sealed config's)")
	f.IntVar(&o.opts.MemoryMiB, "memory", 0, "RAM in MiB (default: the sealed config's)")
	f.StringVar(&o.accel, "accel", "auto", "how the VM runs guest code: auto (KVM when usable, else TCG), kvm or tcg")
	f.StringVar(&o.opts.Kernel, "kernel", "", "guest kernel (default: Debian's cloud kernel, fetched into the cache)")
	f.StringVar(&o.opts.KernelModules, "kernel-modules", "", "the --kernel's lib/modules/<version> folder")
	f.StringArrayVarP(&o.env, "env", "e", nil, "KEY=VAL added to the workload's environment (needs --allow-overrides at seal time)")
	f.BoolVarP(&o.stdin, "interactive", "i", false, "relay stdin to the workload")
	f.BoolVarP(&o.opts.TTY, "tty", "t", false, "give the workload a terminal (stdout and stderr become one stream)")
	f.StringArrayVarP(&o.publish, "publish", "p", nil, "publish a guest TCP port: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]")
	f.StringVar(&o.opts.Network, "network", "user", "user (QEMU user-mode networking) or none")
	f.StringArrayVarP(&o.vols, "volume", "v", nil, "share a host folder: HOSTDIR:GUESTDIR[:ro] (virtiofs)")
	f.StringVar(&o.opts.Name, "name", "", "name of the VM (default: random)")
	f.BoolVar(&o.rm, "rm", false, "remove the VM's state at exit (always done: cwrun keeps none)")
	f.DurationVar(&o.opts.StopTimeout, "stop-timeout", 10*time.Second, "after SIGINT/SIGTERM, how long the workload may take to stop before the VM is killed")
	f.DurationVar(&o.opts.ReadyTimeout, "boot-timeout", 60*time.Second, "fail when the guest has not reported ready this long after the VM's start (TCG boots take seconds)")
	f.BoolVar(&o.opts.Timings, "timings", false, "print the boot breakdown at the end")
	f.StringVar(&o.opts.TPMDevice, "tpm", "", "--tee tpm images: pass this host TPM (e.g. /dev/tpm0; the guest then owns it while it runs) to the guest instead of a fresh software TPM (untested here: no host TPM)")
	f.StringVar(&o.opts.TPMCADir, "vtpm-ca", "", "--tee tpm images: the CA folder that signs each software TPM's EK certificate (default /var/lib/cwrun/vtpm-ca as root; a broker trusts its issuercert.pem)")
	f.StringVar(&o.opts.CmdlineAppend, "x-cmdline-append", "", "append to the guest kernel's command line (tests: a measured tpm boot then gets no key)")
	_ = f.MarkHidden("x-cmdline-append")
	return cmd
}

func runRun(cmd *cobra.Command, g *globalOpts, o *runOpts, args []string) (err error) {
	defer func() {
		var ee exitError
		if err != nil && !errors.As(err, &ee) {
			// As podman does: 125 says cwrun failed, not the workload.
			fmt.Fprintln(os.Stderr, "cwrun:", err)
			err = exitError(125)
		}
	}()
	opts := o.opts
	opts.Image, opts.Args = args[0], args[1:]
	opts.Log = g.logger()
	if opts.Accel, err = vm.ParseAccel(o.accel); err != nil {
		return err
	}
	if o.passFile != "" {
		if opts.Passphrase, err = readPassphrase(o.passFile); err != nil {
			return err
		}
		defer clear(opts.Passphrase)
	}
	if o.kbs != "" || o.kbsCA != "" {
		client, err := launcher.BrokerClient(o.kbsCA)
		if err != nil {
			return err
		}
		opts.Broker = &launcher.Broker{URL: o.kbs, Client: client}
	}
	for _, e := range o.env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("-e %q: want KEY=VALUE", e)
		}
	}
	opts.Env = o.env
	for _, p := range o.publish {
		fw, err := parsePublish(p)
		if err != nil {
			return err
		}
		opts.Publish = append(opts.Publish, fw)
	}
	for _, v := range o.vols {
		vol, err := parseVolume(v)
		if err != nil {
			return err
		}
		opts.Volumes = append(opts.Volumes, vol)
	}
	if o.stdin {
		opts.Stdin = os.Stdin
	}
	if env := os.Getenv("CWRUN_INIT"); env != "" { // tests and packagers
		opts.InitPath = env
	}

	// Signals go to the workload, not to the context: the workload gets
	// its grace period. main's context only ends on a second path.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	opts.Signals = sigs
	if opts.TTY {
		// Apart: a burst of resizes must not crowd out a SIGTERM.
		winch := make(chan os.Signal, 1)
		signal.Notify(winch, syscall.SIGWINCH)
		defer signal.Stop(winch)
		opts.Resized = winch
	}

	sess := g.session()
	defer sess.Close()
	code, err := launcher.Run(context.WithoutCancel(cmd.Context()), sess, opts)
	if p := os.Getenv("CWRUN_RSS_REPORT"); p != "" {
		writeRSS(p)
	}
	if err != nil {
		return err
	}
	if code != 0 {
		return exitError(code)
	}
	return nil
}

// writeRSS saves cwrun's own peak RSS (VmHWM), for the benchmark:
// measuring from outside would count QEMU, a child, as well.
func writeRSS(path string) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return
	}
	os.WriteFile(path, b, 0o644) //nolint:errcheck,gosec // a benchmark aid
}

// parsePublish reads -p [HOSTIP:]HOSTPORT:GUESTPORT[/PROTO].
func parsePublish(s string) (vm.Forward, error) {
	bad := func(why string) (vm.Forward, error) {
		return vm.Forward{}, fmt.Errorf("-p %q: %s; want [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]", s, why)
	}
	spec, proto, _ := strings.Cut(s, "/")
	if proto == "" {
		proto = "tcp"
	}
	if proto != "tcp" && proto != "udp" {
		return bad("unknown protocol " + proto)
	}
	parts := strings.Split(spec, ":")
	var host string
	switch len(parts) {
	case 2:
	case 3:
		host = parts[0]
		if net.ParseIP(host) == nil {
			return bad("host address " + host + " is not an IP address")
		}
		parts = parts[1:]
	default:
		return bad("wrong number of fields")
	}
	hp, err1 := strconv.Atoi(parts[0])
	gp, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil || hp < 1 || hp > 65535 || gp < 1 || gp > 65535 {
		return bad("ports are numbers from 1 to 65535")
	}
	return vm.Forward{HostAddr: host, HostPort: hp, GuestPort: gp, Proto: proto}, nil
}

// parseVolume reads -v HOSTDIR:GUESTDIR[:ro|:rw].
func parseVolume(s string) (launcher.Volume, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return launcher.Volume{}, fmt.Errorf("-v %q: want HOSTDIR:GUESTDIR[:ro]", s)
	}
	v := launcher.Volume{GuestPath: parts[1]}
	abs, err := filepath.Abs(parts[0])
	if err != nil {
		return v, err
	}
	v.HostPath = abs
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			v.ReadOnly = true
		case "rw":
		default:
			return v, fmt.Errorf("-v %q: unknown option %q (want ro or rw)", s, parts[2])
		}
	}
	return v, nil
}
