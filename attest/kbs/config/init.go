package config

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Files Init writes, relative to its folder.
const (
	TokenKeyFile   = "token.key"
	SecretsKeyFile = "secrets.key"
	AdminKeyFile   = "admin.key"
	AdminPubFile   = "admin.pub"
	TLSCertFile    = "tls.crt"
	TLSKeyFile     = "tls.key"
	CACertFile     = "ca.crt"
	CAKeyFile      = "ca.key"
)

// DefaultListen is the address Init writes when given none: this
// machine only, until the operator decides otherwise.
const DefaultListen = "127.0.0.1:8443"

// CertValidity is how long the broker's TLS certificate lasts (init's
// and renew-tls's); CAValidity, the CA's that issues it.
const (
	CertValidity = 365 * 24 * time.Hour
	CAValidity   = 10 * 365 * 24 * time.Hour
)

// InitOptions tune Init. The zero value makes a broker for this machine.
type InitOptions struct {
	// Hosts are extra names and addresses for the TLS certificate, on top
	// of localhost, 127.0.0.1, ::1 and the machine's host name.
	Hosts []string
	// Listen is written as the config's listen; default DefaultListen.
	Listen string
	// Force replaces files that exist; without it Init writes nothing
	// when any of its files exists.
	Force bool
}

// Init makes a working broker configuration in dir: config.toml, a
// token key, a secrets key, an admin key pair (Ed25519; admin.key is the
// private half the admin CLI uses, admin.pub the one the broker trusts)
// and a TLS pair (ECDSA P-256, one year) issued by a CA of its own
// (ca.crt, ca.key: ten years; see tlsca.go). The folder is made
// 0700, secret files 0600, each created exclusively. It returns the
// paths it wrote.
func Init(dir string, o InitOptions) ([]string, error) {
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if _, _, err := net.SplitHostPort(o.Listen); err != nil || !printable(o.Listen) {
		return nil, fmt.Errorf("listen address %q is not host:port (e.g. \"127.0.0.1:8443\" or \":8443\")", o.Listen)
	}
	hosts, err := certHosts(o.Hosts)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("kbs init: %w", err)
	}
	names := []string{FileName, TokenKeyFile, SecretsKeyFile, AdminKeyFile, AdminPubFile, TLSCertFile, TLSKeyFile, CACertFile, CAKeyFile}
	var existing []string
	for _, n := range names {
		if _, err := os.Lstat(filepath.Join(dir, n)); err == nil {
			existing = append(existing, n)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("kbs init: %w", err)
		}
	}
	if len(existing) > 0 && !o.Force {
		return nil, fmt.Errorf("kbs init: %s already holds %s: nothing written; pass --force to replace them (stored secrets sealed with the old secrets.key become unreadable, and clients need the new ca.crt; to renew only the TLS certificate: cwrun kbs renew-tls; to change only the secrets key: cwrun kbs rotate-secrets)", dir, strings.Join(existing, ", "))
	}

	files, err := initFiles(o.Listen, hosts)
	if err != nil {
		return nil, fmt.Errorf("kbs init: %w", err)
	}
	var written []string
	for _, f := range files {
		p := filepath.Join(dir, f.name)
		if o.Force {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return written, fmt.Errorf("kbs init: replacing %s: %w", p, err)
			}
		}
		err := writeExcl(p, f.data, f.mode)
		clear(f.data)
		if err != nil {
			// Leave nothing half made: a second init then starts clean.
			for _, w := range written {
				os.Remove(w)
			}
			return nil, fmt.Errorf("kbs init: %w", err)
		}
		written = append(written, p)
	}
	return written, nil
}

type initFile struct {
	name string
	data []byte
	mode os.FileMode
}

