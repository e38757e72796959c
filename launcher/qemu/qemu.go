// Package qemu is cwrun's QEMU backend: the argv for a vm.Spec, the
// process, and QMP to stop it. QEMU runs as a child that dies with
// cwrun (parent-death signal), so no QEMU outlives the launcher.
//
// It never sees a disk key: keys travel to the guest over the
// virtio-serial ports, which QEMU only relays.
package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/launcher/vm"
)

// QEMU is the vm.VMM for qemu-system-x86_64.
type QEMU struct {
	// Binary is the QEMU program; default qemu-system-x86_64 from PATH.
	Binary string
}

// Path finds the QEMU program or says which package brings it.
func (q QEMU) Path() (string, error) {
	name := q.Binary
	if name == "" {
		name = "qemu-system-x86_64"
	}
	p, err := exec.LookPath(name)
	if err != nil {
		return "", fmt.Errorf("%s not found: install Debian's qemu-system-x86 (apt-get install qemu-system-x86)", name)
	}
	return p, nil
}

// Args returns QEMU's argv (without the program) for spec.
func Args(spec vm.Spec) ([]string, error) {
	if spec.Firmware == nil && (spec.Kernel == "" || spec.Initrd == "") {
		return nil, errors.New("qemu: a kernel and an initrd are required without firmware")
	}
	accel := "tcg"
	if spec.Accel == vm.AccelKVM {
		accel = "kvm"
	}
	a := []string{
		"-name", spec.Name,
		// -display none, not -nographic: the latter would also put a
		// monitor on stdio.
		"-nodefaults", "-no-user-config", "-display", "none",
		"-accel", accel,
		"-smp", strconv.Itoa(max(spec.CPUs, 1)),
		"-m", strconv.Itoa(max(spec.MemoryMiB, 128)),
		"-qmp", "unix:" + filepath.Join(spec.RunDir, "qmp.sock") + ",server=on,wait=off",
	}
	if !spec.Reboot {
		a = append(a, "-no-reboot")
	}
	if fw := spec.Firmware; fw != nil {
		if fw.Code == "" || fw.Vars == "" {
			return nil, errors.New("qemu: firmware needs both a code and a variable store file")
		}
		// OVMF's 4 MiB builds want q35 (SMM-less builds boot on it
		// without -global settings).
		a = append(a, "-M", "q35",
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+escape(fw.Code),
			"-drive", "if=pflash,format=raw,unit=1,file="+escape(fw.Vars))
	} else {
		// microvm hung in early boot under TCG here; pc boots.
		a = append(a, "-M", "pc")
	}
	if spec.Kernel != "" {
		a = append(a, "-kernel", spec.Kernel, "-initrd", spec.Initrd, "-append", spec.Cmdline)
	}
	if t := spec.TPM; t != nil {
		switch {
		case t.Socket != "":
			a = append(a, "-chardev", "socket,id=chrtpm,path="+escape(t.Socket),
				"-tpmdev", "emulator,id=tpm0,chardev=chrtpm")
		case t.Device != "":
			a = append(a, "-tpmdev", "passthrough,id=tpm0,path="+escape(t.Device))
		default:
			return nil, errors.New("qemu: a TPM needs an swtpm socket or a host device")
		}
		a = append(a, "-device", "tpm-crb,tpmdev=tpm0")
	}
	if accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	if virtiofs(spec) {
		// vhost-user devices need the guest RAM in shared memory.
		a = append(a, "-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", max(spec.MemoryMiB, 128)),
			"-numa", "node,memdev=mem")
	}
	switch {
	case spec.ConsoleSocket != "":
		a = append(a, "-chardev", "socket,id=console,path="+escape(spec.ConsoleSocket)+",server=on,wait=off", "-serial", "chardev:console")
	case spec.Console != "":
		a = append(a, "-chardev", "file,id=console,path="+spec.Console, "-serial", "chardev:console")
	default:
		a = append(a, "-serial", "none")
	}
	for i, d := range spec.Disks {
		format := d.Format
		if format == "" {
			format = "raw"
		}
		cache := "unsafe"
		if d.Durable {
			cache = "writeback"
		}
		drive := fmt.Sprintf("file=%s,format=%s,if=none,id=disk%d,cache=%s", escape(d.Path), format, i, cache)
		if d.Snapshot {
			drive += ",snapshot=on"
		}
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		dev := fmt.Sprintf("virtio-blk-pci,drive=disk%d", i)
		if d.Boot {
			dev += ",bootindex=0"
		}
		a = append(a, "-drive", drive, "-device", dev)
	}
	if len(spec.Ports) > 0 {
		a = append(a, "-device", "virtio-serial-pci,id=vser0")
		for i, p := range spec.Ports {
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=port%d,path=%s,server=on,wait=off", i, escape(p.Socket)),
				"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=port%d,name=%s", i, p.Name))
		}
	}
	if spec.RNG {
		a = append(a, "-device", "virtio-rng-pci")
	}
	if n := spec.Network; n != nil {
		netdev := "user,id=net0"
		for _, f := range n.Forwards {
			proto := f.Proto
			if proto == "" {
				proto = "tcp"
			}
			netdev += fmt.Sprintf(",hostfwd=%s:%s:%d-:%d", proto, f.HostAddr, f.HostPort, f.GuestPort)
		}
		a = append(a, "-netdev", netdev, "-device", "virtio-net-pci,netdev=net0")
	}
	for i, sh := range spec.Shares {
		switch sh.FS {
		case "", vm.FSVirtiofs:
			a = append(a, "-chardev", fmt.Sprintf("socket,id=vfs%d,path=%s", i, escape(virtiofsSocket(spec, i))),
				"-device", fmt.Sprintf("vhost-user-fs-pci,chardev=vfs%d,tag=%s", i, sh.Tag))
		case vm.FS9p:
			fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none", i, escape(sh.HostPath))
			if sh.ReadOnly {
				fsdev += ",readonly=on"
			}
			a = append(a, "-fsdev", fsdev, "-device", fmt.Sprintf("virtio-9p-pci,fsdev=fs%d,mount_tag=%s", i, sh.Tag))
		default:
			return nil, fmt.Errorf("qemu: share %q: unknown file system %q (want virtiofs or 9p)", sh.Tag, sh.FS)
		}
	}
	return a, nil
}

