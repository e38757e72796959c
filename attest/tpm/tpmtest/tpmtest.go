// Package tpmtest gives tests a real software TPM (swtpm) manufactured
// with an EK certificate signed by a CA of the test's own, as cwrun's
// launcher makes one per VM. It skips the test when swtpm is missing.
//
// It is for tests only and never runs in a guest.
package tpmtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// CA is an EK CA in a folder, with the files swtpm_localca reads.
type CA struct {
	Dir  string
	Cert *x509.Certificate
}

// NewCA makes a self-signed ECDSA P-256 EK CA.
func NewCA(t testing.TB) *CA {
	t.Helper()
	dir := t.TempDir()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test EK CA " + filepath.Base(dir)},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"signkey.pem":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})),
		"issuercert.pem": string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		"certserial":     "1\n",
		"localca.conf": fmt.Sprintf("statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n",
			dir, dir, dir, dir),
		"localca.options": "--platform-manufacturer test\n--platform-version 2.1\n--platform-model QEMU\n",
		"setup.conf": fmt.Sprintf("create_certs_tool = swtpm_localca\ncreate_certs_tool_config = %s/localca.conf\ncreate_certs_tool_options = %s/localca.options\nactive_pcr_banks = sha256\n",
			dir, dir),
	}
	for n, s := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return &CA{Dir: dir, Cert: cert}
}

// CertFile is the CA certificate's PEM file.
func (ca *CA) CertFile() string { return filepath.Join(ca.Dir, "issuercert.pem") }

// StartSwtpm manufactures a TPM 2.0 whose EK certificate ca signs and
// serves it on a command socket (a raw TPM command stream), until the
// test ends.
func StartSwtpm(t testing.TB, ca *CA) net.Conn {
	t.Helper()
	for _, p := range []string{"swtpm", "swtpm_setup", "swtpm_localca"} {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s is not installed (Debian: apt-get install swtpm swtpm-tools)", p)
		}
	}
	dir, err := os.MkdirTemp("", "swtpm-ek") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	out, err := exec.Command("swtpm_setup", "--tpm2", "--tpmstate", dir, "--create-ek-cert", "--create-platform-cert",
		"--pcr-banks", "sha256", "--config", filepath.Join(ca.Dir, "setup.conf"), "--logfile", filepath.Join(dir, "setup.log")).CombinedOutput()
	if err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "setup.log"))
		t.Fatalf("swtpm_setup: %v\n%s\n%s", err, out, log)
	}
	sock := filepath.Join(dir, "s")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "c"), "--flags", "not-need-init,startup-clear",
		"--tpmstate", "dir="+dir)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		c, err := net.Dial("unix", sock)
		if err == nil {
			t.Cleanup(func() { c.Close() })
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm did not listen on %s: %v", sock, err)
		}
	}
}
