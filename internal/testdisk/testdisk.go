// Package testdisk builds small bootable UEFI disks for tests: an MBR
// disk whose EFI system partition holds \EFI\BOOT\BOOTX64.EFI, a unified
// kernel image (systemd-boot's stub + Debian's cloud kernel + a busybox
// initrd + the command line). The busybox init prints a marker line on
// the serial console, counts its boots in a raw sector of the disk (so
// that a test can tell a throw-away overlay from a persistent one),
// reports a cloud-init seed disk when one is attached and the CPUs and
// memory it sees, and powers off (or, as Options say, serves HTTP on
// QEMU's user network, talks on its console, waits for the power
// button, or ignores it).
//
// What the disk does is stated here, by the test's side, and not
// computed by the code under test. Builds need objcopy (binutils),
// systemd-boot-efi, dosfstools and mtools; a missing one skips the test.
package testdisk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cwrun/cwrun/launcher/initrd"
	"github.com/cwrun/cwrun/launcher/kernel"
)

// Stub is systemd-boot's UEFI stub (Debian package systemd-boot-efi).
const Stub = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"

// Layout of the disk, in 512-byte sectors.
const (
	espStart = 2048 // 1 MiB, as partitioning tools align
	espSize  = 48 << 20 / 512
	// StateSector is the raw sector where the init keeps its boot
	// count (decimal, space padded), after the EFI system partition.
	StateSector = espStart + espSize
	totalSize   = (StateSector + 2048) * 512 // 1 MiB after the ESP
)

// Marker starts the line the init prints once it runs.
const Marker = "cwrun-testdisk: init running"

// BootsPrefix starts the line that says how many times this disk has
// booted (its raw state sector's count after this boot).
const BootsPrefix = "cwrun-testdisk: boots="

// IgnoringStop is printed by a Hang disk before it waits forever.
const IgnoringStop = "cwrun-testdisk: ignoring stop requests"

// Every boot reports what the guest sees: CPUsPrefix is followed by
// the number of online CPUs (nproc), MemTotalPrefix by MemTotal from
// /proc/meminfo in KiB (less than the VM's memory: the firmware and
// the kernel keep some).
const (
	CPUsPrefix     = "cwrun-testdisk: cpus="
	MemTotalPrefix = "cwrun-testdisk: memtotal_kib="
)

// Lines and body of a Serve disk.
const (
	// ServeBody is what GET / on the guest's port 80 returns.
	ServeBody = "cwrun-testdisk: hello over the user network\n"
	// ServingLine is printed once httpd listens.
	ServingLine = "cwrun-testdisk: serving http on 10.0.2.15:80"
	// NetFailedPrefix starts the line printed when eth0 cannot be
	// configured (the disk then waits for the power button anyway).
	NetFailedPrefix = "cwrun-testdisk: network failed: "
)

// Options shape the disk.
type Options struct {
	// Kernel is the guest kernel; its modules folder must hold
	// virtio_pci and virtio_blk.
	Kernel kernel.Kernel
	// Hang makes the init wait forever after its report instead of
	// powering off, ignoring ACPI power-button presses (it runs no
	// acpid), as a stuck guest would.
	Hang bool
	// Interactive makes the init read a line from its console and echo
	// it (Got), then wait for the ACPI power button (a guest that shuts
	// down cleanly when asked) before it powers off.
	Interactive bool
	// Serve loads virtio_net, configures eth0 statically for QEMU's
	// user network (10.0.2.15/24, gateway 10.0.2.2, as slirp hands out
	// by DHCP), serves ServeBody at / on port 80 with busybox httpd,
	// then waits for the ACPI power button before it powers off.
	Serve bool
	// RebootOnce makes the first boot of the disk reboot the machine
	// (busybox reboot -f) right after its boots= line; later boots go on.
	RebootOnce bool
}

// RebootingLine is what a RebootOnce disk says before it reboots.
const RebootingLine = "cwrun-testdisk: rebooting"

// Lines of an Interactive disk.
const (
	AskLine     = "cwrun-testdisk: type a line"
	GotPrefix   = "cwrun-testdisk: got "
	WaitingLine = "cwrun-testdisk: waiting for the power button"
	PressedLine = "cwrun-testdisk: power button pressed"
)

// Need skips t unless the programs a build needs are installed.
func Need(t testing.TB) {
	t.Helper()
	for _, p := range []string{"objcopy", "mkfs.vfat", "mmd", "mcopy", "qemu-img"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (Debian packages binutils, dosfstools, mtools, qemu-utils; hack/deps.sh installs them)", p)
		}
	}
	for _, p := range []string{Stub, "/bin/busybox"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("needs %s (Debian packages systemd-boot-efi, busybox-static; hack/deps.sh installs them)", p)
		}
	}
}