// escape doubles commas, QEMU's escape inside option values.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// virtiofs reports whether spec has virtiofs shares.
func virtiofs(spec vm.Spec) bool {
	for _, sh := range spec.Shares {
		if sh.FS == "" || sh.FS == vm.FSVirtiofs {
			return true
		}
	}
	return false
}

func virtiofsSocket(spec vm.Spec, i int) string {
	return filepath.Join(spec.RunDir, fmt.Sprintf("vfs%d.sock", i))
}

// virtiofsdPaths are where Debian (qemu-system-common, QEMU 7.2's C
// virtiofsd) and others put virtiofsd.
var virtiofsdPaths = []string{"/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"}

// Virtiofsd finds the virtiofsd program or says which package brings it.
func Virtiofsd() (string, error) {
	if p, err := exec.LookPath("virtiofsd"); err == nil {
		return p, nil
	}
	for _, p := range virtiofsdPaths {
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("virtiofsd not found (needed for -v): install Debian's qemu-system-common (bookworm ships it as /usr/lib/qemu/virtiofsd) or the virtiofsd package")
}

// Start boots spec. QEMU (and each virtiofsd) gets SIGKILL if cwrun
// dies, and is killed when ctx ends.
func (q QEMU) Start(ctx context.Context, spec vm.Spec) (vm.Machine, error) {
	bin, err := q.Path()
	if err != nil {
		return nil, err
	}
	args, err := Args(spec)
	if err != nil {
		return nil, err
	}
	var vfsd string
	if virtiofs(spec) {
		if vfsd, err = Virtiofsd(); err != nil {
			return nil, err
		}
	}
	m := &machine{done: make(chan struct{}), qmp: filepath.Join(spec.RunDir, "qmp.sock")}
	// Sockets left by an earlier machine would pass for this one's.
	stale := []string{m.qmp}
	for _, p := range spec.Ports {
		stale = append(stale, p.Socket)
	}
	for i := range spec.Shares {
		stale = append(stale, virtiofsSocket(spec, i))
	}
	for _, p := range stale {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("removing the stale socket %s: %w", p, err)
		}
	}
	stderr, err := os.Create(filepath.Join(spec.RunDir, "qemu.log"))
	if err != nil {
		return nil, fmt.Errorf("qemu log: %w", err)
	}
	m.logPath = stderr.Name()
	started := make(chan error, 1)
	// The parent-death signal belongs to the thread that forked, so
	// that thread stays locked until QEMU is gone.
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer close(m.done)
		defer stderr.Close()
		attr := func() *syscall.SysProcAttr {
			return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
		}
		var helpers []*exec.Cmd
		stopHelpers := func() {
			for _, h := range helpers {
				syscall.Kill(-h.Process.Pid, syscall.SIGKILL) //nolint:errcheck // already gone is fine
				h.Wait()                                      //nolint:errcheck // killed on purpose
			}
		}
		for i, sh := range spec.Shares {
			if sh.FS != "" && sh.FS != vm.FSVirtiofs {
				continue
			}
			sock := virtiofsSocket(spec, i)
			h := exec.Command(vfsd, "--socket-path="+sock, "-o", "source="+sh.HostPath, "-o", "cache=auto")
			if sh.ReadOnly {
				// QEMU 7.2's virtiofsd has no read-only mode, and a
				// guest mount's ro flag is the guest's to drop: serve a
				// read-only bind mount instead, made in a mount
				// namespace of virtiofsd's own, so that it vanishes
				// with virtiofsd and no mount is ever left on the host.
				h = exec.Command("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
					`mount --bind -- "$1" "$1"; mount -o remount,bind,ro -- "$1"; shift; exec "$@"`,
					"sh", sh.HostPath, vfsd, "--socket-path="+sock, "-o", "source="+sh.HostPath, "-o", "cache=auto")
			}
			h.Stdout, h.Stderr = stderr, stderr
			h.SysProcAttr = attr()
			if err := h.Start(); err != nil {
				stopHelpers()
				started <- fmt.Errorf("starting %s: %w", vfsd, err)
				return
			}
			helpers = append(helpers, h)
			if err := waitFile(sock, 10*time.Second); err != nil {
				stopHelpers()
				started <- fmt.Errorf("virtiofsd for %s: %w: %s", sh.HostPath, err, lastLines(m.logPath, 5))
				return
			}
		}
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = stderr, stderr
		// snapshot=on overlays go to TMPDIR: keep them in the run folder,
		// which the launcher removes even if QEMU was killed.
		cmd.Env = append(os.Environ(), "TMPDIR="+spec.RunDir)
		cmd.SysProcAttr = attr()
		if err := cmd.Start(); err != nil {
			stopHelpers()
			started <- fmt.Errorf("starting %s: %w", bin, err)
			return
		}
		m.cmd = cmd
		started <- nil
		m.err = cmd.Wait()
		stopHelpers()
	}()
	if err := <-started; err != nil {
		<-m.done
		return nil, err
	}
	go func() {
		select {
		case <-ctx.Done():
			m.Kill() //nolint:errcheck // best effort on cancel
		case <-m.done:
		}
	}()
	// QEMU makes its sockets before it runs the guest: wait for them
	// so that callers can connect at once.
	want := []string{m.qmp}
	for _, p := range spec.Ports {
		want = append(want, p.Socket)
	}
	if err := m.waitSockets(want, 10*time.Second); err != nil {
		m.Kill() //nolint:errcheck // the error below says more
		<-m.done
		return nil, err
	}
	// QEMU listens before it loads the kernel and initrd.
	if err := m.waitRunning(10 * time.Second); err != nil {
		m.Kill() //nolint:errcheck // the error below says more
		<-m.done
		return nil, err
	}
	return m, nil
}