func initFiles(listen string, hosts []string) ([]initFile, error) {
	tokenKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tokenPEM, err := privatePEM(tokenKey)
	if err != nil {
		return nil, err
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	secretHex := []byte(hex.EncodeToString(secret) + "\n")
	clear(secret)
	adminPub, adminPriv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	adminPEM, err := privatePEM(adminPriv)
	if err != nil {
		return nil, err
	}
	adminPubPEM, err := publicPEM(adminPub)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	ca, err := newAuthority(hosts[len(hosts)-1], now)
	if err != nil {
		return nil, err
	}
	caPEM, caKeyPEM, err := ca.files()
	if err != nil {
		return nil, err
	}
	certPEM, keyPEM, _, err := serverCert(hosts, now, ca)
	if err != nil {
		return nil, err
	}
	return []initFile{
		{CAKeyFile, caKeyPEM, 0o600},
		{CACertFile, caPEM, 0o644},
		{TokenKeyFile, tokenPEM, 0o600},
		{SecretsKeyFile, secretHex, 0o600},
		{AdminKeyFile, adminPEM, 0o600},
		{AdminPubFile, adminPubPEM, 0o644},
		{TLSKeyFile, keyPEM, 0o600},
		{TLSCertFile, certPEM, 0o644},
		// Last: a config exists only once the files it names do.
		{FileName, []byte(configText(listen, now)), 0o644},
	}, nil
}

// writeExcl creates path (failing if it exists), writes data and syncs.
func writeExcl(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

func privatePEM(k any) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	defer clear(der)
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func publicPEM(k any) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// certHosts is the certificate's subject alternative names: the local
// names, the machine's host name, and the extra ones, without repeats.
func certHosts(extra []string) ([]string, error) {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h, err := os.Hostname(); err == nil && h != "" {
		hosts = append(hosts, h)
	}
	for _, h := range extra {
		h = strings.TrimSpace(h)
		if h == "" || !printable(h) || strings.ContainsAny(h, " /:") && net.ParseIP(h) == nil {
			return nil, fmt.Errorf("--host %q is neither a DNS name nor an IP address", h)
		}
		hosts = append(hosts, h)
	}
	var out []string
	for _, h := range hosts {
		if !slices.Contains(out, h) {
			out = append(out, h)
		}
	}
	return out, nil
}

func printable(s string) bool {
	for _, r := range s {
		if r < 0x21 || r > 0x7e || r == '"' || r == '\\' {
			return false
		}
	}
	return true
}

func configText(listen string, now time.Time) string {
	return `# cwrun key broker configuration, written by ` + "`cwrun kbs init`" + ` on ` + now.UTC().Format("2006-01-02") + `.
# Relative paths are relative to this file's folder. Unknown keys are an
# error, so a typo never silently leaves a default in place.

# Where to serve: "127.0.0.1:8443" (this machine only) or ":8443" (every address).
listen = ` + strconv.Quote(listen) + `

# The broker's state: "sqlite:kbs.db" (a file next to this one, one broker)
# or "postgres://user:password@host/db" (several brokers sharing state).
store = "sqlite:kbs.db"

# HTTPS. init made this pair from its own CA: clients trust ca.crt (cwrun's
# --kbs-cacert, curl's --cacert); ` + "`cwrun kbs renew-tls`" + ` issues the next one
# from it, and the clients need nothing new. ca.key is needed only for that.
tls_cert = "` + TLSCertFile + `"
tls_key = "` + TLSKeyFile + `"

# Signs attestation tokens (ECDSA P-256, PEM). Brokers sharing a store share it.
token_key = "` + TokenKeyFile + `"

# 32 random bytes in hex. The session-cookie key and the key sealing
# passphrases and resources in the store are derived from it (HKDF-SHA256,
# distinct labels). Brokers sharing a store share it; losing it loses every
# stored secret, so back it up.
secrets_key = "` + SecretsKeyFile + `"

# Public keys whose signed tokens the admin API accepts. The admin CLI signs
# with the private half (admin.key); keep that one with the administrator.
admin_keys = ["` + AdminPubFile + `"]

# krun's unauthenticated /kbs/v0/register_workload (it never overwrites).
allow_register = false

# TEEs served: "snp", "tdx", "tpm", "sample". "sample" proves NOTHING: add it
# only to try cwrun without TEE hardware (or pass ` + "`cwrun kbs serve --tees sample`" + `).
tees = ["snp", "tdx"]

# How long a handshake's session and an attestation token last.
# session_ttl = "5m"
# token_ttl = "5m"

# The Go garbage collector's target (GOGC) while serving; the GOGC environment
# variable wins. Default 400: a quarter less CPU per handshake than Go's 100.
# gc_percent = 400

# While the broker is saturated, new handshakes wait at /auth and begin first
# come, first served, so that a burst of guests (boxes back after a power cut)
# each finish in about the same time instead of all slowly. A guest waits at
# most admission_wait, then hears 503 and retries.
# admission = true
# admission_wait = "30s"

[snp]
# VCEK certificates, read before asking AMD's key server.
vcek_cache = "vcek-cache"
# Fetch missing VCEKs from AMD's key server (AMD allows about one per 10 s).
kds = false

[tdx]
# Intel PCS collateral (tcbinfo-<fmspc>.json, qeidentity.json,
# tcb-signing-chain.pem). Set, every quote's TCB status is checked and a quote
# whose collateral is missing is refused; unset, only the quote's signature
# chain up to Intel's root is checked.
# collateral_cache = "tdx-cache"
# Fetch missing collateral from Intel's provisioning service into collateral_cache.
pcs = false

# [tpm]
# CA certificates (PEM) trusted to vouch for TPMs' endorsement keys. A guest
# whose EK certificate chains to one proves its fresh AK by credential
# activation during the handshake; its claims then carry ek_ca, the SHA-256 of
# the CA certificate, which a tpm workload registers instead of one AK. For
# cwrun's software TPMs: the run host's vTPM CA (` + "`cwrun run --vtpm-ca`" + `).
# ek_ca = ["/var/lib/cwrun/vtpm-ca/issuercert.pem"]
# Refuse tpm evidence without the firmware event log (kernel, initrd and
# command line digests).
# require_eventlog = false
`
}
