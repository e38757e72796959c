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
	"github.com/cwrun/cwrun/sealed"
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

	// TPMDevice is a host TPM character device (e.g. /dev/tpm0) that a
	// guest sealed for --tee tpm gets instead of a software TPM of its
	// own (QEMU's pass-through: the guest's firmware extends the host
	// TPM's PCRs, so the host must not use the TPM meanwhile). Its AK is
	// the same on every boot, so a broker may trust it by its "ak"
	// reference, or by its manufacturer's EK CA. Default: a fresh swtpm
	// per run.
	TPMDevice string
	// TPMCADir is the vTPM CA that signs each software TPM's EK
	// certificate (see TPMCA); default DefaultTPMCADir(), made on first
	// use.
	TPMCADir string
	// CmdlineAppend is added to the guest kernel's command line. It is
	// for tests of measured boot: a tpm guest's command line is measured,
	// so one changed this way gets no key from a broker.
	CmdlineAppend string

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

// defaultMemoryMiB is a guest's RAM when neither the run nor the sealed
// config says.
const defaultMemoryMiB = 512

// TPMCmdline is the command line of tpm runs (UEFI firmware on q35): a
// fixed string, since the firmware measures it and a broker holds its
// digest.
const TPMCmdline = Cmdline

// firmwareAllowance is added to ReadyTimeout for UEFI boots: OVMF alone
// takes about 14 s under TCG here, more on a loaded host.
const firmwareAllowance = 2 * time.Minute

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
	// The terminal first: the relay's warnings go through its writer.
	var term *hostTerm
	if o.TTY {
		term = newHostTerm(o.Stdin, o.Stdout, o.Stderr)
		o.Warn = warnWriter{w: o.Warn, t: term}
		if o.Stdin != nil && term.in == nil {
			// As podman says it; docker refuses.
			fmt.Fprintf(o.Warn, "cwrun: warning: the input device is not a TTY: -t and -i might not work properly (pipe into -i alone)\n")
		}
	}
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
		if disk.Config.TEE == sealed.TEETPM && o.TPMDevice == "" {
			if _, _, err := swtpmTools(); err != nil {
				return 0, fmt.Errorf("%s is sealed for tpm: %w", disk.Image, err)
			}
		}
		if rl, err = newRelay(bk, o.Log, o.Warn); err != nil {
			return 0, err
		}
	}
	if len(o.Passphrase) == 0 && rl == nil {
		return 0, fmt.Errorf("no key for the disk of %s: it names no key broker (sealed without --kbs); pass --kbs URL, or --passphrase-file in development mode (the host then knows the key)", disk.Image)
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
	sealedMem := disk.Config.RAMMiB
	if sealedMem == 0 {
		sealedMem = defaultMemoryMiB
	}
	if mem == 0 {
		mem = sealedMem
	}

	network := o.Network == "user"
	runDir := rf.dir
	// A tpm guest whose key comes from a broker boots through UEFI
	// firmware, which measures kernel, initrd and command line into the
	// TPM: exactly the files TPMBoot names, whatever the run's flags.
	measured := rl != nil && disk.Config.TEE == sealed.TEETPM
	if measured && mem != sealedMem {
		// See tpm.DirectBoot: QEMU writes the initrd's address, which
		// follows the RAM size, into the kernel header the firmware
		// measures.
		return 0, fmt.Errorf("%s is sealed for tpm with %d MiB of memory, and the broker expects the kernel digest of a boot with exactly that much (QEMU writes the initrd's address, which depends on the memory size, into the measured kernel header): run it without --memory, or seal it again with --memory %d", disk.Image, sealedMem, mem)
	}
	var kernelPath, initrdPath, cmdline string
	var fw *vm.Firmware
	var guestTPMDev *vm.TPM
	if measured {
		if fw, err = qemu.OVMF(runDir); err != nil {
			return 0, fmt.Errorf("%s is sealed for tpm, which boots through UEFI firmware: %w", disk.Image, err)
		}
		// Manufacturing the vTPM (key generation) takes a second or
		// more: it runs while the kernel and initrd are found.
		type vtpmResult struct {
			dev  *vm.TPM
			stop func()
			err  error
		}
		tc := make(chan vtpmResult, 1)
		go func() {
			d, stop, err := guestTPM(ctx, o, runDir)
			tc <- vtpmResult{d, stop, err}
		}()
		kernelPath, initrdPath, cmdline, err = tpmBoot(ctx, o, initPath)
		tr := <-tc
		if tr.err == nil {
			defer tr.stop()
		}
		if err != nil {
			return 0, err
		}
		if tr.err != nil {
			return 0, tr.err
		}
		guestTPMDev = tr.dev
		o.ReadyTimeout += firmwareAllowance
	} else {
		k, err := guestKernel(ctx, o)
		if err != nil {
			return 0, err
		}
		mods := initrd.BaseModules()
		if rl != nil {
			mods = append(mods, initrd.EntropyModules()...)
		}
		if network {
			mods = append(mods, initrd.NetworkModules()...)
		}
		if len(o.Volumes) > 0 {
			mods = append(mods, "virtiofs")
		}
		if k.ModulesDir == "" {
			mods = nil
		}
		if initrdPath, err = initrd.Build(ctx, initrd.Spec{Init: initPath, ModulesDir: k.ModulesDir, Modules: mods}); err != nil {
			return 0, err
		}
		kernelPath, cmdline = k.Vmlinuz, Cmdline
	}
	if o.CmdlineAppend != "" {
		cmdline += " " + o.CmdlineAppend
	}

	spec := vm.Spec{
		Name: filepath.Base(runDir), Kernel: kernelPath, Initrd: initrdPath,
		Cmdline:  cmdline,
		Firmware: fw, TPM: guestTPMDev,
		CPUs: cpus, MemoryMiB: mem, Accel: accel,
		Disks:   []vm.Disk{{Path: disk.Path, Format: "raw", Snapshot: true}},
		Console: filepath.Join(runDir, "console.log"),
		RNG:     rl != nil, // see initrd.EntropyModules
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

// networkMode checks --network (default user) against the -p forwards,
// for sealed and whole-disk runs alike.
func networkMode(network string, publish []vm.Forward) (string, error) {
	switch network {
	case "":
		network = "user"
	case "user", "none":
	default:
		return "", fmt.Errorf("--network %q: want user or none", network)
	}
	if network == "none" && len(publish) > 0 {
		return "", errors.New("-p needs a network: drop --network none")
	}
	return network, nil
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
	var err error
	if o.Network, err = networkMode(o.Network, o.Publish); err != nil {
		return o, err
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

// TPMBoot returns the kernel, initrd and command line that a tpm run
// with opts boots (opts' Kernel and InitPath, else Debian's cloud kernel
// and the installed cwrun-init): byte for byte the same for the same
// cwrun and kernel, whatever else the run asks for (network, volumes),
// since a broker holds their digests as reference values. The initrd
// carries one fixed module set (base, entropy, network, virtiofs).
func TPMBoot(ctx context.Context, opts Options) (kernel, initrd, cmdline string, err error) {
	o, err := opts.withDefaults()
	if err != nil {
		return "", "", "", err
	}
	initPath, err := findInit(o.InitPath)
	if err != nil {
		return "", "", "", err
	}
	return tpmBoot(ctx, o, initPath)
}

func tpmBoot(ctx context.Context, o Options, initPath string) (kernelPath, initrdPath, cmdline string, err error) {
	k, err := guestKernel(ctx, o)
	if err != nil {
		return "", "", "", err
	}
	var mods []string
	if k.ModulesDir != "" {
		mods = append(append(append(initrd.BaseModules(), initrd.EntropyModules()...), initrd.NetworkModules()...), "virtiofs")
	}
	initrdPath, err = initrd.Build(ctx, initrd.Spec{Init: initPath, ModulesDir: k.ModulesDir, Modules: mods})
	if err != nil {
		return "", "", "", err
	}
	return k.Vmlinuz, initrdPath, TPMCmdline, nil
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