// waitRunning connects to QMP and negotiates capabilities. The greeting
// comes from QMP's own I/O thread as soon as QEMU listens, but commands
// run on the main loop, which starts once the machine is built (kernel
// and initrd loaded).
func (m *machine) waitRunning(timeout time.Duration) error {
	// The socket file exists from QEMU's bind, but connections are
	// refused until its listen: a loaded host can preempt QEMU between
	// the two.
	deadline := time.Now().Add(timeout)
	conn, err := net.DialTimeout("unix", m.qmp, timeout)
	for errors.Is(err, syscall.ECONNREFUSED) && time.Now().Before(deadline) {
		select {
		case <-m.done:
		case <-time.After(10 * time.Millisecond):
			conn, err = net.DialTimeout("unix", m.qmp, time.Until(deadline))
			continue
		}
		break
	}
	if err == nil {
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(timeout)) //nolint:errcheck // a unix socket
		r := bufio.NewReader(conn)
		if _, err = r.ReadBytes('\n'); err == nil {
			if _, err = conn.Write([]byte(`{"execute":"qmp_capabilities"}` + "\n")); err == nil {
				_, err = r.ReadBytes('\n')
			}
		}
	}
	if err == nil {
		return nil
	}
	select {
	case <-m.done:
		return fmt.Errorf("qemu exited at start: %v: %s", m.err, lastLines(m.logPath, 5))
	case <-time.After(2 * time.Second):
		return fmt.Errorf("qemu did not start within %s: %v: %s", timeout, err, lastLines(m.logPath, 5))
	}
}

func waitFile(p string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if _, err := os.Stat(p); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %s", p, timeout)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type machine struct {
	cmd     *exec.Cmd
	done    chan struct{}
	err     error
	qmp     string
	logPath string
}

func (m *machine) waitSockets(paths []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, p := range paths {
		for {
			if _, err := os.Stat(p); err == nil {
				break
			}
			select {
			case <-m.done:
				return fmt.Errorf("qemu exited at start: %v: %s", m.err, lastLines(m.logPath, 5))
			default:
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("qemu did not create %s within %s: %s", p, timeout, lastLines(m.logPath, 5))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return nil
}

func (m *machine) Wait() error {
	<-m.done
	if m.err != nil {
		return fmt.Errorf("qemu: %w: %s", m.err, lastLines(m.logPath, 5))
	}
	return nil
}

func (m *machine) Pid() int { return m.cmd.Process.Pid }

func (m *machine) Kill() error {
	select {
	case <-m.done:
		return nil
	default:
	}
	return syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
}

// Powerdown presses the guest's ACPI power button (QMP
// system_powerdown): a guest OS that listens for it shuts down and
// powers off; one that does not keeps running.
func (m *machine) Powerdown(ctx context.Context) error {
	return qmpCommand(ctx, m.qmp, "system_powerdown")
}

// Shutdown asks QEMU over QMP to quit, and kills it if that fails or
// ctx ends first.
func (m *machine) Shutdown(ctx context.Context) error {
	err := qmpCommand(ctx, m.qmp, "quit")
	select {
	case <-m.done:
		return nil
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
	}
	m.Kill()
	<-m.done
	return err
}

// lastLines returns the last n lines of a file, for error messages.
func lastLines(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
