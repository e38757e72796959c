// Package config reads and writes the key broker's configuration: one
// TOML file an operator can read and edit, next to the key files it
// names. Load checks everything it can before the broker starts (every
// field, every key file, its mode), so that a mistake is reported once,
// with the field's name and what to do, instead of as a failed request
// later. Init makes a working configuration with fresh keys.
//
// The package never writes over an existing key unless asked to, and
// never reads a private key from a file others can read.
package config

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/store/storeurl"
)

// FileName is the configuration file Init writes in its folder.
const FileName = "config.toml"

// Config is the broker's configuration file, decoded. Relative paths in
// it are relative to the file's folder; Load makes them absolute.
type Config struct {
	// Listen is host:port to serve on, e.g. "127.0.0.1:8443" or ":8443".
	Listen string `toml:"listen"`
	// Store is where the broker keeps its state: "sqlite:PATH",
	// "sqlite:///abs/path", a bare path (SQLite), or "postgres://...".
	Store string `toml:"store"`
	// TLSCert and TLSKey are the server's PEM certificate chain and key.
	// Both empty: no TLS (serve refuses unless told --insecure-http).
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// TokenKey is a PEM P-256 private key that signs attestation tokens.
	TokenKey string `toml:"token_key"`
	// SecretsKey is a file holding 32 random bytes (hex or base64). The
	// cookie key and the at-rest key are derived from it with HKDF-SHA256
	// under distinct labels, so one file is all replicas must share.
	SecretsKey string `toml:"secrets_key"`
	// AdminKeys are PEM public keys (Ed25519 or ECDSA P-256) whose JWTs
	// the admin API accepts. None: the admin API refuses every call.
	AdminKeys []string `toml:"admin_keys"`
	// AllowRegister enables krun's unauthenticated register_workload.
	AllowRegister bool `toml:"allow_register"`
	// TEEs are the TEEs served ("sample", "snp", "tdx", "tpm"); evidence
	// from any other is refused at /auth. Default: snp and tdx. "sample"
	// proves nothing and must be named to be served.
	TEEs []string `toml:"tees"`
	// SessionTTL and TokenTTL: "5m", "90s"... Default 5 minutes each.
	SessionTTL Duration `toml:"session_ttl"`
	TokenTTL   Duration `toml:"token_ttl"`
	// GCPercent is the Go garbage collector's target (GOGC) that
	// `cwrun kbs serve` runs with, 10 to 10000. 0: kbs.DefaultGCPercent
	// (400). The GOGC environment variable, when set, wins.
	GCPercent int `toml:"gc_percent"`
	// Admission queues new handshakes first come, first served while
	// the broker is saturated (kbs.Options.Admission). Default on.
	Admission *bool `toml:"admission"`
	// AdmissionWait is the longest a guest waits in that queue before a
	// 503. Default kbs.DefaultAdmitWait (30 s).
	AdmissionWait Duration `toml:"admission_wait"`

	SNP SNP `toml:"snp"`
	TDX TDX `toml:"tdx"`
	TPM TPM `toml:"tpm"`

	// Dir is the folder of the file the config came from; relative
	// paths were resolved against it. Not in the file.
	Dir string `toml:"-"`

	keys *keys // what Validate read from the key files
}

// SNP configures the SEV-SNP verifier.
type SNP struct {
	// VCEKCache is a folder of VCEK certificates (and the AMD chains) the
	// verifier reads before asking AMD, and fills when KDS is on.
	VCEKCache string `toml:"vcek_cache"`
	// KDS allows fetching VCEKs from AMD's key server (rate-limited by
	// AMD to about one per 10 s per address). Off: only evidence that
	// carries its VCEK, or the cache, can be verified.
	KDS bool `toml:"kds"`
}

// TDX configures the TDX verifier.
type TDX struct {
	// CollateralCache is a folder of Intel PCS collateral (TCB info, QE
	// identity) read before asking Intel, and filled when PCS is on. Set
	// (or PCS on), every quote's TCB status is checked and a quote whose
	// collateral cannot be had is refused; unset, only the quote's
	// signature chain up to Intel's root is checked.
	CollateralCache string `toml:"collateral_cache"`
	// PCS allows fetching missing collateral from Intel's provisioning
	// service into CollateralCache (which it needs).
	PCS bool `toml:"pcs"`
}

// Duration is a time.Duration written as "5m" in TOML.
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration ("5m", "90s").
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (write \"5m\" or \"90s\")", b)
	}
	if v <= 0 {
		return fmt.Errorf("%q: a duration must be positive", b)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the Go form.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// knownTEEs are the TEEs a verifier can be built for.
var knownTEEs = []string{attest.TeeSample, attest.TeeSNP, attest.TeeTDX, attest.TeeTPM}

// DefaultTEEs are served when the file names none.
var DefaultTEEs = []string{attest.TeeSNP, attest.TeeTDX}

// Load reads the configuration at path, resolves its relative paths
// against its folder and validates it (Validate).
func Load(path string) (*Config, error) {
	c, err := Read(path)
	if err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("kbs config %s: %w", path, err)
	}
	return c, nil
}

