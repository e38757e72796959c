package config

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
)

// initDir runs Init into a fresh folder and returns it.
func initDir(t *testing.T, o InitOptions) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "kbs")
	if _, err := Init(dir, o); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestInitLoadRoundTrip(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: ":9443", Hosts: []string{"kbs.example", "192.0.2.7"}})
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != ":9443" {
		t.Errorf("listen = %q, want :9443", c.Listen)
	}
	if want := "sqlite://" + filepath.Join(dir, "kbs.db"); c.Store != want {
		t.Errorf("store = %q, want %q", c.Store, want)
	}
	for field, got := range map[string]string{
		"tls_cert": c.TLSCert, "tls_key": c.TLSKey, "token_key": c.TokenKey, "secrets_key": c.SecretsKey,
		"snp.vcek_cache": c.SNP.VCEKCache,
	} {
		if !filepath.IsAbs(got) || filepath.Dir(got) != dir {
			t.Errorf("%s = %q, want a path in %s", field, got, dir)
		}
	}
	if len(c.AdminKeys) != 1 || c.AdminKeys[0] != filepath.Join(dir, AdminPubFile) {
		t.Errorf("admin_keys = %q", c.AdminKeys)
	}
	if !slices.Equal(c.Served(), []string{"snp", "tdx"}) {
		t.Errorf("tees = %q, want snp, tdx (sample only when named)", c.Served())
	}
	if c.AllowRegister {
		t.Error("allow_register on by default")
	}
	if c.SNP.KDS || c.TDX.PCS || c.TDX.CollateralCache != "" {
		t.Errorf("network fetches or collateral checks on by default: %+v %+v", c.SNP, c.TDX)
	}
	k := c.keys
	if k.token == nil || k.token.Curve != elliptic.P256() {
		t.Fatal("token key not read as P-256")
	}
	if len(k.cookie) != 32 || len(k.atRest) != 32 || string(k.cookie) == string(k.atRest) {
		t.Errorf("derived keys: cookie %x at-rest %x: want two distinct 32-byte keys", k.cookie, k.atRest)
	}
	if len(k.admin) != 1 {
		t.Fatalf("admin keys: %d, want 1", len(k.admin))
	}
	// admin.key's public half is what admin.pub holds.
	priv, err := ReadPrivateKey(filepath.Join(dir, AdminKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if !priv.Public().(ed25519.PublicKey).Equal(k.admin[0]) {
		t.Error("admin.pub is not admin.key's public key")
	}

	// Modes: the folder 0700, secrets 0600.
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Errorf("folder mode %04o, want 0700", fi.Mode().Perm())
	}
	for _, n := range []string{TokenKeyFile, SecretsKeyFile, AdminKeyFile, TLSKeyFile} {
		fi, err := os.Stat(filepath.Join(dir, n))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %04o, want 0600", n, fi.Mode().Perm())
		}
	}

	// The certificate names every host and lasts a year.
	b, _ := os.ReadFile(c.TLSCert)
	blk, _ := pem.Decode(b)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	for _, h := range []string{"localhost", host, "kbs.example"} {
		if err := cert.VerifyHostname(h); err != nil {
			t.Errorf("certificate: %v", err)
		}
	}
	for _, ip := range []string{"127.0.0.1", "::1", "192.0.2.7"} {
		if !slices.ContainsFunc(cert.IPAddresses, func(a net.IP) bool { return a.Equal(net.ParseIP(ip)) }) {
			t.Errorf("certificate lacks IP %s: %v", ip, cert.IPAddresses)
		}
	}
	if d := cert.NotAfter.Sub(time.Now()); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("certificate valid for %s more, want about a year", d)
	}
	if _, ok := cert.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("certificate key %T, want ECDSA", cert.PublicKey)
	}
	// Clients trust it directly.
	pool, err := CertPool(c.TLSCert)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, DNSName: "localhost"}); err != nil {
		t.Errorf("self-signed certificate does not verify against itself: %v", err)
	}
}

