package qemu

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/launcher/kernel"
	"github.com/cwrun/cwrun/launcher/vm"
)

// argPairs returns the values of every occurrence of flag in argv.
func argPairs(argv []string, flag string) []string {
	var out []string
	for i := 0; i+1 < len(argv); i++ {
		if argv[i] == flag {
			out = append(out, argv[i+1])
		}
	}
	return out
}

func TestArgs(t *testing.T) {
	base := vm.Spec{Name: "t", Kernel: "/k", Initrd: "/i", Cmdline: "console=ttyS0", CPUs: 2, MemoryMiB: 256, RunDir: "/run/x"}
	for _, c := range []struct {
		name   string
		edit   func(*vm.Spec)
		want   map[string][]string // flag -> all its values, in order
		absent []string
	}{
		{"minimal tcg", func(*vm.Spec) {}, map[string][]string{
			"-accel": {"tcg"}, "-M": {"pc"}, "-smp": {"2"}, "-m": {"256"}, "-kernel": {"/k"}, "-initrd": {"/i"},
			"-append": {"console=ttyS0"}, "-serial": {"none"}, "-display": {"none"},
			"-qmp": {"unix:/run/x/qmp.sock,server=on,wait=off"},
		}, []string{"-cpu", "-netdev", "-drive", "-nographic", "-object"}},
		{"kvm", func(s *vm.Spec) { s.Accel = vm.AccelKVM }, map[string][]string{"-accel": {"kvm"}, "-cpu": {"host"}}, nil},
		{"small memory is raised", func(s *vm.Spec) { s.MemoryMiB = 16; s.CPUs = 0 }, map[string][]string{"-m": {"128"}, "-smp": {"1"}}, nil},
		{"disks", func(s *vm.Spec) {
			s.Disks = []vm.Disk{{Path: "/a,b.img", Snapshot: true}, {Path: "/c.qcow2", Format: "qcow2", ReadOnly: true}, {Path: "/keep.qcow2", Format: "qcow2", Durable: true}}
		}, map[string][]string{
			"-drive": {"file=/a,,b.img,format=raw,if=none,id=disk0,cache=unsafe,snapshot=on",
				"file=/c.qcow2,format=qcow2,if=none,id=disk1,cache=unsafe,readonly=on",
				"file=/keep.qcow2,format=qcow2,if=none,id=disk2,cache=writeback"},
		}, nil},
		{"console and ports", func(s *vm.Spec) {
			s.Console = "/run/x/console"
			s.Ports = []vm.Port{{Name: "cwrun.control", Socket: "/run/x/c"}}
		}, map[string][]string{
			"-serial":  {"chardev:console"},
			"-chardev": {"file,id=console,path=/run/x/console", "socket,id=port0,path=/run/x/c,server=on,wait=off"},
			"-device":  {"virtio-serial-pci,id=vser0", "virtserialport,bus=vser0.0,chardev=port0,name=cwrun.control"},
		}, nil},
		{"console socket", func(s *vm.Spec) {
			s.ConsoleSocket = "/run/x/console.sock"
		}, map[string][]string{
			"-serial":  {"chardev:console"},
			"-chardev": {"socket,id=console,path=/run/x/console.sock,server=on,wait=off"},
		}, nil},
		{"user network with forwards", func(s *vm.Spec) {
			s.Network = &vm.Network{Forwards: []vm.Forward{{HostPort: 8080, GuestPort: 80}, {HostAddr: "127.0.0.1", HostPort: 53, GuestPort: 5353, Proto: "udp"}}}
		}, map[string][]string{
			"-netdev": {"user,id=net0,hostfwd=tcp::8080-:80,hostfwd=udp:127.0.0.1:53-:5353"},
			"-device": {"virtio-net-pci,netdev=net0"},
		}, nil},
		{"virtiofs share", func(s *vm.Spec) {
			s.Shares = []vm.Share{{Tag: "cwrun0", HostPath: "/data", FS: vm.FSVirtiofs}}
		}, map[string][]string{
			"-object":  {"memory-backend-memfd,id=mem,size=256M,share=on"},
			"-numa":    {"node,memdev=mem"},
			"-chardev": {"socket,id=vfs0,path=/run/x/vfs0.sock"},
			"-device":  {"vhost-user-fs-pci,chardev=vfs0,tag=cwrun0"},
		}, nil},
		{"uefi with a swtpm and a direct kernel boot", func(s *vm.Spec) {
			s.Firmware = &vm.Firmware{Code: "/fw/code.fd", Vars: "/run/x/vars.fd"}
			s.TPM = &vm.TPM{Socket: "/run/x/tpm.sock"}
		}, map[string][]string{
			"-M":       {"q35"},
			"-drive":   {"if=pflash,format=raw,unit=0,readonly=on,file=/fw/code.fd", "if=pflash,format=raw,unit=1,file=/run/x/vars.fd"},
			"-kernel":  {"/k"},
			"-chardev": {"socket,id=chrtpm,path=/run/x/tpm.sock"},
			"-tpmdev":  {"emulator,id=tpm0,chardev=chrtpm"},
			"-device":  {"tpm-crb,tpmdev=tpm0"},
		}, nil},
		{"uefi disk boot with the host tpm", func(s *vm.Spec) {
			s.Kernel, s.Initrd, s.Cmdline = "", "", ""
			s.Firmware = &vm.Firmware{Code: "/fw/code.fd", Vars: "/run/x/vars.fd"}
			s.TPM = &vm.TPM{Device: "/dev/tpm0"}
			s.Disks = []vm.Disk{{Path: "/d.qcow2", Format: "qcow2", Boot: true, Snapshot: true}}
		}, map[string][]string{
			"-tpmdev": {"passthrough,id=tpm0,path=/dev/tpm0"},
			"-device": {"tpm-crb,tpmdev=tpm0", "virtio-blk-pci,drive=disk0,bootindex=0"},
		}, []string{"-kernel", "-initrd", "-append"}},
		{"entropy device", func(s *vm.Spec) { s.RNG = true }, map[string][]string{"-device": {"virtio-rng-pci"}}, nil},
		{"9p share", func(s *vm.Spec) {
			s.Shares = []vm.Share{{Tag: "s", HostPath: "/data", ReadOnly: true, FS: vm.FS9p}}
		}, map[string][]string{
			"-fsdev":  {"local,id=fs0,path=/data,security_model=none,readonly=on"},
			"-device": {"virtio-9p-pci,fsdev=fs0,mount_tag=s"},
		}, []string{"-object"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := base
			c.edit(&s)
			argv, err := Args(s)
			if err != nil {
				t.Fatal(err)
			}
			for flag, want := range c.want {
				if got := argPairs(argv, flag); !reflect.DeepEqual(got, want) {
					t.Errorf("%s: got %q, want %q\nargv: %q", flag, got, want, argv)
				}
			}
			for _, flag := range c.absent {
				if got := argPairs(argv, flag); len(got) > 0 {
					t.Errorf("%s present: %q", flag, got)
				}
			}
		})
	}
	if argv, _ := Args(base); !slices.Contains(argv, "-no-reboot") {
		t.Errorf("a guest reboot does not end the VMM: %q", argv)
	}
	rb := base
	rb.Reboot = true
	if argv, _ := Args(rb); slices.Contains(argv, "-no-reboot") {
		t.Errorf("Reboot still passes -no-reboot: %q", argv)
	}
	if _, err := Args(vm.Spec{Initrd: "/i"}); err == nil {
		t.Error("a spec without a kernel was accepted")
	}
	if _, err := Args(vm.Spec{Firmware: &vm.Firmware{Code: "/c"}}); err == nil {
		t.Error("firmware without a variable store was accepted")
	}
	if _, err := Args(vm.Spec{Kernel: "/k", Initrd: "/i", TPM: &vm.TPM{}}); err == nil {
		t.Error("a TPM with neither socket nor device was accepted")
	}
	if _, err := Args(vm.Spec{Kernel: "/k", Initrd: "/i", Shares: []vm.Share{{Tag: "x", FS: "nfs"}}}); err == nil {
		t.Error("an unknown share file system was accepted")
	}
}

