package config

import (
	"bytes"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// pool is what a client given file trusts.
func pool(t *testing.T, file string) *x509.CertPool {
	t.Helper()
	p, err := CertPool(file)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// served is the certificate the broker of dir serves, as a client sees
// it: the chain in tls.crt, checked to load with tls.key.
func served(t *testing.T, dir string) (leaf *x509.Certificate, intermediates *x509.CertPool) {
	t.Helper()
	if err := checkTLS(filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile)); err != nil {
		t.Fatalf("the pair does not load: %v", err)
	}
	chain, err := readCerts(filepath.Join(dir, TLSCertFile))
	if err != nil {
		t.Fatal(err)
	}
	intermediates = x509.NewCertPool()
	for _, c := range chain[1:] {
		intermediates.AddCert(c)
	}
	return chain[0], intermediates
}

// trusts says whether a client trusting roots accepts the broker of dir
// as name.
func trusts(t *testing.T, roots *x509.CertPool, dir, name string) error {
	t.Helper()
	leaf, inter := served(t, dir)
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: name,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	return err
}

func fileMode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestInitMakesCA(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0", Hosts: []string{"kbs.example"}})
	ca, err := loadAuthority(dir, filepath.Join(dir, CAKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !ca.cert.IsCA || !ca.cert.MaxPathLenZero || ca.cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		t.Errorf("ca.crt: IsCA %v, MaxPathLenZero %v, key usage %b", ca.cert.IsCA, ca.cert.MaxPathLenZero, ca.cert.KeyUsage)
	}
	if left := time.Until(ca.cert.NotAfter); left < CAValidity-time.Hour {
		t.Errorf("the CA lasts %v", left)
	}
	if m := fileMode(t, filepath.Join(dir, CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %v, want 0600", m)
	}
	leaf, _ := served(t, dir)
	if leaf.IsCA || leaf.CheckSignatureFrom(ca.cert) != nil {
		t.Error("tls.crt is not a server certificate issued by ca.crt")
	}
	for _, trust := range []string{CACertFile, TLSCertFile} {
		for _, name := range []string{"kbs.example", "localhost"} {
			if err := trusts(t, pool(t, filepath.Join(dir, trust)), dir, name); err != nil {
				t.Errorf("a client trusting %s refuses %s: %v", trust, name, err)
			}
		}
	}
	if err := trusts(t, pool(t, filepath.Join(dir, CACertFile)), dir, "other.example"); err == nil {
		t.Error("the certificate holds a name it was not made for")
	}
}

func TestRenewTLS(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0", Hosts: []string{"kbs.example"}})
	certFile, keyFile, caFile := filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile), filepath.Join(dir, CACertFile)
	// What clients were given at init: the CA, or tls.crt.
	byCA, byTLS := pool(t, caFile), pool(t, certFile)
	caBefore, _ := os.ReadFile(caFile)
	oldLeaf, _ := served(t, dir)

	r, err := RenewTLS(dir, RenewOptions{Hosts: []string{"192.0.2.9"}})
	if err != nil {
		t.Fatal(err)
	}
	if r.NewCA {
		t.Error("renewal made a new CA")
	}
	leaf, _ := served(t, dir)
	if !bytes.Equal(leaf.Raw, r.Cert.Raw) {
		t.Error("RenewTLS returned another certificate than it wrote")
	}
	if leaf.Equal(oldLeaf) || bytes.Equal(leaf.RawSubjectPublicKeyInfo, oldLeaf.RawSubjectPublicKeyInfo) {
		t.Error("the renewed certificate has the old key")
	}
	// The clients need nothing new.
	for trust, p := range map[string]*x509.CertPool{"ca.crt": byCA, "init's tls.crt": byTLS} {
		if err := trusts(t, p, dir, "kbs.example"); err != nil {
			t.Errorf("a client given %s refuses the renewed certificate: %v", trust, err)
		}
	}
	if caNow, _ := os.ReadFile(caFile); !bytes.Equal(caNow, caBefore) {
		t.Error("ca.crt changed")
	}
	// The old names stay, the new address joins them.
	if !slices.Contains(leaf.DNSNames, "kbs.example") || !slices.ContainsFunc(leaf.IPAddresses, func(ip net.IP) bool { return ip.String() == "192.0.2.9" }) {
		t.Errorf("names %v, addresses %v: want kbs.example kept and 192.0.2.9 added", leaf.DNSNames, leaf.IPAddresses)
	}
	if left := time.Until(leaf.NotAfter); left < CertValidity-time.Hour {
		t.Errorf("the renewed certificate lasts %v", left)
	}
	if m := fileMode(t, keyFile); m != 0o600 {
		t.Errorf("tls.key mode %v, want 0600", m)
	}

	// --new-ca: the old trust no longer holds, the new ca.crt does.
	r, err = RenewTLS(dir, RenewOptions{NewCA: true})
	if err != nil {
		t.Fatal(err)
	}
	if !r.NewCA {
		t.Error("--new-ca made no new CA")
	}
	if err := trusts(t, byCA, dir, "kbs.example"); err == nil {
		t.Error("the old CA still vouches for the certificate of a new one")
	}
	if err := trusts(t, pool(t, caFile), dir, "kbs.example"); err != nil {
		t.Errorf("the new ca.crt: %v", err)
	}
	if m := fileMode(t, filepath.Join(dir, CAKeyFile)); m != 0o600 {
		t.Errorf("ca.key mode %v, want 0600", m)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*.new")); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
	if _, err := RenewTLS(t.TempDir(), RenewOptions{}); err == nil || !strings.Contains(err.Error(), "kbs init") {
		t.Errorf("no certificate at all: %v", err)
	}
}

// A folder from before init made a CA (a self-signed pair) gets one at
// its first renewal.
func TestRenewTLSSelfSigned(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	os.Remove(filepath.Join(dir, CACertFile))
	os.Remove(filepath.Join(dir, CAKeyFile))
	writePair(t, filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile))
	old := pool(t, filepath.Join(dir, TLSCertFile))
	r, err := RenewTLS(dir, RenewOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !r.NewCA {
		t.Error("no CA made for a self-signed certificate")
	}
	if err := trusts(t, pool(t, filepath.Join(dir, CACertFile)), dir, "localhost"); err != nil {
		t.Errorf("the new ca.crt: %v", err)
	}
	if err := trusts(t, old, dir, "localhost"); err == nil {
		t.Error("the old self-signed certificate vouches for the new one")
	}
	// From now on, renewals keep the CA.
	if r, err := RenewTLS(dir, RenewOptions{}); err != nil || r.NewCA {
		t.Errorf("second renewal: new CA %v, %v", r != nil && r.NewCA, err)
	}
}

// A certificate another CA issued is the business of that CA: refused,
// nothing touched, unless --new-ca says to replace it with ours.
func TestRenewTLSForeignIssuer(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	foreign, err := newAuthority("corp", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, _, err := serverCert([]string{"localhost"}, time.Now(), foreign)
	if err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(dir, TLSCertFile)
	os.WriteFile(certFile, certPEM, 0o644)
	os.WriteFile(filepath.Join(dir, TLSKeyFile), keyPEM, 0o600)
	if _, err := RenewTLS(dir, RenewOptions{}); err == nil || !strings.Contains(err.Error(), "have that CA renew it") {
		t.Errorf("a certificate from another CA: %v", err)
	}
	if now, _ := os.ReadFile(certFile); !bytes.Equal(now, certPEM) {
		t.Error("a refused renewal changed the certificate")
	}
	r, err := RenewTLS(dir, RenewOptions{NewCA: true})
	if err != nil || !r.NewCA {
		t.Fatalf("--new-ca: new CA %v, %v", r != nil && r.NewCA, err)
	}
	if r.Cert.CheckSignatureFrom(foreign.cert) == nil {
		t.Error("still issued by the other CA")
	}
}

// A CA about to end issues nothing more: a certificate capped at its
// end would need renewing again within days.
func TestRenewTLSEndingCA(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	ending, err := newAuthority("old", time.Now().Add(-CAValidity+20*24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, leaf, err := serverCert([]string{"localhost"}, time.Now(), ending)
	if err != nil {
		t.Fatal(err)
	}
	if !leaf.NotAfter.Equal(ending.cert.NotAfter) {
		t.Errorf("a certificate from a CA ending %v ends %v", ending.cert.NotAfter, leaf.NotAfter)
	}
	caPEM, caKeyPEM, err := ending.files()
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{TLSCertFile: certPEM, TLSKeyFile: keyPEM, CACertFile: caPEM, CAKeyFile: caKeyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := RenewTLS(dir, RenewOptions{}); err == nil || !strings.Contains(err.Error(), "--new-ca") {
		t.Errorf("renewal from an ending CA: %v", err)
	}
	if r, err := RenewTLS(dir, RenewOptions{NewCA: true}); err != nil || time.Until(r.Cert.NotAfter) < CertValidity-time.Hour {
		t.Errorf("--new-ca from an ending CA: %v", err)
	}
}

// A ca.key that is not ca.crt's is named, and --new-ca gets out of it
// (say, a renewal cut short between the two).
func TestRenewTLSMismatchedCAKey(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	other, err := newAuthority("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	_, keyPEM, err := other.files()
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, CAKeyFile), keyPEM, 0o600)
	if _, err := RenewTLS(dir, RenewOptions{}); err == nil || !strings.Contains(err.Error(), "is not the key of") {
		t.Errorf("mismatched CA key: %v", err)
	}
	if _, err := RenewTLS(dir, RenewOptions{NewCA: true}); err != nil {
		t.Errorf("--new-ca over a mismatched CA key: %v", err)
	}
}

// The CA's key may be kept offline between renewals: a renewal without
// it says to put it back or name it; one given CAKey uses it there, and
// a new CA's key goes there too, never into the config folder.
func TestRenewTLSCAKeyAway(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	away := filepath.Join(t.TempDir(), "kbs-ca.key")
	if err := os.Rename(filepath.Join(dir, CAKeyFile), away); err != nil {
		t.Fatal(err)
	}
	if _, err := RenewTLS(dir, RenewOptions{}); err == nil || !strings.Contains(err.Error(), "put it back") || !strings.Contains(err.Error(), "--ca-key") {
		t.Errorf("renewal without ca.key: %v", err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, CACertFile))
	r, err := RenewTLS(dir, RenewOptions{CAKey: away})
	if err != nil || r.NewCA {
		t.Fatalf("renewal with the CA key away: %+v, %v", r, err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, CACertFile)); string(after) != string(before) {
		t.Error("a renewal with the CA key away changed ca.crt")
	}
	if _, err := RenewTLS(dir, RenewOptions{CAKey: away, NewCA: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, CAKeyFile)); !os.IsNotExist(err) {
		t.Errorf("a new CA's key was written into the config folder: %v", err)
	}
	if _, err := loadAuthority(dir, away); err != nil {
		t.Fatalf("the new CA's key is not where --ca-key names: %v", err)
	}
	if fi, _ := os.Stat(away); fi.Mode().Perm() != 0o600 {
		t.Errorf("the new CA key has mode %v", fi.Mode().Perm())
	}
}
