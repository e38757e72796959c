package config

import (
	"bytes"
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
	"path/filepath"
	"slices"
	"time"
)

// The broker's own certificate authority. init makes one (ca.crt,
// ca.key) and issues the broker's TLS certificate from it; clients
// trust the CA, so that renew-tls can issue the next certificate
// without a new file for every host that runs guests. tls.crt holds the
// chain (the broker's certificate, then the CA's), so a client given
// tls.crt trusts the CA as well.
//
// The CA is only ever used for the broker's names: clients trust it
// with --cacert for their connection to the broker, never in the
// system's store, where it could vouch for any name.

// authority is a CA certificate with its private key.
type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// newAuthority makes a CA named after host, CAValidity from now.
func newAuthority(host string, now time.Time) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "cwrun key broker CA " + host},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// It signs the broker's certificates only, never another CA.
		MaxPathLen:     0,
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key}, nil
}

// files returns the CA's certificate and key as PEM.
func (a *authority) files() (certPEM, keyPEM []byte, err error) {
	if keyPEM, err = privatePEM(a.key); err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cert.Raw}), keyPEM, nil
}

// loadAuthority reads dir's ca.crt and its key from keyFile; an error
// wrapping fs.ErrNotExist when there is no ca.crt.
func loadAuthority(dir, keyFile string) (*authority, error) {
	certFile := filepath.Join(dir, CACertFile)
	certs, err := readCerts(certFile)
	if err != nil {
		return nil, err
	}
	ca := certs[0]
	if !ca.IsCA {
		return nil, fmt.Errorf("%s is not a CA certificate", certFile)
	}
	if _, err := os.Stat(keyFile); err != nil {
		// Not fs.ErrNotExist: a CA without its key is not "no CA".
		return nil, fmt.Errorf("the key of %s: %v (put it back from where it is kept, or name it with --ca-key)", certFile, err)
	}
	k, err := ReadPrivateKey(keyFile)
	if err != nil {
		return nil, err
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok || !key.PublicKey.Equal(ca.PublicKey) {
		return nil, fmt.Errorf("%s is not the key of %s", keyFile, certFile)
	}
	return &authority{cert: ca, key: key}, nil
}

// readCerts reads the PEM certificates of path, in order; at least one.
func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var blk *pem.Block
		blk, data = pem.Decode(data)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", path, len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return certs, nil
}

// serverCert makes the broker's TLS pair for hosts (the last names the
// certificate): a new ECDSA P-256 key and a certificate signed by ca,
// lasting CertValidity or until ca ends, whichever comes first; the
// certificate PEM is the chain, this certificate then ca's. With a nil
// ca the certificate signs itself (what init wrote before it made a CA).
func serverCert(hosts []string, now time.Time, ca *authority) (chainPEM, keyPEM []byte, leaf *x509.Certificate, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "cwrun key broker " + hosts[len(hosts)-1]},
		NotBefore:             now.Add(-time.Hour), // a little clock skew between machines
		NotAfter:              now.Add(CertValidity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	parent, signer := tmpl, any(key)
	if ca != nil {
		parent, signer = ca.cert, ca.key
		if tmpl.NotAfter.After(ca.cert.NotAfter) {
			tmpl.NotAfter = ca.cert.NotAfter
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		return nil, nil, nil, err
	}
	if leaf, err = x509.ParseCertificate(der); err != nil {
		return nil, nil, nil, err
	}
	if keyPEM, err = privatePEM(key); err != nil {
		return nil, nil, nil, err
	}
	chainPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if ca != nil {
		chainPEM = append(chainPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})...)
	}
	return chainPEM, keyPEM, leaf, nil
}

// signsItself says whether c is self-signed: its issuer is its subject
// and its own key signed it.
func signsItself(c *x509.Certificate) bool {
	return bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

// CertNames lists a certificate's DNS names and addresses.
func CertNames(c *x509.Certificate) []string {
	names := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	return names
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}
