package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/internal/syncbuf"
	"github.com/prometheus/client_golang/prometheus"
)

// writePair writes a new self-signed certificate and key over the
// files as an atomic writer does (a new file renamed over the old),
// and returns the certificate's DER.
func writePair(t *testing.T, certFile, keyFile string) []byte {
	t.Helper()
	return writePairMadeAt(t, certFile, keyFile, time.Now())
}

// selfSigned makes a pair as init did before it made a CA.
func selfSigned(hosts []string, now time.Time) (certPEM, keyPEM []byte, err error) {
	certPEM, keyPEM, _, err = serverCert(hosts, now, nil)
	return certPEM, keyPEM, err
}

// writePairMadeAt writes a self-signed pair made at made.
func writePairMadeAt(t *testing.T, certFile, keyFile string, made time.Time) []byte {
	t.Helper()
	certPEM, keyPEM, err := selfSigned([]string{"127.0.0.1", "localhost"}, made)
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
	r, err := newCertReloader(certFile, keyFile, slog.New(slog.NewTextHandler(&logs, nil)), nil)
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
	if _, err := newCertReloader(certFile, filepath.Join(dir, "none"), slog.New(slog.DiscardHandler), nil); err == nil || !strings.Contains(err.Error(), "tls_key") {
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
	// Monitoring sees when it ends.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a test of the metric, not of trust
	resp, err := hc.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "cwrun_kbs_tls_cert_expiry_timestamp_seconds ") {
		t.Errorf("/metrics has no certificate expiry:\n%.2000s", body)
	}
}

// A certificate that ends soon is warned about, and its end is a
// metric; one that has ended is an error in the log.
func TestCertExpiry(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	// Made 355 days ago: 10 days left of its year.
	writePairMadeAt(t, certFile, keyFile, time.Now().Add(-CertValidity+10*24*time.Hour))
	var logs syncbuf.Buffer
	reg := prometheus.NewRegistry()
	r, err := newCertReloader(certFile, keyFile, slog.New(slog.NewTextHandler(&logs, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	if got := logs.String(); !strings.Contains(got, "level=WARN") || !strings.Contains(got, "expires in 9 days") {
		t.Errorf("no warning of the end in 10 days:\n%s", got)
	}
	want := float64(r.cert.Leaf.NotAfter.Unix())
	if got := gauge(t, reg, "cwrun_kbs_tls_cert_expiry_timestamp_seconds"); got != want {
		t.Errorf("cwrun_kbs_tls_cert_expiry_timestamp_seconds %v, want %v", got, want)
	}
	// A day later by the daily check... past its end.
	r.mu.Lock()
	r.served(r.cert.Leaf.NotAfter.Add(time.Minute))
	r.mu.Unlock()
	if got := logs.String(); !strings.Contains(got, "level=ERROR") || !strings.Contains(got, "has expired") {
		t.Errorf("no error for an expired certificate:\n%s", got)
	}
	// A renewal is quiet.
	logs = syncbuf.Buffer{}
	r.recheck = 0
	writePair(t, certFile, keyFile)
	r.GetCertificate(nil)
	if got := logs.String(); strings.Contains(got, "expire") {
		t.Errorf("a fresh certificate was warned about:\n%s", got)
	}
	if got := gauge(t, reg, "cwrun_kbs_tls_cert_expiry_timestamp_seconds"); got <= want {
		t.Errorf("the metric did not follow the renewal: %v", got)
	}
}

// gauge reads a gauge's value from reg.
func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s in the registry", name)
	return 0
}
