// Package launcher runs a sealed image as a microVM: it finds the
// image's encrypted disk, the guest kernel and cwrun-init's initrd,
// starts the VMM, and speaks the host side of the control protocol
// (config in; stages, output and the exit status out; signals in).
//
// It never holds a disk key beyond handing the development-mode
// passphrase to the guest, and never writes to a sealed disk: the VMM
// writes to a throw-away overlay. With attested key release it relays
// the guest's requests to the key broker, which it cannot read into:
// they are protected end to end.
package launcher

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cwrun/cwrun/guest/proto"
	"github.com/cwrun/cwrun/images"
	"github.com/cwrun/cwrun/launcher/initrd"
	"github.com/cwrun/cwrun/launcher/kernel"
	"github.com/cwrun/cwrun/launcher/qemu"
	"github.com/cwrun/cwrun/launcher/vm"
)

// Options say how to run one sealed image. The zero value of each
// field means its documented default.
type Options struct {
	// Image is the sealed image's reference, in any transport.
	Image string
	// SealedDir, when set, is a folder that holds the sealed layout
	// (/disk.img, /krun-sev.json), such as an OCI bundle's root file
	// system that podman mounted: it is booted in place, and Image only
	// names it in messages.
	SealedDir string
	// Passphrase unlocks the sealed disk (development mode: the host
	// knows the key). Without it the key must come from a key broker
	// (Broker, or the sealed config's attestation_url).
	Passphrase []byte
	// Broker is the key broker whose guest endpoints the launcher
	// relays on the cwrun.kbs port. nil: the sealed config's
	// attestation_url when there is no Passphrase, else no relay.
	Broker *Broker

	// CPUs and MemoryMiB shape the VM; 0 means the sealed config's
	// (krun-sev.json), else 1 vCPU and 512 MiB.
	CPUs, MemoryMiB int
	// Accel is auto (default), kvm or tcg.
	Accel vm.Accel
	// Kernel is a guest kernel to boot instead of Debian's cloud
	// kernel (fetched into the cache); KernelModules is its
	// lib/modules/<version> folder (empty: the kernel has everything
	// built in).
	Kernel, KernelModules string

	// Args replace the sealed command and Env adds to the sealed
	// environment; both only when the sealed config allows overrides.
	Args, Env []string
	// Stdin, when set, is relayed to the workload's stdin; else the
	// workload reads /dev/null.
	Stdin io.Reader
	// Stdout and Stderr receive the workload's output; default
	// os.Stdout and os.Stderr. Warn receives cwrun's own warnings and
	// the timings; default os.Stderr.
	Stdout, Stderr, Warn io.Writer
	// TTY gives the workload a pty in the guest as its stdin, stdout
	// and stderr: its output, both streams in one, comes on Stdout.
	// When Stdin is a terminal (an *os.File), it is in raw mode from
	// the workload's start until Run returns, so that every key, Ctrl-C
	// included, goes to the guest's pty. The pty takes the size of the
	// first terminal among Stdout, Stderr and Stdin, and follows it on
	// each signal (SIGWINCH) that arrives on Resized.
	TTY bool
	// Network is "user" (default: QEMU user-mode networking, guest
	// 10.0.2.15) or "none" (no network device at all).
	Network string
	// Publish are host ports forwarded to guest ports (user network).
	Publish []vm.Forward
	// Volumes are host folders shared with the guest (virtiofs).
	Volumes []Volume
	// Name names the VM and its run folder; default a random one.
	Name string

	// Signals are the signals cwrun received: the first sends SIGTERM
	// to the workload (or stops a VM that is still booting), and the VM
	// is killed StopTimeout later or at the second signal.
	Signals <-chan os.Signal
	// Resized says that the terminal's size changed (SIGWINCH); with
	// TTY the pty follows it. nil: the pty keeps its first size.
	Resized <-chan os.Signal
	// Started, when set, is called once, as soon as the guest reports
	// that the workload runs (sd_notify READY=1 under podman
	// --sdnotify=container). It must not block. nil: nothing is called.
	Started func()
	// StopTimeout is the grace period after a signal; default 10 s.
	StopTimeout time.Duration
	// ReadyTimeout bounds the time from the VMM's start to the guest's
	// "ready"; default 60 s (TCG boots take seconds).
	ReadyTimeout time.Duration
	// Timings prints the boot breakdown to Warn at the end.
	Timings bool

	// InitPath is the cwrun-init binary; default: next to the running
	// executable, then /usr/lib/cwrun/cwrun-init.
	InitPath string
	// CacheDir holds extracted disks; kernels and initrds go to their
	// own packages' default caches. Default $XDG_CACHE_HOME/cwrun, else
	// ~/.cache/cwrun.
	CacheDir string
	// RunDir is where the run folder (sockets, console log) is made;
	// default $XDG_RUNTIME_DIR/cwrun, else /run/cwrun as root, else the
	// temporary folder. The run folder is removed at the end, and the
	// folders of runs whose cwrun was killed are removed at the start
	// (see Cleanup).
	RunDir string
	// VMM starts the machine; default QEMU.
	VMM vm.VMM
	// Log receives debug and info records; default discards.
	Log *slog.Logger
}

