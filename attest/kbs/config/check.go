package config

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs/store/postgres"
	"github.com/cwrun/cwrun/attest/kbs/store/sqlite"
	"github.com/cwrun/cwrun/attest/kbs/store/storeurl"
)

// Level grades a Finding.
type Level int

// The levels of a Finding, least first.
const (
	OK   Level = iota
	Note       // worth knowing, nothing to do
	Warn       // serve runs, but something needs doing or is unsafe
	Fail       // serve would refuse to start, or the broker would not work
)

func (l Level) String() string {
	return [...]string{"ok", "note", "warn", "FAIL"}[l]
}

// A Finding is one thing Check found about one part of a broker.
type Finding struct {
	Level Level
	Part  string // "config", "listen", "tls", "store", "tees", "admin"
	Text  string
}

// Check looks over the broker that the config file at path describes,
// as `cwrun kbs serve` would start it, without starting it and without
// changing anything: the file and the key files it names (their modes
// included), the listen address, the TLS certificate (names, end,
// issuer) and the CA key's mode, the store (reached and its schema read, never made or
// migrated), the TEEs served and the admin keys. It is safe to run
// beside a running broker.
func Check(ctx context.Context, path string, now time.Time) []Finding {
	var out []Finding
	add := func(l Level, part, format string, args ...any) {
		out = append(out, Finding{l, part, fmt.Sprintf(format, args...)})
	}
	c, err := Read(path)
	if err != nil {
		add(Fail, "config", "%v", err)
		return out
	}
	valid := c.Validate()
	var fe fieldErrors
	switch {
	case errors.As(valid, &fe):
		for _, e := range fe {
			add(Fail, "config", "%v", e)
		}
	case valid != nil:
		add(Fail, "config", "%v", valid)
	default:
		add(OK, "config", "%s: the key files load and only their owner can read them", path)
	}
	if sf, err := ReadSecretsFile(path); err == nil && sf.Previous > 0 {
		add(Note, "config", "secrets_key holds %d earlier key(s) after the current one (a rotation in progress): once every broker runs with this file, `cwrun kbs reseal`, then `cwrun kbs rotate-secrets --drop-previous`", sf.Previous)
	}
	c.checkListen(add)
	c.checkTLS(add, now)
	c.checkStore(ctx, add)
	for _, t := range c.Served() {
		if t == attest.TeeSample {
			add(Warn, "tees", "sample is served: its evidence proves nothing, any host gets a sample workload's key")
		}
	}
	add(OK, "tees", "serves %s", strings.Join(c.Served(), ", "))
	if c.AllowRegister {
		add(Warn, "admin", "allow_register is on: anyone who reaches the broker may register a new workload (krun's register_workload; it never overwrites)")
	}
	if len(c.AdminKeys) == 0 {
		add(Warn, "admin", "no admin_keys: the admin API refuses every call")
	} else {
		add(OK, "admin", "%d admin key file(s)", len(c.AdminKeys))
	}
	return out
}

type addFunc func(l Level, part, format string, args ...any)

// checkListen tries the listen address: free, in use (by this broker,
// most likely), or refused.
func (c *Config) checkListen(add addFunc) {
	if c.Listen == "" {
		return // Validate said so
	}
	l, err := net.Listen("tcp", c.Listen)
	switch {
	case err == nil:
		l.Close()
		add(OK, "listen", "%s is free", c.Listen)
	case errors.Is(err, syscall.EADDRINUSE):
		add(Note, "listen", "%s is in use: by this broker, if it runs; otherwise stop what holds it", c.Listen)
	default:
		add(Fail, "listen", "%s: %v", c.Listen, err)
	}
}