// Read is Load without Validate, for callers that change fields first
// (serve's flags); they must call Validate before Options.
func Read(path string) (*Config, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("kbs config %s: %w", path, err)
	}
	b, err := os.ReadFile(abs)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("kbs config %s does not exist: run `cwrun kbs init` to make one, or pass --config", path)
	}
	if err != nil {
		return nil, fmt.Errorf("kbs config: %w", err)
	}
	c, err := Parse(b, filepath.Dir(abs))
	if err != nil {
		return nil, fmt.Errorf("kbs config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes a configuration and resolves its relative paths against
// dir. It refuses keys it does not know (a typo would otherwise silently
// leave a default in place). It does not read the files named: Validate
// does.
func Parse(b []byte, dir string) (*Config, error) {
	c := &Config{Dir: dir}
	md, err := toml.NewDecoder(bytes.NewReader(b)).Decode(c)
	if err != nil {
		return nil, err
	}
	if und := md.Undecoded(); len(und) > 0 {
		names := make([]string, len(und))
		for i, k := range und {
			names[i] = k.String()
		}
		sort.Strings(names)
		return nil, fmt.Errorf("unknown keys %s: check their spelling (the known keys are in the file `cwrun kbs init` writes)", strings.Join(names, ", "))
	}
	c.resolve()
	return c, nil
}

func (c *Config) resolve() {
	c.TLSCert = c.Path(c.TLSCert)
	c.TLSKey = c.Path(c.TLSKey)
	c.TokenKey = c.Path(c.TokenKey)
	c.SecretsKey = c.Path(c.SecretsKey)
	for i, k := range c.AdminKeys {
		c.AdminKeys[i] = c.Path(k)
	}
	c.SNP.VCEKCache = c.Path(c.SNP.VCEKCache)
	c.TDX.CollateralCache = c.Path(c.TDX.CollateralCache)
	for i, p := range c.TPM.EKCA {
		c.TPM.EKCA[i] = c.Path(p)
	}
	c.Store = ResolveStore(c.Store, c.Dir)
}

// Path makes p absolute against the config's folder; "" stays "".
func (c *Config) Path(p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(c.Dir, p)
}

// ResolveStore makes a SQLite store's relative path absolute against
// dir: "kbs.db" and "sqlite:kbs.db" become "sqlite:///<dir>/kbs.db".
// Other targets, and ones storeurl refuses, are left as they are
// (Validate names the problem).
func ResolveStore(s, dir string) string {
	kind, p, err := storeurl.Parse(s)
	if err != nil || kind != storeurl.SQLite {
		return s
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(dir, p)
	}
	return "sqlite://" + p
}

// Validate checks every field and reads the key files: the token key,
// the secrets key, the admin keys, and the TLS pair. Private keys in
// files that group or others may read are refused. Call it again after
// changing fields (serve's flags do).
func (c *Config) Validate() error {
	var errs []error
	bad := func(field string, err error) { errs = append(errs, fmt.Errorf("%s: %w", field, err)) }
	if c.Listen == "" {
		bad("listen", errors.New(`missing: give host:port, e.g. "127.0.0.1:8443" or ":8443"`))
	} else if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		bad("listen", fmt.Errorf("%q is not host:port (e.g. \"127.0.0.1:8443\" or \":8443\")", c.Listen))
	}
	if c.Store == "" {
		bad("store", errors.New(`missing: give "sqlite:kbs.db" (a file next to the config) or "postgres://user@host/db"`))
	} else if _, _, err := storeurl.Parse(c.Store); err != nil {
		bad("store", err)
	}
	tees, err := normTEEs(c.TEEs)
	if err != nil {
		bad("tees", err)
	}
	k := &keys{}
	if c.TokenKey == "" {
		bad("token_key", errors.New("missing: a PEM P-256 private key file (`cwrun kbs init` makes one)"))
	} else if k.token, err = readTokenKey(c.TokenKey); err != nil {
		bad("token_key", err)
	}
	if c.SecretsKey == "" {
		bad("secrets_key", errors.New("missing: a file of 32 random bytes in hex (`cwrun kbs init` makes one; `openssl rand -hex 32` does too)"))
	} else if secrets, err := readSecrets(c.SecretsKey); err != nil {
		bad("secrets_key", err)
	} else {
		// The first key seals; the rest (a rotation in progress) only
		// open what they sealed.
		for i, secret := range secrets {
			cookie, atRest, err := deriveKeys(secret)
			if err != nil {
				bad("secrets_key", err)
				break
			}
			if i == 0 {
				k.cookie, k.atRest = cookie, atRest
				if k.tpmCredential, err = hkdf.Key(sha256.New, secret, nil, tpmCredentialLabel, 32); err != nil {
					bad("secrets_key", err)
				}
			} else {
				k.prevCookie, k.prevAtRest = append(k.prevCookie, cookie), append(k.prevAtRest, atRest)
				cred, err := hkdf.Key(sha256.New, secret, nil, tpmCredentialLabel, 32)
				if err != nil {
					bad("secrets_key", err)
				}
				k.prevTpmCredential = append(k.prevTpmCredential, cred)
			}
			clear(secret)
		}
	}
	for _, p := range c.AdminKeys {
		pubs, err := ReadPublicKeys(p)
		if err != nil {
			bad("admin_keys", err)
			continue
		}
		k.admin = append(k.admin, pubs...)
	}
	switch {
	case (c.TLSCert == "") != (c.TLSKey == ""):
		bad("tls_cert/tls_key", errors.New("give both or neither"))
	case c.TLSCert != "":
		if err := checkTLS(c.TLSCert, c.TLSKey); err != nil {
			bad("tls_cert/tls_key", err)
		}
	}
	if c.GCPercent != 0 && (c.GCPercent < 10 || c.GCPercent > 10000) {
		bad("gc_percent", fmt.Errorf("%d is out of range: give 10 to 10000, or leave it out for %d", c.GCPercent, kbs.DefaultGCPercent))
	}
	if err := checkDirOrAbsent(c.SNP.VCEKCache); err != nil {
		bad("snp.vcek_cache", err)
	}
	if err := checkDirOrAbsent(c.TDX.CollateralCache); err != nil {
		bad("tdx.collateral_cache", err)
	}
	if _, err := readEKCAs(c.TPM.EKCA); err != nil {
		bad("tpm.ek_ca", err)
	}
	if len(errs) > 0 {
		return fieldErrors(errs)
	}
	c.TEEs = tees
	c.keys = k
	return nil
}

// GOGC is the garbage collector target to serve with: GCPercent, or
// kbs.DefaultGCPercent when unset.
func (c *Config) GOGC() int {
	if c.GCPercent == 0 {
		return kbs.DefaultGCPercent
	}
	return c.GCPercent
}

// Served reports the TEEs the broker serves, in a stable order.
func (c *Config) Served() []string {
	t, err := normTEEs(c.TEEs)
	if err != nil {
		return nil
	}
	return t
}

func normTEEs(in []string) ([]string, error) {
	if len(in) == 0 {
		return slices.Clone(DefaultTEEs), nil
	}
	var out []string
	for _, t := range in {
		t = strings.ToLower(strings.TrimSpace(t))
		if !slices.Contains(knownTEEs, t) {
			return nil, fmt.Errorf("%q is not a TEE cwrun verifies: want some of %s", t, strings.Join(knownTEEs, ", "))
		}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	sort.Strings(out)
	return out, nil
}

func checkDirOrAbsent(p string) error {
	if p == "" {
		return nil
	}
	fi, err := os.Stat(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil // made when first needed
	}
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a folder", p)
	}
	return nil
}

// keys is what Validate read from the key files.
type keys struct {
	token          *ecdsa.PrivateKey
	cookie, atRest []byte
	// prevCookie, prevAtRest and prevTpmCredential come from
	// secrets_key's later keys.
	prevCookie, prevAtRest, prevTpmCredential [][]byte
	tpmCredential                             []byte
	admin                                     []crypto.PublicKey
}

// HKDF labels: distinct so that the cookie key and the at-rest key are
// independent, versioned so that a future change of derivation cannot
// silently read old data with a wrong key.
const (
	cookieLabel = "cwrun-kbs cookie-key v1"
	atRestLabel = "cwrun-kbs at-rest-key v1"
)

func deriveKeys(secret []byte) (cookie, atRest []byte, err error) {
	if cookie, err = hkdf.Key(sha256.New, secret, nil, cookieLabel, 32); err != nil {
		return nil, nil, fmt.Errorf("deriving the cookie key: %w", err)
	}
	if atRest, err = hkdf.Key(sha256.New, secret, nil, atRestLabel, 32); err != nil {
		return nil, nil, fmt.Errorf("deriving the at-rest key: %w", err)
	}
	return cookie, atRest, nil
}

// fieldErrors are every problem Validate found, so that one run names
// them all.
type fieldErrors []error

func (e fieldErrors) Error() string {
	if len(e) == 1 {
		return e[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d problems:", len(e))
	for _, err := range e {
		b.WriteString("\n  - " + err.Error())
	}
	return b.String()
}

func (e fieldErrors) Unwrap() []error { return e }