// Cmdline is the guest kernel's command line. Beyond the console and
// "power off on panic" (panic=-1 with QEMU's -no-reboot):
//   - acpi=noirq: PCI interrupt routing from the firmware's tables, not
//     ACPI's AML, which under TCG made loading the virtio modules take
//     twice as long (650-900 ms against 270-400 ms, measured here);
//   - cryptomgr.notests: no self-tests of each crypto algorithm as it
//     registers (AES, XTS, SHA-256 ...): known-answer tests of the
//     kernel's own code guard against miscompilation, not against the
//     host, and cost about 0.3 s of a TCG boot.
const Cmdline = "console=ttyS0 quiet panic=-1 acpi=noirq cryptomgr.notests"

// Volume is a -v HOSTDIR:GUESTDIR[:ro].
type Volume struct {
	HostPath, GuestPath string
	ReadOnly            bool
}

// ErrOverridesRefused says the sealed config does not let the host
// change the workload.
var ErrOverridesRefused = errors.New("the sealed image does not allow host overrides")

// GuestError is a failure the guest reported (it then powered off).
type GuestError struct {
	Stage, Message string
}

func (e *GuestError) Error() string {
	return fmt.Sprintf("the guest failed at %s: %s", e.Stage, e.Message)
}

// Run boots the sealed image and returns the workload's exit status
// (128+N when a signal killed it). err is set when the workload could
// not run; then exitCode is meaningless. Nothing is left behind: no
// VMM process, run folder or mount; and when cwrun is killed outright,
// the next Run removes what it left.
func Run(ctx context.Context, sess *images.Session, opts Options) (exitCode int, err error) {
	o, err := opts.withDefaults()
	if err != nil {
		return 0, err
	}
	t := newTimeline()

	initPath, err := findInit(o.InitPath)
	if err != nil {
		return 0, err
	}
	if o.VMM == nil {
		q := qemu.QEMU{}
		if _, err := q.Path(); err != nil { // before any download
			return 0, err
		}
		o.VMM = q
	}
	if len(o.Volumes) > 0 {
		if _, err := qemu.Virtiofsd(); err != nil {
			return 0, err
		}
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

	var disk *sealedDisk
	if o.SealedDir != "" {
		disk, err = sealedDirDisk(o.SealedDir, o.Image)
	} else {
		disk, err = findDisk(ctx, sess, o.Image, o.CacheDir, o.Log, &folderNotes{rf, sess, o.Log})
	}
	if err != nil {
		return 0, err
	}
	defer func() {
		if disk.release != nil {
			rf.forgetMount()
			if uerr := disk.release(); uerr != nil && err == nil {
				err = uerr
			}
		}
	}()
	allow := disk.Config.Cwrun != nil && disk.Config.Cwrun.AllowOverrides
	if (len(o.Args) > 0 || len(o.Env) > 0) && !allow {
		what := "a command"
		if len(o.Args) == 0 {
			what = "environment (-e)"
		}
		return 0, fmt.Errorf("%s: %w: %s was given, but the command and environment are sealed into the encrypted disk, "+
			"and the host is the party the seal protects against; run it without them, or seal it with `cwrun build --allow-overrides`",
			disk.Image, ErrOverridesRefused, what)
	}
	var rl *relay
	if b := o.Broker; b != nil || (len(o.Passphrase) == 0 && disk.Config.AttestationURL != "") {
		bk := Broker{URL: disk.Config.AttestationURL}
		if b != nil {
			bk = *b
			if bk.URL == "" {
				bk.URL = disk.Config.AttestationURL
			}
		}
		if bk.URL == "" {
			return 0, fmt.Errorf("%s was sealed without a key broker URL (attestation_url): pass --kbs URL", disk.Image)
		}
		if err := teeHost(disk.Config.TEE, "/sys"); err != nil {
			return 0, fmt.Errorf("%s: %w", disk.Image, err)
		}
		if rl, err = newRelay(bk, o.Log); err != nil {
			return 0, err
		}
	}
	if len(o.Passphrase) == 0 && rl == nil {
		return 0, fmt.Errorf("no key for the disk of %s: it names no key broker (sealed without --kbs); pass --kbs URL, or --passphrase-file in development mode (the host then knows the key)", disk.Image)
	}
	var term *hostTerm
	if o.TTY {
		term = newHostTerm(o.Stdin, o.Stdout, o.Stderr)
		if o.Stdin != nil && term.in == nil {
			// As podman says it; docker refuses.
			fmt.Fprintf(o.Warn, "cwrun: warning: the input device is not a TTY: -t and -i might not work properly (pipe into -i alone)\n")
		}
	}

	accel, warn, err := o.Accel.Resolve()
	if err != nil {
		return 0, err
	}
	if warn != "" {
		fmt.Fprintf(o.Warn, "cwrun: warning: %s\n", warn)
	}
	cpus, mem := o.CPUs, o.MemoryMiB
	if cpus == 0 {
		cpus = max(disk.Config.CPUs, 1)
	}
	if mem == 0 {
		mem = disk.Config.RAMMiB
		if mem == 0 {
			mem = 512
		}
	}

	k, err := guestKernel(ctx, o)
	if err != nil {
		return 0, err
	}
	mods := initrd.BaseModules()
	network := o.Network == "user"
	if network {
		mods = append(mods, initrd.NetworkModules()...)
	}
	if len(o.Volumes) > 0 {
		mods = append(mods, "virtiofs")
	}
	if k.ModulesDir == "" {
		mods = nil
	}
	initrdPath, err := initrd.Build(ctx, initrd.Spec{Init: initPath, ModulesDir: k.ModulesDir, Modules: mods})
	if err != nil {
		return 0, err
	}

	runDir := rf.dir
	spec := vm.Spec{
		Name: filepath.Base(runDir), Kernel: k.Vmlinuz, Initrd: initrdPath,
		Cmdline: Cmdline,
		CPUs:    cpus, MemoryMiB: mem, Accel: accel,
		Disks:   []vm.Disk{{Path: disk.Path, Format: "raw", Snapshot: true}},
		Console: filepath.Join(runDir, "console.log"),
		RunDir:  runDir,
	}
	portNames := []string{proto.PortControl, proto.PortStdout, proto.PortStderr}
	if o.Stdin != nil {
		portNames = append(portNames, proto.PortStdin)
	}
	if rl != nil {
		portNames = append(portNames, proto.PortKBS)
	}
	for _, n := range portNames {
		spec.Ports = append(spec.Ports, vm.Port{Name: n, Socket: filepath.Join(runDir, n)})
	}
	if network {
		spec.Network = &vm.Network{Forwards: o.Publish}
	}
	cfg := &proto.Config{
		Passphrase: string(o.Passphrase), Args: o.Args, Env: o.Env,
		Stdin: o.Stdin != nil, Network: network, Timings: o.Timings,
		TTY: o.TTY, KBS: rl != nil,
	}
	if term != nil {
		cfg.TTYSize = term.size()
	}
	for i, v := range o.Volumes {
		tag := fmt.Sprintf("cwrun%d", i)
		spec.Shares = append(spec.Shares, vm.Share{Tag: tag, HostPath: v.HostPath, ReadOnly: v.ReadOnly, FS: vm.FSVirtiofs})
		cfg.Shares = append(cfg.Shares, proto.Share{Tag: tag, Path: v.GuestPath, ReadOnly: v.ReadOnly, FSType: vm.FSVirtiofs})
	}

	r := &runner{o: o, spec: spec, cfg: cfg, t: t, term: term, relay: rl}
	code, err := r.run(ctx)
	if o.Timings {
		t.print(o.Warn)
	}
	return code, err
}

func (o Options) withDefaults() (Options, error) {
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
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
	switch o.Network {
	case "":
		o.Network = "user"
	case "user", "none":
	default:
		return o, fmt.Errorf("--network %q: want user or none", o.Network)
	}
	if o.Network == "none" && len(o.Publish) > 0 {
		return o, errors.New("-p needs a network: drop --network none")
	}
	if o.StopTimeout <= 0 {
		o.StopTimeout = 10 * time.Second
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 60 * time.Second
	}
	if o.CacheDir == "" {
		d, err := os.UserCacheDir()
		if err != nil {
			return o, fmt.Errorf("no cache folder: %w (set XDG_CACHE_HOME)", err)
		}
		o.CacheDir = filepath.Join(d, "cwrun")
	}
	for _, v := range o.Volumes {
		if !filepath.IsAbs(v.GuestPath) {
			return o, fmt.Errorf("-v %s:%s: the guest path must be absolute", v.HostPath, v.GuestPath)
		}
		if st, err := os.Stat(v.HostPath); err != nil || !st.IsDir() {
			return o, fmt.Errorf("-v %s: not a folder on the host", v.HostPath)
		}
	}
	return o, nil
}

// findInit finds cwrun-init: given, next to the running executable, or
// where packages install it.
func findInit(given string) (string, error) {
	if given != "" {
		if _, err := os.Stat(given); err != nil {
			return "", fmt.Errorf("cwrun-init: %w", err)
		}
		return given, nil
	}
	var tried []string
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "cwrun-init")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		tried = append(tried, p)
	}
	p := "/usr/lib/cwrun/cwrun-init"
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	tried = append(tried, p)
	return "", fmt.Errorf("the guest init cwrun-init was not found (looked at %s): build it with `make build` (it goes next to cwrun) or install it as %s",
		strings.Join(tried, ", "), p)
}

func guestKernel(ctx context.Context, o Options) (kernel.Kernel, error) {
	if o.Kernel != "" {
		return kernel.FromPath(o.Kernel, o.KernelModules)
	}
	if o.KernelModules != "" {
		return kernel.Kernel{}, errors.New("--kernel-modules needs --kernel")
	}
	return kernel.Fetcher{}.Fetch(ctx)
}