// checkTLS reports the certificate's names, end and issuer.
func (c *Config) checkTLS(add addFunc, now time.Time) {
	if c.TLSCert == "" {
		add(Fail, "tls", "no tls_cert/tls_key: serve refuses to start without --insecure-http")
		return
	}
	chain, err := readCerts(c.TLSCert)
	if err != nil {
		add(Fail, "tls", "%v", err)
		return
	}
	leaf := chain[0]
	names := CertNames(leaf)
	switch left := leaf.NotAfter.Sub(now); {
	case left <= 0:
		add(Fail, "tls", "%s ended on %s: clients refuse the broker; renew it (init's: cwrun kbs renew-tls)", c.TLSCert, day(leaf.NotAfter))
	case left < expiryWarning:
		add(Warn, "tls", "%s ends on %s, in %d days: renew it (init's: cwrun kbs renew-tls)", c.TLSCert, day(leaf.NotAfter), int(left.Hours()/24))
	default:
		add(OK, "tls", "%s for %s, until %s", c.TLSCert, strings.Join(names, ", "), day(leaf.NotAfter))
	}
	// The CA's key is renew-tls's alone, but whoever reads it can make
	// certificates that every client of the broker trusts.
	if caKey := filepath.Join(c.Dir, CAKeyFile); fileExists(caKey) {
		if err := checkPrivate(caKey); err != nil {
			add(Fail, "tls", "%v", err)
		}
	}
	caFile := filepath.Join(c.Dir, CACertFile)
	cas, caErr := readCerts(caFile)
	switch {
	case signsItself(leaf):
		add(Note, "tls", "the certificate signs itself: cwrun kbs renew-tls moves the broker to a CA of its own, whose %s the clients then need once, and never again for renewals", CACertFile)
	case caErr == nil && leaf.CheckSignatureFrom(cas[0]) == nil:
		if left := cas[0].NotAfter.Sub(now); left < expiryWarning {
			add(Warn, "tls", "issued by the broker's CA, %s, which ends on %s: cwrun kbs renew-tls --new-ca makes a new one (clients then need it)", caFile, day(cas[0].NotAfter))
		} else {
			add(OK, "tls", "issued by the broker's CA, %s (until %s): clients trust that file", caFile, day(cas[0].NotAfter))
		}
	default:
		add(Note, "tls", "issued by %q: clients trust that CA; renew the certificate with it", leaf.Issuer.String())
	}
}

// checkStore reaches the store without opening it as a broker does: a
// SQLite file is looked at, a PostgreSQL database's schema version read.
func (c *Config) checkStore(ctx context.Context, add addFunc) {
	kind, arg, err := storeurl.Parse(c.Store)
	if err != nil {
		return // Validate said so
	}
	switch kind {
	case storeurl.Postgres:
		ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		v, err := postgres.SchemaOf(ctx, arg)
		switch {
		case err != nil:
			add(Fail, "store", "%v", err)
		case v == 0:
			add(Note, "store", "%s answers and holds no broker schema yet: serve makes it", RedactURL(c.Store))
		case v < postgres.SchemaVersion():
			add(Note, "store", "%s answers, schema %d: serve migrates it to %d (every broker sharing it must then be this version or newer)", RedactURL(c.Store), v, postgres.SchemaVersion())
		case v > postgres.SchemaVersion():
			add(Fail, "store", "%s has schema %d, newer than this cwrun knows (%d): upgrade cwrun", RedactURL(c.Store), v, postgres.SchemaVersion())
		default:
			add(OK, "store", "%s answers, schema %d", RedactURL(c.Store), v)
		}
	default:
		fi, err := os.Stat(arg)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if _, derr := os.Stat(filepath.Dir(arg)); derr != nil {
				add(Fail, "store", "%s cannot be made: %v", arg, derr)
			} else {
				add(Note, "store", "%s does not exist yet: serve makes it", arg)
			}
			return
		case err != nil:
			add(Fail, "store", "%v", err)
			return
		case !fi.Mode().IsRegular():
			add(Fail, "store", "%s is not a file", arg)
			return
		}
		on, err := sqlite.Serving(arg)
		switch {
		case err != nil:
			add(Fail, "store", "%v", err)
		case on:
			add(Note, "store", "%s (%d KiB): a broker serves from it now; a second one on the same file is refused", arg, fi.Size()>>10)
		default:
			add(OK, "store", "%s (%d KiB)", arg, fi.Size()>>10)
		}
	}
}

func day(t time.Time) string { return t.UTC().Format("2006-01-02") }
