// Package qemu is cwrun's QEMU backend: the argv for a vm.Spec, the
// process, and QMP to stop it. QEMU runs as a child that dies with
// cwrun (parent-death signal), so no QEMU outlives the launcher.
//
// It never sees a disk key: keys travel to the guest over the
// virtio-serial ports, which QEMU only relays.
package qemu

import (
	"context"
	"errors"
	"fmt"
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

// binary finds QEMU or says which package brings it.
func (q QEMU) binary() (string, error) {
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
	if spec.Kernel == "" || spec.Initrd == "" {
		return nil, errors.New("qemu: a kernel and an initrd are required")
	}
	accel := "tcg"
	if spec.Accel == vm.AccelKVM {
		accel = "kvm"
	}
	a := []string{
		"-name", spec.Name,
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
		"-accel", accel,
		// microvm hung in early boot under TCG here; pc boots.
		"-M", "pc",
		"-smp", strconv.Itoa(max(spec.CPUs, 1)),
		"-m", strconv.Itoa(max(spec.MemoryMiB, 128)),
		"-kernel", spec.Kernel,
		"-initrd", spec.Initrd,
		"-append", spec.Cmdline,
		"-qmp", "unix:" + filepath.Join(spec.RunDir, "qmp.sock") + ",server=on,wait=off",
	}
	if accel == "kvm" {
		a = append(a, "-cpu", "host")
	}
	if spec.Console != "" {
		a = append(a, "-chardev", "file,id=console,path="+spec.Console, "-serial", "chardev:console")
	} else {
		a = append(a, "-serial", "none")
	}
	for i, d := range spec.Disks {
		format := d.Format
		if format == "" {
			format = "raw"
		}
		drive := fmt.Sprintf("file=%s,format=%s,if=none,id=disk%d,cache=unsafe", escape(d.Path), format, i)
		if d.Snapshot {
			drive += ",snapshot=on"
		}
		if d.ReadOnly {
			drive += ",readonly=on"
		}
		a = append(a, "-drive", drive, "-device", fmt.Sprintf("virtio-blk-pci,drive=disk%d", i))
	}
	if len(spec.Ports) > 0 {
		a = append(a, "-device", "virtio-serial-pci,id=vser0")
		for i, p := range spec.Ports {
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=port%d,path=%s,server=on,wait=off", i, escape(p.Socket)),
				"-device", fmt.Sprintf("virtserialport,bus=vser0.0,chardev=port%d,name=%s", i, p.Name))
		}
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
	for i, s := range spec.Shares {
		fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none", i, escape(s.HostPath))
		if s.ReadOnly {
			fsdev += ",readonly=on"
		}
		a = append(a, "-fsdev", fsdev, "-device", fmt.Sprintf("virtio-9p-pci,fsdev=fs%d,mount_tag=%s", i, s.Tag))
	}
	return a, nil
}

// escape doubles commas, QEMU's escape inside option values.
func escape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// Start boots spec. QEMU gets SIGKILL if cwrun dies, and is killed when
// ctx ends.
func (q QEMU) Start(ctx context.Context, spec vm.Spec) (vm.Machine, error) {
	bin, err := q.binary()
	if err != nil {
		return nil, err
	}
	args, err := Args(spec)
	if err != nil {
		return nil, err
	}
	m := &machine{done: make(chan struct{}), qmp: filepath.Join(spec.RunDir, "qmp.sock")}
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
		cmd := exec.Command(bin, args...)
		cmd.Stdout, cmd.Stderr = stderr, stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("starting %s: %w", bin, err)
			return
		}
		m.cmd = cmd
		started <- nil
		m.err = cmd.Wait()
		stderr.Close()
		close(m.done)
	}()
	if err := <-started; err != nil {
		stderr.Close()
		return nil, err
	}
	go func() {
		select {
		case <-ctx.Done():
			m.Kill()
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
		m.Kill()
		<-m.done
		return nil, err
	}
	return m, nil
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
