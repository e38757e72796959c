package launcher

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestSwtpmMissingSaysWhichPackage(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, _, err := swtpmTools()
	if !errors.Is(err, ErrNoSwtpm) {
		t.Fatalf("swtpmTools with an empty PATH: %v", err)
	}
	for _, want := range []string{"swtpm-tools", "apt-get install swtpm", "--tpm /dev/tpm0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
}

func TestTPMCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	p, err := TPMCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s is not PEM", p)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil || !c.IsCA || c.CheckSignatureFrom(c) != nil {
		t.Fatalf("the vTPM CA is not a self-signed CA certificate: %v", err)
	}
	if st, err := os.Stat(filepath.Join(dir, "signkey.pem")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the CA key: %v, %v: want mode 0600", st, err)
	}
	// A second call keeps the CA: brokers trust it by its fingerprint.
	if _, err := TPMCA(dir); err != nil {
		t.Fatal(err)
	}
	b2, _ := os.ReadFile(p)
	if string(b) != string(b2) {
		t.Error("TPMCA made a new CA over an existing one")
	}
	conf, _ := os.ReadFile(filepath.Join(dir, "swtpm_setup.conf"))
	if !strings.Contains(string(conf), filepath.Join(dir, "swtpm-localca.conf")) {
		t.Errorf("swtpm_setup.conf does not point at the CA's own swtpm_localca config:\n%s", conf)
	}
}

// TestGuestTPM manufactures and serves a vTPM as a tpm run does, and
// checks that it ends when stopped, leaving only its run folder.
func TestGuestTPM(t *testing.T) {
	if _, _, err := swtpmTools(); err != nil {
		t.Skip(err)
	}
	if _, err := exec.LookPath("certtool"); err != nil {
		t.Skip("swtpm_localca needs certtool (Debian package gnutls-bin)")
	}
	run, err := os.MkdirTemp("", "cwtpm") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(run)
	ca := filepath.Join(t.TempDir(), "ca")
	tp, stop, err := guestTPM(context.Background(), Options{TPMCADir: ca}, run)
	if err != nil {
		t.Fatal(err)
	}
	if tp.Socket == "" || tp.Device != "" {
		t.Fatalf("guest TPM %+v: want an swtpm socket", tp)
	}
	if _, err := os.Stat(tp.Socket); err != nil {
		t.Fatalf("swtpm control socket: %v", err)
	}
	if _, err := os.Stat(filepath.Join(run, "tpm", "tpm2-00.permall")); err != nil {
		t.Errorf("no TPM state in the run folder: %v", err)
	}
	log, _ := os.ReadFile(filepath.Join(run, "tpm", "setup.log"))
	if !strings.Contains(string(log), "EK certificate") {
		t.Errorf("swtpm_setup made no EK certificate:\n%s", log)
	}
	pids := swtpmPids(t, run)
	if len(pids) != 1 {
		t.Fatalf("want one swtpm serving %s, got %v", run, pids)
	}
	stop()
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(pids[0], 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("swtpm %d outlived stop", pids[0])
		}
		time.Sleep(20 * time.Millisecond)
	}

	if _, _, err := guestTPM(context.Background(), Options{TPMDevice: filepath.Join(run, "no-such-tpm")}, run); err == nil || !strings.Contains(err.Error(), "--tpm") {
		t.Errorf("a missing host TPM device: %v", err)
	}
	dev := filepath.Join(run, "tpmrm0")
	os.WriteFile(dev, nil, 0o600)
	if tp, _, err := guestTPM(context.Background(), Options{TPMDevice: dev}, run); err != nil || tp.Device != dev || tp.Socket != "" {
		t.Errorf("host TPM pass-through: %+v, %v", tp, err)
	}
}

// swtpmPids are the swtpm processes whose command line names dir.
func swtpmPids(t *testing.T, dir string) []int {
	t.Helper()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.HasPrefix(filepath.Base(strings.Split(string(b), "\x00")[0]), "swtpm") || !strings.Contains(string(b), dir) {
			continue
		}
		var pid int
		for _, c := range e.Name() {
			pid = pid*10 + int(c-'0')
		}
		out = append(out, pid)
	}
	return out
}