func TestPathMissing(t *testing.T) {
	_, err := QEMU{Binary: "qemu-system-nonexistent"}.Path()
	if err == nil || !strings.Contains(err.Error(), "qemu-system-x86") {
		t.Fatalf("error %v does not name the package", err)
	}
}

// testKernel is Debian's cloud kernel, fetched once into the temporary
// folder (shared with launcher/initrd's tests).
func testKernel(t *testing.T) kernel.Kernel {
	t.Helper()
	if testing.Short() {
		t.Skip("boots QEMU")
	}
	for _, p := range []string{"qemu-system-x86_64", "apt-get"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("needs %s (Debian's qemu-system-x86, apt)", p)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := kernel.Fetcher{CacheDir: filepath.Join(os.TempDir(), "cwrun-test-kernel")}.Fetch(ctx)
	if err != nil {
		t.Fatalf("fetching the guest kernel: %v", err)
	}
	return k
}

// hungSpec boots a kernel whose initrd holds no init: it panics and,
// with panic=0, stays up until stopped.
func hungSpec(t *testing.T) vm.Spec {
	k := testKernel(t)
	dir, err := os.MkdirTemp("", "cwq") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	initrd := filepath.Join(dir, "empty.cpio")
	os.WriteFile(initrd, []byte("070701"+strings.Repeat("0", 104)+"TRAILER!!!\x00\x00\x00\x00"), 0o644)
	return vm.Spec{Name: "hung", Kernel: k.Vmlinuz, Initrd: initrd, Cmdline: "console=ttyS0 panic=0", CPUs: 1, MemoryMiB: 128,
		Console: filepath.Join(dir, "console"), RunDir: dir,
		Ports: []vm.Port{{Name: "p", Socket: filepath.Join(dir, "p.sock")}}}
}

func alive(pid int) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	return err == nil && !strings.Contains(string(b), ") Z ")
}