// Build writes the raw disk as dir/disk.raw and returns its path.
func Build(t testing.TB, dir string, o Options) string {
	t.Helper()
	Need(t)
	work := t.TempDir()
	rd := filepath.Join(work, "initrd.cpio")
	if err := writeInitrd(rd, o); err != nil {
		t.Fatal(err)
	}
	uki := filepath.Join(work, "BOOTX64.EFI")
	if err := makeUKI(uki, o.Kernel.Vmlinuz, rd, "console=ttyS0 panic=-1 quiet"); err != nil {
		t.Fatal(err)
	}
	esp := filepath.Join(work, "esp.img")
	run(t, "mkfs.vfat", "-n", "ESP", "-C", esp, fmt.Sprint(espSize/2)) // KiB
	run(t, "mmd", "-i", esp, "::EFI", "::EFI/BOOT")
	run(t, "mcopy", "-i", esp, uki, "::EFI/BOOT/BOOTX64.EFI")

	disk := filepath.Join(dir, "disk.raw")
	f, err := os.Create(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(totalSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(mbr(), 0); err != nil {
		t.Fatal(err)
	}
	e, err := os.Open(esp)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if _, err := io.Copy(io.NewOffsetWriter(f, espStart*512), e); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return disk
}

// QCOW2 converts a raw disk to dir/disk.qcow2 and returns its path.
func QCOW2(t testing.TB, raw, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
	return out
}

// Boots reads the boot count from a raw disk's state sector.
func Boots(t testing.TB, raw string) string {
	t.Helper()
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 512)
	if _, err := f.ReadAt(b, StateSector*512); err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(strings.Trim(string(b), "\x00"))
}

// mbr is a protective-free classic MBR with one EFI system partition
// (type 0xEF): OVMF finds \EFI\BOOT\BOOTX64.EFI on it.
func mbr() []byte {
	b := make([]byte, 512)
	p := b[446:462]
	p[0] = 0x00                            // not "active": UEFI does not care
	copy(p[1:4], []byte{0xfe, 0xff, 0xff}) // CHS: use the LBA fields
	p[4] = 0xef
	copy(p[5:8], []byte{0xfe, 0xff, 0xff})
	binary.LittleEndian.PutUint32(p[8:12], espStart)
	binary.LittleEndian.PutUint32(p[12:16], espSize)
	b[510], b[511] = 0x55, 0xaa
	return b
}

// initScript is the guest's /init. It loads the virtio modules so it
// can see its disks (and NIC), then reports and powers off.
func initScript(o Options) string {
	s := `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko; done
echo "` + Marker + `"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
n=$(dd if=/dev/vda bs=512 skip=` + fmt.Sprint(StateSector) + ` count=1 2>/dev/null | tr -dc 0-9)
n=$((${n:-0}+1))
printf '%-511s\n' "$n" | dd of=/dev/vda bs=512 seek=` + fmt.Sprint(StateSector) + ` count=1 conv=notrunc,fsync 2>/dev/null
sync
echo "` + BootsPrefix + `$n"
`
	if o.RebootOnce {
		s += `if [ "$n" = 1 ]; then echo "` + RebootingLine + `"; reboot -f; fi
`
	}
	s += `if [ -b /dev/vdb ]; then
	echo "cwrun-testdisk: second disk: $(grep -a -m1 -o 'instance-id: [a-z0-9-]*' /dev/vdb)"
fi
echo "` + CPUsPrefix + `$(nproc)"
echo "` + MemTotalPrefix + `$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo)"
`
	if o.Serve {
		// Static, not DHCP: busybox udhcpc needs a script to apply its
		// lease, and slirp's addresses are fixed anyway. httpd listens
		// before it goes to the background.
		s += `i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if ip link set lo up && ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2; then
	httpd -p 80 -h /www && echo "` + ServingLine + `"
else
	echo "` + NetFailedPrefix + `$(ls /sys/class/net | tr '\n' ' ')"
fi
`
	}
	if o.Interactive {
		s += `echo "` + AskLine + `"
read line
echo "` + GotPrefix + `$line"
`
	}
	if o.Interactive || o.Serve {
		// The first event of an input device named "Power Button" is
		// the press (q35 may also have a PS/2 keyboard). Each reader
		// opens its device before it says it is ready, and the waiting
		// line comes after all are: a press from then on is queued
		// for them, not lost (tests press as soon as they see the line).
		s += `mkdir -p /tmp
evs=
for e in /sys/class/input/event*; do
	grep -q "Power Button" $e/device/name 2>/dev/null && evs="$evs /dev/input/${e##*/}"
done
for ev in $evs; do (exec <$ev; touch /tmp/ready.${ev##*/}; head -c 1 >/dev/null; touch /tmp/pressed) & done
for ev in $evs; do
	i=0
	while [ ! -e /tmp/ready.${ev##*/} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
done
echo "` + WaitingLine + ` ($evs)"
while [ ! -e /tmp/pressed ]; do sleep 0.2; done
echo "` + PressedLine + `"
`
	}
	if o.Hang {
		s += `echo "` + IgnoringStop + `"
trap '' TERM INT
while :; do sleep 1; done
`
	}
	return s + "poweroff -f\n"
}

// writeInitrd writes a newc cpio: busybox, the init script, the
// virtio block (and, to serve, network) modules with their
// dependencies, in load order, and what a Serve disk serves.
func writeInitrd(path string, o Options) error {
	want := []string{"virtio_pci", "virtio_blk"}
	if o.Serve {
		want = append(want, initrd.NetworkModules()...)
	}
	if o.Interactive || o.Serve {
		want = append(want, "button", "evdev") // the ACPI power button as /dev/input/event*
	}
	mods, err := initrd.Resolve(o.Kernel.ModulesDir, want)
	if err != nil {
		return err
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		return fmt.Errorf("needs a static /bin/busybox (Debian package busybox-static): %w", err)
	}
	var w cpioWriter
	for _, d := range []string{"bin", "dev", "etc", "lib", "lib/modules", "proc", "sys"} {
		w.add(d, 0o040755, 0, 0, nil)
	}
	w.add("dev/console", 0o020600, 5, 1, nil)
	w.add("bin/busybox", 0o100755, 0, 0, bb)
	w.add("init", 0o100755, 0, 0, []byte(initScript(o)))
	if o.Serve {
		w.add("www", 0o040755, 0, 0, nil)
		w.add("www/index.html", 0o100644, 0, 0, []byte(ServeBody))
	}
	var names []string
	for _, m := range mods {
		b, err := os.ReadFile(m.Path)
		if err != nil {
			return err
		}
		w.add("lib/modules/"+m.Name+".ko", 0o100644, 0, 0, b)
		names = append(names, m.Name)
	}
	w.add("etc/modules", 0o100644, 0, 0, []byte(strings.Join(names, "\n")+"\n"))
	w.add("TRAILER!!!", 0, 0, 0, nil)
	return os.WriteFile(path, w.b.Bytes(), 0o644)
}

type cpioWriter struct {
	b   bytes.Buffer
	ino int
}

func (c *cpioWriter) add(name string, mode uint32, rmajor, rminor int, data []byte) {
	c.ino++
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	fmt.Fprintf(&c.b, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	c.b.WriteString(name + "\x00")
	c.pad()
	c.b.Write(data)
	c.pad()
}

func (c *cpioWriter) pad() {
	for c.b.Len()%4 != 0 {
		c.b.WriteByte(0)
	}
}

// makeUKI joins stub, kernel, initrd and command line into one UEFI
// executable, as systemd's ukify does, with section addresses past the
// stub's own (systemd 252's stub reads them from the section table).
func makeUKI(out, vmlinuz, rd, cmdline string) error {
	dir := filepath.Dir(out)
	cl := filepath.Join(dir, "cmdline")
	osrel := filepath.Join(dir, "os-release")
	if err := os.WriteFile(cl, []byte(cmdline+"\x00"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(osrel, []byte("ID=cwrun-testdisk\nNAME=cwrun test disk\n"), 0o644); err != nil {
		return err
	}
	st, err := os.Stat(vmlinuz)
	if err != nil {
		return err
	}
	const linuxVMA = 0x2000000
	initrdVMA := linuxVMA + (st.Size()+0xfffff)&^0xfffff + 0x100000
	cmd := exec.Command("objcopy",
		"--add-section", ".osrel="+osrel, "--change-section-vma", ".osrel=0x20000",
		"--add-section", ".cmdline="+cl, "--change-section-vma", ".cmdline=0x30000",
		"--add-section", ".linux="+vmlinuz, "--change-section-vma", fmt.Sprintf(".linux=%#x", linuxVMA),
		"--add-section", ".initrd="+rd, "--change-section-vma", fmt.Sprintf(".initrd=%#x", initrdVMA),
		Stub, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("objcopy (making the unified kernel image): %v: %s", err, b)
	}
	return nil
}

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if b, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, b)
	}
}
