// Package vm is the seam between cwrun's launcher and the VMMs that run
// its guests (QEMU, libkrun): the machine a guest needs, described once,
// and the two small interfaces a backend implements.
//
// It holds no keys and starts nothing itself.
package vm

import (
	"context"
	"errors"
	"fmt"
	"os"
)

// Spec is the machine a guest needs. Paths are host paths.
type Spec struct {
	Name string // for messages and process titles
	// Kernel, Initrd and Cmdline are a direct kernel boot. They may be
	// empty only with Firmware, which then boots from the disks.
	Kernel  string
	Initrd  string
	Cmdline string
	// Firmware, when set, boots through UEFI firmware on a q35 machine
	// (with a direct kernel boot the firmware loads and measures the
	// kernel, initrd and command line); nil: QEMU's own direct boot on
	// a pc machine, the fastest.
	Firmware *Firmware
	// TPM, when set, gives the guest a TPM 2.0 (CRB interface).
	TPM       *TPM
	CPUs      int
	MemoryMiB int
	Accel     Accel
	Disks     []Disk
	// Ports are virtio-serial ports; the VMM listens on each Socket and
	// the launcher connects.
	Ports   []Port
	Network *Network // nil: no network device at all
	Shares  []Share
	// Console receives the guest's serial console (kernel messages and
	// the init's log lines); a file path.
	Console string
	// ConsoleSocket, instead of Console, makes the serial console a unix
	// socket that the VMM listens on and the launcher connects to, both
	// ways: an interactive console (whole-disk VMs).
	ConsoleSocket string
	// Reboot lets a guest reboot: the machine resets and boots again
	// (a whole-disk VM's OS reboots after updates or its first
	// cloud-init run). false: a reboot ends the VMM as a power-off does,
	// which is what a sealed workload's exit must do.
	Reboot bool
	// RNG gives the guest a virtio entropy device fed by the host, so
	// that its random pool is seeded at once: a fresh TCG guest
	// otherwise waits about a second for it at its first getrandom.
	RNG bool
	// RunDir holds the VMM's own sockets and files; the launcher owns
	// and removes it.
	RunDir string
}

// Firmware is a UEFI firmware image pair (OVMF).
type Firmware struct {
	// Code is the read-only code volume (OVMF_CODE_4M.fd).
	Code string
	// Vars is this machine's own copy of the variable store, which the
	// firmware writes; never the distribution's template.
	Vars string
}

// TPM is the guest's TPM 2.0: a software TPM or the host's own.
type TPM struct {
	// Socket is the control socket of a running swtpm
	// (`swtpm socket --ctrl type=unixio,path=...`), which QEMU drives.
	Socket string
	// Device is a host TPM character device passed through (/dev/tpm0);
	// used when Socket is empty.
	Device string
}

// Disk is a block device of the guest, in order (vda, vdb, ...).
type Disk struct {
	Path   string
	Format string // "raw" or "qcow2"
	// Boot makes the firmware try this disk first (Firmware boots).
	Boot bool
	// Durable honours the guest's flushes, for a disk whose writes are
	// kept (a --persist overlay); otherwise writes may stay in the
	// host's cache, which is faster and loses only what is thrown away
	// at the end anyway.
	Durable bool
	// Snapshot sends the guest's writes to a throw-away overlay: the
	// file itself is never written (sealed disks stay pristine).
	Snapshot bool
	ReadOnly bool
}

// Port is one virtio-serial port, found by the guest through its name.
type Port struct {
	Name   string
	Socket string
}

// Network is user-mode networking (no privileges, no vhost).
type Network struct {
	Forwards []Forward
}

// Forward publishes a guest TCP port on the host.
type Forward struct {
	HostAddr  string // "" binds every host address, as podman's -p does
	HostPort  int
	GuestPort int
	Proto     string // "tcp" or "udp"
}

// Share exports a host folder to the guest, mounted by tag.
type Share struct {
	Tag      string
	HostPath string
	ReadOnly bool
	// FS is how: "virtiofs" (the default: a virtiofsd process per share,
	// guest RAM shared with it) or "9p" (needs a guest kernel with 9p,
	// which Debian's cloud kernel lacks).
	FS string
}

// Share file systems.
const (
	FSVirtiofs = "virtiofs"
	FS9p       = "9p"
)

// Accel is how the VMM executes guest code.
type Accel string

// Accelerators.
const (
	AccelAuto Accel = "auto"
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// ParseAccel reads --accel.
func ParseAccel(s string) (Accel, error) {
	switch a := Accel(s); a {
	case AccelAuto, AccelKVM, AccelTCG:
		return a, nil
	case "":
		return AccelAuto, nil
	}
	return "", fmt.Errorf("--accel %q: want auto, kvm or tcg", s)
}

// ErrKVMUnusable says KVM cannot run a stock guest kernel here.
var ErrKVMUnusable = errors.New("kvm unusable")

// ProbeKVM tells whether KVM can run a stock kernel on this host. On a
// PVM host (a paravirtual KVM, module kvm_pvm) stock kernels hang right
// after decompression, so it counts as unusable.
func ProbeKVM() error {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return fmt.Errorf("%w (paravirtual PVM host: stock kernels hang under it)", ErrKVMUnusable)
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("%w (%v)", ErrKVMUnusable, err)
	}
	f.Close()
	return nil
}

// Resolve turns auto into kvm or tcg. warn is set when auto fell back.
func (a Accel) Resolve() (resolved Accel, warn string, err error) {
	switch a {
	case AccelTCG:
		return AccelTCG, "", nil
	case AccelKVM:
		if err := ProbeKVM(); err != nil {
			return "", "", fmt.Errorf("--accel kvm: %w; use --accel tcg (slow, software emulation) or auto", err)
		}
		return AccelKVM, "", nil
	}
	if err := ProbeKVM(); err != nil {
		return AccelTCG, fmt.Sprintf("%v: falling back to TCG; pass --accel tcg to silence", err), nil
	}
	return AccelKVM, "", nil
}

// VMM starts machines.
type VMM interface {
	// Start boots spec and returns once the VMM runs and its sockets
	// exist. The machine dies with ctx.
	Start(ctx context.Context, spec Spec) (Machine, error)
}

// Machine is one running guest.
type Machine interface {
	// Wait returns when the VMM process has exited.
	Wait() error
	// Shutdown asks the VMM to stop the guest now (no guest cooperation).
	Shutdown(ctx context.Context) error
	// Kill ends the VMM process at once.
	Kill() error
	// Pid is the VMM process's id.
	Pid() int
}