func TestInitNeverOverwrites(t *testing.T) {
	dir := initDir(t, InitOptions{})
	before, _ := os.ReadFile(filepath.Join(dir, SecretsKeyFile))
	_, err := Init(dir, InitOptions{})
	if err == nil || !strings.Contains(err.Error(), "--force") || !strings.Contains(err.Error(), SecretsKeyFile) {
		t.Fatalf("second init: %v, want a refusal naming the files and --force", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, SecretsKeyFile))
	if string(before) != string(after) {
		t.Fatal("a refused init changed secrets.key")
	}
	// One existing file is enough to refuse, and nothing else gets written.
	dir2 := filepath.Join(t.TempDir(), "k")
	os.MkdirAll(dir2, 0o700)
	os.WriteFile(filepath.Join(dir2, TLSCertFile), []byte("mine"), 0o644)
	if _, err := Init(dir2, InitOptions{}); err == nil {
		t.Fatal("init over an existing tls.crt succeeded")
	}
	if ents, _ := os.ReadDir(dir2); len(ents) != 1 {
		t.Errorf("refused init left %d files, want only the one that was there", len(ents))
	}

	files, err := Init(dir, InitOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 9 {
		t.Errorf("forced init wrote %d files, want 9", len(files))
	}
	after, _ = os.ReadFile(filepath.Join(dir, SecretsKeyFile))
	if string(before) == string(after) {
		t.Error("--force kept the old secrets.key")
	}
	if _, err := Load(filepath.Join(dir, FileName)); err != nil {
		t.Fatalf("config after --force: %v", err)
	}
}

func TestInitBadOptions(t *testing.T) {
	for _, o := range []InitOptions{
		{Listen: "8443"},
		{Listen: `a"b:1`},
		{Hosts: []string{"has space"}},
		{Hosts: []string{"http://x"}},
	} {
		dir := filepath.Join(t.TempDir(), "k")
		if _, err := Init(dir, o); err == nil {
			t.Errorf("Init(%+v) succeeded", o)
		}
		if _, err := os.Stat(dir); err == nil {
			t.Errorf("Init(%+v) failed but made %s", o, dir)
		}
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name   string
		modify func(t *testing.T, dir string) // changes an Init'ed folder
		want   []string                       // substrings of the error
	}{
		{"missing file", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, FileName)) },
			[]string{"does not exist", "cwrun kbs init"}},
		{"unknown keys", func(t *testing.T, dir string) {
			replaceConfig(t, dir, "allow_register = false", "allow_register = false\nlisen = \"x\"")
			replaceConfig(t, dir, "kds = false", "kds = false\nkds_url = \"y\"")
		}, []string{"unknown keys", "lisen", "snp.kds_url"}},
		{"syntax", func(t *testing.T, dir string) { appendConfig(t, dir, "listen = \n") },
			[]string{"line"}},
		{"token key group-readable", func(t *testing.T, dir string) { os.Chmod(filepath.Join(dir, TokenKeyFile), 0o640) },
			[]string{"token_key", "0640", "chmod 600 ", TokenKeyFile}},
		{"secrets key world-readable", func(t *testing.T, dir string) { os.Chmod(filepath.Join(dir, SecretsKeyFile), 0o644) },
			[]string{"secrets_key", "0644", "chmod 600"}},
		{"tls key readable", func(t *testing.T, dir string) { os.Chmod(filepath.Join(dir, TLSKeyFile), 0o604) },
			[]string{"tls_cert/tls_key", "chmod 600"}},
		{"secrets key short", func(t *testing.T, dir string) { writeKeyFile(t, dir, SecretsKeyFile, "abcd\n") },
			[]string{"secrets_key", "32 bytes"}},
		{"token key wrong type", func(t *testing.T, dir string) {
			_, priv, _ := ed25519.GenerateKey(rand.Reader)
			p, _ := privatePEM(priv)
			writeKeyFile(t, dir, TokenKeyFile, string(p))
		}, []string{"token_key", "P-256"}},
		{"token key P-384", func(t *testing.T, dir string) {
			k, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
			p, _ := privatePEM(k)
			writeKeyFile(t, dir, TokenKeyFile, string(p))
		}, []string{"token_key", "P-256"}},
		{"admin key is private", func(t *testing.T, dir string) {
			b, _ := os.ReadFile(filepath.Join(dir, AdminKeyFile))
			os.WriteFile(filepath.Join(dir, AdminPubFile), b, 0o644)
		}, []string{"admin_keys", "private key"}},
		{"tls pair mismatch", func(t *testing.T, dir string) {
			_, k, _ := selfSigned([]string{"localhost"}, time.Now())
			writeKeyFile(t, dir, TLSKeyFile, string(k))
		}, []string{"tls_cert/tls_key"}},
		{"bad listen", func(t *testing.T, dir string) {
			replaceConfig(t, dir, `listen = "127.0.0.1:8443"`, `listen = "nowhere"`)
		},
			[]string{"listen", "host:port"}},
		{"bad tee", func(t *testing.T, dir string) {
			replaceConfig(t, dir, `tees = ["snp", "tdx"]`, `tees = ["snp", "sgx"]`)
		},
			[]string{"tees", "sgx"}},
		{"bad duration", func(t *testing.T, dir string) {
			replaceConfig(t, dir, `# session_ttl = "5m"`, `session_ttl = "5 minutes"`)
		},
			[]string{"session_ttl", "duration"}},
		{"gc_percent out of range", func(t *testing.T, dir string) {
			replaceConfig(t, dir, `# gc_percent = 400`, `gc_percent = -1`)
		},
			[]string{"gc_percent", "10 to 10000"}},
		{"tls half", func(t *testing.T, dir string) { replaceConfig(t, dir, `tls_key = "tls.key"`, ``) },
			[]string{"tls_cert/tls_key", "both or neither"}},
		{"no store", func(t *testing.T, dir string) { replaceConfig(t, dir, `store = "sqlite:kbs.db"`, ``) },
			[]string{"store", "missing"}},
		{"several at once", func(t *testing.T, dir string) {
			replaceConfig(t, dir, `store = "sqlite:kbs.db"`, ``)
			os.Chmod(filepath.Join(dir, TokenKeyFile), 0o644)
		}, []string{"store", "token_key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := initDir(t, InitOptions{})
			tt.modify(t, dir)
			_, err := Load(filepath.Join(dir, FileName))
			if err == nil {
				t.Fatal("Load succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestLoadSettings(t *testing.T) {
	dir := initDir(t, InitOptions{})
	secret := make([]byte, 32)
	rand.Read(secret)
	// A base64 secret and an absolute postgres store; tees normalised.
	writeKeyFile(t, dir, SecretsKeyFile, base64.StdEncoding.EncodeToString(secret))
	replaceConfig(t, dir, `store = "sqlite:kbs.db"`, `store = "postgres://kbs:pw@db/kbs"`)
	replaceConfig(t, dir, `tees = ["snp", "tdx"]`, `tees = ["Sample", "tdx", "sample"]`)
	replaceConfig(t, dir, `# token_ttl = "5m"`, `token_ttl = "90s"`)
	replaceConfig(t, dir, `allow_register = false`, `allow_register = true`)
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	if c.GOGC() != kbs.DefaultGCPercent {
		t.Errorf("GOGC() = %d with gc_percent unset, want %d", c.GOGC(), kbs.DefaultGCPercent)
	}
	replaceConfig(t, dir, `# gc_percent = 400`, `gc_percent = 150`)
	if c, err := Load(filepath.Join(dir, FileName)); err != nil {
		t.Errorf("gc_percent = 150: %v", err)
	} else if c.GOGC() != 150 {
		t.Errorf("gc_percent = 150: GOGC() = %d", c.GOGC())
	}
	if c.Store != "postgres://kbs:pw@db/kbs" {
		t.Errorf("store = %q", c.Store)
	}
	if !slices.Equal(c.Served(), []string{"sample", "tdx"}) {
		t.Errorf("tees = %q", c.Served())
	}
	if c.TokenTTL.Duration != 90*time.Second || c.SessionTTL.Duration != 0 {
		t.Errorf("ttls = %s, %s", c.TokenTTL, c.SessionTTL)
	}
	if !c.AllowRegister {
		t.Error("allow_register = true not read")
	}
	// The same secret derives the same keys, in any encoding.
	cookie, atRest, _ := deriveKeys(secret)
	if string(c.keys.cookie) != string(cookie) || string(c.keys.atRest) != string(atRest) {
		t.Error("base64 secret derives other keys than the raw bytes")
	}
}

// Two brokers sharing secrets.key must derive the same keys; the
// derivation is pinned so that a change cannot silently orphan data.
func TestDeriveKeysPinned(t *testing.T) {
	secret := make([]byte, 32)
	for i := range secret {
		secret[i] = byte(i)
	}
	cookie, atRest, err := deriveKeys(secret)
	if err != nil {
		t.Fatal(err)
	}
	golden, err := os.ReadFile("testdata/derived-keys.golden")
	if err != nil {
		t.Fatal(err)
	}
	got := "cookie " + hexs(cookie) + "\nat-rest " + hexs(atRest) + "\n"
	if got != string(golden) {
		t.Errorf("derived keys changed:\n%s\nwant:\n%s", got, golden)
	}
}

func hexs(b []byte) string {
	const digits = "0123456789abcdef"
	var s strings.Builder
	for _, c := range b {
		s.WriteByte(digits[c>>4])
		s.WriteByte(digits[c&15])
	}
	return s.String()
}

func TestResolveStore(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"kbs.db", "sqlite:///etc/k/kbs.db"},
		{"sqlite:kbs.db", "sqlite:///etc/k/kbs.db"},
		{"sqlite:sub/kbs.db", "sqlite:///etc/k/sub/kbs.db"},
		{"sqlite:///var/lib/kbs.db", "sqlite:///var/lib/kbs.db"},
		{"sqlite:/var/lib/kbs.db", "sqlite:///var/lib/kbs.db"},
		{"/var/lib/kbs.db", "sqlite:///var/lib/kbs.db"},
		{"postgres://u@h/db", "postgres://u@h/db"},
		{"postgresql://u@h/db?sslmode=disable", "postgresql://u@h/db?sslmode=disable"},
		{"", ""},
	} {
		if got := ResolveStore(tt.in, "/etc/k"); got != tt.want {
			t.Errorf("ResolveStore(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestReadPublicKeysSeveral(t *testing.T) {
	dir := t.TempDir()
	_, e1, _ := ed25519.GenerateKey(rand.Reader)
	k2, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p1, _ := publicPEM(e1.Public())
	p2, _ := publicPEM(&k2.PublicKey)
	p := filepath.Join(dir, "admins.pub")
	os.WriteFile(p, append(p1, p2...), 0o644)
	keys, err := ReadPublicKeys(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Fatalf("%d keys, want 2", len(keys))
	}
	os.WriteFile(p, []byte("not pem"), 0o644)
	if _, err := ReadPublicKeys(p); err == nil {
		t.Error("a file without PEM read as keys")
	}
}

func appendConfig(t *testing.T, dir, s string) {
	t.Helper()
	p := filepath.Join(dir, FileName)
	b, _ := os.ReadFile(p)
	if err := os.WriteFile(p, append(b, s...), 0o644); err != nil {
		t.Fatal(err)
	}
}

func replaceConfig(t *testing.T, dir, old, new string) {
	t.Helper()
	p := filepath.Join(dir, FileName)
	b, _ := os.ReadFile(p)
	if !strings.Contains(string(b), old) {
		t.Fatalf("config lacks %q", old)
	}
	if err := os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}

func writeKeyFile(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}
