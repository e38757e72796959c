package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cwrun/cwrun/attest/kbs"
)

// DefaultDir is where `cwrun kbs init` writes and the admin verbs look
// for admin.key and ca.crt: /etc/cwrun/kbs for root, else
// $XDG_CONFIG_HOME/cwrun/kbs (~/.config/cwrun/kbs).
func DefaultDir() string {
	if os.Geteuid() == 0 {
		return "/etc/cwrun/kbs"
	}
	if x := os.Getenv("XDG_CONFIG_HOME"); x != "" {
		return filepath.Join(x, "cwrun", "kbs")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".config", "cwrun", "kbs")
	}
	return filepath.Join(".config", "cwrun", "kbs")
}

// ClientOptions say how the admin CLI reaches a broker.
type ClientOptions struct {
	// URL is the broker's base URL ("https://kbs:8443"). Empty: derived
	// from Dir's config.toml (its listen address, on localhost when it
	// listens on every address).
	URL string
	// AdminKey is the PEM private key whose tokens the broker's
	// admin_keys trust. Empty: Dir's admin.key.
	AdminKey string
	// CACert is a PEM certificate to trust for the broker's TLS. Empty:
	// Dir's ca.crt when it exists, else its tls.crt (a broker set up
	// before init made a CA), else the system's roots.
	CACert string
	// Dir is the broker's config folder; default DefaultDir().
	Dir string
}

// NewAdminClient makes an admin API client from files.
func NewAdminClient(o ClientOptions) (*kbs.AdminClient, error) {
	if o.Dir == "" {
		o.Dir = DefaultDir()
	}
	if o.URL == "" {
		u, err := URLFromDir(o.Dir)
		if err != nil {
			return nil, err
		}
		o.URL = u
	}
	u, err := url.Parse(o.URL)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("broker URL %q: want https://HOST:PORT", o.URL)
	}
	if o.AdminKey == "" {
		o.AdminKey = filepath.Join(o.Dir, AdminKeyFile)
	}
	key, err := ReadPrivateKey(o.AdminKey)
	if err != nil {
		return nil, fmt.Errorf("admin key: %w (pass --admin-key or set CWRUN_KBS_ADMIN_KEY)", err)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	for _, name := range []string{CACertFile, TLSCertFile} {
		if p := filepath.Join(o.Dir, name); o.CACert == "" && fileExists(p) {
			o.CACert = p
		}
	}
	if o.CACert != "" {
		pool, err := CertPool(o.CACert)
		if err != nil {
			return nil, err
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &kbs.AdminClient{
		BaseURL: strings.TrimSuffix(o.URL, "/"),
		HTTP:    &http.Client{Transport: tr, Timeout: time.Minute},
		Key:     key,
	}, nil
}

// URLFromDir derives a broker URL from the listen address in dir's
// config.toml.
func URLFromDir(dir string) (string, error) {
	p := filepath.Join(dir, FileName)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("which broker? pass --kbs URL or set CWRUN_KBS_URL (no %s to read the address from)", p)
	}
	if err != nil {
		return "", err
	}
	c, err := Parse(b, dir)
	if err != nil {
		return "", fmt.Errorf("%s: %w", p, err)
	}
	return ListenURL(c.Listen, c.TLSCert != ""), nil
}

// ListenURL is the URL a client on this machine uses to reach a broker
// listening on listen: a wildcard host becomes localhost.
func ListenURL(listen string, useTLS bool) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return ""
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "localhost"
	}
	scheme := "https"
	if !useTLS {
		scheme = "http"
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

func fileExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}
