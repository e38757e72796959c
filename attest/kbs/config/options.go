package config

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strings"

	"github.com/cwrun/cwrun/attest"
	"github.com/cwrun/cwrun/attest/kbs"
	"github.com/cwrun/cwrun/attest/kbs/store/storeurl"
	"github.com/cwrun/cwrun/attest/sample"
	"github.com/cwrun/cwrun/attest/snp"
	tdxv "github.com/cwrun/cwrun/attest/tdx"
	"github.com/google/go-sev-guest/verify/trust"
	tdxtrust "github.com/google/go-tdx-guest/verify/trust"
	"github.com/prometheus/client_golang/prometheus"
)

// Options opens the store and builds the verifiers the configuration
// names, and returns the broker's options and what closes the store.
// Call Validate (Load does) first.
func (c *Config) Options(ctx context.Context, logger *slog.Logger, reg prometheus.Registerer) (kbs.Options, io.Closer, error) {
	if c.keys == nil {
		if err := c.Validate(); err != nil {
			return kbs.Options{}, nil, err
		}
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	verifiers, err := c.verifiers(logger)
	if err != nil {
		return kbs.Options{}, nil, err
	}
	st, err := storeurl.Open(ctx, c.Store)
	if err != nil {
		return kbs.Options{}, nil, fmt.Errorf("store %s: %w", RedactURL(c.Store), err)
	}
	return kbs.Options{
		Store:              st,
		Verifiers:          verifiers,
		TokenKey:           c.keys.token,
		CookieKey:          c.keys.cookie,
		AtRestKey:          c.keys.atRest,
		PreviousCookieKeys: c.keys.prevCookie,
		PreviousAtRestKeys: c.keys.prevAtRest,
		AdminKeys:          c.keys.admin,
		AllowRegister:      c.AllowRegister,
		SessionTTL:         c.SessionTTL.Duration,
		TokenTTL:           c.TokenTTL.Duration,
		Admission:          c.Admission == nil || *c.Admission,
		AdmitWait:          c.AdmissionWait.Duration,
		Logger:             logger,
		Metrics:            reg,
	}, st, nil
}

func (c *Config) verifiers(logger *slog.Logger) ([]attest.Verifier, error) {
	var out []attest.Verifier
	for _, t := range c.Served() {
		var v attest.Verifier
		var err error
		switch t {
		case attest.TeeSample:
			v = sample.NewVerifier()
		case attest.TeeSNP:
			v, err = c.snpVerifier(logger)
		case attest.TeeTDX:
			v, err = c.tdxVerifier(logger)
		case attest.TeeTPM:
			v, err = c.tpmVerifier()
		default:
			err = errors.New("no verifier in this build")
		}
		if err != nil {
			return nil, fmt.Errorf("tees: %s verifier: %w", t, err)
		}
		out = append(out, v)
	}
	return out, nil
}

func (c *Config) snpVerifier(logger *slog.Logger) (attest.Verifier, error) {
	o := snp.Options{CacheDir: c.SNP.VCEKCache, Logger: logger.With("tee", "snp")}
	if o.CacheDir != "" {
		// Made here rather than by init so that a config written by hand
		// needs no mkdir either.
		if err := os.MkdirAll(o.CacheDir, 0o700); err != nil {
			return nil, fmt.Errorf("snp.vcek_cache: %w", err)
		}
	}
	if c.SNP.KDS {
		o.Getter = trust.DefaultHTTPSGetter()
	}
	return snp.NewVerifier(o)
}

func (c *Config) tdxVerifier(logger *slog.Logger) (attest.Verifier, error) {
	o := tdxv.Options{CacheDir: c.TDX.CollateralCache, Logger: logger.With("tee", "tdx")}
	if o.CacheDir != "" {
		if err := os.MkdirAll(o.CacheDir, 0o700); err != nil {
			return nil, fmt.Errorf("tdx.collateral_cache: %w", err)
		}
	}
	if c.TDX.PCS {
		if o.CacheDir == "" {
			// Every quote would ask Intel again: refuse rather than be slow.
			return nil, errors.New("tdx.pcs = true needs tdx.collateral_cache, a folder to keep what Intel's PCS answers")
		}
		o.Getter = tdxtrust.DefaultHTTPSGetter()
	}
	return tdxv.NewVerifier(o)
}

// RedactURL hides a store URL's password, in its user part or its
// query, for logs and errors.
func RedactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		if strings.Contains(s, "password") {
			return "(a store URL holding a password)"
		}
		return s
	}
	if q := u.Query(); q.Has("password") {
		q.Set("password", "xxxxx")
		u.RawQuery = q.Encode()
	}
	return u.Redacted()
}
