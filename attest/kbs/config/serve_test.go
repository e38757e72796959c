package config

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
)

// serve runs c.Serve in the background and returns the broker's URL and
// a stop function that returns Serve's result.
func serve(t *testing.T, c *Config, o ServeOptions) (string, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	addrc := make(chan net.Addr, 1)
	o.Ready = func(a net.Addr) { addrc <- a }
	done := make(chan error, 1)
	go func() { done <- c.Serve(ctx, o) }()
	var url string
	select {
	case a := <-addrc:
		url = ListenURL(a.String(), c.TLSCert != "")
		url = strings.Replace(url, "127.0.0.1", "localhost", 1)
	case err := <-done:
		cancel()
		t.Fatalf("Serve: %v", err)
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatal("Serve did not listen in 10 s")
	}
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(15 * time.Second):
			return errors.New("Serve did not return 15 s after its context ended")
		}
	}
	t.Cleanup(func() { stop() })
	return url, stop
}

func TestServeAdminRoundTrip(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	c.TEEs = []string{"sample", "snp"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	url, stop := serve(t, c, ServeOptions{})
	if !strings.HasPrefix(url, "https://localhost:") {
		t.Fatalf("url %s", url)
	}
	// The admin client finds the key and the certificate in the folder.
	ac, err := NewAdminClient(ClientOptions{URL: url, Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := ac.AddWorkload(ctx, kbs.WorkloadSpec{ID: "w", Tee: "snp", Passphrase: "p", References: map[string][]string{"measurement": {strings.Repeat("a", 96)}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ac.AddWorkload(ctx, kbs.WorkloadSpec{ID: "w", Tee: "snp", Passphrase: "p", References: map[string][]string{"measurement": {strings.Repeat("a", 96)}}}); !errors.Is(err, kbs.ErrExists) {
		t.Fatalf("second add: %v, want ErrExists", err)
	}
	// Without the certificate, TLS fails: the broker is not trusted by default.
	noCA, err := NewAdminClient(ClientOptions{URL: url, Dir: t.TempDir(), AdminKey: filepath.Join(dir, AdminKeyFile)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := noCA.Workloads(ctx); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("client without the broker's certificate: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	// The store was closed and kept the workload: a second broker sees it.
	url, stop = serve(t, c, ServeOptions{})
	ac.BaseURL = url
	ws, err := ac.Workloads(ctx)
	if err != nil || len(ws) != 1 || ws[0].ID != "w" {
		t.Fatalf("after restart: %v %+v", err, ws)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestServeNeedsTLSOrInsecure(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: "127.0.0.1:0"})
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	c.TEEs = []string{"snp"}
	c.TLSCert, c.TLSKey = "", ""
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	err = c.Serve(context.Background(), ServeOptions{})
	if err == nil || !strings.Contains(err.Error(), "--insecure-http") {
		t.Fatalf("Serve without TLS: %v, want a refusal naming --insecure-http", err)
	}
	url, stop := serve(t, c, ServeOptions{InsecureHTTP: true})
	if !strings.HasPrefix(url, "http://") {
		t.Fatalf("insecure url %s", url)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

func TestAdminClientDefaults(t *testing.T) {
	dir := initDir(t, InitOptions{Listen: ":8555"})
	ac, err := NewAdminClient(ClientOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if ac.BaseURL != "https://localhost:8555" {
		t.Errorf("BaseURL %q, want https://localhost:8555 (from the config's listen)", ac.BaseURL)
	}
	if ac.Key == nil {
		t.Error("no admin key")
	}
	// No config: the error says how to name the broker.
	if _, err := NewAdminClient(ClientOptions{Dir: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "--kbs") {
		t.Errorf("no config: %v", err)
	}
	// An admin key others can read is refused.
	os.Chmod(filepath.Join(dir, AdminKeyFile), 0o644)
	if _, err := NewAdminClient(ClientOptions{Dir: dir}); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("0644 admin key: %v", err)
	}
	if _, err := NewAdminClient(ClientOptions{Dir: dir, URL: "kbs:8443"}); err == nil {
		t.Error("a URL without scheme accepted")
	}
}

func TestListenURL(t *testing.T) {
	for _, tt := range []struct {
		listen string
		tls    bool
		want   string
	}{
		{":8443", true, "https://localhost:8443"},
		{"0.0.0.0:8443", true, "https://localhost:8443"},
		{"[::]:8443", false, "http://localhost:8443"},
		{"127.0.0.1:9", true, "https://127.0.0.1:9"},
		{"kbs.example:443", true, "https://kbs.example:443"},
		{"[::1]:8443", true, "https://[::1]:8443"},
		{"nonsense", true, ""},
	} {
		if got := ListenURL(tt.listen, tt.tls); got != tt.want {
			t.Errorf("ListenURL(%q, %v) = %q, want %q", tt.listen, tt.tls, got, tt.want)
		}
	}
}

func TestRedactURL(t *testing.T) {
	for _, tt := range []struct{ in, hidden string }{
		{"postgres://kbs:hunter2@db/kbs", "hunter2"},
		{"postgres://kbs@db/kbs?password=hunter2&sslmode=require", "hunter2"},
	} {
		got := RedactURL(tt.in)
		if strings.Contains(got, tt.hidden) {
			t.Errorf("RedactURL(%q) = %q: the password shows", tt.in, got)
		}
		if !strings.Contains(got, "db/kbs") {
			t.Errorf("RedactURL(%q) = %q: the rest is gone", tt.in, got)
		}
	}
	if got := RedactURL("sqlite:///var/lib/kbs.db"); got != "sqlite:///var/lib/kbs.db" {
		t.Errorf("a sqlite URL changed: %q", got)
	}
}

func TestOptionsVerifiers(t *testing.T) {
	dir := initDir(t, InitOptions{})
	c, err := Load(filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c.TEEs = []string{"tdx", "sample", "snp"}
	c.TDX.CollateralCache = filepath.Join(dir, "tdx-cache")
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	opts, st, err := c.Options(ctx, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var tees []string
	for _, v := range opts.Verifiers {
		tees = append(tees, v.Tee())
	}
	if strings.Join(tees, ",") != "sample,snp,tdx" {
		t.Errorf("verifiers for %q, want sample,snp,tdx", tees)
	}
	// The caches are made on first use, private.
	for _, d := range []string{c.SNP.VCEKCache, c.TDX.CollateralCache} {
		if fi, err := os.Stat(d); err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
			t.Errorf("cache %s: %v %v", d, fi, err)
		}
	}
	if opts.TokenKey == nil || len(opts.CookieKey) != 32 || len(opts.AtRestKey) != 32 || len(opts.AdminKeys) != 1 || opts.Store == nil {
		t.Errorf("options incomplete: %+v", opts)
	}
	// The broker accepts them as they are.
	if _, err := kbs.New(opts); err != nil {
		t.Fatalf("kbs.New: %v", err)
	}

	// PCS without a cache folder would ask Intel for every quote.
	c.TEEs = []string{"tdx"}
	c.TDX = TDX{PCS: true}
	if _, _, err := c.Options(ctx, nil, nil); err == nil || !strings.Contains(err.Error(), "collateral_cache") {
		t.Errorf("pcs without a cache: %v", err)
	}
}