// TestMachineStop starts real QEMU and stops it each way a launcher
// does: QMP quit, Kill, and the end of the context.
func TestMachineStop(t *testing.T) {
	spec := hungSpec(t)
	for _, how := range []string{"shutdown", "kill", "cancel"} {
		t.Run(how, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			m, err := QEMU{}.Start(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{spec.Ports[0].Socket, filepath.Join(spec.RunDir, "qmp.sock")} {
				if _, err := os.Stat(p); err != nil {
					t.Fatalf("Start returned before %s existed", p)
				}
			}
			pid := m.Pid()
			if !alive(pid) {
				t.Fatal("QEMU is not running after Start")
			}
			time.Sleep(300 * time.Millisecond)
			start := time.Now()
			switch how {
			case "shutdown":
				sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
				if err := m.Shutdown(sctx); err != nil {
					t.Errorf("Shutdown: %v", err)
				}
				scancel()
				if err := m.Wait(); err != nil {
					t.Errorf("Wait after a QMP quit: %v (want a clean exit)", err)
				}
			case "kill":
				if err := m.Kill(); err != nil {
					t.Fatal(err)
				}
				if err := m.Wait(); err == nil {
					t.Error("Wait after Kill reported a clean exit")
				}
			case "cancel":
				cancel()
				m.Wait() //nolint:errcheck // killed
			}
			if d := time.Since(start); d > 6*time.Second {
				t.Errorf("stopping took %s", d)
			}
			if alive(pid) {
				t.Errorf("QEMU %d still runs", pid)
			}
			if err := m.Kill(); err != nil {
				t.Errorf("Kill of a stopped machine: %v", err)
			}
		})
	}
}

func TestStartFailsClearly(t *testing.T) {
	spec := hungSpec(t)
	spec.Kernel = "/nonexistent/vmlinuz"
	_, err := QEMU{}.Start(context.Background(), spec)
	if err == nil || !strings.Contains(err.Error(), "qemu exited at start") || !strings.Contains(err.Error(), "/nonexistent/vmlinuz") {
		t.Fatalf("error %v", err)
	}
}

func TestOVMF(t *testing.T) {
	dir := t.TempDir()
	fw, err := OVMF(dir)
	if errors.Is(err, ErrNoFirmware) {
		t.Skip("needs Debian's ovmf package")
	}
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(fw.Vars) != dir {
		t.Errorf("variable store %s is not the machine's own copy in %s", fw.Vars, dir)
	}
	tmpl, err := os.ReadFile(strings.Replace(fw.Code, "CODE", "VARS", 1))
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(fw.Vars)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, tmpl) {
		t.Errorf("the copy of the variable store differs from its template")
	}
}
