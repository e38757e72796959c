package config

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// RenewTLS replaces the self-signed TLS pair Init wrote in dir with a
// fresh one (a new key, CertValidity from now) for the same names and
// addresses plus extraHosts. Each file is written beside itself and
// renamed over the old one, so that a running broker (which reads the
// pair again when it changes) never sees half a file. A certificate
// that a CA issued is refused: renewing it is the CA's job, and a
// self-signed one in its place would break every client that trusts
// the CA. It returns the new certificate.
func RenewTLS(dir string, extraHosts []string) (*x509.Certificate, error) {
	certFile, keyFile := filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile)
	data, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %w (run cwrun kbs init first)", err)
	}
	blk, _ := pem.Decode(data)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("renew TLS: %s holds no PEM certificate", certFile)
	}
	old, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %s: %w", certFile, err)
	}
	// Self-signed: its issuer is its subject and its own key signed it.
	if !bytes.Equal(old.RawIssuer, old.RawSubject) || old.CheckSignature(old.SignatureAlgorithm, old.RawTBSCertificate, old.Signature) != nil {
		return nil, fmt.Errorf("renew TLS: %s was issued by %q, not self-signed: have that CA renew it", certFile, old.Issuer)
	}
	hosts, err := certHosts(extraHosts)
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	for _, h := range old.DNSNames {
		if !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	for _, ip := range old.IPAddresses {
		if s := ip.String(); !slices.Contains(hosts, s) {
			hosts = append(hosts, s)
		}
	}
	certPEM, keyPEM, err := selfSigned(hosts, time.Now())
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	defer clear(keyPEM)
	// Checked before anything is replaced.
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	// The key first: a broker that looks between the two renames finds
	// a pair that does not load and keeps serving the old one.
	if err := replaceFile(keyFile, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	if err := replaceFile(certFile, certPEM, 0o644); err != nil {
		return nil, fmt.Errorf("renew TLS: %w (%s is new already: run this again)", err, keyFile)
	}
	blk, _ = pem.Decode(certPEM)
	return x509.ParseCertificate(blk.Bytes)
}

// replaceFile writes data to a new file beside path and renames it over
// path.
func replaceFile(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".new"
	os.Remove(tmp) // left by an interrupted run
	if err := writeExcl(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("replacing %s: %w", path, err)
	}
	return nil
}
