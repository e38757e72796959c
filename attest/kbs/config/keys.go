package config

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// checkPrivate refuses a private key file that is not a regular file or
// that group or others may read or write: such a key may already be
// someone else's too, and the broker must not run on it.
func checkPrivate(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s does not exist (`cwrun kbs init` makes the key files)", path)
	}
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", path)
	}
	if m := fi.Mode().Perm(); m&0o077 != 0 {
		return fmt.Errorf("%s has mode %04o, looser than 0600: others may read the key; run `chmod 600 %s` (and replace the key if it may have leaked)", path, m, path)
	}
	return nil
}

func readPrivate(path string) ([]byte, error) {
	if err := checkPrivate(path); err != nil {
		return nil, err
	}
	return os.ReadFile(path)
}

// readTokenKey reads a P-256 private key in PEM (PKCS#8 or SEC 1).
func readTokenKey(path string) (*ecdsa.PrivateKey, error) {
	s, err := ReadPrivateKey(path)
	if err != nil {
		return nil, err
	}
	k, ok := s.(*ecdsa.PrivateKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: the token key must be ECDSA P-256 (tokens are ES256); make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`", path)
	}
	return k, nil
}

// ReadPrivateKey reads an Ed25519 or ECDSA P-256 private key in PEM
// (PKCS#8 "PRIVATE KEY" or SEC 1 "EC PRIVATE KEY"), refusing a file that
// group or others may read.
func ReadPrivateKey(path string) (crypto.Signer, error) {
	b, err := readPrivate(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s holds no PEM block: want a PEM private key", path)
	}
	defer clear(blk.Bytes)
	var key any
	switch blk.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("%s holds a %q PEM block: want a private key (\"PRIVATE KEY\" or \"EC PRIVATE KEY\")", path, blk.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	switch k := key.(type) {
	case ed25519.PrivateKey:
		return k, nil
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("%s: ECDSA key on %s: only P-256 is supported", path, k.Curve.Params().Name)
		}
		return k, nil
	default:
		return nil, fmt.Errorf("%s: a %T: want an Ed25519 or ECDSA P-256 key", path, key)
	}
}

// ReadPublicKeys reads every PEM "PUBLIC KEY" block of a file: Ed25519
// or ECDSA P-256 keys, as the admin API accepts.
func ReadPublicKeys(path string) ([]crypto.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []crypto.PublicKey
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "PUBLIC KEY" {
			if bytes.Contains([]byte(blk.Type), []byte("PRIVATE")) {
				return nil, fmt.Errorf("%s holds a private key: the broker needs only the public half (admin.pub); keep the private key with the admin", path)
			}
			return nil, fmt.Errorf("%s holds a %q PEM block: want \"PUBLIC KEY\"", path, blk.Type)
		}
		pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		switch k := pub.(type) {
		case ed25519.PublicKey:
			out = append(out, k)
		case *ecdsa.PublicKey:
			if k.Curve != elliptic.P256() {
				return nil, fmt.Errorf("%s: ECDSA key on %s: only P-256 is supported", path, k.Curve.Params().Name)
			}
			out = append(out, k)
		default:
			return nil, fmt.Errorf("%s: a %T key: want Ed25519 or ECDSA P-256", path, pub)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no PEM public key", path)
	}
	return out, nil
}

// readSecrets reads the secrets key file: one key per line, each 32
// bytes in hex or base64, blank lines and # comments skipped. The first
// is the key; any after it are earlier keys that a rotation keeps until
// every record is re-sealed (rotate-secrets writes them).
func readSecrets(path string) ([][]byte, error) {
	b, err := readPrivate(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	var out [][]byte
	for i, line := range bytes.Split(b, []byte("\n")) {
		line = bytes.TrimSpace(line)
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		k, ok := decodeSecret(line)
		if !ok {
			return nil, fmt.Errorf("%s line %d does not hold 32 bytes in hex or base64: write one with `openssl rand -hex 32`, one key per line (the first seals, the rest are earlier keys kept during a rotation)", path, i+1)
		}
		for _, seen := range out {
			if bytes.Equal(seen, k) {
				return nil, fmt.Errorf("%s line %d repeats an earlier key: keep each key once", path, i+1)
			}
		}
		out = append(out, k)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s holds no key: write one with `openssl rand -hex 32 > %s`", path, path)
	}
	return out, nil
}

// decodeSecret reads one key: 32 bytes in hex or base64.
func decodeSecret(s []byte) ([]byte, bool) {
	for _, dec := range []func([]byte) ([]byte, error){
		func(s []byte) ([]byte, error) {
			out := make([]byte, hex.DecodedLen(len(s)))
			n, err := hex.Decode(out, s)
			return out[:n], err
		},
		decode64(base64.StdEncoding), decode64(base64.RawStdEncoding),
		decode64(base64.URLEncoding), decode64(base64.RawURLEncoding),
	} {
		if k, err := dec(s); err == nil && len(k) == 32 {
			return k, true
		}
	}
	return nil, false
}

func decode64(enc *base64.Encoding) func([]byte) ([]byte, error) {
	return func(s []byte) ([]byte, error) {
		out := make([]byte, enc.DecodedLen(len(s)))
		n, err := enc.Decode(out, s)
		return out[:n], err
	}
}

// checkTLS checks that the key is private and matches the certificate.
func checkTLS(cert, key string) error {
	if err := checkPrivate(key); err != nil {
		return err
	}
	if _, err := tls.LoadX509KeyPair(cert, key); err != nil {
		return fmt.Errorf("%s and %s: %w", cert, key, err)
	}
	return nil
}

// CertPool reads PEM certificates to trust (the broker's ca.crt, its
// tls.crt, which carries the CA, or another CA's certificate).
func CertPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	return p, nil
}
