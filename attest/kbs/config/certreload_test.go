package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
)

// writePair writes a new self-signed certificate and key over the
// files as an atomic writer does (a new file renamed over the old),
// and returns the certificate's DER.
func writePair(t *testing.T, certFile, keyFile string) []byte {
	t.Helper()
	certPEM, keyPEM, err := selfSigned([]string{"127.0.0.1", "localhost"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	for f, b := range map[string][]byte{keyFile: keyPEM, certFile: certPEM} {
		tmp := f + ".new"
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, f); err != nil {
			t.Fatal(err)
		}
	}
	blk, _ := pem.Decode(certPEM)
	return blk.Bytes
}

func TestCertReloader(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	first := writePair(t, certFile, keyFile)
	var logs syncbuf.Buffer
	r, err := newCertReloader(certFile, keyFile, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	r.recheck = 0
	served := func() []byte {
		t.Helper()
		c, err := r.GetCertificate(nil)
		if err != nil {
			t.Fatal(err)
		}
		return c.Certificate[0]
	}
	if !bytes.Equal(served(), first) {
		t.Fatal("not serving the certificate of the files")
	}
	second := writePair(t, certFile, keyFile)
	if !bytes.Equal(served(), second) {
		t.Fatal("a renewed certificate was not picked up")
	}
	if !strings.Contains(logs.String(), "TLS certificate reloaded") {
		t.Errorf("the reload was not logged:\n%s", logs.String())
	}

	// A key that does not match (caught between the two writes): the
	// renewed certificate stays, and the refusal is logged once.
	other := filepath.Join(dir, "other")
	writePair(t, other+".crt", other+".key")
	key, _ := os.ReadFile(other + ".key")
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if !bytes.Equal(served(), second) {
			t.Fatal("a pair that does not load replaced the one in use")
		}
	}
	if n := strings.Count(logs.String(), "does not load"); n != 1 {
		t.Errorf("the refused pair was logged %d times; want once:\n%s", n, logs.String())
	}
	// A file gone for a moment changes nothing either.
	os.Remove(certFile)
	if !bytes.Equal(served(), second) {
		t.Fatal("a missing file replaced the certificate in use")
	}
	third := writePair(t, certFile, keyFile)
	if !bytes.Equal(served(), third) {
		t.Fatal("a good pair after a bad one was not picked up")
	}

	// Unloadable at the start is an error, as before.
	if _, err := newCertReloader(certFile, filepath.Join(dir, "none"), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "tls_key") {
		t.Errorf("a missing key at the start: %v", err)
	}
}

// The running broker serves a renewed certificate on new connections
// without a restart.
func TestServeReloadsCertificate(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	url, _ := serve(t, c, ServeOptions{})
	addr := strings.TrimPrefix(url, "https://")
	peer := func() []byte {
		t.Helper()
		conn, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true}) //nolint:gosec // only the served certificate is looked at
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].Raw
	}
	old := peer()
	renewed := writePair(t, c.TLSCert, c.TLSKey)
	if bytes.Equal(old, renewed) {
		t.Fatal("the renewal wrote the same certificate")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !bytes.Equal(peer(), renewed) {
		if time.Now().After(deadline) {
			cert, _ := x509.ParseCertificate(peer())
			t.Fatalf("still serving %v 10 s after the renewal", cert.Subject)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
