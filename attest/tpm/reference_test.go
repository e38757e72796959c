package tpm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/launcher/kernel"
)

// The fixture ovmf-direct-boot.evlog is the event log of a real boot:
// QEMU 7.2 -M q35 -m 512 with Debian's OVMF_CODE_4M.fd, swtpm, Debian's
// 6.1.0-57 cloud kernel, a 1031310-byte busybox initrd and -append
// "console=ttyS0 quiet panic=-1".
const fixtureCmdline = "console=ttyS0 quiet panic=-1"

func fixtureLog(t *testing.T) *EventLog {
	t.Helper()
	b, err := os.ReadFile("testdata/ovmf-direct-boot.evlog")
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseEventLog(b)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestBootReferencesMatchARealLog checks the PCR 4 and 9 arithmetic and
// the load options encoding against what OVMF and the kernel logged.
func TestBootReferencesMatchARealLog(t *testing.T) {
	l := fixtureLog(t)
	claims := l.BootClaims()
	dec := func(name string) []byte {
		b, err := hex.DecodeString(claims[name])
		if err != nil || len(b) != 32 {
			t.Fatalf("fixture claim %s = %q", name, claims[name])
		}
		return b
	}
	got := bootReferences(dec(ClaimKernelDigest), dec(ClaimInitrdDigest), dec(ClaimCmdlineDigest))
	replay := l.Replay()
	for _, pcr := range []uint32{4, 9} {
		if want := hex.EncodeToString(replay[pcr]); got[fmt.Sprintf("pcr%d", pcr)] != want {
			t.Errorf("pcr%d = %s, the log replays to %s", pcr, got[fmt.Sprintf("pcr%d", pcr)], want)
		}
	}
	cd := sha256Hex(loadOptions(fixtureCmdline + " initrd=initrd"))
	if cd != claims[ClaimCmdlineDigest] {
		t.Errorf("cmdline digest %s, the log has %s", cd, claims[ClaimCmdlineDigest])
	}
	if sha256Hex(loadOptions(fixtureCmdline+" x initrd=initrd")) == claims[ClaimCmdlineDigest] {
		t.Error("a different command line gives the same digest")
	}
}

func TestQEMUBootHeader(t *testing.T) {
	hdr := make([]byte, 0x400)
	copy(hdr[hdrMagic:], "HdrS")
	binary.LittleEndian.PutUint16(hdr[hdrVersion:], 0x20f)
	hdr[hdrLoadFlags] = 1
	binary.LittleEndian.PutUint16(hdr[hdrXLoadFlags:], xlfCanBeLoadedAbove4G)
	out, err := qemuBootHeader(hdr, 1031310, 512<<20)
	if err != nil {
		t.Fatal(err)
	}
	// (512 MiB - ACPI data - 1 - size) rounded down to 4 KiB.
	// (512 MiB - 160 KiB of ACPI data - 1 - size), rounded down to 4 KiB.
	if got := binary.LittleEndian.Uint32(out[hdrRamdiskImage:]); got != 0x1fedc000 {
		t.Errorf("initrd address %#x, want 0x1fedc000", got)
	}
	if binary.LittleEndian.Uint32(out[hdrRamdiskSize:]) != 1031310 || out[hdrTypeOfLoader] != 0xb0 || out[hdrLoadFlags] != 0x81 ||
		binary.LittleEndian.Uint32(out[hdrCmdLinePtr:]) != 0x20000 {
		t.Errorf("header edits: %x", out[0x210:0x230])
	}
	if bytes.Equal(out, hdr) {
		t.Error("the input was not copied")
	}
	mem2, err := qemuBootHeader(hdr, 1031310, 1024<<20)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(mem2, out) {
		t.Error("the memory size does not change the header")
	}
	if _, err := qemuBootHeader(make([]byte, 0x400), 1, 512<<20); err == nil {
		t.Error("a file without HdrS was accepted")
	}
	if _, err := qemuBootHeader(hdr, 600<<20, 512<<20); err == nil {
		t.Error("an initrd larger than the RAM was accepted")
	}
}

func TestAuthenticodeRefusesNonPE(t *testing.T) {
	if _, err := Authenticode([]byte("MZ not really")); err == nil {
		t.Error("garbage accepted as a PE image")
	}
}

// TestDirectBootReferenceValues boots Debian's cloud kernel through
// OVMF with a vTPM under QEMU, reads the event log the firmware and the
// kernel wrote, and checks that ReferenceValues predicted every digest
// and both PCRs.
func TestDirectBootReferenceValues(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM")
	}
	for _, p := range []string{"qemu-system-x86_64", "swtpm", "swtpm_setup", "busybox", "cpio"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (hack/deps.sh installs it)", p)
		}
	}
	code, vars := "/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"
	if _, err := os.Stat(code); err != nil {
		t.Skip("Debian's ovmf is not installed")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	k, err := kernel.Fetcher{}.Fetch(ctx)
	if errors.Is(err, kernel.ErrNoApt) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initrd.cpio")
	root := filepath.Join(dir, "root")
	bb, err := exec.LookPath("busybox")
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "proc", "sys", "dev"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("cp", bb, filepath.Join(root, "bin/busybox")).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	script := `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t securityfs securityfs /sys/kernel/security
echo EVLOG-BEGIN; base64 /sys/kernel/security/tpm0/binary_bios_measurements; echo EVLOG-END
poweroff -f
`
	if err := os.WriteFile(filepath.Join(root, "init"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	mk := exec.Command("sh", "-c", "find . | cpio -o -H newc --quiet > "+initrd)
	mk.Dir = root
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, out)
	}
	state := filepath.Join(dir, "tpm")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(ctx, "swtpm_setup", "--tpm2", "--tpmstate", state).CombinedOutput(); err != nil {
		t.Fatalf("swtpm_setup: %v: %s", err, out)
	}
	sock := filepath.Join(dir, "swtpm.sock")
	sw := exec.CommandContext(ctx, "swtpm", "socket", "--tpm2", "--tpmstate", "dir="+state, "--ctrl", "type=unixio,path="+sock)
	if err := sw.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sw.Process.Kill(); sw.Wait() }() //nolint:errcheck // teardown
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if out, err := exec.Command("cp", vars, filepath.Join(dir, "vars.fd")).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	const mem = 512
	cmdline := "console=ttyS0 quiet panic=-1"
	console := filepath.Join(dir, "console.log")
	q := exec.CommandContext(ctx, "qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot", "-accel", "tcg",
		"-M", "q35", "-m", fmt.Sprint(mem),
		"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+code,
		"-drive", "if=pflash,format=raw,unit=1,file="+filepath.Join(dir, "vars.fd"),
		"-kernel", k.Vmlinuz, "-initrd", initrd, "-append", cmdline,
		"-chardev", "socket,id=chrtpm,path="+sock, "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0",
		"-serial", "file:"+console)
	if out, err := q.CombinedOutput(); err != nil {
		t.Fatalf("qemu: %v: %s", err, out)
	}
	con, err := os.ReadFile(console)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)EVLOG-BEGIN\r?\n(.*?)EVLOG-END`).FindSubmatch(con)
	if m == nil {
		t.Fatalf("no event log on the console:\n%s", con)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.NewReplacer("\r", "", "\n", "").Replace(string(m[1])))
	if err != nil {
		t.Fatal(err)
	}
	l, err := ParseEventLog(raw)
	if err != nil {
		t.Fatal(err)
	}
	want, err := DirectBoot{Kernel: k.Vmlinuz, Initrd: initrd, Cmdline: cmdline, MemoryMiB: mem}.ReferenceValues()
	if err != nil {
		t.Fatal(err)
	}
	got := l.BootClaims()
	replay := l.Replay()
	got["pcr4"], got["pcr9"] = hex.EncodeToString(replay[4]), hex.EncodeToString(replay[9])
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s: the boot measured %s, ReferenceValues predicted %s", name, got[name], w)
		}
	}
	// The same boot with other RAM moves the initrd, which QEMU writes
	// into the kernel header that OVMF measures.
	other, err := DirectBoot{Kernel: k.Vmlinuz, Initrd: initrd, Cmdline: cmdline, MemoryMiB: 1024}.ReferenceValues()
	if err != nil {
		t.Fatal(err)
	}
	if other[ClaimKernelDigest] == want[ClaimKernelDigest] {
		t.Error("the kernel digest does not depend on the memory size")
	}
}

func sha256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
