package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Renewal is what RenewTLS did.
type Renewal struct {
	Cert *x509.Certificate // the broker's new certificate
	CA   *x509.Certificate // the CA that issued it
	// NewCA is set when the CA is new too (made now, in place of a
	// self-signed certificate, an ending CA or, asked for, another
	// issuer): clients must be given its ca.crt once.
	NewCA bool
}

// caRenewMargin is how long before its CA ends renew-tls stops issuing
// from it and asks for a new one: a certificate that lasts less would
// soon need renewing again.
const caRenewMargin = 30 * 24 * time.Hour

// RenewOptions are RenewTLS's choices.
type RenewOptions struct {
	Hosts []string // names and addresses to add to the certificate's
	NewCA bool     // make a new CA even when the current one could issue
	// CAKey is the CA's key file, for a key kept away from the config
	// folder between renewals; "" is the folder's ca.key. A new CA's key
	// is written there too.
	CAKey string
}

// RenewTLS issues the broker a new TLS pair in dir (a new key,
// CertValidity from now) for the same names and addresses plus
// o.Hosts, from dir's CA (ca.crt, and ca.key or o.CAKey): clients that trust the CA
// (or were given init's tls.crt, which carries it) need nothing new.
// Each file is written beside itself and renamed over the old one, so
// that a running broker (which reads the pair again when it changes)
// never sees half a file.
//
// A new CA is made, and Renewal.NewCA set, when the certificate signed
// itself (init before it made a CA), when the CA ends within
// caRenewMargin, or when newCA is set. A certificate that another CA
// issued is refused unless newCA is set: renewing it is that CA's job,
// and one from ours would break every client that trusts only that CA.
func RenewTLS(dir string, o RenewOptions) (*Renewal, error) {
	extraHosts, newCA := o.Hosts, o.NewCA
	caKeyFile := o.CAKey
	if caKeyFile == "" {
		caKeyFile = filepath.Join(dir, CAKeyFile)
	}
	certFile, keyFile := filepath.Join(dir, TLSCertFile), filepath.Join(dir, TLSKeyFile)
	if _, err := os.Stat(certFile); err != nil {
		return nil, fmt.Errorf("renew TLS: %w (run cwrun kbs init first)", err)
	}
	chain, err := readCerts(certFile)
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	old := chain[0]
	now := time.Now()
	selfSigned := signsItself(old)
	var ca *authority
	if !newCA && !selfSigned {
		// The CA's files are read only when it is to issue: a new one
		// replaces them whatever they hold.
		ca, err = loadAuthority(dir, caKeyFile)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("renew TLS: %w (pass --new-ca to replace the CA)", err)
		}
	}
	switch {
	case newCA, selfSigned:
	case ca == nil || old.CheckSignatureFrom(ca.cert) != nil:
		return nil, fmt.Errorf("renew TLS: %s was issued by %q, not by this broker's %s: have that CA renew it, or pass --new-ca to issue it from a new CA of the broker's own (its clients then need the new %s)",
			certFile, old.Issuer, CACertFile, CACertFile)
	case ca.cert.NotAfter.Sub(now) < caRenewMargin:
		return nil, fmt.Errorf("renew TLS: the CA in %s ends on %s: pass --new-ca to make a new one (its clients then need the new %s)",
			filepath.Join(dir, CACertFile), ca.cert.NotAfter.UTC().Format("2006-01-02"), CACertFile)
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
	r := &Renewal{NewCA: ca == nil}
	if ca == nil {
		if ca, err = newAuthority(hosts[len(hosts)-1], now); err != nil {
			return nil, fmt.Errorf("renew TLS: %w", err)
		}
	}
	certPEM, keyPEM, leaf, err := serverCert(hosts, now, ca)
	if err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	defer clear(keyPEM)
	// Checked before anything is replaced.
	if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	if r.NewCA {
		// The CA first: the broker does not read it, and a run cut
		// short after it leaves a certificate the next run (with
		// --new-ca) replaces.
		caPEM, caKeyPEM, err := ca.files()
		if err != nil {
			return nil, fmt.Errorf("renew TLS: %w", err)
		}
		err = replaceFile(caKeyFile, caKeyPEM, 0o600)
		clear(caKeyPEM)
		if err == nil {
			err = replaceFile(filepath.Join(dir, CACertFile), caPEM, 0o644)
		}
		if err != nil {
			return nil, fmt.Errorf("renew TLS: %w (run this again with --new-ca)", err)
		}
	}
	// The key first: a broker that looks between the two renames finds
	// a pair that does not load and keeps serving the old one.
	if err := replaceFile(keyFile, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("renew TLS: %w", err)
	}
	if err := replaceFile(certFile, certPEM, 0o644); err != nil {
		again := "run this again"
		if r.NewCA {
			again += " with --new-ca"
		}
		return nil, fmt.Errorf("renew TLS: %w (%s is new already: %s)", err, keyFile, again)
	}
	r.Cert, r.CA = leaf, ca.cert
	return r, nil
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
